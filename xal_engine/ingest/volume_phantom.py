"""Synthetic volume pools: 3-D phantoms with one lesion whose shape and enhancement pattern is the class.

Each volume (C, D, S, S): smooth low-frequency background + an ellipsoidal "organ" (semi-axes 0.40-0.46
of each side) with a bright outline + mild noise, the 2-D phantoms' recipe one dimension up; one
lesion strictly inside the organ whose voxel mask is the exact ROI.

    class 0  sphere          solid bright dome, intensity 1 - 0.35 d^2 (d: ellipsoidal distance, 1 at the edge)
    class 1  rim_ellipsoid   prolate ellipsoid, aspect 2.0-2.5, random 3-D orientation, ring-enhancing:
                             bright rim (d > 0.7, +1), dark necrotic-like centre (-1, below the organ)

Both classes have the same lesion volume law: the equivalent-sphere radius is r = R·m·U(0.8, 1.2) voxels
(R = ``lesion_radius``, m = min(D, S)), and an ellipsoid of aspect e has semi-axes a = r·e^(2/3) and
b = r·e^(-1/3), so its volume 4/3·π·a·b² = 4/3·π·r³ is the sphere's: size is no class cue, shape and
texture are. Voxels are isotropic (the lesion and the margins are in voxels along every axis).

Containment: with organ-normalised coordinates q (|q| = 1 on the organ outline), a lesion voxel lies
within a voxels of the lesion centre c, so |q| <= |q(c)| + a / A_min; centres are drawn with
|q(c)| <= 1 - (a + MARGIN) / A_min, which keeps every ROI voxel MARGIN voxels inside the outline.

Labels are exactly balanced (a seeded permutation of 0, 1, 0, 1, ...); splits come from
``synthetic.assign_splits``. Volumes are generated in blocks of ``volume_block_size(D, S)`` (about 1M
voxels: 4 MiB float32 temporaries at any size) from a generator seeded by (seed, block): the same
config gives byte-identical arrays, memory stays flat in N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import (
    BLOCK_PIXELS,
    MAX_BLOCK,
    SyntheticConfig,
    _smooth_basis,
    assign_splits,
)
from xal_engine.progress import progress
from xal_engine.store import Pool, PoolWriter

CLASSES = ("sphere", "rim_ellipsoid")
MIN_SIDE = 24  # smallest depth / size (there --lesion-radius may be 0.078-0.125: 1.5-3.6 voxels)
MAX_SIDE = 512
ORGAN_AXES = (0.40, 0.46)  # organ semi-axes, fraction of each side
ORGAN_SHIFT = 0.03  # organ centre jitter, fraction of each side
RADIUS_JITTER = (0.8, 1.2)  # per-volume factor on the equivalent-sphere radius
ASPECT = (2.0, 2.5)  # rim_ellipsoid: long / short semi-axis
MARGIN = 2.0  # voxels between the lesion and the organ outline at least
MIN_RADIUS = 1.5  # voxels: the smallest equivalent-sphere radius allowed
RIM = 0.7  # rim_ellipsoid: the bright rim is RIM < d <= 1, the dark centre d <= RIM
CORE = -1.0  # rim_ellipsoid: the centre's intensity, times the lesion contrast (below the organ)


def lesion_radius_range(depth: int, size: int) -> tuple[float, float]:
    """(lowest, highest) ``lesion_radius`` R that fits: the smallest lesion keeps MIN_RADIUS voxels and
    the longest (a = 1.2·R·m·2.5^(2/3)) leaves a tenth of the organ's smallest semi-axis for its centre."""
    m = min(depth, size)
    longest = RADIUS_JITTER[1] * ASPECT[1] ** (2 / 3)  # a / (R·m) at most
    return MIN_RADIUS / (RADIUS_JITTER[0] * m), (0.9 * ORGAN_AXES[0] - MARGIN / m) / longest


@dataclass(frozen=True)
class VolumePhantomConfig:
    """Arguments of ``pool create --synthetic --volumes`` (field ``lesion_radius``: ``--lesion-radius``)."""

    n: int = 200
    depth: int = 32
    size: int = 32
    channels: int = 1
    seed: int = 0
    lesion_radius: float = 0.12  # equivalent-sphere radius, fraction of min(depth, size)
    roi_fraction: float = 1.0
    test_fraction: float = 0.2
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        # the fields shared with the 2-D phantoms are checked by their config (same flags, same limits)
        SyntheticConfig(n=self.n, channels=self.channels, seed=self.seed, roi_fraction=self.roi_fraction,
                        test_fraction=self.test_fraction, val_fraction=self.val_fraction)
        for name in ("depth", "size"):
            value = getattr(self, name)
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise XalError(f"--{name} must be between {MIN_SIDE} and {MAX_SIDE} for --volumes "
                               f"(got {value})")
        lo, hi = lesion_radius_range(self.depth, self.size)
        if not lo <= self.lesion_radius <= hi:
            raise XalError(f"--lesion-radius must be between {lo:.3f} and {hi:.3f} at --depth {self.depth} "
                           f"--size {self.size} (got {self.lesion_radius})")


