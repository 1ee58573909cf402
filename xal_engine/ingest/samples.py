"""Tiny datasets in the real on-disk formats (NIfTI via nibabel, DICOM via pydicom, CSVs, PNGs).

The real datasets cannot be downloaded here: tests and benchmarks build look-alikes with these.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS volumes: LPS-like voxel axes


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> Path:
    """``data`` as a NIfTI-1 file (.nii or .nii.gz by the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_brats_case(root: Path, case: str, seg: np.ndarray, layout: str = "2020", ext: str = ".nii.gz",
                     images: dict[str, np.ndarray] | None = None) -> Path:
    """A case folder in the BraTS 2020/2021 or 2023 layout. Modalities default to seeded noise
    plus 100 * seg, as float32; ``images`` overrides some (keyed by this layout's names)."""
    sep, mods = ("_", ("t1", "t1ce", "t2", "flair")) if layout == "2020" else ("-", ("t1n", "t1c", "t2w", "t2f"))
    folder = root / case
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    for mod in mods:
        data = (images or {}).get(mod)
        if data is None:
            data = (rng.random(seg.shape) * 50 + 100 * seg).astype(np.float32)
        write_nifti(folder / f"{case}{sep}{mod}{ext}", data)
    write_nifti(folder / f"{case}{sep}seg{ext}", seg.astype(np.uint8))
    return folder


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                slope: float = 1.0, intercept: float = 0.0, window: tuple[float, float] | None = None,
                uids: tuple[str, str, str] | None = None) -> Path:
    """An uncompressed single-frame monochrome DICOM; ``pixels`` (H, W) uint8 or uint16."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = uids[2] if uids else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (uids[0], uids[1]) if uids else (generate_uid(), generate_uid())
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


VINDR_HEADER = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")


def make_vindr(root: Path, n: int, shape: tuple[int, int] = (256, 256), seed: int = 0) -> Path:
    """n 12-bit radiographs with one Nodule/Mass or Lung Opacity box from each of three readers."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image_id = f"img{i:05d}"
        write_dicom(root / "train" / f"{image_id}.dicom", rng.integers(0, 4096, shape, dtype=np.uint16))
        cls = ("Nodule/Mass", 8) if i % 2 else ("Lung Opacity", 7)
        for rad in ("R1", "R2", "R3"):
            x0, y0 = rng.integers(0, shape[1] // 2), rng.integers(0, shape[0] // 2)
            rows.append((image_id, *cls, rad, x0, y0, x0 + shape[1] // 4, y0 + shape[0] // 4))
    write_csv(root / "annotations" / "annotations_train.csv", VINDR_HEADER, rows)
    return root


def make_siim(root: Path, n: int, shape: tuple[int, int] = (256, 256), seed: int = 0) -> Path:
    """n radiographs in study/series/image.dcm folders (two images a study) with both CSVs."""
    rng = np.random.default_rng(seed)
    studies, images = [], []
    for i in range(n):
        study, series, image = f"s{i // 2:05d}", f"r{i // 2:05d}", f"i{i:05d}"
        write_dicom(root / "train" / study / series / f"{image}.dcm",
                    rng.integers(0, 4096, shape, dtype=np.uint16))
        if i % 2 == 0:
            onehot = [0, 0, 0, 0]
            onehot[(i // 2) % 4] = 1
            studies.append((f"{study}_study", *onehot))
        box = {"x": 10.0, "y": 20.0, "width": shape[1] / 3, "height": shape[0] / 3}
        images.append((f"{image}_image", str([box]) if i % 3 else "",
                       "opacity 1 10 20 50 60" if i % 3 else "none 1 0 0 1 1", study))
    write_csv(root / "train_study_level.csv", ("id", "Negative for Pneumonia", "Typical Appearance",
                                               "Indeterminate Appearance", "Atypical Appearance"), studies)
    write_csv(root / "train_image_level.csv", ("id", "boxes", "label", "StudyInstanceUID"), images)
    return root


def make_folder(root: Path, n: int, shape: tuple[int, int] = (256, 256), seed: int = 0) -> Path:
    """n 8-bit grey PNGs with masks and a labels CSV over two classes."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"im{i:05d}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
        mask = np.zeros(shape, np.uint8)
        mask[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = 255
        cv2.imwrite(str(root / "masks" / f"im{i:05d}.png"), mask)
    write_csv(root / "labels.csv", ("id", "class"), [(f"im{i:05d}", "ab"[i % 2]) for i in range(n)])
    return root


def make_brats(root: Path, n: int, shape: tuple[int, int, int] = (96, 96, 40), seed: int = 0) -> Path:
    """n BraTS 2020-layout cases with a spherical three-label tumour each."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    for i in range(n):
        centre = np.array(shape) / 2 + rng.integers(-4, 5, 3)
        r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        seg = np.where(r < shape[0] / 8, 4, np.where(r < shape[0] / 6, 1, np.where(r < shape[0] / 4, 2, 0)))
        write_brats_case(root, f"BraTS20_Training_{i + 1:03d}", seg.astype(np.uint8))
    return root
