"""Semi-synthetic BraTS-like pools: template slices, determinism, ROI in the brain, class contrast, shortcut."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import assign_splits, block_size, marker_masks
from xal_engine.store import PER_IMAGE_ARRAYS, SPLIT_TEST, SPLIT_TRAIN, Pool

pytest.importorskip("nilearn", reason="the brain phantom needs nilearn (the 'experiments' extra) for MNI152")

from xal_engine.ingest.brain_phantom import (
    APPEARANCE,
    CLASSES,
    CORE,
    BrainBlock,
    BrainPhantomConfig,
    appearance,
    create_brain_phantom_pool,
    generate_block,
    load_template,
)

SIZE = 48
CONFIG = BrainPhantomConfig(n=block_size(SIZE) + 40, size=SIZE, seed=5, shortcut=0.5, roi_fraction=0.8)


def first_block(config: BrainPhantomConfig) -> BrainBlock:
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    return generate_block(config, 0, split[:min(config.n, block_size(config.size))])


@pytest.fixture(scope="module")
def block() -> BrainBlock:
    return first_block(CONFIG)


def test_template_slices_are_large_and_centres_lie_inside_the_brain() -> None:
    tpl = load_template(SIZE, 0.6)
    z = len(tpl.slices)
    assert tpl.t1.shape == tpl.brain.shape == (z, SIZE, SIZE) and z >= 20
    area = tpl.brain.sum(axis=(1, 2))
    assert area.min() >= 0.5 * area.max()  # 0.6 of the largest before resampling, area-resampled masks
    assert np.all(tpl.t1[~tpl.brain] == 0) and 0.9 <= tpl.t1.max() <= 1.0
    # every admissible centre of slice k is a brain pixel of slice k
    slice_of = np.repeat(np.arange(z), np.diff(tpl.offsets))
    assert tpl.offsets[-1] == len(tpl.centres)
    assert tpl.brain[slice_of, tpl.centres[:, 0], tpl.centres[:, 1]].all()


def test_same_seed_gives_identical_blocks_and_another_seed_differs(block: BrainBlock) -> None:
    again = first_block(CONFIG)
    other = first_block(replace(CONFIG, seed=6))
    for name in (*PER_IMAGE_ARRAYS, "tumours", "markers"):
        a, b = getattr(block, name), getattr(again, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("images", "rois", "labels"):
        assert not np.array_equal(getattr(block, name), getattr(other, name)), name
    assert block.ids[7].startswith("brain_000007_z")


def test_roi_is_the_tumour_inside_the_brain_mask(block: BrainBlock) -> None:
    assert block.images.shape == (len(block.labels), 3, SIZE, SIZE) and block.images.dtype == np.uint8
    assert not np.any(block.tumours & ~block.brain)
    np.testing.assert_array_equal(block.rois, block.tumours & block.has_roi[:, None, None])
    assert block.tumours.sum(axis=(1, 2)).min() >= 10  # every image has a visible tumour
    assert 0.6 < block.has_roi.mean() < 0.95  # roi_fraction 0.8 over ~450 images
    # outside the brain (and off the marker) every channel sits at its per-image minimum, 0
    outside = ~block.brain & ~block.markers
    assert np.all(block.images.transpose(1, 0, 2, 3)[:, outside] == 0)


def test_appearance_table_centre_and_periphery() -> None:
    d = np.array([[[0.0, CORE - 0.01, CORE, 1.0]]] * 3, dtype=np.float32)  # (3, 1, 4)
    out = appearance(np.arange(3), d)  # (3, 3, 1, 4)
    np.testing.assert_array_equal(out[1, :, 0, 0], np.float32([0.15, 0.55, 1.00]))  # necrotic core: dark T1ce, bright T2
    np.testing.assert_array_equal(out[1, :, 0, 3], np.float32([1.00, 0.85, 0.70]))  # enhancing rim: bright T1ce
    for k in (0, 2):  # one region: the same target everywhere
        np.testing.assert_array_equal(out[k, :, 0, 0], out[k, :, 0, 3])
    np.testing.assert_array_equal(out[:, :, 0, 1], APPEARANCE[:, 0])


def _roi_means(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(b, 3) mean intensity per channel over each mask; NaN for an empty mask."""
    area = masks.sum(axis=(1, 2))[:, None]
    total = (images.astype(np.float64) * masks[:, None]).sum(axis=(2, 3))
    return np.where(area > 0, total / np.maximum(area, 1), np.nan)


