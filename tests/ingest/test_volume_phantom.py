"""Volume phantom pools (``pool create --synthetic --volumes``): shapes, determinism, balanced classes,
ROIs inside the organ, lesion volumes as configured, a class a tiny 3-D CNN learns, and the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from xal_engine.cli import main
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import assign_splits
from xal_engine.ingest.volume_phantom import (
    ASPECT,
    CLASSES,
    MARGIN,
    RADIUS_JITTER,
    VolumeBlock,
    VolumePhantomConfig,
    assign_labels,
    create_volume_phantom_pool,
    generate_volume_block,
    lesion_radius_range,
    volume_block_size,
)
from xal_engine.store import PER_IMAGE_ARRAYS, Pool


def blocks(config: VolumePhantomConfig) -> list[VolumeBlock]:
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    labels = assign_labels(config.n, config.seed)
    step = volume_block_size(config.depth, config.size)
    return [generate_volume_block(config, i, labels[a:a + step], split[a:a + step])
            for i, a in enumerate(range(0, config.n, step))]


def cat(generated: list[VolumeBlock], name: str) -> np.ndarray:
    return np.concatenate([getattr(g, name) for g in generated])


def test_pool_shapes_dtypes_and_the_generated_blocks(tmp_path: Path) -> None:
    config = VolumePhantomConfig(n=70, depth=24, size=32, channels=2, seed=5, roi_fraction=0.6)
    pool = create_volume_phantom_pool(config, tmp_path / "v.zarr")
    assert pool.is_volume and pool.depth == 24 and pool.spatial == (24, 32, 32) and pool.channels == 2
    assert pool.classes == list(CLASSES) and pool.attrs["volume_phantom"] == asdict(config)
    batch = pool.read(0, 70)
    assert batch.images.shape == (70, 2, 24, 32, 32) and batch.images.dtype == np.uint8
    assert batch.rois.shape == (70, 24, 32, 32) and batch.rois.dtype == np.bool_
    assert batch.labels.dtype == np.int16 and batch.ids[69] == "volume_000069"
    generated = blocks(config)  # 1M voxels / 24·32² = 42 volumes per block: two blocks
    assert [len(g.labels) for g in generated] == [42, 28]
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(batch, name), cat(generated, name), name)
    np.testing.assert_array_equal(batch.split, assign_splits(70, 0.2, 0.1, 5))
    assert batch.has_roi.any() and not batch.has_roi.all()
    assert not batch.rois[~batch.has_roi].any()
    np.testing.assert_array_equal(batch.rois, cat(generated, "lesions") & batch.has_roi[:, None, None, None])
    assert pool.validate() == []


def test_same_seed_gives_byte_identical_pools(tmp_path: Path) -> None:
    config = VolumePhantomConfig(n=40, depth=24, size=24, seed=7)
    one = create_volume_phantom_pool(config, tmp_path / "a.zarr").read(0, 40)
    two = create_volume_phantom_pool(config, tmp_path / "b.zarr").read(0, 40)
    other = create_volume_phantom_pool(VolumePhantomConfig(**{**asdict(config), "seed": 8}),
                                       tmp_path / "c.zarr").read(0, 40)
    for name in PER_IMAGE_ARRAYS:
        a, b = getattr(one, name), getattr(two, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("images", "rois", "labels", "split"):
        assert not np.array_equal(getattr(one, name), getattr(other, name)), name


def test_classes_are_exactly_balanced() -> None:
    for n, seed in ((41, 0), (200, 3), (1, 0)):
        labels = assign_labels(n, seed)
        assert labels.dtype == np.int16
        assert np.bincount(labels, minlength=2).tolist() == [n - n // 2, n // 2]
    assert not np.array_equal(assign_labels(200, 0), assign_labels(200, 1))  # shuffled by seed


def test_rois_lie_margin_voxels_inside_the_organ() -> None:
    generated = blocks(VolumePhantomConfig(n=64, depth=24, size=32, seed=1))
    lesions, organ = cat(generated, "lesions"), cat(generated, "organ")
    assert lesions.any(axis=(1, 2, 3)).all()
    for lesion, inside in zip(lesions, organ):
        # distance from each lesion voxel to the nearest voxel outside the organ outline
        assert distance_transform_edt(inside)[lesion].min() >= MARGIN


def test_lesion_volume_and_shape_follow_the_config() -> None:
    config = VolumePhantomConfig(n=96, depth=32, size=32, seed=2, lesion_radius=0.1)
    generated = blocks(config)
    lesions, labels, axes = cat(generated, "lesions"), cat(generated, "labels"), cat(generated, "semi_axes")
    long, short = axes[:, 0], axes[:, 1]
    r = np.cbrt(long * short * short)  # equivalent-sphere radius, voxels
    lo, hi = RADIUS_JITTER
    assert ((r >= lo * 3.2 - 1e-9) & (r <= hi * 3.2 + 1e-9)).all()  # 0.1 x min(32, 32) = 3.2 voxels
    aspect = long / short
    np.testing.assert_allclose(aspect[labels == 0], 1.0)
    assert ((aspect[labels == 1] >= ASPECT[0]) & (aspect[labels == 1] <= ASPECT[1])).all()
    counted = lesions.sum(axis=(1, 2, 3))
    expected = 4 / 3 * math.pi * r ** 3  # both classes: the sphere's volume
    ratio = counted / expected
    assert ratio.min() > 0.85 and ratio.max() < 1.15  # voxelisation of 3.2-voxel lesions
    assert abs(ratio.mean() - 1.0) < 0.03
    # the mean lesion volume over volumes: E[r³] = (3.2)³ · E[U(0.8, 1.2)³] = 32.768 · 1.04
    assert counted.mean() == pytest.approx(4 / 3 * math.pi * 32.768 * 1.04, rel=0.08)


def test_ring_enhancing_class_has_a_dark_centre() -> None:
    generated = blocks(VolumePhantomConfig(n=64, depth=32, size=32, seed=4))
    for g in generated:
        image = g.images[:, 0].astype(np.float32)
        for i, label in enumerate(g.labels):
            centre = np.unravel_index(distance_transform_edt(g.lesions[i]).argmax(), g.lesions[i].shape)
            shell = g.lesions[i] & (distance_transform_edt(g.lesions[i]) <= 1.0)
            organ = g.organ[i] & ~g.lesions[i]
            if label == 0:  # the solid dome: brighter than the organ at its centre
                assert image[i][centre] > np.median(image[i][organ]) + 20
            else:  # the ring: a bright rim around a centre darker than the organ
                assert image[i][centre] < np.median(image[i][organ]) - 5
                assert image[i][shell].mean() > image[i][centre] + 30


def test_a_tiny_3d_cnn_learns_the_class_in_a_few_epochs() -> None:
    config = VolumePhantomConfig(n=320, depth=24, size=24, seed=0)
    generated = blocks(config)
    x = torch.from_numpy(cat(generated, "images")).float() / 255.0
    x -= x.mean()
    y = torch.from_numpy(cat(generated, "labels")).long()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(), torch.nn.MaxPool3d(2),
            torch.nn.Conv3d(8, 16, 3, padding=1), torch.nn.BatchNorm3d(16), torch.nn.ReLU(), torch.nn.MaxPool3d(2),
            torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool3d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, 2))
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        train, test = torch.arange(256), torch.arange(256, 320)
        for _ in range(4):
            net.train()
            for part in train[torch.randperm(256)].split(16):
                loss = torch.nn.functional.cross_entropy(net(x[part]), y[part])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            accuracy = (net.eval()(x[test]).argmax(1) == y[test]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.85  # chance: about 0.5 (the pool's classes are balanced)


def test_block_size_bounds_the_working_set() -> None:
    assert volume_block_size(32, 32) == 32 and volume_block_size(64, 64) == 4
    assert volume_block_size(128, 96) == 1 and volume_block_size(24, 24) == 75


@pytest.mark.parametrize(("changes", "message"), [
    ({"depth": 16}, "--depth must be between 24 and 512 for --volumes (got 16)"),
    ({"size": 1024}, "--size must be between 24 and 512 for --volumes (got 1024)"),
    ({"lesion_radius": 0.2}, "--lesion-radius must be between 0.059 and 0.135 at --depth 32 --size 32 (got 0.2)"),
    ({"lesion_radius": 0.05}, "--lesion-radius must be between 0.059 and 0.135"),
    ({"n": 0}, "--n must be at least 1"),
    ({"channels": 17}, "--channels must be between 1 and 16"),
    ({"val_fraction": 0.9}, "--val-fraction must be at most 1 - --test-fraction = 0.8"),
])
def test_config_errors_name_the_flag(changes: dict[str, float], message: str) -> None:
    with pytest.raises(XalError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        VolumePhantomConfig(**changes)


def test_lesion_radius_range_by_hand() -> None:
    # lowest: 1.5 voxels / (0.8 · 24); highest: (0.9 · 0.40 - 2 / 24) / (1.2 · 2.5^(2/3))
    lo, hi = lesion_radius_range(24, 40)
    assert lo == pytest.approx(1.5 / 19.2)
    assert hi == pytest.approx((0.36 - 2 / 24) / (1.2 * 2.5 ** (2 / 3)))


def test_cli_creates_volume_pools_and_refuses_flags_that_do_not_apply(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.zarr"
    assert main(["pool", "create", "--synthetic", "--volumes", "--n", "20", "--depth", "24", "--size", "32",
                 "--seed", "4", "--lesion-radius", "0.1", "--roi-fraction", "0.5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"created {out}: 20 volumes 1x24x32x32 uint8, 2 classes, ")
    config = VolumePhantomConfig(n=20, depth=24, size=32, seed=4, lesion_radius=0.1, roi_fraction=0.5)
    assert Pool.open(out).attrs["volume_phantom"] == asdict(config)
    expected = create_volume_phantom_pool(config, tmp_path / "lib.zarr").read(0, 20)
    got = Pool.open(out).read(0, 20)
    for name in PER_IMAGE_ARRAYS:
        assert getattr(got, name).tobytes() == getattr(expected, name).tobytes(), name
    defaults = tmp_path / "defaults.zarr"  # --volumes' own defaults: 200 volumes of 32³
    assert main(["pool", "create", "--synthetic", "--volumes", "--out", str(defaults)]) == 0
    assert Pool.open(defaults).attrs["volume_phantom"] == asdict(VolumePhantomConfig())
    assert (Pool.open(defaults).n, Pool.open(defaults).spatial) == (200, (32, 32, 32))
    capsys.readouterr()
    bad = tmp_path / "bad.zarr"
    for argv, message in (
            (["--synthetic", "--volumes", "--classes", "2"], "--classes does not apply to --volumes"),
            (["--synthetic", "--volumes", "--shortcut", "0.2"], "--shortcut does not apply to --volumes"),
            (["--synthetic", "--volumes", "--min-brain", "0.6"], "--min-brain does not apply to --volumes"),
            (["--volumes"], "--volumes needs --synthetic"),
            (["--brain-phantom", "--volumes"], "--volumes needs --synthetic"),
            (["--synthetic", "--depth", "24"], "--depth applies only to --synthetic --volumes"),
            (["--brain-phantom", "--lesion-radius", "0.1"], "--lesion-radius applies only to --synthetic --volumes"),
            (["--synthetic", "--volumes", "--depth", "8"], "--depth must be between 24 and 512 for --volumes"),
    ):
        assert main(["pool", "create", *argv, "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists() and not Path(f"{bad}.partial").exists()
    assert main(["pool", "create", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    assert "--volumes" in help_text and "(default 64; --volumes: 32)" in help_text
