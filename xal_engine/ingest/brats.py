"""BraTS case folders -> axial tumour slices, 3 classes by dominant sub-region.

Layouts, detected per case from the file names:
  2020/2021  BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii[.gz], enhancing = 4
  2023       BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii[.gz], enhancing = 3
Only T1ce, FLAIR, T2 (the image channels, in that order) and seg are needed.

A slice is vol[:, :, k] (last axis = axial). Display orientation: the slice is transposed, so rows
follow voxel axis j and columns voxel axis i (image = vol[:, :, k].T, mask likewise). With BraTS's
affine diag(-1, -1, 1) this puts anterior at the top. No flips: image and mask stay voxel-aligned.

Slices with >= min_tumour_voxels tumour voxels (seg > 0) are kept. Class = the sub-region with the
most voxels in the slice, classes ordered ("edema" = 2, "necrotic_core" = 1, "enhancing" = 4 or 3);
a tie goes to the first of that order. ROI = mask of the dominant label, or seg > 0 (whole tumour).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from xal_engine.errors import XalError
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
    resize_masks,
)

CLASSES = ["edema", "necrotic_core", "enhancing"]
CHANNELS = ["t1ce", "flair", "t2"]
NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


@dataclass(frozen=True)
class Layout:
    """File naming of one BraTS release: <case><sep><modality>.nii[.gz]."""

    name: str
    sep: str
    modalities: tuple[str, str, str, str]   # t1ce, flair, t2, seg in this release's names
    enhancing: int

    def label_values(self) -> np.ndarray:
        """Seg values of the classes in CLASSES order: edema, necrotic core, enhancing."""
        return np.array([2, 1, self.enhancing], np.int16)


LAYOUTS = (Layout("2020", "_", ("t1ce", "flair", "t2", "seg"), 4),
           Layout("2023", "-", ("t1c", "t2f", "t2w", "seg"), 3))


@dataclass(frozen=True)
class BratsSettings:
    min_tumour_voxels: int = 100
    per_volume: bool = False     # min-max over the whole volume instead of each slice
    roi: str = "dominant"        # or "whole-tumour"
    dtype: str = "uint8"         # or "float16"

    def __post_init__(self) -> None:
        if self.roi not in ("dominant", "whole-tumour"):
            raise XalError(f"--roi: expected 'dominant' or 'whole-tumour', got {self.roi!r}")
        if self.dtype not in ("uint8", "float16"):
            raise XalError(f"--dtype: expected uint8 or float16 for BraTS, got {self.dtype!r}")
        if self.min_tumour_voxels < 1:
            raise XalError(f"--min-tumour-voxels: expected at least 1, got {self.min_tumour_voxels}")


def find_case_files(case_dir: Path) -> tuple[Layout, dict[str, Path]] | str:
    """The layout whose file names match most, and its files; or why the case cannot be used."""
    names = sorted(p.name for p in case_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    best: tuple[Layout, dict[str, Path]] | None = None
    for layout in LAYOUTS:
        found: dict[str, Path] = {}
        for mod in layout.modalities:
            hits = [n for n in names if n.endswith((f"{layout.sep}{mod}.nii.gz", f"{layout.sep}{mod}.nii"))]
            if hits:
                found[mod] = case_dir / hits[0]
        if best is None or len(found) > len(best[1]):
            best = (layout, found)
    layout, found = best
    missing = [m for m in layout.modalities if m not in found]
    if missing:
        want = ", ".join(f"{case_dir.name}{layout.sep}{m}.nii[.gz]" for m in missing)
        return f"missing modality {'/'.join(missing)} ({layout.name} layout: expected {want})"
    return layout, found


def read_volume(path: Path, dtype: type | None = None) -> np.ndarray:
    """The whole volume, decompressed once (scaled straight to ``dtype`` when given, so a 240x240x155
    image is 34 MiB of float32, not 68 of float64); 4-D with one volume is squeezed, others refused."""
    img = nib.load(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D volume, got shape {tuple(img.shape)}")
    return np.asarray(img.dataobj, dtype=dtype).reshape(shape)


class BratsSource(IngestSource):
    name = "brats"
    modality = "MR"

    def __init__(self, root: Path, size: int, settings: BratsSettings = BratsSettings()) -> None:
        super().__init__(root, size)
        self.opts = settings
        self.classes, self.channels, self.dtype = list(CLASSES), 3, DTYPES[settings.dtype]

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.opts), "channels": CHANNELS, "class_labels": {
                    "edema": 2, "necrotic_core": 1, "enhancing": "4 (2020/2021 layout), 3 (2023 layout)"},
                "orientation": "image = vol[:, :, k].T (rows = voxel axis j, columns = voxel axis i)",
                "resize": "images bilinear (antialiased), masks nearest"}

    def scan(self) -> tuple[list[Item], list[Skip]]:
        if not self.root.is_dir():
            raise XalError(f"{self.root}: expected a folder of BraTS case folders")
        dirs = [d for d in [self.root, *self.root.rglob("*")] if d.is_dir()
                and any(p.name.endswith((".nii", ".nii.gz")) for p in d.iterdir())]
        by_case: dict[str, list[Path]] = {}
        for d in dirs:
            by_case.setdefault(d.name, []).append(d)
        cases, skipped = dedupe(by_case)
        items = []
        for case, case_dir in cases.items():
            found = find_case_files(case_dir)
            if isinstance(found, str):
                skipped.append(Skip(case, found))
            else:
                items.append(Item(case, case, found))
        return items, skipped

    def load(self, item: Item) -> ItemResult:
        case = item.key
        layout, paths = item.data
        vols = []
        for mod in layout.modalities:             # t1ce, flair, t2, seg: each file read once
            try:
                vols.append(read_volume(paths[mod], None if mod == "seg" else np.float32))
            except NIFTI_ERRORS as err:
                return ItemResult.only_skips(Skip(case, f"{paths[mod].name}: unreadable NIfTI "
                                                        f"({type(err).__name__}: {err})"))
        shapes = {mod: v.shape for mod, v in zip(layout.modalities, vols)}
        if len(set(shapes.values())) > 1:
            return ItemResult.only_skips(Skip(case, "shape mismatch between modalities: " + ", ".join(
                f"{m} {s}" for m, s in shapes.items())))
        return self._slices(case, layout, np.stack(vols[:3]), vols[3])

    def _slices(self, case: str, layout: Layout, img: np.ndarray, seg_raw: np.ndarray) -> ItemResult:
        """img (3, X, Y, D) any dtype, seg (X, Y, D) -> the case's tumour slices."""
        seg_name = f"{case}{layout.sep}seg"
        if not np.isfinite(seg_raw).all():
            return ItemResult.only_skips(Skip(case, f"{seg_name}: non-finite voxels in the segmentation"))
        seg = np.rint(seg_raw).astype(np.int16)
        values = layout.label_values()
        extra = sorted(set(np.unique(seg).tolist()) - {0, *values.tolist()})
        if extra:
            return ItemResult.only_skips(Skip(case, f"{seg_name}: labels {extra} outside "
                                                    f"{{0, 1, 2, {layout.enhancing}}} ({layout.name} layout)"))
        counts = (seg[None] == values[:, None, None, None]).sum(axis=(1, 2))   # (3, D) voxels per class
        tumour = counts.sum(axis=0)                                           # (D,)
        keep = np.flatnonzero(tumour >= self.opts.min_tumour_voxels)
        if keep.size == 0:
            return ItemResult.only_skips(Skip(case, f"no slice with >= {self.opts.min_tumour_voxels} "
                                                    f"tumour voxels (most: {int(tumour.max(initial=0))})"))
        ids = np.array([f"{case}_slice_{k}" for k in keep])
        finite = np.isfinite(img[..., keep]).all(axis=(1, 2))                  # (3, S) per channel
        bad = ~finite.all(axis=0)
        skipped = [Skip(i, "non-finite voxels in " + "/".join(
                   c for c, ok in zip(CHANNELS, finite[:, j]) if not ok)) for j, i in
                   zip(np.flatnonzero(bad), ids[bad])]
        keep, ids = keep[~bad], ids[~bad]
        if keep.size == 0:
            return ItemResult.only_skips(*skipped)
        x = np.moveaxis(img[..., keep].astype(np.float32, copy=False), -1, 0).transpose(0, 1, 3, 2)  # (S, 3, Y, X)
        if self.opts.per_volume:
            vol = img if np.isfinite(img).all() else np.where(np.isfinite(img), img, np.nan)
            lo = np.nanmin(vol, axis=(1, 2, 3))[None, :, None, None]                 # (1, 3, 1, 1)
            span = np.nanmax(vol, axis=(1, 2, 3))[None, :, None, None] - lo
            x = np.clip((x - lo) / np.where(span > 0, span, 1.0), 0.0, 1.0)
        else:
            x = minmax(x, (2, 3))
        s = np.moveaxis(seg[..., keep], -1, 0).transpose(0, 2, 1)                     # (S, Y, X)
        cls = counts[:, keep].argmax(axis=0)                                          # first max wins
        rois = s > 0 if self.opts.roi == "whole-tumour" else s == values[cls][:, None, None]
        n = keep.size
        return ItemResult(images=quantise(resize_images(x, self.size), self.dtype),
                          rois=resize_masks(rois, self.size), has_roi=np.ones(n, bool),
                          labels=cls.astype(np.int16), ids=tuple(ids.tolist()), skipped=tuple(skipped))
