"""What every ingest format shares: settings, per-item results, resizing, quantising, splits.

A format lists its *items* (a BraTS case, a DICOM image, an image file) in a deterministic order;
a worker turns one item into an :class:`ItemResult` (0..n model-ready images plus skip reasons);
the driver writes results in item order through ``PoolWriter``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from xal_engine.errors import XalError
from xal_engine.store import IMAGE_DTYPES, SPLIT_TEST, SPLIT_VAL

DTYPES = {str(dtype): dtype for dtype in IMAGE_DTYPES}  # --dtype name -> pool image dtype


@dataclass(frozen=True)
class IngestConfig:
    """Settings shared by every format (the CLI maps flags onto these defaults)."""

    workers: int = 1                # decoding processes; 1 = decode in this process
    test_fraction: float = 0.2      # of split groups (patients), not of images
    val_fraction: float = 0.1
    seed: int = 0                   # seeds the group permutation behind the splits
    overwrite: bool = False
    resume: bool = False
    chunk_size: int | None = None   # images per pool chunk; None = PoolWriter's choice
    show_progress: bool | None = None  # None = only on an interactive stderr

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise XalError(f"--workers: expected at least 1, got {self.workers}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise XalError(f"--chunk-size: must be at least 1, got {self.chunk_size}")
        for flag, frac in (("--test-fraction", self.test_fraction), ("--val-fraction", self.val_fraction)):
            if not 0.0 <= frac <= 1.0:
                raise XalError(f"{flag}: expected a fraction in [0, 1], got {frac}")
        if self.test_fraction + self.val_fraction > 1.0:
            raise XalError("--test-fraction + --val-fraction: expected a sum of at most 1, got "
                           f"{self.test_fraction + self.val_fraction:g}")


class Skip(NamedTuple):
    """An item (or one image of it) left out of the pool, and why."""

    item: str
    reason: str


@dataclass(frozen=True)
class Item:
    """One unit of decoding work. ``group`` is the split unit (the patient where it is known)."""

    key: str
    group: str
    data: Any = None


@dataclass(frozen=True)
class ItemResult:
    """What one item gives the pool: n images (n may be 0) and the parts of it that were skipped."""

    images: np.ndarray      # (n, C, S, S) pool dtype
    rois: np.ndarray        # (n, S, S) bool
    has_roi: np.ndarray     # (n,) bool
    labels: np.ndarray      # (n,) int16, -1 = unknown
    ids: tuple[str, ...]
    skipped: tuple[Skip, ...] = field(default=())
    # the optional pool arrays of the source's ``extra_arrays``, (n, ...) each (DICOM: UIDs, shapes)
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def only_skips(*skipped: Skip) -> ItemResult:
        empty = np.empty((0,), np.uint8)
        return ItemResult(empty, empty, empty, empty, (), tuple(skipped))


class IngestSource(abc.ABC):
    """A dataset format: lists its items in a fixed order and decodes one item (in a worker).

    ``classes``, ``channels`` and ``dtype`` describe the pool; they are final after ``scan``.
    ``extra_arrays`` names the optional pool arrays every non-empty result gives in ``extra``.
    ``depth``: None for images (n, C, S, S); D for volumes (n, C, D, S, S), rois (n, D, S, S).
    """

    name: str        # format name, e.g. "brats"
    modality: str    # pool attribute, e.g. "MR"
    classes: list[str]
    channels: int
    dtype: np.dtype
    extra_arrays: tuple[str, ...] = ()
    depth: int | None = None

    def __init__(self, root: Path, size: int) -> None:
        if size < 1:
            raise XalError(f"--size: expected a positive number of pixels, got {size}")
        self.root, self.size = Path(root), size   # output images are size x size

    @abc.abstractmethod
    def scan(self) -> tuple[list[Item], list[Skip]]:
        """Items in a deterministic order, and what was skipped while listing (missing files...)."""

    @abc.abstractmethod
    def load(self, item: Item) -> ItemResult:
        """Decode one item; expected bad input becomes ``Skip`` entries, never an exception."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Format settings recorded in the pool attributes and the report (JSON-serialisable)."""


def minmax(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """(x - min) / (max - min) over ``axis`` as float32; a constant block maps to 0."""
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    return ((x - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """(n, C, H, W) float32 in [0, 1] -> (n, C, size, size): bilinear, half-pixel centres.

    Antialiased, so a 3000-pixel radiograph shrunk to 224 does not alias; identical to plain
    bilinear when enlarging, and the identity at the same size.
    """
    if x.shape[-2:] == (size, size):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0).numpy()


def resize_masks(m: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) bool -> (n, size, size) bool, nearest neighbour with half-pixel centres:
    output pixel i takes source pixel floor((i + 0.5) * H / size)."""
    if m.shape[-2:] == (size, size):
        return m.astype(bool, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.uint8))[:, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest-exact")[:, 0].numpy() > 0.5


def quantise(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """[0, 1] float -> pool dtype: uint8 0..255, uint16 0..65535 (rounded), or float16."""
    if dtype == np.float16:
        return x.astype(np.float16)
    top = np.iinfo(dtype).max
    return np.rint(np.clip(x, 0.0, 1.0) * top).astype(dtype)


def assign_splits(groups: list[str], test_fraction: float, val_fraction: float,
                  seed: int) -> dict[str, int]:
    """Group (patient) -> split code. A seeded permutation of the sorted unique groups: the first
    round(n * test) are test, the next round(n * val) validation, the rest train. No group is in
    two splits, and the result does not depend on the order or the number of workers."""
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = round(len(unique) * test_fraction)
    n_val = min(round(len(unique) * val_fraction), len(unique) - n_test)
    codes = np.zeros(len(unique), np.uint8)
    codes[order[:n_test]] = SPLIT_TEST
    codes[order[n_test:n_test + n_val]] = SPLIT_VAL
    return dict(zip(unique, codes.tolist()))


def dedupe(entries: Mapping[str, list[Path]]) -> tuple[dict[str, Path], list[Skip]]:
    """Id -> files found for it: keep the first path (sorted), skip the others as duplicate ids."""
    kept: dict[str, Path] = {}
    skipped: list[Skip] = []
    for key in sorted(entries):
        first, *rest = sorted(entries[key])
        kept[key] = first
        skipped += [Skip(str(p), f"duplicate id {key!r} (already taken by {first})") for p in rest]
    return kept, skipped


def resolve_file(root: Path, given: Path | None, names: tuple[str, ...], flag: str) -> Path:
    """A CSV given by a flag, or the first file found under ``root`` with one of ``names``."""
    if given is not None:
        if not given.is_file():
            raise XalError(f"{flag}: {given} is not a file")
        return given
    for name in names:
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    raise XalError(f"{root}: no {' or '.join(names)} found (give it with {flag})")


def read_table(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """A CSV with a header as rows of strings; XalError naming the file when columns are missing."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise XalError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(expected {', '.join(required)})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise XalError(f"{path}: unreadable CSV ({err})") from None
