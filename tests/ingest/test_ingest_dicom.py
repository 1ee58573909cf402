"""DICOM pixel pipeline and box rasterising, against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xal_engine.ingest.boxes import boxes_mask
from xal_engine.ingest.common import quantise
from xal_engine.ingest.dicom import load_radiograph, read_dicom, window
from xal_engine.ingest.samples import write_dicom

pytest.importorskip("pydicom")


def test_modality_lut_then_window_16_bit(tmp_path: Path) -> None:
    # stored p -> x = 2 p - 100 -> LINEAR window c = 1000, w = 1001: y = clip((x - 999.5) / 1000 + 0.5)
    stored = np.array([[50, 300], [550, 800]], np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=16, slope=2.0, intercept=-100.0,
                       window=(1000.0, 1001.0))
    y = read_dicom(path)
    np.testing.assert_allclose(y, [[0.0, 0.0005], [0.5005, 1.0]], atol=1e-6)
    assert quantise(y, np.dtype(np.uint8)).tolist() == [[0, 0], [128, 255]]
    assert quantise(y, np.dtype(np.uint16)).tolist() == [[0, 33], [32800, 65535]]
    # without the window: min-max of the modality values (0 .. 1500)
    np.testing.assert_allclose(read_dicom(path, use_window=False), [[0, 500 / 1500], [1000 / 1500, 1]], atol=1e-6)


def test_monochrome1_is_inverted_12_bit(tmp_path: Path) -> None:
    stored = np.array([[100, 1075], [3025, 4000]], np.uint16)    # min-max: (x - 100) / 3900
    y = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(y, [[1.0, 0.75], [0.25, 0.0]], atol=1e-6)   # low values are white
    assert quantise(y, np.dtype(np.uint8)).tolist() == [[255, 191], [64, 0]]


def test_window_functions() -> None:
    x = np.array([0.0, 50.0, 100.0])
    np.testing.assert_allclose(window(x, 50.0, 100.0, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(window(x, 50.0, 100.0, "SIGMOID"), 1 / (1 + np.exp([2.0, 0.0, -2.0])))
    np.testing.assert_array_equal(window(x, 50.0, 1.0), [0.0, 1.0, 1.0])   # width 1: step at c - 0.5


def test_boxes_are_scaled_clipped_and_filled() -> None:
    # 100 x 200 image (H x W) -> 10 x 10: x scales by 1/20, y by 1/10
    boxes = np.array([[20, 10, 60, 35],        # cols 1..2, rows 1..3
                      [-50, 90, 30, 150],      # partly outside: cols 0..1, row 9
                      [250, 0, 300, 50],       # wholly outside: nothing
                      [60, 10, 20, 35],        # x_max < x_min: dropped
                      [np.nan, 0, 10, 10]])    # damaged: dropped
    want = np.zeros((10, 10), bool)
    want[1:4, 1:3] = True
    want[9, 0:2] = True
    np.testing.assert_array_equal(boxes_mask(boxes, 100, 200, 10), want)
    assert not boxes_mask(np.empty((0, 4)), 100, 200, 10).any()


def test_unreadable_dicom_becomes_a_skip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all" * 10)
    r = load_radiograph("bad", bad, 0, np.empty((0, 4)), 8, np.dtype(np.uint8))
    assert len(r) == 0 and r.skipped[0].reason.startswith("bad.dcm: unreadable DICOM (")
    good = write_dicom(tmp_path / "t.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    good.write_bytes(good.read_bytes()[:-40])          # pixel data cut short
    r = load_radiograph("t", good, 0, np.empty((0, 4)), 8, np.dtype(np.uint8))
    assert len(r) == 0 and "unreadable DICOM" in r.skipped[0].reason


def test_voi_lut_sequence_without_window(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset

    path = write_dicom(tmp_path / "lut.dcm", np.array([[0, 1], [2, 3]], np.uint16), bits_stored=8)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]                      # 4 entries, first input value 0, 8-bit output
    item.add_new(0x00283006, "US", [0, 10, 200, 250])   # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    # LUT output 0, 10, 200, 250, then min-max to [0, 1]
    np.testing.assert_allclose(read_dicom(path), [[0, 10 / 250], [200 / 250, 1]], atol=1e-6)
