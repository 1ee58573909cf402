"""VinDr-CXR ingest: class by most boxes (ties by --classes order), ROI of that class, skip rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xal_engine.errors import XalError
from xal_engine.ingest import IngestConfig, ingest
from xal_engine.ingest.samples import VINDR_HEADER, write_csv, write_dicom
from xal_engine.ingest.vindr import VindrSettings, VindrSource
from xal_engine.store import Pool

pytest.importorskip("pydicom")
H, W, S = 40, 60, 20       # original rows x columns; output 20 x 20: x scales by 1/3, y by 1/2

ROWS = [
    ("A", "Nodule/Mass", 8, "R1", 6, 4, 18, 16), ("A", "Nodule/Mass", 8, "R2", 30, 20, 42, 36),
    ("A", "Lung Opacity", 7, "R3", 0, 0, 60, 40),                       # 2 nodule boxes beat 1 opacity
    ("B", "Lung Opacity", 7, "R1", 3, 3, 9, 9), ("B", "Pulmonary fibrosis", 13, "R2", -10, 30, 12, 50),
    ("C", "No finding", 14, "R1", "", "", "", ""), ("C", "No finding", 14, "R2", "", "", "", ""),
    ("D", "Cardiomegaly", 3, "R1", 10, 10, 20, 20),
    ("E", "Nodule/Mass", 8, "R1", 100, 100, 120, 120),                  # wholly outside the image
    ("F", "Nodule/Mass", 8, "R1", 1, 1, 5, 5),                          # no DICOM file
    ("H", "Nodule/Mass", 8, "R1", 1, 1, 5, 5),                          # unreadable DICOM
]


def make(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = {}
    for image_id in "ABCDEG":
        pixels[image_id] = rng.integers(0, 4096, (H, W), dtype=np.uint16)
        write_dicom(root / "train" / f"{image_id}.dicom", pixels[image_id],
                    photometric="MONOCHROME1" if image_id == "B" else "MONOCHROME2")
    write_dicom(root / "test_copy" / "A.dcm", pixels["A"])                 # duplicate id
    (root / "train" / "H.dicom").write_bytes(b"\0" * 300)
    write_csv(root / "annotations" / "annotations_train.csv", VINDR_HEADER, ROWS)
    return pixels


def test_classes_rois_and_skips(tmp_path: Path) -> None:
    pixels = make(tmp_path / "src")
    report = ingest(VindrSource(tmp_path / "src", S), tmp_path / "p.zarr",
                    IngestConfig(test_fraction=0.0, val_fraction=0.0))
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["Nodule/Mass", "Pulmonary fibrosis", "Lung Opacity"] and pool.channels == 1
    assert list(b.ids) == ["A", "B"] and b.labels.tolist() == [0, 1]   # B: 1 vs 1, fibrosis listed first
    want_a = np.zeros((S, S), bool)
    want_a[2:8, 2:6] = True        # x 6..18 -> cols 2..5, y 4..16 -> rows 2..7
    want_a[10:18, 10:14] = True    # x 30..42 -> cols 10..13, y 20..36 -> rows 10..17
    want_b = np.zeros((S, S), bool)
    want_b[15:20, 0:4] = True      # x -10..12 -> cols 0..3 (clipped), y 30..50 -> rows 15..19 (clipped)
    np.testing.assert_array_equal(b.rois[0], want_a)
    np.testing.assert_array_equal(b.rois[1], want_b)
    # B is MONOCHROME1 without a window: 1 - min-max, then bilinear (antialiased) to 20 x 20
    p = pixels["B"].astype(np.float64)
    unit = torch.from_numpy(1 - (p - p.min()) / (p.max() - p.min()))[None, None]
    ref = F.interpolate(unit, size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
    assert np.abs(b.images[1, 0] - ref * 255).max() <= 0.5 + 1e-3
    reasons = {s["item"].replace(str(tmp_path / "src"), "SRC"): s["reason"] for s in report["skipped"]}
    assert reasons == {
        "SRC/train/A.dicom": "duplicate id 'A' (already taken by " + str(tmp_path / "src/test_copy/A.dcm") + ")",
        "C": "no box of the chosen classes", "D": "no box of the chosen classes",
        "E": "all boxes lie outside the image (60x40)",
        "F": "DICOM file missing (<image_id>.dicom or .dcm)", "G": "not in annotations_train.csv",
        "H": reasons["H"]}
    assert reasons["H"].startswith("H.dicom: unreadable DICOM (")


def test_keep_no_finding_and_class_choice(tmp_path: Path) -> None:
    make(tmp_path / "src")
    settings = VindrSettings(classes=("Lung Opacity", "Pulmonary fibrosis"), keep_no_finding=True, dtype="uint16")
    ingest(VindrSource(tmp_path / "src", S, settings), tmp_path / "p.zarr", IngestConfig())
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["Lung Opacity", "Pulmonary fibrosis", "No finding"]
    assert list(b.ids) == ["A", "B", "C"] and b.labels.tolist() == [0, 0, 2]   # B's tie: opacity first now
    assert b.has_roi.tolist() == [True, True, False] and b.images.dtype == np.uint16
    np.testing.assert_array_equal(b.rois[0], np.ones((S, S), bool))            # the whole-image opacity box


def test_unknown_class_name_is_an_error(tmp_path: Path) -> None:
    make(tmp_path / "src")
    with pytest.raises(XalError, match=r"--classes: unknown class name\(s\) \['Nodules'\]"):
        ingest(VindrSource(tmp_path / "src", S, VindrSettings(classes=("Nodules",))), tmp_path / "p.zarr")
    with pytest.raises(XalError, match="no annotations_train.csv or train.csv found"):
        ingest(VindrSource(tmp_path / "src" / "train", S), tmp_path / "p.zarr")
