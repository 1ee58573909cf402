"""DICOM pixel pipeline: stored values -> modality LUT -> VOI LUT / window -> [0, 1], MONOCHROME1 inverted.

Order as in PS3.3 C.11 (the grayscale pipeline): rescale slope/intercept (or a Modality LUT) gives
modality units; the first window (Window Center/Width, VOI LUT Function LINEAR, LINEAR_EXACT or
SIGMOID) or, without one, a VOI LUT Sequence, or, without either, the image's own min..max maps
them to [0, 1]; MONOCHROME1 (white = low values) is inverted last, so 1 is always white.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

try:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pragma: no cover - the "dicom" extra is missing
    pydicom = None

from xal_engine.errors import XalError
from xal_engine.ingest.boxes import boxes_mask
from xal_engine.ingest.common import (
    DTYPES,
    IngestSource,
    Item,
    ItemResult,
    Skip,
    dedupe,
    minmax,
    quantise,
    resize_images,
)
from xal_engine.store.format import DICOM_ARRAYS


def require_pydicom() -> None:
    if pydicom is None:
        raise XalError("reading DICOM needs pydicom: pip install 'xal-engine[dicom]'")


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued: the first pair is the default view."""
    return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Modality values -> [0, 1] by a DICOM window (PS3.3 C.11.2.1.2)."""
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if width <= 1.0:  # LINEAR with width 1: a step at center - 0.5
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def dicom_to_unit(ds: Any, use_window: bool = True) -> np.ndarray:
    """A monochrome single-frame dataset -> (H, W) float32 in [0, 1], 1 = white."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"expected a MONOCHROME1/2 image, got {photometric}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"expected one frame, got {ds.NumberOfFrames}")
    stored = ds.pixel_array
    x = np.asarray(apply_modality_lut(stored, ds), np.float64)
    if use_window and "WindowCenter" in ds and "WindowWidth" in ds:
        func = str(ds.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
        y = window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), func)
    elif use_window and "VOILUTSequence" in ds:
        lut_in = np.rint(x).astype(np.int64)          # a LUT is indexed by integer modality values
        y = minmax(np.asarray(apply_voi_lut(lut_in, ds, prefer_lut=True), np.float64), (0, 1))
    else:
        y = minmax(x, (0, 1))
    if not np.isfinite(y).all():
        raise ValueError("non-finite pixel values after the modality/VOI LUT")
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32)


def read_dicom(path: Path, use_window: bool = True) -> np.ndarray:
    """File -> (H, W) float32 in [0, 1]. Raises (any exception) on an unreadable file."""
    ds = pydicom.dcmread(path)
    return dicom_to_unit(ds, use_window)


def source_uids(ds: Any) -> dict[str, str]:
    """The dataset's SOP, Series and Study Instance UIDs (the pool's optional DICOM columns; "" where
    absent)."""
    return {"sop_instance_uid": str(ds.get("SOPInstanceUID", "") or "").strip(),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or "").strip(),
            "study_instance_uid": str(ds.get("StudyInstanceUID", "") or "").strip()}


def load_radiograph(key: str, path: Path, label: int, boxes: np.ndarray, size: int, dtype: np.dtype,
                    use_window: bool = True, require_roi: bool = False) -> ItemResult:
    """One DICOM radiograph -> a 1-channel pool image with the ROI of its boxes (original pixels),
    and its UIDs and Rows x Columns (the pool's optional DICOM arrays).

    Geometry: the whole image (Rows x Columns) is resized to size x size (:func:`resize_images`), no
    crop or padding, so source pixel (r, c) covers pool pixels [r * S / Rows, (r + 1) * S / Rows) x
    [c * S / Columns, (c + 1) * S / Columns); boxes map by that scale (:func:`boxes_mask`).
    """
    try:
        ds = pydicom.dcmread(path)
        x = dicom_to_unit(ds, use_window)                                   # (H, W) in [0, 1]
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for damaged files
        return ItemResult.only_skips(Skip(key, f"{path.name}: unreadable DICOM ({type(err).__name__}: {err})"))
    uids = source_uids(ds)
    if not uids["sop_instance_uid"]:
        return ItemResult.only_skips(Skip(key, f"{path.name}: no SOP Instance UID"))
    height, width = x.shape
    roi = boxes_mask(boxes, height, width, size)
    if require_roi and not roi.any():
        return ItemResult.only_skips(Skip(key, f"all boxes lie outside the image ({width}x{height})"))
    image = quantise(resize_images(x[None, None], size), dtype)              # (1, 1, S, S)
    extra = {name: np.array([value], dtype=object) for name, value in uids.items()}
    extra["source_shape"] = np.array([[height, width]], np.int32)
    return ItemResult(images=image, rois=roi[None], has_roi=np.array([roi.any()]),
                      labels=np.array([label], np.int16), ids=(key,), extra=extra)


def index_dicoms(root: Path, suffixes: tuple[str, ...]) -> tuple[dict[str, Path], list[Skip]]:
    """Image id (file stem) -> DICOM path under ``root``; a second file with the same id is skipped."""
    found: dict[str, list[Path]] = {}
    for p in root.rglob("*"):
        if p.suffix.lower() in suffixes and p.is_file():
            found.setdefault(p.stem, []).append(p)
    return dedupe(found)


class RadiographSource(IngestSource):
    """A DICOM radiograph format: items carry (path, label, boxes (nb, 4), require_roi). Pools keep
    each image's UIDs and source shape (``DICOM_ARRAYS``)."""

    extra_arrays = DICOM_ARRAYS

    def __init__(self, root: Path, size: int, dtype: str, use_window: bool) -> None:
        require_pydicom()
        super().__init__(root, size)
        self.channels, self.dtype, self.use_window = 1, DTYPES[dtype], use_window

    def load(self, item: Item) -> ItemResult:
        path, label, boxes, require_roi = item.data
        return load_radiograph(item.key, path, label, boxes, self.size, self.dtype, self.use_window,
                               require_roi)
