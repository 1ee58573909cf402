"""BraTS case folders -> whole volumes: one (3, G, G, G) image (T1ce, FLAIR, T2) and one ROI per case.

Case files and layouts as in :mod:`xal_engine.ingest.brats` (2020/2021 and 2023 names, .nii or .nii.gz).

Geometry, per case (vol[i, j, k] in voxel axes, spacing s_i, s_j, s_k mm from the NIfTI header):
  1. brain = voxels where any channel > 0, or seg > 0 (so the tumour is never cut);
     its bounding box [lo, hi) per axis.
  2. the box is padded symmetrically to a cube *in mm* (side = the longest extent in mm; an axis of
     spacing s gets round(side / s) voxels, at least its extent); voxels outside the volume are 0.
     Padding, not anisotropic stretching: the output voxels stay isotropic and shapes undistorted.
     The pool keeps each case's box and spacing (``crop_box`` [start, size] (2, 3), ``source_spacing``
     (3,) mm, in source voxel axes i, j, k): a volume voxel maps back to its source voxels.
  3. stored axis order (D, H, W) = (axial k, rows j, columns i): volume = vol.transpose(2, 1, 0), so
     volume[k] is the 2-D ingest's slice image vol[:, :, k].T (anterior at the top for BraTS).
  4. resampled to G^3 with half-voxel centres: images trilinear (F.interpolate, float32,
     align_corners=False, no antialiasing), masks nearest ("nearest-exact": output voxel d takes
     source voxel floor((d + 0.5) * n / G)).
Normalisation: per channel, min-max over the brain voxels of the case; outside the brain 0.

Class per case: ``class_by="dominant"``: the sub-region with most voxels in the whole volume
(edema, necrotic_core, enhancing; a tie goes to the first); ``class_by="grade"``: LGG / HGG from the
BraTS 2020 ``name_mapping.csv`` (column Grade, matched on BraTS_2020_subject_ID = the case folder's
name); 2023 cases have no grade and are skipped. ROI = whole tumour (seg > 0) or the dominant
sub-region's mask. A case without tumour voxels is skipped (no ROI, no dominant class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from xal_engine.errors import XalError
from xal_engine.ingest.brats import CHANNELS, CLASSES, NIFTI_ERRORS, BratsSource, Layout, read_volume
from xal_engine.ingest.common import DTYPES, Item, ItemResult, Skip, quantise, read_table, resolve_file
from xal_engine.store.format import GEOMETRY_ARRAYS

DEFAULT_GRID = 96                       # volumes are DEFAULT_GRID^3 voxels unless told otherwise
GRADES = ["LGG", "HGG"]
CLASS_BY = ("dominant", "grade")
MAPPING_NAME = "name_mapping.csv"
MAPPING_COLUMNS = ("Grade", "BraTS_2020_subject_ID")


@dataclass(frozen=True)
class BratsVolumeSettings:
    class_by: str = "dominant"          # or "grade" (BraTS 2020 name_mapping.csv)
    roi: str = "whole-tumour"           # or "dominant"
    dtype: str = "uint8"                # or "float16"
    name_mapping: Path | None = None    # class_by="grade": default name_mapping.csv under the source

    def __post_init__(self) -> None:
        if self.class_by not in CLASS_BY:
            raise XalError(f"--class-by: expected 'dominant' or 'grade', got {self.class_by!r}")
        if self.roi not in ("dominant", "whole-tumour"):
            raise XalError(f"--roi: expected 'dominant' or 'whole-tumour', got {self.roi!r}")
        if self.dtype not in ("uint8", "float16"):
            raise XalError(f"--dtype: expected uint8 or float16 for BraTS, got {self.dtype!r}")
        if self.name_mapping is not None and self.class_by != "grade":
            raise XalError("--name-mapping: only used with --class-by grade")


def read_grades(path: Path) -> dict[str, str | None]:
    """BraTS 2020 name_mapping.csv -> {BraTS_2020_subject_ID: "HGG" | "LGG" | None (unusable)}.

    Values are stripped; an id listed twice with different grades, or a grade other than HGG/LGG
    (e.g. "NA"), maps to None, which the scan reports as the case's skip reason.
    """
    grades: dict[str, str | None] = {}
    for row in read_table(path, MAPPING_COLUMNS):
        case, grade = (row[c].strip() if row[c] else "" for c in ("BraTS_2020_subject_ID", "Grade"))
        if not case or case.upper() == "NA":
            continue
        value = grade if grade in GRADES else None
        grades[case] = value if grades.get(case, value) == value else None
    return grades


def cube_box(lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box [lo, hi) (voxels, per axis) padded symmetrically to a cube in mm: (start, size).

    side = max((hi - lo) * spacing); size = max(hi - lo, round(side / spacing));
    start = lo - (size - (hi - lo)) // 2 (may be < 0 or run past the volume: zeros there).
    """
    extent = hi - lo
    side = float((extent * spacing).max())
    size = np.maximum(extent, np.rint(side / spacing).astype(np.int64))
    return lo - (size - extent) // 2, size


