"""`ingest brats --volumes`: crop box, orientation, resampling, normalisation, classes (dominant / grade
from name_mapping.csv), bad cases, the volume pool and the CLI, against hand-built NIfTI cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.errors import XalError
from xal_engine.ingest import IngestConfig, ingest
from xal_engine.ingest.brats_volumes import (
    BratsVolumeSettings,
    BratsVolumeSource,
    brain_box,
    cube_box,
    read_grades,
)
from xal_engine.ingest.samples import write_csv, write_nifti
from xal_engine.store import Pool

SHAPE = (40, 44, 36)                   # voxel axes (i, j, k)
CENTRE, AXES = (20, 24, 16), (14, 16, 12)
# brain = integer ellipsoid |x - c| / a <= 1: i in [6, 35), j in [8, 41), k in [4, 29): extents 29, 33, 25.
# Cube of side 33 (spacing 1): start = lo - (33 - extent) // 2 = (4, 8, 0), size (33, 33, 33).
START, SIDE = np.array([4, 8, 0]), 33
NAMES = {"2020": ("_", ("t1ce", "flair", "t2", "seg"), 4), "2023": ("-", ("t1c", "t2f", "t2w", "seg"), 3)}
MAPPING_HEADER = ("Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                  "BraTS_2019_subject_ID", "BraTS_2020_subject_ID")


def brain_mask() -> np.ndarray:
    g = np.indices(SHAPE)
    return sum(((g[a] - CENTRE[a]) / AXES[a]) ** 2 for a in range(3)) <= 1.0


def hand_seg(kind: str, enhancing: int = 4) -> np.ndarray:
    """'edema': 208 edema + 8 necrotic voxels; 'enhancing': 125 enhancing + 64 edema; 'none': empty."""
    seg = np.zeros(SHAPE, np.uint8)
    if kind == "edema":
        seg[14:20, 18:24, 10:16] = 2
        seg[16:18, 20:22, 12:14] = 1
    elif kind == "enhancing":
        seg[12:17, 20:25, 14:19] = enhancing
        seg[22:26, 26:30, 8:12] = 2
    return seg


def channels(seed: int) -> np.ndarray:
    """(3, X, Y, Z) float32: integers 1..200 inside the brain (every channel > 0 there), 0 outside."""
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 201, (3, *SHAPE)) * brain_mask()).astype(np.float32)


def make_case(root: Path, case: str, layout: str = "2020", ext: str = ".nii.gz", seg: np.ndarray | None = None,
              seed: int = 0, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """A BraTS case folder (t1ce/flair/t2/seg in this layout's names); returns its channels."""
    sep, mods, enhancing = NAMES[layout]
    img = channels(seed)
    seg = hand_seg("edema", enhancing) if seg is None else seg
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    for mod, data in zip(mods, (*img, seg)):
        write_nifti(root / case / f"{case}{sep}{mod}{ext}", data, affine)
    return img


def normalised(img: np.ndarray) -> np.ndarray:
    """Per channel min-max over the brain, 0 outside: the values the pool should hold before resampling."""
    brain = brain_mask()
    lo = img[:, brain].min(axis=1)[:, None, None, None]
    hi = img[:, brain].max(axis=1)[:, None, None, None]
    return (img - lo) / (hi - lo) * brain


def run(src: Path, out: Path, grid: int = 11, settings: BratsVolumeSettings | None = None, **kw) -> dict:
    kw = {"test_fraction": 0.0, "val_fraction": 0.0, **kw}
    return ingest(BratsVolumeSource(src, grid, settings or BratsVolumeSettings()), out, IngestConfig(**kw))


def test_cube_box_pads_symmetrically_in_mm() -> None:
    start, size = cube_box(np.array([6, 8, 4]), np.array([35, 41, 29]), np.array([1.0, 1.0, 1.0]))
    assert start.tolist() == START.tolist() and size.tolist() == [SIDE] * 3
    # spacing (1, 1, 2) mm: extents 29, 33, 25 voxels = 29, 33, 50 mm -> side 50 mm = 50, 50, 25 voxels
    start, size = cube_box(np.array([6, 8, 4]), np.array([35, 41, 29]), np.array([1.0, 1.0, 2.0]))
    assert start.tolist() == [-4, 0, 4] and size.tolist() == [50, 50, 25]
    start, size = brain_box(brain_mask(), np.array([1.0, 1.0, 2.0]))               # the ellipsoid's box
    assert start.tolist() == [-4, 0, 4] and size.tolist() == [50, 50, 25]


def test_crop_orientation_and_exact_resample_both_layouts(tmp_path: Path) -> None:
    """Grid 11 from a 33-voxel cube: output voxel d is source voxel start + 3 d + 1 exactly (trilinear
    and nearest-exact alike), so image and ROI are hand-computable; axes (D, H, W) = (k, j, i)."""
    img20 = make_case(tmp_path / "src", "BraTS20_Training_001", "2020", ".nii.gz", hand_seg("edema"), seed=1)
    img23 = make_case(tmp_path / "src" / "nested", "BraTS-GLI-00002-000", "2023", ".nii",
                      hand_seg("enhancing", 3), seed=2)
    report = run(tmp_path / "src", tmp_path / "p.zarr", settings=BratsVolumeSettings(roi="dominant"))
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.is_volume and pool.depth == 11
    assert b.images.shape == (2, 3, 11, 11, 11) and b.rois.shape == (2, 11, 11, 11)
    assert list(b.ids) == ["BraTS-GLI-00002-000", "BraTS20_Training_001"]          # sorted case ids
    assert pool.classes == ["edema", "necrotic_core", "enhancing"] and b.labels.tolist() == [2, 0]
    assert b.has_roi.all() and b.images.dtype == np.uint8 and pool.validate() == []
    i, j, k = (START[a] + 3 * np.arange(11) + 1 for a in range(3))
    for n, (img, seg, label) in enumerate(((img23, hand_seg("enhancing", 3), 3), (img20, hand_seg("edema"), 2))):
        want = normalised(img)[:, i][:, :, j][:, :, :, k].transpose(0, 3, 2, 1)      # (3, k, j, i)
        assert np.abs(b.images[n].astype(float) - want * 255).max() <= 0.5 + 1e-3
        want_roi = (seg[i][:, j][:, :, k] == label).transpose(2, 1, 0)
        np.testing.assert_array_equal(b.rois[n], want_roi)
        assert want_roi.sum() > 0
    # case 001's edema box [14:20, 18:24, 10:16] (i, j, k) holds the sampled voxels i 14, 17 (w = 3, 4),
    # j 18, 21 (h = 3, 4), k 10, 13 (d = 3, 4); (i, j, k) = (17, 21, 13) is necrotic: not in the edema ROI
    d, h, w = np.nonzero(b.rois[1])
    assert set(zip(d.tolist(), h.tolist(), w.tolist())) == \
        {(dd, hh, ww) for dd in (3, 4) for hh in (3, 4) for ww in (3, 4)} - {(4, 4, 4)}
    settings = pool.attrs["ingest"]
    assert (settings["grid"], settings["size"]) == (11, 11)
    assert (settings["class_by"], settings["roi"]) == ("dominant", "dominant")
    assert report["skipped"] == [] and report["per_class"] == {"edema": 1, "necrotic_core": 0, "enhancing": 1}


def test_whole_tumour_fraction_centroid_and_padding_anisotropic(tmp_path: Path) -> None:
    """Spacing (1, 1, 2) mm: the box is padded to 50 x 50 x 25 voxels from (-4, 0, 4) (zeros outside
    the volume); grid 25 halves i and j and keeps k. A non-integer ratio (grid 16) keeps the ROI's
    volume fraction and centroid."""
    g = np.indices(SHAPE)
    ball = ((g[0] - 18) ** 2 + (g[1] - 22) ** 2 + (g[2] - 15) ** 2) <= 5 ** 2
    assert ball.sum() == 515                                                        # lattice points in r <= 5
    seg = np.where(ball, 2, 0).astype(np.uint8)
    seg[17:20, 21:24, 14:17] = 1
    make_case(tmp_path / "src", "BraTS20_Training_001", seg=seg, spacing=(1.0, 1.0, 2.0))
    run(tmp_path / "src", tmp_path / "a.zarr", grid=25)
    a = Pool.open(tmp_path / "a.zarr").read(0, 1)
    padded = np.zeros((50, 50, 25), bool)                                           # box (-4, 0, 4) + (50, 50, 25)
    padded[4:44, :44, :] = (seg > 0)[:, :, 4:29]
    pi = pj = 2 * np.arange(25) + 1                                                  # nearest-exact: 50 -> 25
    np.testing.assert_array_equal(a.rois[0], padded[pi][:, pj].transpose(2, 1, 0))  # k kept (25 -> 25)
    pool = Pool.open(tmp_path / "a.zarr")  # the box and spacing are stored per volume
    assert pool.take("crop_box", np.array([0])).tolist() == [[[-4, 0, 4], [50, 50, 25]]]
    assert pool.take("source_spacing", np.array([0])).tolist() == [[1.0, 1.0, 2.0]]
    assert pool.info()["optional_arrays"] == ["crop_box", "source_spacing"] and pool.validate() == []
    assert (a.images[0][..., :2] == 0).all()                                         # w = 0, 1: i < 0, padding
    make_case(tmp_path / "iso", "BraTS20_Training_001", seg=seg)
    run(tmp_path / "iso", tmp_path / "b.zarr", grid=16)
    roi = Pool.open(tmp_path / "b.zarr").read(0, 1).rois[0]                         # (16, 16, 16) of (k, j, i)
    scale = SIDE / 16                                                   # source voxels per output voxel
    assert abs(roi.sum() * scale ** 3 - 515) / 515 < 0.15
    centre = np.array(np.nonzero(roi)).mean(axis=1)                                   # (d, h, w)
    source = START[::-1] + (centre + 0.5) * scale - 0.5                               # (k, j, i) in source voxels
    np.testing.assert_allclose(source, [15, 22, 18], atol=1.0)


def test_grades_from_name_mapping(tmp_path: Path) -> None:
    src = tmp_path / "MICCAI_BraTS2020_TrainingData"
    for n in range(1, 5):
        make_case(src, f"BraTS20_Training_{n:03d}", seed=n)
    make_case(src, "BraTS-GLI-00005-000", "2023")
    write_csv(src / "name_mapping.csv", MAPPING_HEADER, [
        ("HGG", "Brats17_CBICA_AAB_1", "Brats18_CBICA_AAB_1", "NA", " BraTS19_CBICA_AAB_1", "BraTS20_Training_001"),
        ("LGG", "Brats17_2013_0_1", "Brats18_2013_0_1", "TCGA-CS-4941", "BraTS19_2013_0_1", "BraTS20_Training_002"),
        ("LGG", "NA", "NA", "TCGA-CS-4942", "NA", " BraTS20_Training_003 "),
        ("NA", "NA", "NA", "NA", "NA", "BraTS20_Training_999"),
    ])
    report = run(src, tmp_path / "p.zarr", settings=BratsVolumeSettings(class_by="grade"))
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["LGG", "HGG"]
    assert list(b.ids) == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert b.labels.tolist() == [1, 0, 0]
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"BraTS20_Training_004", "BraTS-GLI-00005-000"}
    assert reasons["BraTS20_Training_004"].startswith("not in name_mapping.csv")
    assert reasons["BraTS-GLI-00005-000"].startswith("2023 layout has no grade")
    assert pool.attrs["ingest"]["name_mapping"] == str(src / "name_mapping.csv")
    assert report["per_class"] == {"LGG": 2, "HGG": 1}