def test_classes_differ_as_designed(block: BrainBlock) -> None:
    tumour = _roi_means(block.images, block.tumours)  # (b, 3): T1ce, FLAIR, T2
    brain = _roi_means(block.images, block.brain & ~block.tumours)
    rel = tumour - brain  # tumour contrast against the rest of the brain, per channel
    k = block.labels
    mean = np.stack([np.nanmean(rel[k == c], axis=0) for c in range(3)])  # (K, 3)
    edema, necrotic, enhancing = mean
    assert edema[1] > 30 and edema[0] < edema[1] - 40  # bright on FLAIR, not on T1ce
    assert enhancing[0] > 40 and enhancing[0] > edema[0] + 40  # bright on T1ce
    assert necrotic[2] > 10  # fluid centre bright on T2
    # necrotic core: the inner part (eroded by 2 px) is darker on T1ce than the rim; enhancing: not
    inner = binary_erosion(block.tumours, structure=np.ones((1, 5, 5), dtype=bool))
    rim = block.tumours & ~inner
    gap = _roi_means(block.images, rim)[:, 0] - _roi_means(block.images, inner)[:, 0]
    assert np.nanmean(gap[k == 1]) > 40 and np.nanmean(gap[k == 2]) < 10
    # nearest class centroid on the three contrasts separates the classes (train on half, test on half)
    ok = np.isfinite(rel).all(axis=1)
    x, y = rel[ok], k[ok]
    centroids = np.stack([x[::2][y[::2] == c].mean(axis=0) for c in range(3)])
    pred = np.argmin(((x[1::2, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[1::2]).mean() > 0.8


def test_shortcut_marker_is_class_coded_outside_the_brain_and_never_in_test(block: BrainBlock) -> None:
    has = block.markers.any(axis=(1, 2))
    assert not np.any(has & (block.split == SPLIT_TEST))
    trainval = block.split != SPLIT_TEST
    assert 0.35 < has[trainval].mean() < 0.65  # shortcut 0.5
    assert not np.any(block.markers & block.brain) and not np.any(block.markers & block.rois)
    expected = marker_masks(SIZE, len(CLASSES))[block.labels]
    np.testing.assert_array_equal(block.markers[has], expected[has])
    assert np.all(block.images.transpose(1, 0, 2, 3)[:, block.markers] == 255)
    plain = first_block(replace(CONFIG, shortcut=0.0))
    assert not plain.markers.any()


def test_pool_holds_the_generated_blocks(tmp_path: Path) -> None:
    pool = create_brain_phantom_pool(CONFIG, tmp_path / "brain.zarr")
    assert pool.validate() == []
    assert pool.classes == list(CLASSES) and (pool.channels, pool.height, pool.width) == (3, SIZE, SIZE)
    assert pool.attrs["brain_phantom"] == asdict(CONFIG)
    split = assign_splits(CONFIG.n, CONFIG.test_fraction, CONFIG.val_fraction, CONFIG.seed)
    step = block_size(SIZE)
    tail = generate_block(CONFIG, 1, split[step:])
    batch = Pool.open(tmp_path / "brain.zarr").read(0, CONFIG.n)
    head = first_block(CONFIG)
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(batch, name),
                                      np.concatenate([getattr(head, name), getattr(tail, name)]), name)
    assert np.any(batch.split == SPLIT_TRAIN) and np.any(batch.split == SPLIT_TEST)


@pytest.mark.parametrize(("field", "value", "flag"), [("size", 16, "--size"), ("val_fraction", 0.9, "--val-fraction"), ("shortcut", 1.5, "--shortcut"),
                                                     ("min_brain", 0.0, "--min-brain"), ("n", 0, "--n")])
def test_bad_config_names_the_flag(field: str, value: float, flag: str) -> None:
    with pytest.raises(XalError, match=f"^{flag} must be"):
        BrainPhantomConfig(**{field: value})


def test_cli_pool_create_brain_phantom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xal_engine.cli import main

    out = tmp_path / "cli.zarr"
    assert main(["pool", "create", "--brain-phantom", "--n", "30", "--size", "32", "--seed", "2",
                 "--min-brain", "0.7", "--out", str(out)]) == 0
    pool = Pool.open(out)
    assert pool.attrs["brain_phantom"] == asdict(BrainPhantomConfig(n=30, size=32, seed=2, min_brain=0.7))
    assert pool.classes == list(CLASSES) and pool.channels == 3
    capsys.readouterr()
    for argv, message in ((["--brain-phantom", "--classes", "4"], "--classes does not apply to --brain-phantom"),
                          (["--brain-phantom", "--synthetic"], "not both"),
                          (["--brain-phantom", "--min-brain", "2"], "--min-brain must be")):
        assert main(["pool", "create", *argv, "--out", str(tmp_path / "x.zarr")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
