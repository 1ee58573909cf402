"""BraTS ingest: slice selection, classes, ROIs and channels against hand-built volumes, both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xal_engine.errors import XalError
from xal_engine.ingest import IngestConfig, ingest, report_path
from xal_engine.ingest import brats as brats_mod
from xal_engine.ingest.brats import BratsSettings, BratsSource
from xal_engine.ingest.samples import write_brats_case, write_nifti
from xal_engine.store import Pool

SHAPE = (24, 24, 12)
KEPT = [3, 5, 7, 8]          # slices with >= 100 tumour voxels (slice 9 has 99)
CLASSES = [0, 1, 2, 0]       # edema, necrotic core, enhancing, tie edema/enhancing -> edema
LABEL_OF = {0: 2, 1: 1, 2: 4}


def hand_seg(enhancing: int = 4) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:12, 5:17, 3] = 2; seg[14:19, 5:9, 3] = 1              # 120 edema + 20 necrotic
    seg[4:14, 4:14, 5] = 1; seg[15:18, 15:18, 5] = enhancing    # 100 necrotic + 9 enhancing
    seg[3:13, 6:17, 7] = enhancing                              # 110 enhancing
    seg[0:5, 0:10, 8] = 2; seg[10:15, 0:10, 8] = enhancing      # 50 / 50: tie
    seg[0:9, 0:11, 9] = 2                                       # 99: below the threshold
    return seg


def channels(seed: int) -> dict[str, np.ndarray]:
    """t1ce, flair, t2: integers 0..255 with 0 and 255 in every slice, so min-max is x / 255."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("t1ce", "flair", "t2"):
        v = rng.integers(0, 256, SHAPE).astype(np.float32)
        v[0, 0, :], v[1, 0, :] = 0, 255
        out[name] = v
    return out


def make_case(root: Path, case: str, layout: str = "2020", ext: str = ".nii.gz", seed: int = 0,
              seg: np.ndarray | None = None) -> dict[str, np.ndarray]:
    vols = channels(seed)
    names = dict(zip(("t1ce", "flair", "t2"), ("t1ce", "flair", "t2") if layout == "2020" else ("t1c", "t2f", "t2w")))
    write_brats_case(root, case, hand_seg(4 if layout == "2020" else 3) if seg is None else seg, layout, ext,
                     images={names[k]: v for k, v in vols.items()})
    return vols


def run(src: Path, out: Path, size: int = 24, settings: BratsSettings | None = None, **kw) -> dict:
    kw = {"test_fraction": 0.0, "val_fraction": 0.0, **kw}
    return ingest(BratsSource(src, size, settings or BratsSettings()), out, IngestConfig(**kw))


def test_both_layouts_slices_classes_rois_and_channels(tmp_path: Path) -> None:
    v20 = make_case(tmp_path / "src", "BraTS20_Training_001", "2020", ".nii.gz", seed=1)
    v23 = make_case(tmp_path / "src" / "nested", "BraTS-GLI-00002-000", "2023", ".nii", seed=2)
    report = run(tmp_path / "src", tmp_path / "p.zarr")
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["edema", "necrotic_core", "enhancing"] and pool.channels == 3
    # cases in sorted id order: "BraTS-GLI-..." < "BraTS20_..."
    assert list(b.ids) == [f"BraTS-GLI-00002-000_slice_{k}" for k in KEPT] + \
        [f"BraTS20_Training_001_slice_{k}" for k in KEPT]
    assert b.labels.tolist() == CLASSES * 2 and b.has_roi.all() and b.images.dtype == np.uint8
    seg = hand_seg()
    for j, vols in enumerate((v23, v20)):
        for i, k in enumerate(KEPT):
            n = 4 * j + i
            want_roi = (seg[:, :, k] == LABEL_OF[CLASSES[i]]).T          # rows = voxel axis j
            np.testing.assert_array_equal(b.rois[n], want_roi)
            for c, name in enumerate(("t1ce", "flair", "t2")):           # channel order T1ce/FLAIR/T2
                np.testing.assert_array_equal(b.images[n, c], vols[name][:, :, k].T.astype(np.uint8))
    assert report["per_class"] == {"edema": 4, "necrotic_core": 2, "enhancing": 2}
    assert report["skipped"] == [] and pool.validate() == []
    assert pool.attrs["ingest"]["min_tumour_voxels"] == 100


def test_resize_whole_tumour_per_volume_and_float16(tmp_path: Path) -> None:
    seed_vols = channels(3)
    t2 = seed_vols["t2"].copy()
    t2[:, :, 3] = np.floor(t2[:, :, 3] / 2)           # slice max 127: per-volume keeps it, per-slice stretches
    write_brats_case(tmp_path / "src", "BraTS20_Training_001", hand_seg(), "2020",
                     images={"t1ce": seed_vols["t1ce"], "flair": seed_vols["flair"], "t2": t2})
    run(tmp_path / "src", tmp_path / "a.zarr", size=12, settings=BratsSettings(roi="whole-tumour"))
    a = Pool.open(tmp_path / "a.zarr").read(0, 4)
    seg_t = hand_seg().transpose(1, 0, 2)
    # nearest with half-pixel centres, 24 -> 12: output pixel i takes source pixel 2 i + 1
    np.testing.assert_array_equal(a.rois, (seg_t[1::2, 1::2, KEPT] > 0).transpose(2, 0, 1))
    full = np.stack([seed_vols["t1ce"][:, :, k].T for k in KEPT])[:, None] / 255.0
    ref = F.interpolate(torch.from_numpy(full), size=(12, 12), mode="bilinear", align_corners=False,
                        antialias=True).numpy()
    assert np.abs(a.images[:, :1].astype(float) - ref * 255).max() <= 0.5 + 1e-6
    run(tmp_path / "src", tmp_path / "v.zarr", settings=BratsSettings(per_volume=True, dtype="float16"))
    v = Pool.open(tmp_path / "v.zarr").read(0, 4)
    assert v.images.dtype == np.float16
    np.testing.assert_allclose(v.images[0, 2], t2[:, :, 3].T / 255.0, atol=1e-3)   # not stretched
    assert v.images[0, 2].max() <= 127 / 255 + 1e-3


