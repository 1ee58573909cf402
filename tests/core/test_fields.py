"""The per-image result registry: the host copy round trip, the containers and what derives from it."""

import math

import numpy as np
import pytest
import torch

from xal_engine.core import fields
from xal_engine.core.fields import (
    FIELDS,
    NAMES,
    REQUIRED,
    REQUIRED_NAMES,
    SCALAR,
    BatchScores,
    Layout,
    PerImage,
)
from xal_engine.jobs.select import CSV_FIELDS


def device_scores(b: int = 5, k: int = 3, seed: int = 0) -> BatchScores:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, k, generator=gen), dim=1)
    floats = {name: torch.randn(b, generator=gen) for name in
              ("entropy", "margin", "least_confidence", "dice", "soft_dice", "energy")}
    floats["dice"][1] = math.nan  # an image without an ROI
    return BatchScores(probs=probs, pred=probs.argmax(1), hit=torch.tensor([True, False, True, True, False]),
                       **floats)


def test_pack_unpack_gives_every_field_in_its_stored_dtype():
    s = device_scores()
    packed = fields.pack(s)
    assert packed.shape == (5, 8 + 3) and packed.dtype == torch.float32  # 8 scalar columns + K probs
    host = fields.unpack(packed.numpy())
    optional = ("cam", "bald", "mc_entropy", "variation_ratio", "embedding")  # only on request
    assert list(host) == list(REQUIRED_NAMES) == [n for n in NAMES if n not in optional]
    for f in REQUIRED:
        assert host[f.name].dtype == np.dtype(f.dtype), f.name
        assert host[f.name].shape == ((5, 3) if f.per_class else (5,)), f.name
    np.testing.assert_array_equal(host.pred, s.pred.numpy().astype(np.int16))
    np.testing.assert_array_equal(host.hit, s.hit.numpy())
    np.testing.assert_array_equal(host.entropy, s.entropy.numpy())  # fp32 columns are exact
    assert math.isnan(host.dice[1]) and not np.isnan(host.dice[[0, 2, 3, 4]]).any()
    np.testing.assert_array_equal(host.probs, s.probs.numpy().astype(np.float16))


def test_the_cam_travels_in_the_same_copy_when_present():
    s = device_scores()
    cam = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(1))  # N (B, h, w)
    with_cam = BatchScores(cam=cam, **s.as_dict())
    layout = Layout.of(with_cam)
    assert layout == Layout(n_classes=3, cam_shape=(3, 4)) and Layout.of(s) == Layout(n_classes=3)
    assert [f.name for f in layout.fields] == [*REQUIRED_NAMES, "cam"] and layout.tail(fields.BY_NAME["cam"]) == (3, 4)
    packed = fields.pack(with_cam)
    assert packed.shape == (5, 8 + 3 + 12)  # + h * w CAM columns
    host = fields.unpack(packed.numpy(), layout)
    assert host.cam.dtype == np.float16 and host.cam.shape == (5, 3, 4)
    np.testing.assert_array_equal(host.cam, cam.numpy().astype(np.float16))
    np.testing.assert_array_equal(host.probs, s.probs.numpy().astype(np.float16))  # columns unmoved
    np.testing.assert_array_equal(fields.pack(s).numpy(), packed[:, :11].numpy())
    assert host.rows(1, 3).cam.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="packed results have 23 columns"):
        fields.unpack(packed.numpy(), Layout(n_classes=3))


def test_rows_and_concat_are_inverse():
    host = fields.unpack(fields.pack(device_scores(seed=3)).numpy())
    parts = [host.rows(0, 2), host.rows(2, 5)]
    joined = fields.concat(parts)
    for name in REQUIRED_NAMES:
        np.testing.assert_array_equal(joined[name], host[name])
    assert parts[0].pred.shape == (2,) and parts[1].probs.shape == (3, 3)


def test_containers_refuse_unknown_or_missing_fields():
    with pytest.raises(TypeError, match=r"unknown result field\(s\) \['dise'\]"):
        PerImage(dise=np.zeros(2))
    with pytest.raises(TypeError, match=r"BatchScores needs every result field; missing \['hit'\]"):
        BatchScores(**{n: torch.zeros(2) for n in REQUIRED_NAMES if n != "hit"})
    partial = PerImage(entropy=np.ones(2))  # selection may read a subset
    with pytest.raises(AttributeError, match="PerImage has no field 'dice'"):
        partial.dice  # noqa: B018


def test_batch_csv_columns_follow_the_registry():
    scalar = [f.name for f in FIELDS if f.shape == SCALAR and not f.optional]  # optional: absent from most runs
    assert CSV_FIELDS == ("rank", "index", "id", "score", "pred", "pred_class", *scalar[1:], "has_roi")
    assert "probs" not in CSV_FIELDS


def test_embedding_and_mc_fields_travel_in_the_same_copy_after_the_cam():
    s = device_scores()
    gen = torch.Generator().manual_seed(2)
    cam = torch.rand(5, 2, 2, generator=gen)
    embedding = torch.randn(5, 6, generator=gen) * 10  # (B, D)
    mc = {"bald": torch.rand(5, generator=gen), "mc_entropy": torch.rand(5, generator=gen),
          "variation_ratio": torch.tensor([0.0, 0.25, 0.5, 0.75, 0.0])}
    full = BatchScores(cam=cam, embedding=embedding, **mc, **s.as_dict())
    layout = Layout.of(full)
    assert layout == Layout(n_classes=3, cam_shape=(2, 2), embedding_dim=6, mc=True)
    assert [f.name for f in layout.fields] == [*REQUIRED_NAMES, "cam", "bald", "mc_entropy", "variation_ratio",
                                               "embedding"]
    assert layout.tail(fields.BY_NAME["embedding"]) == (6,) and layout.tail(fields.BY_NAME["bald"]) == ()
    packed = fields.pack(full)
    assert packed.shape == (5, 8 + 3 + 4 + 3 + 6)  # scalars, K probs, h*w CAM, 3 MC scalars, D embedding
    np.testing.assert_array_equal(packed[:, :15].numpy(), fields.pack(BatchScores(cam=cam, **s.as_dict())).numpy())
    host = fields.unpack(packed.numpy(), layout)
    assert host.embedding.dtype == np.float16 and host.embedding.shape == (5, 6)
    np.testing.assert_array_equal(host.embedding, embedding.numpy().astype(np.float16))
    for name, value in mc.items():
        assert host[name].dtype == np.float32
        np.testing.assert_array_equal(host[name], value.numpy())
    # only the embedding, or only MC: the layout says which, and the other is absent
    only = BatchScores(embedding=embedding, **s.as_dict())
    assert Layout.of(only) == Layout(n_classes=3, embedding_dim=6)
    assert list(fields.unpack(fields.pack(only).numpy(), Layout.of(only))) == [*REQUIRED_NAMES, "embedding"]
    with pytest.raises(ValueError, match="needs the run's embedding size"):
        Layout(n_classes=3).tail(fields.BY_NAME["embedding"])