@dataclass(frozen=True)
class VolumeBlock:
    """One generated block: the pool arrays plus the lesion and organ geometry (for tests and checks)."""

    images: np.ndarray  # (b, C, D, S, S) uint8
    rois: np.ndarray  # (b, D, S, S) bool, all-False where has_roi is False
    has_roi: np.ndarray  # (b,) bool
    labels: np.ndarray  # (b,) int16
    ids: np.ndarray  # (b,) str
    split: np.ndarray  # (b,) uint8
    lesions: np.ndarray  # (b, D, S, S) bool, the lesion mask (= ROI where has_roi)
    organ: np.ndarray  # (b, D, S, S) bool, inside the organ outline (|q| < 1)
    semi_axes: np.ndarray  # (b, 2) float64 voxels: long a and short b (a = b for a sphere)


def volume_block_size(depth: int, size: int) -> int:
    """Volumes per generated block: 32 at 32³, 4 at 64³, 1 from 128x96x96 up."""
    return max(1, min(MAX_BLOCK, BLOCK_PIXELS // (depth * size * size)))


def assign_labels(n: int, seed: int) -> np.ndarray:
    """(n,) int16: classes 0 and 1 in exactly balanced counts (n // 2 and n - n // 2), in seeded order."""
    labels = (np.arange(n) % len(CLASSES)).astype(np.int16)
    return labels[np.random.default_rng([seed, 3]).permutation(n)]


def _grid(depth: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in voxels, shaped to broadcast over (b, D, S, S)."""
    z = np.arange(depth, dtype=np.float32).reshape(1, depth, 1, 1) + 0.5
    y = np.arange(size, dtype=np.float32).reshape(1, 1, size, 1) + 0.5
    return z, y, y.reshape(1, 1, 1, size)


def _per_volume(v: np.ndarray) -> np.ndarray:  # (b,) -> (b, 1, 1, 1) float32
    return np.asarray(v, dtype=np.float32).reshape(-1, 1, 1, 1)


def _background(rng: np.random.Generator, b: int, depth: int, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Background (b, D, S, S) float32 in ~[0, 0.8] (the 2-D phantoms' body, organ plateau, outline and
    texture), the organ mask (b, D, S, S) bool, organ centres (b, 3) and semi-axes (b, 3) in voxels."""
    wz, ws = _smooth_basis(depth), _smooth_basis(size)  # (D, 6), (S, 6)
    knots = rng.standard_normal((b, 6, 6, 6), dtype=np.float32)
    smooth = np.einsum("zi,yj,xk,bijk->bzyx", wz, ws, ws, knots, optimize=True)  # (b, D, S, S)
    sides = np.array([depth, size, size], dtype=np.float64)
    centre = (0.5 + rng.uniform(-ORGAN_SHIFT, ORGAN_SHIFT, (b, 3))) * sides  # (b, 3) voxels
    axes = rng.uniform(*ORGAN_AXES, (b, 3)) * sides  # (b, 3) voxels
    z, y, x = _grid(depth, size)
    r = np.sqrt(((z - _per_volume(centre[:, 0])) / _per_volume(axes[:, 0])) ** 2
                + ((y - _per_volume(centre[:, 1])) / _per_volume(axes[:, 1])) ** 2
                + ((x - _per_volume(centre[:, 2])) / _per_volume(axes[:, 2])) ** 2)  # 1 on the outline
    t = (r - 1.0) / _per_volume(1.5 / axes.min(axis=1))  # signed distance to the outline, ~voxels / 1.5
    organ = 0.3 * np.clip(0.5 - 0.5 * t, 0.0, 1.0)
    outline = 0.18 * np.clip(1.0 - np.abs(t), 0.0, 1.0)
    inside = r < 1.0
    return 0.12 + organ + outline + 0.06 * smooth + 0.06 * smooth * inside, inside, centre, axes


def _unit_vectors(rng: np.random.Generator, b: int) -> np.ndarray:
    """(b, 3) directions uniform on the sphere (normalised Gaussian draws)."""
    v = rng.standard_normal((b, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _lesions(rng: np.random.Generator, labels: np.ndarray, config: VolumePhantomConfig,
             organ_centre: np.ndarray, organ_axes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion masks (b, D, S, S) bool, intensities (b, D, S, S) float32 and semi-axes (b, 2) voxels.

    Ellipsoidal distance of a prolate spheroid with long axis n: d² = (v·n / a)² + (|v|² - (v·n)²) / b².
    """
    b, depth, size = len(labels), config.depth, config.size
    elongated = labels == 1
    r = config.lesion_radius * min(depth, size) * rng.uniform(*RADIUS_JITTER, b)  # (b,) voxels
    aspect = np.where(elongated, rng.uniform(*ASPECT, b), 1.0)
    long, short = r * aspect ** (2 / 3), r * aspect ** (-1 / 3)  # 4/3·π·a·b² = 4/3·π·r³
    # centre: |q(c)| uniform-in-ball up to 1 - (a + MARGIN) / A_min, so the lesion stays MARGIN inside
    reach = 1.0 - (long + MARGIN) / organ_axes.min(axis=1)
    q = _unit_vectors(rng, b) * (reach * np.cbrt(rng.uniform(0.0, 1.0, b)))[:, None]  # (b, 3)
    centre = organ_centre + q * organ_axes  # (b, 3) voxels
    n = _unit_vectors(rng, b)  # long-axis directions
    contrast = rng.uniform(0.18, 0.32, b)
    z, y, x = _grid(depth, size)
    vz, vy, vx = z - _per_volume(centre[:, 0]), y - _per_volume(centre[:, 1]), x - _per_volume(centre[:, 2])
    along = vz * _per_volume(n[:, 0]) + vy * _per_volume(n[:, 1]) + vx * _per_volume(n[:, 2])  # (b, D, S, S)
    across = np.maximum(vz * vz + vy * vy + vx * vx - along * along, 0.0)
    d = np.sqrt((along / _per_volume(long)) ** 2 + across / _per_volume(short * short))
    mask = d <= 1.0
    dome = 1.0 - 0.35 * d * d
    rim = np.where(d > RIM, np.float32(1.0), np.float32(CORE))  # float32, as every other temporary
    texture = np.where(_per_volume(elongated) > 0, rim, dome)
    value = np.where(mask, texture * _per_volume(contrast), 0.0).astype(np.float32)
    return mask, value, np.stack([long, short], axis=1)


def generate_volume_block(config: VolumePhantomConfig, block: int, labels: np.ndarray,
                          split: np.ndarray) -> VolumeBlock:
    """Volumes [block·B, block·B + len(split)), B = volume_block_size(D, S), from the stream seeded by
    (seed, block); ``labels`` and ``split`` are those volumes' rows of the pool-wide assignments."""
    rng = np.random.default_rng([config.seed, 2, block])
    b, depth, size, channels = len(split), config.depth, config.size, config.channels
    has_roi = rng.random(b) < config.roi_fraction
    background, organ, organ_centre, organ_axes = _background(rng, b, depth, size)
    lesions, lesion, semi_axes = _lesions(rng, labels, config, organ_centre, organ_axes)
    # mild noise: uniform, std 0.02, as in the 2-D phantoms
    voxels = rng.random((b, channels, depth, size, size), dtype=np.float32)  # (b, C, D, S, S), in place
    voxels -= 0.5
    voxels *= 0.02 * math.sqrt(12.0)
    for ch in range(channels):  # the 2-D phantoms' multi-sequence weights
        voxels[:, ch] += background * (1 - 0.12 * ch) + lesion * (1 - 0.25 * ch / channels)
    np.clip(voxels, 0.0, 1.0, out=voxels)
    images = (voxels * 255.0 + 0.5).astype(np.uint8)
    start = block * volume_block_size(depth, size)
    ids = np.char.mod("volume_%06d", np.arange(start, start + b)).astype(np.str_)
    return VolumeBlock(images=images, rois=lesions & has_roi[:, None, None, None], has_roi=has_roi,
                       labels=np.asarray(labels, dtype=np.int16), ids=ids, split=split.astype(np.uint8),
                       lesions=lesions, organ=organ, semi_axes=semi_axes)


def create_volume_phantom_pool(config: VolumePhantomConfig, out: str | Path, overwrite: bool = False,
                               show_progress: bool | None = None) -> Pool:
    """Write a volume phantom pool (format v2: images (N, C, D, S, S), rois (N, D, S, S)) to ``out``
    (via ``out.partial``) block by block; memory flat in N."""
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    labels = assign_labels(config.n, config.seed)
    step = volume_block_size(config.depth, config.size)
    with PoolWriter(out, channels=config.channels, height=config.size, width=config.size, depth=config.depth,
                    dtype=np.uint8, classes=list(CLASSES), modality="phantom", source="volume_phantom",
                    attrs={"volume_phantom": asdict(config)}, overwrite=overwrite) as writer, \
            progress(config.n, "pool create", unit="vol", enabled=show_progress) as bar:
        for block, start in enumerate(range(0, config.n, step)):
            stop = min(config.n, start + step)
            g = generate_volume_block(config, block, labels[start:stop], split[start:stop])
            writer.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
            bar.update(stop - start)
        return writer.close()
