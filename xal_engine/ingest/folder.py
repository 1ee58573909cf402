"""A plain folder of PNG/JPEG/TIFF images (8 or 16 bit, grey or colour), optional masks and labels.

- id = the image's path below the folder without its suffix ("sub/img01"); masks: the same id
  below ``masks`` with any image suffix, nonzero (any channel) = ROI; no mask -> has_roi False.
- labels: a CSV with columns id, class; classes sorted by name unless ``classes`` gives the order;
  an image without a row gets label -1 (unknown); a class outside ``classes`` skips the image.
- Intensities keep their meaning: value / dtype max (255 or 65535) -> [0, 1] -> pool dtype, no
  stretching. Colour -> grey by ITU-R BT.601 luma; grey -> 3 channels by repetition.
- channels and dtype default to those of the first image in id order.
- Without ``masks``, a folder named ``masks`` directly under the root is not read as images (it
  most likely holds the masks): it is listed once among the skipped items, saying how to use it
  (``--masks ROOT/masks``) or to read it as images anyway (``masks_folder_as_images``).
- An image whose header gives more than ``max_megapixels`` is skipped before it is decoded (a small
  compressed file can decode to gigabytes). The size comes from the PNG IHDR, the JPEG SOF or the
  first TIFF IFD; a header not read so (BigTIFF, a truncated one) leaves it to OpenCV's own limit.
"""

from __future__ import annotations

import struct
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
MASKS = "masks"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:  # pragma: no cover
        raise XalError("ingest folder needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _png_size(f: Any) -> tuple[int, int] | None:
    head = f.read(24)  # signature, IHDR length and type, width, height
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _jpeg_size(f: Any) -> tuple[int, int] | None:
    f.read(2)  # SOI
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2 or marker == 0xDA:  # scan data: no frame header before it
            return None
        if marker in SOF_MARKERS:
            frame = f.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        f.seek(struct.unpack(">H", length)[0] - 2, 1)
        # a marker follows each segment; anything else is not a JPEG read here
        if f.read(1) != b"\xff":
            return None
        f.seek(-1, 1)


def _tiff_size(f: Any) -> tuple[int, int] | None:
    head = f.read(8)  # byte order, 42, offset of the first IFD
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or struct.unpack(order + "H", head[2:4])[0] != 42:  # BigTIFF (43) is not read here
        return None
    f.seek(struct.unpack(order + "I", head[4:8])[0])
    (count,) = struct.unpack(order + "H", f.read(2))
    found: dict[int, int] = {}
    for _ in range(count):
        tag, kind, _n, value = struct.unpack(order + "HHI4s", f.read(12))
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, without decoding it; None when unknown."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
            f.seek(0)
            if magic == b"\x89PNG\r\n\x1a\n":
                return _png_size(f)
            if magic[:3] == b"\xff\xd8\xff":
                return _jpeg_size(f)
            if magic[:2] in (b"II", b"MM"):
                return _tiff_size(f)
    except (OSError, struct.error):  # a truncated header: OpenCV decides
        pass
    return None


def check_pixels(path: Path, max_megapixels: float | None) -> None:
    """Raise ValueError when the header of ``path`` gives more than ``max_megapixels`` pixels."""
    size = None if max_megapixels is None else header_size(path)
    if size is not None and size[0] * size[1] > max_megapixels * 1e6:
        raise ValueError(f"{size[0]}x{size[1]} pixels by its header, over the limit of {max_megapixels:g} "
                         "megapixels (--max-megapixels)")


def read_image(path: Path, max_megapixels: float | None = None) -> np.ndarray:
    """(H, W, C) RGB(A dropped) or (H, W, 1) grey, float32 in [0, 1]. Raises ValueError if unreadable
    or larger than ``max_megapixels`` (checked from the header, before decoding)."""
    check_pixels(path, max_megapixels)
    cv2 = _cv2()
    x = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if x is None:
        raise ValueError("unreadable image")
    if x.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 8- or 16-bit pixels, got {x.dtype}")
    top = np.iinfo(x.dtype).max
    x = x[:, :, None] if x.ndim == 2 else x[:, :, 2::-1]          # BGR(A) -> RGB
    return x.astype(np.float32) / top


def image_kind(path: Path, max_megapixels: float | None = None) -> tuple[int, str]:
    """(channels, dtype name) of one image file, as stored."""
    check_pixels(path, max_megapixels)
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
    max_megapixels: float = 100.0   # larger images (by their header) are skipped undecoded
    masks_folder_as_images: bool = False  # read ROOT/masks as images when no masks folder is given

    def __post_init__(self) -> None:
        if self.classes is not None:
            if not self.classes:
                raise XalError("--classes: expected comma-separated class names, got none")
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise XalError(f"--classes: expected distinct class names, got {', '.join(repeated)} "
                               "more than once")
        if not self.max_megapixels > 0:
            raise XalError(f"--max-megapixels: expected a positive number, got {self.max_megapixels:g}")
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
                "max_megapixels": self.opts.max_megapixels,
                "masks_folder_as_images": self.opts.masks_folder_as_images,
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
        root = self.root.resolve()
        exclude = masks_dir.resolve() if masks_dir else None
        skipped: list[Skip] = []
        implicit = root / MASKS
        if masks_dir is None and not self.opts.masks_folder_as_images and implicit.is_dir():
            # masks beside the images, named like them: read as images they would be duplicates
            exclude = implicit
            n = sum(1 for p in implicit.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            skipped.append(Skip(f"{MASKS}/", f"folder {self.root / MASKS} ({n} image files) not read as "
                                             f"images: pass --masks {self.root / MASKS} to use it as masks, "
                                             "or --masks-folder-as-images"))
        files, dup_skips = index_images(root, exclude=exclude)
        skipped += dup_skips
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
                channels, dtype = image_kind(item.data[0], self.opts.max_megapixels)
            except ValueError:
                continue
            self.channels = self.opts.channels or channels
            self.dtype = DTYPES[self.opts.dtype or dtype]
            return

    def load(self, item: Item) -> ItemResult:
        path, mask_path, label = item.data
        try:
            x = read_image(path, self.opts.max_megapixels)                  # (H, W, c) in [0, 1]
        except ValueError as err:
            return ItemResult.only_skips(Skip(item.key, f"{path.name}: {err}"))
        if self.channels == 1 and x.shape[2] == 3:
            x = (x @ LUMA)[:, :, None]
        elif self.channels == 3 and x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        roi = np.zeros(x.shape[:2], bool)
        if mask_path is not None:
            try:
                m = read_image(mask_path, self.opts.max_megapixels)
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