def test_read_grades_conflicts_and_missing_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "m.csv", ("Grade", "BraTS_2020_subject_ID"),
              [("HGG", "a"), ("HGG", "a"), ("LGG", "b"), ("HGG", "b"), ("GBM", "c")])
    assert read_grades(tmp_path / "m.csv") == {"a": "HGG", "b": None, "c": None}
    write_csv(tmp_path / "v.csv", MAPPING_HEADER[1:], [("NA",) * 5])          # the validation set's layout
    with pytest.raises(XalError, match=r"v.csv: missing column\(s\) Grade"):
        read_grades(tmp_path / "v.csv")
    make_case(tmp_path / "src", "BraTS20_Training_001")
    with pytest.raises(XalError, match="no name_mapping.csv found .give it with --name-mapping"):
        run(tmp_path / "src", tmp_path / "p.zarr", settings=BratsVolumeSettings(class_by="grade"))
    with pytest.raises(XalError, match="--name-mapping: only used with --class-by grade"):
        BratsVolumeSettings(name_mapping=tmp_path / "m.csv")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_cases_are_skipped_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_case(src, "BraTS20_Training_001")
    make_case(src / "copy", "BraTS20_Training_001")                               # duplicate id
    make_case(src, "BraTS20_Training_002")
    _truncate(src / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii.gz")
    make_case(src, "BraTS20_Training_003", ext=".nii")
    _truncate(src / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii")
    make_case(src, "BraTS20_Training_004")
    (src / "BraTS20_Training_004" / "BraTS20_Training_004_seg.nii.gz").unlink()
    make_case(src, "BraTS20_Training_005", seg=np.zeros(SHAPE, np.uint8))
    img = make_case(src, "BraTS20_Training_006")
    img[1, 20, 20, 20] = np.inf
    write_nifti(src / "BraTS20_Training_006" / "BraTS20_Training_006_flair.nii.gz", img[1])
    odd = hand_seg("edema")
    odd[20, 20, 20] = 3
    make_case(src, "BraTS20_Training_007", seg=odd)
    make_case(src, "BraTS20_Training_008")
    write_nifti(src / "BraTS20_Training_008" / "BraTS20_Training_008_seg.nii.gz", hand_seg("edema")[:, :, :30])
    report = run(src, tmp_path / "p.zarr", workers=2)
    reasons = {s["item"].replace(str(src), "SRC"): s["reason"] for s in report["skipped"]}
    expect = {
        "SRC/copy/BraTS20_Training_001": "duplicate id 'BraTS20_Training_001'",
        "BraTS20_Training_002": "BraTS20_Training_002_flair.nii.gz: unreadable NIfTI (EOFError",
        "BraTS20_Training_003": "BraTS20_Training_003_t2.nii: unreadable NIfTI (OSError",
        "BraTS20_Training_004": "missing modality seg",
        "BraTS20_Training_005": "BraTS20_Training_005_seg: no tumour voxels (no ROI)",
        "BraTS20_Training_006": "non-finite voxels in flair",
        "BraTS20_Training_007": "BraTS20_Training_007_seg: labels [3] outside {0, 1, 2, 4}",
        "BraTS20_Training_008": "shape mismatch between modalities: t1ce (40, 44, 36)",
    }
    assert set(reasons) == set(expect)
    for item, start in expect.items():
        assert reasons[item].startswith(start), (item, reasons[item])
    pool = Pool.open(tmp_path / "p.zarr")
    assert list(pool.read(0, pool.n).ids) == ["BraTS20_Training_001"] and report["skipped_count"] == 8


def test_cli_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for n in (1, 2, 3):
        make_case(src, f"BraTS20_Training_{n:03d}", seed=n)
    rows = [(grade, "NA", "NA", "NA", "NA", f"BraTS20_Training_{n:03d}") for n, grade in ((1, "HGG"), (2, "HGG"), (3, "LGG"))]
    write_csv(tmp_path / "map.csv", MAPPING_HEADER, rows)
    out = tmp_path / "p.zarr"
    code = main(["ingest", "brats", str(src), "--out", str(out), "--volumes", "--grid", "12", "--class-by", "grade",
                 "--name-mapping", str(tmp_path / "map.csv"), "--dtype", "float16", "--test-fraction", "0.34",
                 "--val-fraction", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ingest brats: 3 volumes from 3 items (0 skipped)")
    pool = Pool.open(out)
    b = pool.read(0, pool.n)
    assert b.images.shape == (3, 3, 12, 12, 12) and b.images.dtype == np.float16 and b.labels.tolist() == [1, 1, 0]
    assert pool.classes == ["LGG", "HGG"] and sorted(b.split.tolist()) == [0, 0, 2]
    settings = pool.attrs["ingest"]
    assert (settings["volumes"], settings["grid"], settings["roi"]) == (True, 12, "whole-tumour")
    assert main(["ingest", "brats", str(src), "--out", str(tmp_path / "q.zarr"), "--volumes", "--json",
                 "--normalise", "volume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["grid"] == 96 and report["per_class"]["edema"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--volumes", "--size", "64"], "--size: 2-D only, not with --volumes"),
    (["--volumes", "--min-tumour-voxels", "5", "--normalise", "slice"],
     "--min-tumour-voxels, --normalise slice: 2-D only"),
    (["--grid", "32"], "--grid: only with --volumes"),
    (["--class-by", "grade"], "--class-by: only with --volumes"),
    (["--volumes", "--grid", "0"], "--grid: expected a positive number of voxels, got 0"),
    (["--volumes", "--name-mapping", "x.csv"], "--name-mapping: only used with --class-by grade"),
    (["--volumes", "--class-by", "grade", "--name-mapping", "nope.csv"], "--name-mapping: nope.csv is not a file"),
])
def test_cli_conflicting_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    make_case(tmp_path / "src", "BraTS20_Training_001")
    assert main(["ingest", "brats", str(tmp_path / "src"), "--out", str(tmp_path / "p.zarr"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "p.zarr").exists()