def crop(x: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """x (..., X, Y, Z)[start : start + size] over the last three axes, zeros outside x."""
    out = np.zeros((*x.shape[:-3], *size.tolist()), x.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, x.shape[-3:])
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    dst = tuple(slice(a, b) for a, b in zip(src_lo - start, src_hi - start))
    out[(..., *dst)] = x[(..., *src)]
    return out


def brain_box(brain: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) in voxels of the cube cropped from a case: brain (X, Y, Z) bool, not all False
    (any channel > 0 or seg > 0), spacing (3,) mm; see :func:`cube_box`."""
    lo, hi = [], []
    for axis in range(3):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return cube_box(np.array(lo), np.array(hi), spacing)


def resample(img: np.ndarray, roi: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """img (C, P, Q, R) float32, roi (P, Q, R) bool -> (C, G, G, G) trilinear clamped to [0, 1],
    (G, G, G) nearest-exact (half-voxel centres both). Each axis is resampled on its own, so the
    result commutes with transposing the three spatial axes."""
    out = (grid,) * 3
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None]                 # (1, C, P, Q, R)
    x = F.interpolate(t, size=out, mode="trilinear", align_corners=False)[0].clamp_(0.0, 1.0)
    m = torch.from_numpy(np.ascontiguousarray(roi, np.uint8))[None, None].float()      # (1, 1, P, Q, R)
    r = F.interpolate(m, size=out, mode="nearest-exact")[0, 0] > 0.5
    return x.numpy(), r.numpy()


class BratsVolumeSource(BratsSource):
    """``BratsSource``'s case listing, one volume per case (see the module docstring)."""

    extra_arrays = GEOMETRY_ARRAYS

    def __init__(self, root: Path, grid: int = DEFAULT_GRID,
                 settings: BratsVolumeSettings = BratsVolumeSettings()) -> None:
        if grid < 1:
            raise XalError(f"--grid: expected a positive number of voxels, got {grid}")
        super().__init__(root, grid)
        self.vopts = settings
        self.depth = grid                              # volumes: depth = height = width = grid
        self.classes = list(GRADES if settings.class_by == "grade" else CLASSES)
        self.channels, self.dtype = 3, DTYPES[settings.dtype]
        self.mapping_path: Path | None = None          # resolved by scan (class_by="grade")

    def settings(self) -> dict[str, Any]:
        return {"volumes": True, "grid": self.depth, "class_by": self.vopts.class_by, "roi": self.vopts.roi,
                "dtype": self.vopts.dtype, "channels": CHANNELS,
                "name_mapping": None if self.mapping_path is None else str(self.mapping_path),
                "class_rule": ("Grade column of name_mapping.csv, matched on BraTS_2020_subject_ID"
                               if self.vopts.class_by == "grade" else
                               "sub-region with most voxels in the volume; tie = first of the classes"),
                "class_labels": {"edema": 2, "necrotic_core": 1,
                                 "enhancing": "4 (2020/2021 layout), 3 (2023 layout)"},
                "axes": "(D, H, W) = (axial k, rows j, columns i): volume = vol.transpose(2, 1, 0)",
                "crop": "brain bounding box (any channel > 0 or seg > 0) padded symmetrically to a cube "
                        "in mm (zeros outside the volume), then resampled to grid^3 isotropic voxels",
                "normalise": "per channel min-max over the case's brain voxels; 0 outside the brain",
                "resize": "images trilinear (align_corners=False), masks nearest-exact"}

    def scan(self) -> tuple[list[Item], list[Skip]]:
        items, skipped = super().scan()
        if self.vopts.class_by != "grade":
            return items, skipped
        self.mapping_path = resolve_file(self.root, self.vopts.name_mapping, (MAPPING_NAME,), "--name-mapping")
        grades = read_grades(self.mapping_path)
        kept = []
        for item in items:
            layout, paths = item.data
            grade = grades.get(item.key, "absent")
            if layout.name != "2020":
                skipped.append(Skip(item.key, f"{layout.name} layout has no grade (name_mapping.csv is "
                                              "BraTS 2020's); use --class-by dominant"))
            elif grade == "absent":
                skipped.append(Skip(item.key, f"not in {self.mapping_path.name} (BraTS_2020_subject_ID)"))
            elif grade is None:
                skipped.append(Skip(item.key, f"{self.mapping_path.name}: grade not HGG or LGG (or listed "
                                              "twice with different grades)"))
            else:
                kept.append(Item(item.key, item.group, (layout, paths, GRADES.index(grade))))
        return kept, skipped

    def load(self, item: Item) -> ItemResult:
        case = item.key
        layout, paths, *grade = item.data
        vols = []
        name = ""
        try:
            for mod in layout.modalities:             # t1ce, flair, t2, seg: each file read once
                name = paths[mod].name
                vols.append(read_volume(paths[mod], None if mod == "seg" else np.float32))
            name = paths[layout.modalities[0]].name   # its header again (not its data): the spacing
            spacing = np.array(nib.load(paths[layout.modalities[0]]).header.get_zooms()[:3], np.float64)
        except NIFTI_ERRORS as err:
            return ItemResult.only_skips(Skip(case, f"{name}: unreadable NIfTI ({type(err).__name__}: {err})"))
        shapes = {mod: v.shape for mod, v in zip(layout.modalities, vols)}
        if len(set(shapes.values())) > 1:
            return ItemResult.only_skips(Skip(case, "shape mismatch between modalities: " + ", ".join(
                f"{m} {s}" for m, s in shapes.items())))
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            return ItemResult.only_skips(Skip(case, f"{paths[layout.modalities[0]].name}: voxel spacing "
                                                    f"{spacing.tolist()} is not positive"))
        return self._volume(case, layout, vols, spacing, grade[0] if grade else None)

    def _volume(self, case: str, layout: Layout, vols: list[np.ndarray], spacing: np.ndarray,
                grade: int | None) -> ItemResult:
        """vols = [t1ce, flair, t2 (X, Y, Z) float32, seg (X, Y, Z)] -> one (1, 3, G, G, G) volume, or the
        case's skip. ``vols`` is emptied, so that each full-size array is freed once it is cropped."""
        seg_name = f"{case}{layout.sep}seg"
        seg = vols.pop()
        if seg.dtype.kind not in "iub":
            if not np.isfinite(seg).all():
                return ItemResult.only_skips(Skip(case, f"{seg_name}: non-finite voxels in the segmentation"))
            seg = np.rint(seg)
        values = layout.label_values()
        known = np.isin(seg, [0, *values.tolist()])
        if not known.all():
            extra = sorted(int(v) for v in np.unique(seg[~known]))
            return ItemResult.only_skips(Skip(case, f"{seg_name}: labels {extra} outside "
                                                    f"{{0, 1, 2, {layout.enhancing}}} ({layout.name} layout)"))
        seg = seg.astype(np.uint8, copy=False)                                   # labels 0..4 now
        bad = [c for c, v in zip(CHANNELS, vols) if not np.isfinite(v).all()]
        if bad:
            return ItemResult.only_skips(Skip(case, "non-finite voxels in " + "/".join(bad)))
        counts = np.array([np.count_nonzero(seg == v) for v in values])         # (3,) voxels per sub-region
        if counts.sum() == 0:
            return ItemResult.only_skips(Skip(case, f"{seg_name}: no tumour voxels (no ROI)"))
        dominant = int(counts.argmax())                                          # first max wins
        brain = seg > 0                                                          # (X, Y, Z)
        for v in vols:
            brain |= v > 0
        start, size = brain_box(brain, spacing)
        x = np.stack([crop(vols.pop(0), start, size) for _ in range(3)])         # (3, X', Y', Z') float32
        brain = crop(brain, start, size)
        low = x.min(axis=(1, 2, 3), where=brain, initial=np.inf)                 # over the brain only
        span = x.max(axis=(1, 2, 3), where=brain, initial=-np.inf) - low
        x -= low[:, None, None, None]
        x /= np.where(span > 0, span, 1.0).astype(np.float32)[:, None, None, None]
        np.clip(x, 0.0, 1.0, out=x)
        x *= brain                                                               # 0 outside the brain
        roi = crop(seg > 0 if self.vopts.roi == "whole-tumour" else seg == values[dominant], start, size)
        x, roi = resample(x, roi, self.depth)                                    # (3, i, j, k), (i, j, k)
        x, roi = x.transpose(0, 3, 2, 1), roi.transpose(2, 1, 0)                 # (C, D, H, W) = (C, k, j, i)
        if not roi.any():
            n_roi = int(counts.sum() if self.vopts.roi == "whole-tumour" else counts[dominant])
            return ItemResult.only_skips(Skip(case, f"ROI of {n_roi} voxels vanishes at grid {self.depth}^3"))
        label = dominant if grade is None else grade
        return ItemResult(images=quantise(x[None], self.dtype), rois=roi[None], has_roi=np.ones(1, bool),
                          labels=np.array([label], np.int16), ids=(case,),
                          extra={"crop_box": np.stack([start, size])[None].astype(np.int32),
                                 "source_spacing": spacing[None].astype(np.float32)})
