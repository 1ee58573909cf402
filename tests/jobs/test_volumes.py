"""Volume pools end to end: train a 3-D backbone, score (the 3-D path, checked against a direct
capture + the 3-D reference), select, and a two-round AL loop; 2-D-only commands refuse volumes.

Pool: 3-D phantoms (``ingest.volume_phantom``) at 24³, one channel, two classes; arch ``tiny3d``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xal_engine.cli import main
from xal_engine.core.capture import capture
from xal_engine.core.inputs import to_unit_float
from xal_engine.core.models import load_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.ingest.volume_phantom import VolumePhantomConfig, create_volume_phantom_pool
from xal_engine.ops import reference3d
from xal_engine.store import SPLIT_TRAIN, Pool
from xal_engine.store.score_run import ScoreRun

SIDE = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("volumes")
    pool_path = root / "vol.zarr"
    create_volume_phantom_pool(VolumePhantomConfig(n=60, depth=SIDE, size=SIDE, seed=3), pool_path)
    model = root / "model.pt"
    assert main(["train", "--pool", str(pool_path), "--arch", "tiny3d", "--epochs", "2", "--batch-size", "8",
                 "--num-workers", "0", "--device", "cpu", "--out", str(model), "--quiet"]) == 0
    assert main(["score", "--pool", str(pool_path), "--model", str(model), "--run", "r", "--batch-size", "8",
                 "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    return {"root": root, "pool": pool_path, "model": model}


def test_the_checkpoint_records_the_volume_shape(trained: dict[str, Any]) -> None:
    _, ckpt = load_checkpoint(trained["model"], device="cpu")
    assert ckpt.arch == "tiny3d"
    assert ckpt.image_size == (1, SIDE, SIDE, SIDE)
    assert len(ckpt.target_map) == 3  # a (d, h, w) feature volume


def test_scores_equal_a_direct_capture_and_the_3d_reference(trained: dict[str, Any]) -> None:
    pool = Pool.open(trained["pool"])
    stored = ScoreRun.open(pool.group, "r").read()
    model, ckpt = load_checkpoint(trained["model"], device="cpu")
    batch = pool.read(0, pool.n)
    x = to_unit_float(torch.from_numpy(batch.images))  # (N, 1, D, H, W)
    out = capture(model, ckpt.target_layer, x)
    a, g = out.activations[0], out.gradients[0]
    assert a.ndim == 5
    rois = torch.from_numpy(batch.rois)
    ref = reference3d.gradcam_dice_3d(a, g, rois, threshold=0.5)
    has = batch.has_roi
    np.testing.assert_array_equal(stored["pred"], out.logits.argmax(1).numpy())
    # one batch here, eight per batch in the run: float reassociation only
    np.testing.assert_allclose(stored["dice"][has], ref.dice.numpy()[has], atol=1e-5)
    np.testing.assert_allclose(stored["soft_dice"][has], ref.soft_dice.numpy()[has], atol=1e-5)
    np.testing.assert_allclose(stored["energy"][has], ref.energy.numpy()[has], atol=1e-5)
    np.testing.assert_array_equal(stored["hit"][has], ref.hit.numpy()[has])
    assert np.isnan(stored["dice"][~has]).all()
    probs = torch.softmax(out.logits, 1).numpy()
    np.testing.assert_allclose(stored["probs"], probs, atol=2e-3)  # stored as float16


def test_select_ranks_train_volumes(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "batch.csv"
    assert main(["select", "--pool", str(trained["pool"]), "--run", "r", "--strategy", "entropy", "--budget", "5",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    pool = Pool.open(trained["pool"])
    stored = ScoreRun.open(pool.group, "r").read()
    split = pool.column("split")
    ids = pool.column("ids")
    train = np.flatnonzero(split == SPLIT_TRAIN)
    expected = train[np.argsort(-stored["entropy"][train], kind="stable")[:5]]
    assert [r["id"] for r in rows] == ids[expected].tolist()


def test_two_round_loop_on_volumes(trained: dict[str, Any]) -> None:
    run = trained["root"] / "loop"
    assert main(["loop", "--pool", str(trained["pool"]), "--arch", "tiny3d", "--strategy", "dual",
                 "--initial", "8", "--per-round", "4", "--rounds", "2", "--epochs", "2", "--batch-size", "8",
                 "--num-workers", "0", "--device", "cpu", "--out", str(run), "--quiet"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["n_labelled"]) for r in rows] == [8, 12, 16]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert 0.0 <= float(r["test_dice"]) <= 1.0  # the volumes' ROI metrics, not NaN
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "tiny3d"
    pool = Pool.open(trained["pool"])
    labelled = pool.read_labelled_round(pool.subgroups("al")[0])
    assert sorted(np.bincount(labelled[labelled >= 0]).tolist()) == [4, 4, 8]


def test_a_2d_backbone_on_volumes_and_a_3d_model_on_images_are_refused(trained: dict[str, Any], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--pool", str(trained["pool"]), "--arch", "resnet18", "--epochs", "1",
                 "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arch resnet18 is a 2-D backbone" in err[0] and "volumes" in err[0]
    images = tmp_path / "img.zarr"
    create_synthetic_pool(SyntheticConfig(n=40, size=32, classes=2, channels=1), images)
    assert main(["score", "--pool", str(images), "--model", str(trained["model"]), "--run", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a 3-D tiny3d" in err[0] and "2-D images" in err[0]
    assert not (tmp_path / "m.pt").exists()


def test_2d_only_exports_refuse_volume_pools(trained: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pool = str(trained["pool"])
    code = main(["select", "--pool", pool, "--run", "r", "--budget", "3", "--format", "label-studio",
                 "--out", str(tmp_path / "ls")])
    err = capsys.readouterr().err
    assert code == 2 and "holds volumes" in err and "label-studio" in err
    code = main(["select", "--pool", pool, "--run", "r", "--budget", "3", "--out", str(tmp_path / "b.csv"),
                 "--overlays", str(tmp_path / "ov")])
    err = capsys.readouterr().err
    assert code == 2 and "holds volumes" in err and "--overlays" in err
    assert not (tmp_path / "b.csv").exists()


def test_saved_cams_are_the_stage1_feature_volumes(trained: dict[str, Any]) -> None:
    assert main(["score", "--pool", str(trained["pool"]), "--model", str(trained["model"]), "--run", "cams",
                 "--save-cams", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    pool = Pool.open(trained["pool"])
    stored = ScoreRun.open(pool.group, "cams").read(("cam",))
    model, ckpt = load_checkpoint(trained["model"], device="cpu")
    x = to_unit_float(torch.from_numpy(pool.read(0, 8).images))
    out = capture(model, ckpt.target_layer, x)
    low = reference3d.low_res_cam_3d(out.activations[0], out.gradients[0])  # (8, d, h, w)
    assert stored["cam"].shape == (pool.n, *ckpt.target_map)
    np.testing.assert_allclose(stored["cam"][:8].astype(np.float32), low.numpy(), atol=1e-3)  # float16
