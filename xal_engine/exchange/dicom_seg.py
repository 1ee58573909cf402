"""DICOM SEG objects (OHIF, 3D Slicer): ROIs read from SEGs over the pool's source images (import) and
a batch's ROIs and thresholded Grad-CAMs written as SEGs over them (export), with highdicom.

Matching: a pool ingested from DICOM (vindr, siim) stores each image's SOP Instance UID and the source's
Rows x Columns (the optional arrays ``sop_instance_uid``, ``source_shape`` of :mod:`xal_engine.store.format`);
a SEG frame references its source image by SOP Instance UID (per-frame ``SourceImageSequence``, as
highdicom reads it: ``get_source_image_uids`` / ``get_pixels_by_source_instance``).

Geometry: a pool image is the whole source image (Rows x Columns) resized to the pool's H x W, no crop
or padding. A SEG frame is at the source's Rows x Columns; it maps to the pool grid and back by
:func:`xal_engine.exchange.label_studio.resize_mask` (nearest neighbour with half-pixel centres, the pool's
rule for masks of another size): pool pixel i takes source pixel floor((i + 0.5) * Rows / H), source pixel
j takes pool pixel floor((j + 0.5) * H / Rows). When the source is at least as large as the pool grid
(radiographs), pool -> source -> pool gives back the pool mask exactly.

Import rule (:func:`read_seg`): one ROI per referenced source image, the union of the SEG's segments
except those labelled ``Grad-CAM`` (the model's pre-annotation :func:`build_seg` writes), or only segment
``segment`` when given; BINARY frames as they are, FRACTIONAL ones at >= 0.5. Every problem (not a SEG,
an image that is not in the pool, a frame whose size is not its source's, a missing segment) is collected
naming the file and the UID.

Export (:func:`build_seg`): a BINARY Segmentation over one source dataset with segment 1 ``ROI`` (manual,
only when the image has an ROI) and a last segment ``Grad-CAM`` (automatic, algorithm ``xal-engine
Grad-CAM``), at the source's Rows x Columns; type 2 patient/study attributes the source lacks are given
empty values on a copy (highdicom copies them into the SEG).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xal_engine import __version__
from xal_engine.errors import XalError
from xal_engine.exchange.label_studio import resize_mask
from xal_engine.store.format import DICOM_ARRAYS

if TYPE_CHECKING:
    from xal_engine.store import Pool

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
ROI_SEGMENT, CAM_SEGMENT = "ROI", "Grad-CAM"
SUFFIXES = (".dcm", ".dicom")
# type 2 attributes highdicom copies from the source; test and anonymised files may lack them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def require_highdicom() -> Any:
    try:
        import highdicom
    except ImportError:  # pragma: no cover - the "dicom" extra is missing
        raise XalError("DICOM SEG needs highdicom: pip install 'xal-engine[dicom]'") from None
    return highdicom


def dicom_files(path: str | Path, what: str) -> list[Path]:
    """``path`` itself, or every .dcm / .dicom file under the folder ``path``, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise XalError(f"{what} {path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not found:
        raise XalError(f"{what} {path}: no .dcm or .dicom file in the folder")
    return found


def require_uids(pool: Pool, what: str) -> None:
    """A one-line XalError naming the missing arrays when the pool keeps no DICOM UIDs."""
    missing = [name for name in DICOM_ARRAYS if name not in pool.optional]
    if missing:
        raise XalError(f"{what}: pool {pool.path} has no DICOM UIDs (arrays {', '.join(missing)} missing): "
                       "only pools ingested from DICOM (vindr, siim) by xal-engine >= this version keep them; "
                       "ingest it again")


def uid_index(pool: Pool, what: str) -> dict[str, int]:
    """SOP Instance UID -> pool position; refused when the pool has none, or one UID twice."""
    require_uids(pool, what)
    uids = pool.column("sop_instance_uid")  # (N,) str
    index: dict[str, int] = {}
    for i, uid in enumerate(uids.tolist()):
        if uid in index:
            raise XalError(f"{what}: pool {pool.path} holds SOP Instance UID {uid} twice (images "
                           f"{index[uid]} and {i}); SEG objects cannot be matched to one image")
        index[uid] = i
    return index


@dataclass(frozen=True)
class SegRois:
    """The ROIs of a set of SEG files, one per referenced pool image, in file then reference order."""

    files: list[int]  # 1-based position of the SEG file in the import (the problems' numbering)
    ids: list[str]  # pool ids
    masks: list[np.ndarray]  # (H, W) bool at the pool grid
    names: list[str]  # the SEG file each ROI came from


def read_seg(paths: str | Path, pool: Pool, problems: Any, segment: int | None = None) -> SegRois:
    """Every SEG under ``paths`` (a file or a folder) as ROIs at the pool grid (see the module doc);
    problems go to ``problems`` (``add(file number, message)``), file-level errors raise."""
    hd = require_highdicom()
    files = dicom_files(paths, "--import")
    index = uid_index(pool, f"--import {paths}")
    shapes = pool.take("source_shape", np.arange(pool.n))  # (N, 2) the sources' Rows, Columns
    ids = pool.column("ids")
    out = SegRois([], [], [], [])
    for number, path in enumerate(files, 1):
        try:
            seg = hd.seg.segread(path)
        except Exception as err:  # noqa: BLE001 - pydicom/highdicom raise many types for other files
            problems.add(number, f"{path}: not a readable DICOM SEG ({type(err).__name__}: {err})")
            continue
        if str(getattr(seg, "SOPClassUID", "")) != SEG_SOP_CLASS:
            problems.add(number, f"{path}: SOP Class {seg.SOPClassUID} is not Segmentation Storage")
            continue
        labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        if segment is not None:
            if segment not in labels:
                problems.add(number, f"{path}: no segment {segment} (it has {sorted(labels)})")
                continue
            chosen = [segment]
        else:
            chosen = [k for k, label in sorted(labels.items()) if label != CAM_SEGMENT]
            if not chosen:
                problems.add(number, f"{path}: only a {CAM_SEGMENT!r} segment (the model's); pass "
                                     "--segment to import it")
                continue
        fractional = str(seg.SegmentationType) == "FRACTIONAL"
        for _, _, uid in seg.get_source_image_uids():
            uid = str(uid)
            if uid not in index:
                problems.add(number, f"{path}: references SOP Instance UID {uid}, which is not an image of "
                                     f"pool {pool.path}")
                continue
            i = index[uid]
            rows, cols = (int(v) for v in shapes[i])
            if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
                problems.add(number, f"{path}: frames are {seg.Rows}x{seg.Columns}, its source {uid} "
                                     f"({ids[i]}) is {rows}x{cols}")
                continue
            try:
                px = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=chosen)
            except Exception as err:  # noqa: BLE001 - highdicom raises ValueError/KeyError/RuntimeError
                problems.add(number, f"{path}: cannot read the frames of {uid} ({type(err).__name__}: {err})")
                continue
            source_mask = (px[0] >= 0.5 if fractional else px[0] > 0).any(axis=-1)  # (Rows, Columns)
            out.files.append(number)
            out.ids.append(str(ids[i]))
            out.masks.append(to_pool_grid(source_mask, pool.height, pool.width))
            out.names.append(str(path))
    return out


