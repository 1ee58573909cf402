"""Synthetic phantom pools: anatomy-like images with one lesion whose shape and texture is the class.

Each image: smooth low-frequency background + an elliptical "organ" with a bright outline + mild
noise; one lesion inside the central disk of radius 0.40·S whose mask is the exact ROI.

    class k:  base = k % 3    0 round bright dome, 1 elongated ellipse with a bright rim,
                              2 stippled irregular lesion (speckle texture, wavy outline)
              variant = k // 3   bit 0: dark (hypo-intense), bit 1: cored (empty centre)

``first_class`` = F shifts the appearances: pool class j (label j) is appearance class k = F + j, so
F = 3 with 3 classes gives round_dark, rim_ellipse_dark, stippled_dark, a lesion family disjoint from
the default pool's (a source pool for ``pretrain --method supervised``). The shortcut marker keeps
coding the pool class j.

Shortcut cue (``shortcut`` = P): in a fraction P of train/val images (never test) a small bright
marker in a corner of the image: corner = j % 4, pattern = j // 4 (j: the pool class) (filled, hollow, plus). The corner
boxes lie outside the lesion disk by several pixels (checked again per image), so a marker never
overlaps or touches the ROI.

Images are generated in blocks of ``block_size(S)`` images (about 1M pixels: 4 MiB float32
temporaries at any S) with a generator seeded from (seed, block index): the same config gives
byte-identical arrays, memory stays flat in N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.progress import progress
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool, PoolWriter

BLOCK_PIXELS = 1 << 20  # pixels per generated block (float32 working arrays of 4 MiB)
MAX_BLOCK = 256         # images per block at most
MAX_CLASSES = 12       # 3 shapes x 4 variants (and 4 corners x 3 marker patterns)
MIN_SIZE = 32          # smallest size at which the marker corners clear the lesion disk
LESION_DISK = 0.40     # lesions lie within this radius (fraction of S) of the image centre
BASES = ("round", "rim_ellipse", "stippled")


@dataclass(frozen=True)
class SyntheticConfig:
    """Arguments of ``pool create --synthetic`` (field ``roi_fraction`` = flag ``--roi-fraction``)."""

    n: int = 1000
    size: int = 64
    classes: int = 3
    first_class: int = 0  # pool class j has appearance class first_class + j
    channels: int = 1
    seed: int = 0
    shortcut: float = 0.0
    roi_fraction: float = 1.0
    test_fraction: float = 0.2
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise XalError(f"{flag} must be {expected} (got {getattr(self, name)})")

        need(self.n >= 1, "n", "at least 1")
        need(MIN_SIZE <= self.size <= 4096, "size", f"between {MIN_SIZE} and 4096")
        need(2 <= self.classes <= MAX_CLASSES, "classes", f"between 2 and {MAX_CLASSES}")
        need(0 <= self.first_class <= MAX_CLASSES - self.classes, "first_class",
             f"between 0 and {MAX_CLASSES} - --classes = {MAX_CLASSES - self.classes} ({MAX_CLASSES} "
             "appearance classes in all)")
        need(1 <= self.channels <= 16, "channels", "between 1 and 16")
        need(self.seed >= 0, "seed", "non-negative")
        for name in ("shortcut", "roi_fraction", "test_fraction", "val_fraction"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "between 0 and 1")
        need(self.test_fraction + self.val_fraction <= 1.0, "val_fraction",
             f"at most 1 - --test-fraction = {1.0 - self.test_fraction:g}")


@dataclass(frozen=True)
class SyntheticBlock:
    """One generated block: the pool arrays plus where the shortcut marker was drawn."""

    images: np.ndarray   # (b, C, S, S) uint8
    rois: np.ndarray     # (b, S, S) bool, all-False where has_roi is False
    has_roi: np.ndarray  # (b,) bool
    labels: np.ndarray   # (b,) int16
    ids: np.ndarray      # (b,) str
    split: np.ndarray    # (b,) uint8
    lesions: np.ndarray  # (b, S, S) bool, the lesion mask (= ROI where has_roi)
    markers: np.ndarray  # (b, S, S) bool, shortcut marker pixels (all-False: no marker)


def class_names(classes: int, first_class: int = 0) -> list[str]:
    """Names of appearance classes first_class .. first_class + classes - 1: ``round``,
    ``rim_ellipse``, ``stippled``, ``round_dark``, ... (see the module doc)."""
    names = []
    for k in range(first_class, first_class + classes):
        variant = k // 3
        names.append(BASES[k % 3] + ("_dark" if variant & 1 else "") + ("_cored" if variant & 2 else ""))
    return names


def block_size(size: int) -> int:
    """Images per generated block (one random stream each): 256 at 64², 16 at 256², 1 from 1024²."""
    return max(1, min(MAX_BLOCK, BLOCK_PIXELS // (size * size)))


def marker_size(size: int) -> int:
    """Odd side of the marker square: 3 px at 32², 5 px at 64²."""
    return max(3, size // 16) | 1


def marker_masks(size: int, classes: int) -> np.ndarray:
    """(K, S, S) bool: class k's marker, corner k % 4 (2 px in), pattern k // 4."""
    m, inset = marker_size(size), 2
    pattern = np.ones((3, m, m), dtype=bool)        # filled
    pattern[1, 1:-1, 1:-1] = False                  # hollow
    pattern[2] = False
    pattern[2, m // 2, :] = pattern[2, :, m // 2] = True  # plus
    masks = np.zeros((classes, size, size), dtype=bool)
    for k in range(classes):
        row = inset if k % 4 in (0, 1) else size - inset - m
        col = inset if k % 4 in (0, 2) else size - inset - m
        masks[k, row:row + m, col:col + m] = pattern[k // 4]
    return masks


def assign_splits(n: int, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """(n,) uint8: exactly round(T·n) test and round(V·n) validation images, at random."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    split = np.full(n, SPLIT_TRAIN, dtype=np.uint8)
    split[order[:n_test]] = SPLIT_TEST
    split[order[n_test:n_test + n_val]] = SPLIT_VAL
    return split


def _smooth_basis(size: int, knots: int = 6) -> np.ndarray:
    """(S, knots) Gaussian interpolation weights: W @ G @ W.T turns a knot grid into a smooth map."""
    centres = np.linspace(0.0, 1.0, knots)
    y = (np.arange(size) + 0.5) / size
    w = np.exp(-0.5 * ((y[:, None] - centres[None, :]) * (knots - 1)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _background(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """(b, S, S) float32 in ~[0, 0.8]: body, organ ellipse with a bright outline, smooth texture."""
    w = _smooth_basis(size)
    smooth = w @ rng.standard_normal((b, 6, 6), dtype=np.float32) @ w.T  # (b, S, S)
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :, None]  # (1, S, 1)
    x = y.reshape(1, 1, size)                                              # (1, 1, S)
    cy, cx = (0.5 + rng.uniform(-0.04, 0.04, (2, b, 1, 1))).astype(np.float32)
    ry, rx = rng.uniform(0.36, 0.46, (2, b, 1, 1)).astype(np.float32)
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)  # (b, S, S), 1 on the organ outline
    edge = 1.5 / (size * ry)                                    # outline half-width ~1.5 px
    t = (r - 1.0) / edge                                        # signed distance to the outline, ~px/1.5
    organ = 0.3 * np.clip(0.5 - 0.5 * t, 0.0, 1.0)              # plateau with a 2-edge-wide ramp
    outline = 0.18 * np.clip(1.0 - np.abs(t), 0.0, 1.0)         # bright band ~3 px wide
    return 0.12 + organ + outline + 0.06 * smooth + 0.06 * smooth * (r < 1.0)


def _lesions(rng: np.random.Generator, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion masks (b, S, S) bool and signed intensity (b, S, S) float32 for the given classes.

    Computed in a (b, w, w) window around each lesion (w ~ 0.5·S: a quarter of the pixels) and
    scattered into the frame with one fancy-index assignment.
    """
    b = len(labels)
    base, variant = labels % 3, labels // 3
    radius = rng.uniform(0.07, 0.13, b)
    elong = rng.uniform(1.5, 1.8, b)
    # semi-axes (fraction of S) and outline modulation (stippled only): r(θ)·(1 + m1 sin 3θ + m2 sin 5θ)
    a = np.where(base == 1, radius * elong, radius)
    c = np.where(base == 1, radius * rng.uniform(0.5, 0.65, b), radius)
    m1 = np.where(base == 2, rng.uniform(0.15, 0.25, b), 0.0)
    m2 = np.where(base == 2, rng.uniform(0.08, 0.15, b), 0.0)
    phase = rng.uniform(0, 2 * math.pi, (3, b))
    extent = a * (1.0 + m1 + m2)
    # centre uniform in the disk where the whole lesion stays 1.5 px inside the lesion disk
    reach = np.sqrt(rng.uniform(0, 1, b)) * (LESION_DISK - extent - 1.5 / size)
    cy = 0.5 + reach * np.sin(phase[0])
    cx = 0.5 + reach * np.cos(phase[0])
    contrast = rng.uniform(0.18, 0.32, b)
    win = min(size, math.ceil(2 * extent.max() * size) + 4)
    speckle = rng.random((b, win, win), dtype=np.float32)

    def per_image(v: np.ndarray) -> np.ndarray:  # (b,) -> (b, 1, 1) float32
        return v.astype(np.float32)[:, None, None]

    def window(centre: np.ndarray) -> np.ndarray:  # (b,) first pixel of the window, inside the frame
        return np.clip(np.rint(centre * size - win / 2), 0, size - win).astype(np.intp)

    rows = window(cy)[:, None, None] + np.arange(win)[None, :, None]   # (b, w, 1)
    cols = window(cx)[:, None, None] + np.arange(win)[None, None, :]   # (b, 1, w)
    dy = (rows.astype(np.float32) + 0.5) / size - per_image(cy)
    dx = (cols.astype(np.float32) + 0.5) / size - per_image(cx)
    cos, sin = per_image(np.cos(phase[1])), per_image(np.sin(phase[1]))
    u, v = dx * cos + dy * sin, dy * cos - dx * sin     # (b, w, w) lesion-aligned axes
    d = np.sqrt((u / per_image(a)) ** 2 + (v / per_image(c)) ** 2)
    wavy = base == 2
    if wavy.any():  # angular outline modulation, only where needed (atan2 is the costly part)
        theta = np.arctan2(v[wavy], u[wavy])
        d[wavy] /= 1.0 + per_image(m1[wavy]) * np.sin(3 * theta + per_image(phase[2][wavy])) \
            + per_image(m2[wavy]) * np.sin(5 * theta)
    inside = d <= 1.0
    dome = 1.0 - 0.35 * d * d                           # class base 0
    rim = np.where(d > 0.68, 1.0, 0.5)                  # class base 1: bright rim
    stipple = np.where(speckle < 0.5, 1.0, 0.3)         # class base 2: speckle
    texture = np.where(per_image(base) == 0, dome, np.where(per_image(base) == 1, rim, stipple))
    cored = ((variant & 2) > 0)[:, None, None]
    texture = np.where(cored & (d < 0.4), 0.0, texture)  # empty centre
    sign = np.where(variant & 1, -1.0, 1.0) * contrast
    mask = np.zeros((b, size, size), dtype=bool)
    value = np.zeros((b, size, size), dtype=np.float32)
    where = (np.arange(b)[:, None, None], rows, cols)
    mask[where] = inside
    value[where] = inside * texture * per_image(sign)
    return mask, value


def _dilate(mask: np.ndarray) -> np.ndarray:
    """(b, S, S) bool grown by one pixel in the 8-neighbourhood."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    size = mask.shape[-1]
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[:, dy:dy + size, dx:dx + size]
    return out


def generate_block(config: SyntheticConfig, block: int, split: np.ndarray) -> SyntheticBlock:
    """Images [block·B, block·B + len(split)), B = block_size(S), from the stream seeded by (seed, block)."""
    rng = np.random.default_rng([config.seed, 0, block])
    b, size = len(split), config.size
    labels = rng.integers(0, config.classes, b).astype(np.int16)
    has_roi = rng.random(b) < config.roi_fraction
    shortcut = (split != SPLIT_TEST) & (rng.random(b) < config.shortcut)
    background = _background(rng, b, size)
    lesions, lesion = _lesions(rng, labels.astype(np.int64) + config.first_class, size)  # appearance classes
    markers = marker_masks(size, config.classes)[labels] & shortcut[:, None, None]
    markers &= ~(markers & _dilate(lesions)).any(axis=(1, 2))[:, None, None]  # safety net: never touch
    # mild noise: uniform, std 0.02 (a third of the cost of normal draws)
    pixels = rng.random((b, config.channels, size, size), dtype=np.float32)  # (b, C, S, S), in place
    pixels -= 0.5
    pixels *= 0.02 * math.sqrt(12.0)
    # channel c: background weight 1 - 0.12c, lesion weight 1 - 0.25c/C (multi-sequence look)
    for ch in range(config.channels):
        pixels[:, ch] += background * (1 - 0.12 * ch) + lesion * (1 - 0.25 * ch / config.channels)
    np.putmask(pixels, np.broadcast_to(markers[:, None], pixels.shape), 1.0)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    images = (pixels * 255.0 + 0.5).astype(np.uint8)
    start = block * block_size(size)
    ids = np.char.mod("phantom_%06d", np.arange(start, start + b)).astype(np.str_)
    return SyntheticBlock(images=images, rois=lesions & has_roi[:, None, None], has_roi=has_roi,
                          labels=labels, ids=ids, split=split.astype(np.uint8), lesions=lesions,
                          markers=markers)


def write_blocks(writer: PoolWriter, split: np.ndarray, size: int,
                 generate: Callable[[int, np.ndarray], Any],
                 show_progress: bool | None = None) -> Pool:
    """Append ``generate(block, split[a:b])`` for the blocks of ``block_size(size)`` images covering
    ``split`` (n,), then close the writer; any generator whose blocks carry the six pool arrays."""
    n = len(split)
    with progress(n, "pool create", enabled=show_progress) as bar:
        step = block_size(size)
        for block, start in enumerate(range(0, n, step)):
            stop = min(n, start + step)
            g = generate(block, split[start:stop])
            writer.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
            bar.update(stop - start)
    return writer.close()


def create_synthetic_pool(config: SyntheticConfig, out: str | Path, overwrite: bool = False,
                          show_progress: bool | None = None) -> Pool:
    """Write a phantom pool to ``out`` (via ``out.partial``) block by block; memory flat in N."""
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    with PoolWriter(out, channels=config.channels, height=config.size, width=config.size,
                    dtype=np.uint8, classes=class_names(config.classes, config.first_class), modality="phantom",
                    source="synthetic", attrs={"synthetic": asdict(config)},
                    overwrite=overwrite) as writer:
        return write_blocks(writer, split, config.size, partial(generate_block, config), show_progress)
