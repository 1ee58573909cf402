"""Synthetic phantom pools: determinism, splits, lesion/ROI semantics, shortcut marker, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import (
    SyntheticConfig,
    assign_splits,
    block_size,
    class_names,
    create_synthetic_pool,
    generate_block,
    marker_masks,
    marker_size,
)
from xal_engine.store import PER_IMAGE_ARRAYS, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool

CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)  # 4-neighbourhood, per image


def blocks(config: SyntheticConfig) -> list:
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    step = block_size(config.size)
    return [generate_block(config, i, split[a:a + step]) for i, a in enumerate(range(0, config.n, step))]


def test_same_seed_gives_byte_identical_pools(tmp_path: Path) -> None:
    config = SyntheticConfig(n=300, size=32, classes=4, channels=2, seed=7, shortcut=0.4, roi_fraction=0.7)
    one = create_synthetic_pool(config, tmp_path / "a.zarr").read(0, 300)
    two = create_synthetic_pool(config, tmp_path / "b.zarr").read(0, 300)
    other = create_synthetic_pool(SyntheticConfig(**{**asdict(config), "seed": 8}),
                                  tmp_path / "c.zarr").read(0, 300)
    for name in PER_IMAGE_ARRAYS:
        a, b = getattr(one, name), getattr(two, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("images", "rois", "labels", "split"):
        assert not np.array_equal(getattr(one, name), getattr(other, name)), name
    np.testing.assert_array_equal(one.ids, other.ids)
    assert one.ids[42] == "phantom_000042"


def test_pool_matches_generated_blocks_and_records_config(tmp_path: Path) -> None:
    config = SyntheticConfig(n=300, size=32, seed=3, shortcut=0.5)
    pool = create_synthetic_pool(config, tmp_path / "p.zarr")
    batch = pool.read(0, 300)
    generated = blocks(config)
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(batch, name),
                                      np.concatenate([getattr(g, name) for g in generated]), name)
    assert pool.image_dtype == np.uint8 and (pool.channels, pool.height, pool.width) == (1, 32, 32)
    assert pool.classes == ["round", "rim_ellipse", "stippled"]
    assert pool.attrs["source"] == "synthetic" and pool.attrs["modality"] == "phantom"
    assert pool.attrs["synthetic"] == asdict(config)
    assert pool.validate() == []


def test_splits_have_exact_fractions() -> None:
    split = assign_splits(1001, 0.2, 0.1, seed=0)
    assert split.dtype == np.uint8 and len(split) == 1001
    assert (split == SPLIT_TEST).sum() == 200 and (split == SPLIT_VAL).sum() == 100
    assert (split == SPLIT_TRAIN).sum() == 701
    assert not np.array_equal(split, assign_splits(1001, 0.2, 0.1, seed=1))


def test_block_size_bounds_the_working_set() -> None:
    assert [block_size(s) for s in (32, 64, 100, 256, 1024, 4096)] == [256, 256, 104, 16, 1, 1]


def test_class_names_are_distinct() -> None:
    assert class_names(3) == ["round", "rim_ellipse", "stippled"]
    assert class_names(12)[3:6] == ["round_dark", "rim_ellipse_dark", "stippled_dark"]
    assert class_names(12)[-1] == "stippled_dark_cored"
    assert len(set(class_names(12))) == 12


def test_lesions_are_the_rois_and_their_contrast_follows_the_class() -> None:
    config = SyntheticConfig(n=512, size=48, classes=6, seed=1, roi_fraction=0.6)
    for g in blocks(config):
        assert g.lesions.any(axis=(1, 2)).all()  # one lesion in every image
        np.testing.assert_array_equal(g.rois, g.lesions & g.has_roi[:, None, None])
        np.testing.assert_array_equal(g.has_roi, g.rois.any(axis=(1, 2)))
        # lesion pixels against a 2-px ring just outside: brighter for classes 0-2, darker for 3-5
        ring = binary_dilation(g.lesions, structure=CROSS, iterations=2) & ~g.lesions
        pixels = g.images[:, 0].astype(np.float64)
        inside = (pixels * g.lesions).sum((1, 2)) / g.lesions.sum((1, 2))
        outside = (pixels * ring).sum((1, 2)) / ring.sum((1, 2))
        dark = g.labels >= 3
        assert (inside[~dark] > outside[~dark] + 10).all()
        assert (inside[dark] < outside[dark] - 10).all()
    frac = np.concatenate([g.has_roi for g in blocks(config)]).mean()
    assert abs(frac - 0.6) < 4 * np.sqrt(0.6 * 0.4 / 512)


def test_shortcut_marker_outside_roi_never_in_test_and_class_coded() -> None:
    config = SyntheticConfig(n=2048, size=32, classes=12, seed=5, shortcut=0.3)
    masks = marker_masks(32, 12)
    train_marked, train_total = 0, 0
    for g in blocks(config):
        marked = g.markers.any(axis=(1, 2))
        assert not marked[g.split == SPLIT_TEST].any()
        # never inside or touching (8-neighbourhood) the lesion
        touching = binary_dilation(g.lesions, structure=np.ones((1, 3, 3), dtype=bool))
        assert not (g.markers & touching).any()
        np.testing.assert_array_equal(g.markers[marked], masks[g.labels[marked]])
        assert (g.images[:, 0][g.markers] == 255).all()
        train_marked += int(marked[g.split == SPLIT_TRAIN].sum())
        train_total += int((g.split == SPLIT_TRAIN).sum())
    assert abs(train_marked / train_total - 0.3) < 4 * np.sqrt(0.3 * 0.7 / train_total)


def test_marker_masks_hand_case() -> None:
    assert marker_size(32) == 3 and marker_size(64) == 5 and marker_size(256) == 17
    masks = marker_masks(32, 12)
    assert masks[0, 2:5, 2:5].all() and masks[0].sum() == 9           # filled, top-left
    assert masks[3, 27:30, 27:30].all() and masks[3].sum() == 9       # filled, bottom-right
    assert masks[5, 2:5, 27:30].sum() == 8 and not masks[5, 3, 28]    # hollow, top-right
    assert masks[10, 28, 2:5].all() and masks[10, 27:30, 3].all() and masks[10].sum() == 5  # plus


def test_no_shortcut_means_no_marker() -> None:
    for g in blocks(SyntheticConfig(n=300, size=32, seed=2)):
        assert not g.markers.any()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n", 0, "--n must be at least 1"),
    ("size", 16, "--size must be between 32 and 4096"),
    ("classes", 13, "--classes must be between 2 and 12"),
    ("channels", 0, "--channels must be between 1 and 16"),
    ("shortcut", 1.5, "--shortcut must be between 0 and 1"),
    ("roi_fraction", -0.1, "--roi-fraction must be between 0 and 1"),
    ("val_fraction", 0.9, "--val-fraction must be at most 1 - --test-fraction = 0.8"),
])
def test_config_errors_name_the_flag(field: str, value: float, message: str) -> None:
    with pytest.raises(XalError, match=message):
        SyntheticConfig(**{field: value})


def test_first_class_shifts_the_appearance_and_keeps_labels_markers_and_the_rest(tmp_path: Path) -> None:
    """first_class=3: pool classes 0-2 look like appearance classes 3-5 (the dark variants). Every
    random draw is the same as the default pool's, so labels, lesion masks, markers (coded by the pool
    class j) and all pixels off the lesion are identical; on the lesion the shifted pool is darker, and
    darker than the 2-px ring around it."""
    config = SyntheticConfig(n=300, size=32, seed=4, shortcut=0.5)
    shifted_config = SyntheticConfig(**{**asdict(config), "first_class": 3})
    pool = create_synthetic_pool(shifted_config, tmp_path / "dark.zarr")
    assert pool.classes == ["round_dark", "rim_ellipse_dark", "stippled_dark"]
    assert pool.attrs["synthetic"]["first_class"] == 3
    assert class_names(3, first_class=9) == ["round_dark_cored", "rim_ellipse_dark_cored", "stippled_dark_cored"]
    np.testing.assert_array_equal(pool.read(0, 300).images, np.concatenate([g.images for g in blocks(shifted_config)]))
    for bright, dark in zip(blocks(config), blocks(shifted_config)):
        for name in ("labels", "lesions", "rois", "has_roi", "markers", "split"):
            np.testing.assert_array_equal(getattr(bright, name), getattr(dark, name), name)
        assert set(dark.labels.tolist()) == {0, 1, 2} and dark.markers.any()
        off = np.broadcast_to(~dark.lesions[:, None], dark.images.shape)  # (b, C, S, S)
        np.testing.assert_array_equal(bright.images[off], dark.images[off])
        on = dark.lesions
        assert (dark.images[:, 0][on] <= bright.images[:, 0][on]).all()
        ring = binary_dilation(dark.lesions, structure=CROSS, iterations=2) & ~dark.lesions
        pixels = dark.images[:, 0].astype(np.float64)
        for j in range(3):  # per pool class: its lesions' mean below their surroundings'
            of_class = dark.labels == j
            inside = pixels[of_class][on[of_class]].mean()
            assert inside < pixels[of_class][ring[of_class]].mean() - 10, j
            assert inside < bright.images[:, 0][of_class][on[of_class]].mean() - 20, j


def test_first_class_beyond_the_appearance_classes_is_refused_naming_the_flag(tmp_path: Path, capsys) -> None:
    from xal_engine.cli import main

    assert SyntheticConfig(classes=3, first_class=9).first_class == 9  # classes 9-11: the last three
    with pytest.raises(XalError, match=r"^--first-class must be between 0 and 12 - --classes = 9 .*\(got 10\)$"):
        SyntheticConfig(classes=3, first_class=10)
    with pytest.raises(XalError, match=r"--first-class must be between 0 and 12 - --classes = 10"):
        SyntheticConfig(classes=2, first_class=-1)
    out = tmp_path / "unused.zarr"
    assert main(["pool", "create", "--synthetic", "--out", str(out), "--first-class", "11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--first-class must be between 0 and 12 - --classes = 9" in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_memory_stays_flat_for_a_20k_pool(tmp_path: Path) -> None:
    """Peak RSS growth while writing 20k images of 64² is a few chunks, not the pool."""
    script = textwrap.dedent("""
        import resource, sys
        from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
        def peak_mib(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        create_synthetic_pool(SyntheticConfig(n=1100, size=64), sys.argv[1] + "/warm.zarr")
        before = peak_mib()  # one whole chunk written: buffers and codecs at their size
        create_synthetic_pool(SyntheticConfig(n=20000, size=64, shortcut=0.3), sys.argv[1] + "/big.zarr")
        print(peak_mib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, check=True)
    growth_mib = float(result.stdout.strip())
    raw_mib = 20000 * 64 * 64 * 2 / 2**20  # images + rois, 156 MiB
    assert growth_mib < raw_mib / 4
    assert Pool.open(tmp_path / "big.zarr").n == 20000