def to_pool_grid(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Rows, Columns) bool on the source image -> (H, W) bool on the pool grid."""
    return resize_mask(mask, height, width)


def to_source_grid(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(H, W) bool on the pool grid -> (Rows, Columns) bool on the source image (the inverse rule)."""
    return resize_mask(mask, rows, columns)


def source_index(root: str | Path, wanted: set[str]) -> dict[str, Path]:
    """SOP Instance UID -> DICOM file under ``root`` for the UIDs ``wanted`` (headers only are read)."""
    import pydicom

    found: dict[str, Path] = {}
    for path in dicom_files(root, "--sources"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001, S112 - not a DICOM file: not a source
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in wanted and uid not in found:
            found[uid] = path
    return found


def _segment(hd: Any, number: int, label: str, manual: bool) -> Any:
    from pydicom.sr.codedict import codes

    kwargs: dict[str, Any] = {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.MANUAL}
    if not manual:
        kwargs = {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                  "algorithm_identification": hd.AlgorithmIdentificationSequence(
                      name="xal-engine Grad-CAM", family=codes.cid7162.ArtificialIntelligence,
                      version=__version__)}
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, **kwargs)


def build_seg(source: Any, roi: np.ndarray | None, cam: np.ndarray, series_uid: str,
              series_number: int = 900) -> Any:
    """A BINARY highdicom Segmentation over the single-frame ``source`` dataset: segment 1 ``ROI``
    (``roi`` (Rows, Columns) bool, left out when None) and ``Grad-CAM`` (``cam`` (Rows, Columns) bool)."""
    hd = require_highdicom()
    src = copy.deepcopy(source)
    for key in _TYPE2:
        if key not in src:
            setattr(src, key, "")
    masks = ([roi] if roi is not None else []) + [cam]
    labels = ([ROI_SEGMENT] if roi is not None else []) + [CAM_SEGMENT]
    descriptions = [_segment(hd, k, label, label == ROI_SEGMENT) for k, label in enumerate(labels, 1)]
    pixels = np.stack(masks, axis=-1)[None].astype(bool)  # (1, Rows, Columns, segments)
    return hd.seg.Segmentation(
        source_images=[src], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="xal-engine",
        manufacturer_model_name="xal-engine", software_versions=__version__, device_serial_number="0",
        series_description="xal-engine ROI and Grad-CAM")


def write_seg(path: Path, seg: Any) -> Path:
    """Save ``seg`` to a temporary file beside ``path``, then rename it over ``path`` (all or nothing)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
