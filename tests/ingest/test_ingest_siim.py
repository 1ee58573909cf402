"""SIIM-COVID ingest: study labels on images, ROIs from stringified boxes, has_roi False without."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xal_engine.ingest import IngestConfig, ingest
from xal_engine.ingest.samples import write_csv, write_dicom
from xal_engine.ingest.siim import SiimSource, parse_boxes
from xal_engine.store import Pool

pytest.importorskip("pydicom")
H, W, S = 40, 60, 20       # x scales by 1/3, y by 1/2
STUDY_HEADER = ("id", "Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance",
                "Atypical Appearance")


def test_parse_boxes() -> None:
    np.testing.assert_array_equal(
        parse_boxes("[{'x': 6.5, 'y': 4, 'width': 12, 'height': 12}, {'x': 0, 'y': 1, 'width': 2, 'height': 3}]",
                    "opacity 1 6.5 4 18.5 16 opacity 1 0 1 2 4"), [[6.5, 4, 18.5, 16], [0, 1, 2, 4]])
    assert parse_boxes("", "none 1 0 0 1 1").shape == (0, 4)
    np.testing.assert_array_equal(parse_boxes("nan", "opacity 0.5 30 20 42 36 none 1 0 0 1 1"), [[30, 20, 42, 36]])
    with pytest.raises(ValueError):
        parse_boxes("[1, 2]", "")


def test_study_labels_boxes_and_skips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    layout = {"i1": "s1", "i2": "s1", "i3": "s2", "i4": "s3", "i5": "s9", "i6": "s2", "i7": "s2"}
    for image, study in layout.items():
        if image != "i7":
            write_dicom(src / "train" / study / f"ser_{study}" / f"{image}.dcm",
                        np.arange(H * W, dtype=np.uint16).reshape(H, W))
    write_dicom(src / "train" / "s4" / "x" / "i8.dcm", np.zeros((H, W), np.uint16))     # no image row
    write_csv(src / "train_study_level.csv", STUDY_HEADER, [
        ("s1_study", 0, 1, 0, 0), ("s2_study", 0, 0, 0, 1), ("s3_study", 1, 1, 0, 0)])
    write_csv(src / "train_image_level.csv", ("id", "boxes", "label", "StudyInstanceUID"), [
        ("i1_image", "[{'x': 6, 'y': 4, 'width': 12, 'height': 12}]", "opacity 1 6 4 18 16", "s1"),
        ("i2_image", "", "none 1 0 0 1 1", "s1"),
        ("i3_image", "", "opacity 0.5 30 20 42 36", "s2"),
        ("i4_image", "", "none 1 0 0 1 1", "s3"),
        ("i5_image", "", "none 1 0 0 1 1", "s9"),
        ("i6_image", "[{'x': 1", "opacity 1 0 0 1 1", "s2"),
        ("i7_image", "", "none 1 0 0 1 1", "s2")])
    report = ingest(SiimSource(src, S), tmp_path / "p.zarr", IngestConfig(test_fraction=0.5, val_fraction=0))
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["negative", "typical", "indeterminate", "atypical"]
    assert list(b.ids) == ["i1", "i2", "i3"] and b.labels.tolist() == [1, 1, 3]
    assert b.has_roi.tolist() == [True, False, True]
    want = np.zeros((3, S, S), bool)
    want[0, 2:8, 2:6] = True          # x 6..18 -> cols 2..5, y 4..16 -> rows 2..7
    want[2, 10:18, 10:14] = True      # from the label string: x 30..42, y 20..36
    np.testing.assert_array_equal(b.rois, want)
    assert b.split[0] == b.split[1] and sorted({int(b.split[0]), int(b.split[2])}) == [0, 2]  # per study
    reasons = {s["item"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"i4", "i5", "i6", "i7", "i8"}
    assert reasons["i4"] == "study label in train_study_level.csv is not one-hot ([1.0, 1.0, 0.0, 0.0])"
    assert reasons["i5"] == "study s9 not in train_study_level.csv"
    assert reasons["i6"].startswith("unparsable boxes in train_image_level.csv")
    assert reasons["i7"].startswith("DICOM file missing") and reasons["i8"] == "not in train_image_level.csv"