def test_splits_are_per_patient_and_seeded(tmp_path: Path) -> None:
    for i in range(5):
        make_case(tmp_path / "src", f"BraTS20_Training_{i:03d}", seed=i)
    run(tmp_path / "src", tmp_path / "p.zarr", test_fraction=0.2, val_fraction=0.2, seed=7)
    b = Pool.open(tmp_path / "p.zarr").read(0, 20)
    case_split = {}
    for id_, s in zip(b.ids, b.split):
        case_split.setdefault(str(id_).rsplit("_slice_", 1)[0], set()).add(int(s))
    assert all(len(s) == 1 for s in case_split.values())          # no patient in two splits
    assert sorted(next(iter(s)) for s in case_split.values()) == [0, 0, 0, 1, 2]
    run(tmp_path / "src", tmp_path / "q.zarr", test_fraction=0.2, val_fraction=0.2, seed=7)
    np.testing.assert_array_equal(Pool.open(tmp_path / "q.zarr").read(0, 20).split, b.split)


def test_each_volume_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_case(tmp_path / "src", "BraTS20_Training_001")
    reads: list[str] = []
    original = brats_mod.read_volume
    monkeypatch.setattr(brats_mod, "read_volume", lambda p, dtype=None: reads.append(p.name) or original(p, dtype))
    run(tmp_path / "src", tmp_path / "p.zarr")
    assert sorted(reads) == sorted(f"BraTS20_Training_001_{m}.nii.gz" for m in ("t1ce", "flair", "t2", "seg"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_cases_are_skipped_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_case(src, "BraTS20_Training_001")
    make_case(src / "copy", "BraTS20_Training_001")                              # duplicate id
    make_case(src, "BraTS20_Training_002")
    _truncate(src / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii.gz")
    make_case(src, "BraTS20_Training_003", ext=".nii")
    _truncate(src / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii")
    make_case(src, "BraTS20_Training_004")
    (src / "BraTS20_Training_004" / "BraTS20_Training_004_flair.nii.gz").unlink()
    make_case(src, "BraTS20_Training_005")
    write_nifti(src / "BraTS20_Training_005" / "BraTS20_Training_005_seg.nii.gz", hand_seg()[:, :, :10])
    vols = make_case(src, "BraTS20_Training_006")
    vols["t1ce"][3, 3, 5] = np.nan
    write_nifti(src / "BraTS20_Training_006" / "BraTS20_Training_006_t1ce.nii.gz", vols["t1ce"])
    make_case(src, "BraTS20_Training_007", seg=np.zeros(SHAPE, np.uint8))
    odd = hand_seg()
    odd[20, 20, 0] = 3
    make_case(src, "BraTS20_Training_008", seg=odd)
    make_case(src, "BraTS20_Training_009")
    write_nifti(src / "BraTS20_Training_009" / "BraTS20_Training_009_t1ce.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    report = run(src, tmp_path / "p.zarr")
    reasons = {s["item"].replace(str(src), "SRC"): s["reason"] for s in report["skipped"]}
    expect = {
        "SRC/copy/BraTS20_Training_001": "duplicate id 'BraTS20_Training_001'",
        "BraTS20_Training_002": "BraTS20_Training_002_flair.nii.gz: unreadable NIfTI (EOFError",
        "BraTS20_Training_003": "BraTS20_Training_003_t2.nii: unreadable NIfTI (OSError",
        "BraTS20_Training_004": "missing modality flair",
        "BraTS20_Training_005": "shape mismatch between modalities: t1ce (24, 24, 12)",
        "BraTS20_Training_006_slice_5": "non-finite voxels in t1ce",
        "BraTS20_Training_007": "no slice with >= 100 tumour voxels (most: 0)",
        "BraTS20_Training_008": "BraTS20_Training_008_seg: labels [3] outside {0, 1, 2, 4}",
        "BraTS20_Training_009": "BraTS20_Training_009_t1ce.nii.gz: unreadable NIfTI (ValueError: expected a 3-D",
    }
    assert set(reasons) == set(expect)
    for item, start in expect.items():
        assert reasons[item].startswith(start), (item, reasons[item])
    pool = Pool.open(tmp_path / "p.zarr")
    ids = list(pool.read(0, pool.n).ids)
    assert ids == [f"BraTS20_Training_001_slice_{k}" for k in KEPT] + \
        [f"BraTS20_Training_006_slice_{k}" for k in (3, 7, 8)]
    assert pool.validate() == [] and json.loads(report_path(tmp_path / "p.zarr").read_text())["skipped_count"] == 9


def test_a_source_without_usable_cases_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(XalError, match="no usable brats data"):
        run(tmp_path / "empty", tmp_path / "p.zarr")
    make_case(tmp_path / "bad", "BraTS20_Training_001", seg=np.zeros(SHAPE, np.uint8))
    with pytest.raises(XalError, match="no usable brats images.*no slice with"):
        run(tmp_path / "bad", tmp_path / "q.zarr")
    assert not (tmp_path / "q.zarr").exists()
