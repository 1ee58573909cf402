"""A plain folder of PNG/JPEG/TIFF images (8 or 16 bit, grey or colour), optional masks and labels.

- id = the image's path below the folder without its suffix ("sub/img01"); masks: the same id
  below ``masks`` with any image suffix, nonzero (any channel) = ROI; no mask -> has_roi False.
- labels: a CSV with columns id, class; classes sorted by name unless ``classes`` gives the order;
  an image without a row gets label -1 (unknown); a class outside ``classes`` skips the image.
- Intensities keep their meaning: value / dtype max (255 or 65535) -> [0, 1] -> pool dtype, no
  stretching. Colour -> grey by ITU-R BT.601 luma; grey -> 3 channels by repetition.
- channels and dtype default to those of the first image in id order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.ingest.common import (
    DTYPES,
    IngestSource,
    Item,
    ItemResult,
    Skip,
    dedupe,
    quantise,
    read_table,
    resize_images,
    resize_masks,
)

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # R, G, B weights (BT.601)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:  # pragma: no cover
        raise XalError("ingest folder needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def read_image(path: Path) -> np.ndarray:
    """(H, W, C) RGB(A dropped) or (H, W, 1) grey, float32 in [0, 1]. Raises ValueError if unreadable."""
    cv2 = _cv2()
    x = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if x is None:
        raise ValueError("unreadable image")
    if x.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 8- or 16-bit pixels, got {x.dtype}")
    top = np.iinfo(x.dtype).max
    x = x[:, :, None] if x.ndim == 2 else x[:, :, 2::-1]          # BGR(A) -> RGB
    return x.astype(np.float32) / top


def image_kind(path: Path) -> tuple[int, str]:
    """(channels, dtype name) of one image file, as stored."""
    cv2 = _cv2()
    x = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if x is None:
        raise ValueError("unreadable image")
    return (1 if x.ndim == 2 else 3), ("uint16" if x.dtype == np.uint16 else "uint8")


def index_images(root: Path, exclude: Path | None = None) -> tuple[dict[str, Path], list[Skip]]:
    """id (relative path without suffix) -> image file; a second file with the same id is skipped."""
    found: dict[str, list[Path]] = {}
    for p in root.rglob("*"):
        if p.suffix.lower() in SUFFIXES and p.is_file() and not (exclude and p.is_relative_to(exclude)):
            found.setdefault(p.relative_to(root).with_suffix("").as_posix(), []).append(p)
    return dedupe(found)


@dataclass(frozen=True)
class FolderSettings:
    masks: Path | None = None
    labels: Path | None = None
    classes: tuple[str, ...] | None = None
    channels: int | None = None     # 1 or 3; None = as the first image
    dtype: str | None = None        # uint8, uint16 or float16; None = as the first image

    def __post_init__(self) -> None:
        if self.channels not in (None, 1, 3):
            raise XalError(f"--channels: expected 1 or 3, got {self.channels}")
        if self.dtype not in (None, *DTYPES):
            raise XalError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.masks is not None and not Path(self.masks).is_dir():
            raise XalError(f"--masks: {self.masks} is not a folder")


class FolderSource(IngestSource):
    name = "folder"
    modality = ""

    def __init__(self, root: Path, size: int, settings: FolderSettings = FolderSettings()) -> None:
        super().__init__(root, size)
        self.opts = settings
        self.classes = list(settings.classes or [])
        self.channels = settings.channels or 1   # defaults from the first image once scanned
        self.dtype = DTYPES[settings.dtype or "uint8"]

    def settings(self) -> dict[str, Any]:
        return {"masks": str(self.opts.masks) if self.opts.masks else None,
                "labels": str(self.opts.labels) if self.opts.labels else None,
                "channels": self.channels, "dtype": str(self.dtype),
                "intensity": "value / dtype max, no stretching; colour -> grey by BT.601 luma"}

    def _labels(self) -> tuple[dict[str, str], list[Skip]]:
        """Image id -> class name from the labels CSV; sets the class list."""
        if self.opts.labels is None:
            return {}, []
        if not Path(self.opts.labels).is_file():
            raise XalError(f"--labels: {self.opts.labels} is not a file")
        rows = read_table(Path(self.opts.labels), ("id", "class"))
        labels: dict[str, str] = {}
        skipped = []
        for r in rows:
            key, cls = r["id"].strip(), r["class"].strip()
            if labels.get(key, cls) != cls:
                skipped.append(Skip(key, f"conflicting classes {labels[key]!r} and {cls!r} in the labels CSV"))
            labels.setdefault(key, cls)
        if not self.classes:
            self.classes = sorted(set(labels.values()))
        return labels, skipped

    def scan(self) -> tuple[list[Item], list[Skip]]:
        if not self.root.is_dir():
            raise XalError(f"{self.root}: expected a folder of images")
        masks_dir = Path(self.opts.masks) if self.opts.masks else None
        files, skipped = index_images(self.root.resolve(), exclude=masks_dir.resolve() if masks_dir else None)
        masks = index_images(masks_dir)[0] if masks_dir else {}
        labels, label_skips = self._labels()
        if not self.classes:
            raise XalError("--classes: a pool needs class names; give --labels or --classes "
                           "(images without a label get -1 = unknown)")
        conflicted = {s.item for s in label_skips}
        skipped += label_skips
        skipped += [Skip(k, "image file missing (listed in the labels CSV)") for k in sorted(labels.keys() - files.keys())]
        items = []
        for key, path in files.items():
            cls = labels.get(key)
            if key in conflicted:
                continue
            if cls is not None and cls not in self.classes:
                skipped.append(Skip(key, f"unknown class {cls!r} (expected one of {self.classes})"))
                continue
            label = -1 if cls is None else self.classes.index(cls)
            items.append(Item(key, key, (path, masks.get(key), label)))
        self._probe(items)
        return items, skipped

    def _probe(self, items: list[Item]) -> None:
        """Default channels/dtype from the first readable image (the first in id order)."""
        if self.opts.channels is not None and self.opts.dtype is not None:
            return
        for item in items:
            try:
                channels, dtype = image_kind(item.data[0])
            except ValueError:
                continue
            self.channels = self.opts.channels or channels
            self.dtype = DTYPES[self.opts.dtype or dtype]
            return

    def load(self, item: Item) -> ItemResult:
        path, mask_path, label = item.data
        try:
            x = read_image(path)                                            # (H, W, c) in [0, 1]
        except ValueError as err:
            return ItemResult.only_skips(Skip(item.key, f"{path.name}: {err}"))
        if self.channels == 1 and x.shape[2] == 3:
            x = (x @ LUMA)[:, :, None]
        elif self.channels == 3 and x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        roi = np.zeros(x.shape[:2], bool)
        if mask_path is not None:
            try:
                m = read_image(mask_path)
            except ValueError as err:
                return ItemResult.only_skips(Skip(item.key, f"mask {mask_path.name}: {err}"))
            if m.shape[:2] != x.shape[:2]:
                return ItemResult.only_skips(Skip(item.key, f"mask {mask_path.name}: shape {m.shape[:2]} "
                                                            f"differs from the image's {x.shape[:2]}"))
            roi = (m > 0).any(axis=2)
        image = quantise(resize_images(x.transpose(2, 0, 1)[None], self.size), self.dtype)
        rois = resize_masks(roi[None], self.size)
        return ItemResult(images=image, rois=rois, has_roi=rois.any(axis=(1, 2)),
                          labels=np.array([label], np.int16), ids=(item.key,))
