"""Semi-synthetic BraTS-like pools: axial MNI152 T1 slices with one inserted tumour of three classes.

The anatomy is real: nilearn's MNI152 T1 template (2 mm, loaded offline) and its brain mask. Axial
slices whose brain area is at least ``min_brain`` of the largest are padded to a square (anterior up)
and area-resampled to S x S. Each image takes one slice (left-right flipped at random) and inserts a
tumour whose class mimics BraTS's dominant sub-region:

    0 edema          large irregular region, diffuse edge: bright on FLAIR and T2, slightly dark on T1ce
    1 necrotic_core  dark fluid centre (bright on T2) inside a bright enhancing rim on T1ce
    2 enhancing      compact nodule, bright on T1ce, moderately bright on FLAIR/T2

Channels are T1ce / FLAIR / T2 analogues (the paper's order): contrast transforms of the T1 slice t
inside the brain (T1ce = t; T2 = 1.25 - t: fluid bright; FLAIR = 0.75 - 1.2|t - 0.6|: fluid dark,
grey matter bright), blended towards the class's channel intensities (``APPEARANCE``) with a per-image
strength in [0.5, 1] (faint tumours are the hard cases), times a smooth bias field, plus noise; then
min-max normalised per image and channel to uint8, as the BraTS protocol does per slice.

ROI = the tumour mask, always inside the brain mask (centres keep ``CENTRE_MARGIN``·S from the brain
edge; the mask is also cut by it). The optional shortcut cue is the phantom pools' class-coded corner
marker (xal_engine.ingest.synthetic.marker_masks) in a fraction of train/val images, never in test; the
corners lie outside the padded brain, so a marker never touches the brain, let alone the ROI.

Deterministic by seed: blocks of ``synthetic.block_size(S)`` images, each from a generator seeded
by (seed, block); splits from ``synthetic.assign_splits``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, block_size, marker_masks, write_blocks
from xal_engine.store import SPLIT_TEST, Pool, PoolWriter

CLASSES = ("edema", "necrotic_core", "enhancing")
CHANNELS = ("t1ce", "flair", "t2")
PAD = 6  # template voxels of background added on every side (keeps the marker corners off the brain)
CENTRE_MARGIN = 0.06  # tumour centres lie at least this far (fraction of S) inside the brain mask
CORE = 0.55  # necrotic_core: the dark centre is d < CORE, the enhancing rim CORE <= d <= 1
# Target intensities (T1ce, FLAIR, T2) the tumour blends towards, per class: (centre, periphery).
APPEARANCE = np.array([
    [[0.45, 0.95, 0.90], [0.45, 0.95, 0.90]],  # edema: one diffuse region
    [[0.15, 0.55, 1.00], [1.00, 0.85, 0.70]],  # necrotic core | enhancing rim
    [[1.00, 0.80, 0.65], [1.00, 0.80, 0.65]],  # enhancing nodule
], dtype=np.float32)  # (K, 2, 3)
RADIUS = np.array([[0.08, 0.14], [0.07, 0.12], [0.05, 0.10]])  # (K, 2) radius range, fraction of S
WOBBLE = np.array([0.30, 0.10, 0.08])  # (K,) outline modulation amplitude (edema irregular)


@dataclass(frozen=True)
class BrainPhantomConfig:
    """Arguments of ``pool create --brain-phantom`` (field ``roi_fraction`` = flag ``--roi-fraction``)."""

    n: int = 1000
    size: int = 64
    seed: int = 0
    shortcut: float = 0.0
    roi_fraction: float = 1.0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    min_brain: float = 0.6

    def __post_init__(self) -> None:
        # the fields shared with the phantom pools are checked by their config (same flags, same limits)
        SyntheticConfig(n=self.n, size=self.size, seed=self.seed, shortcut=self.shortcut,
                        roi_fraction=self.roi_fraction, test_fraction=self.test_fraction,
                        val_fraction=self.val_fraction)
        if not 0.1 <= self.min_brain <= 0.95:
            raise XalError(f"--min-brain must be between 0.1 and 0.95 (got {self.min_brain})")


@dataclass(frozen=True)
class Template:
    """The usable axial slices at S x S (rows anterior to posterior, columns left to right in x)."""

    t1: np.ndarray       # (Z, S, S) float32 in [0, 1], 0 outside the brain
    brain: np.ndarray    # (Z, S, S) bool
    centres: np.ndarray  # (M, 2) int64 (row, col) of admissible tumour centres, grouped by slice
    offsets: np.ndarray  # (Z + 1,) int64: slice z's centres are centres[offsets[z]:offsets[z + 1]]
    slices: np.ndarray   # (Z,) int64 template z index of each slice
    version: str         # nilearn version that supplied the template


@dataclass(frozen=True)
class BrainBlock:
    """One generated block: the pool arrays plus the brain mask and marker pixels (for checks)."""

    images: np.ndarray   # (b, 3, S, S) uint8
    rois: np.ndarray     # (b, S, S) bool, all-False where has_roi is False
    has_roi: np.ndarray  # (b,) bool
    labels: np.ndarray   # (b,) int16
    ids: np.ndarray      # (b,) str
    split: np.ndarray    # (b,) uint8
    tumours: np.ndarray  # (b, S, S) bool, the tumour mask (= ROI where has_roi)
    brain: np.ndarray    # (b, S, S) bool
    markers: np.ndarray  # (b, S, S) bool, shortcut marker pixels


def _mni152() -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, z) T1 float32 and brain mask bool of the 2 mm template, and nilearn's version."""
    try:
        import nilearn
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    except ImportError:
        raise XalError("--brain-phantom needs nilearn (pip install 'nilearn>=0.10', the "
                       "'experiments' extra): it ships the MNI152 template offline") from None
    t1 = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    brain = np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    return t1, brain, str(nilearn.__version__)


@lru_cache(maxsize=4)
def load_template(size: int, min_brain: float) -> Template:
    """Usable slices of the MNI152 template resampled to ``size`` (cached per process)."""
    t1, brain, version = _mni152()
    area = brain.sum(axis=(0, 1))  # (z,)
    slices = np.flatnonzero(area >= min_brain * area.max())
    # (x, y, z) -> (z, rows = y reversed (anterior up), cols = x), padded to a square
    t1s = np.transpose(np.where(brain, t1, 0.0), (2, 1, 0))[slices, ::-1]
    masks = np.transpose(brain, (2, 1, 0))[slices, ::-1].astype(np.float32)
    side = max(t1s.shape[1:]) + 2 * PAD
    pads = [(0, 0)] + [((side - n) // 2, side - n - (side - n) // 2) for n in t1s.shape[1:]]
    stack = torch.from_numpy(np.stack([np.pad(t1s, pads), np.pad(masks, pads)], axis=1))  # (Z, 2, side, side)
    small = torch.nn.functional.interpolate(stack, size=(size, size), mode="area").numpy()
    brain_s = small[:, 1] >= 0.5
    t1_s = np.clip(np.where(brain_s, small[:, 0] / np.maximum(small[:, 1], 1e-6), 0.0), 0.0, 1.0)
    # admissible centres: at least CENTRE_MARGIN·S from the brain edge (one EDT per slice, setup only)
    inner = [distance_transform_edt(m) >= CENTRE_MARGIN * size for m in brain_s]
    centres = [np.argwhere(m) for m in inner]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in centres])]).astype(np.int64)
    if np.any(np.diff(offsets) == 0):
        raise XalError(f"--size {size}: a template slice has no room for a tumour centre")
    for a in (t1_s, brain_s):
        a.flags.writeable = False
    return Template(t1=t1_s.astype(np.float32), brain=brain_s, centres=np.concatenate(centres).astype(np.int64),
                    offsets=offsets, slices=slices.astype(np.int64), version=version)


def appearance(labels: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(b, 3, S, S) target intensities of each class at normalised tumour radius d (b, S, S)."""
    centre = APPEARANCE[labels, 0][:, :, None, None]  # (b, 3, 1, 1)
    edge = APPEARANCE[labels, 1][:, :, None, None]
    return np.where((d < CORE)[:, None], centre, edge)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _tumours(rng: np.random.Generator, labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
             size: int) -> np.ndarray:
    """(b, S, S) float32 normalised radius d of each tumour (d <= 1 inside)."""
    b = len(labels)
    r = rng.uniform(RADIUS[labels, 0], RADIUS[labels, 1]) * size  # (b,) px
    elong = rng.uniform(1.0, 1.4, b)
    m1, m2 = rng.uniform(0.5, 1.0, (2, b)) * WOBBLE[labels]
    phase = rng.uniform(0, 2 * math.pi, (3, b)).astype(np.float32)[:, :, None, None]
    grid = np.arange(size, dtype=np.float32)
    dy = grid[None, :, None] - rows.astype(np.float32)[:, None, None]  # (b, S, 1)
    dx = grid[None, None, :] - cols.astype(np.float32)[:, None, None]  # (b, 1, S)
    cos, sin = np.cos(phase[0]), np.sin(phase[0])
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # (b, S, S) tumour-aligned axes, px
    a = (r * np.sqrt(elong)).astype(np.float32)[:, None, None]
    c = (r / np.sqrt(elong)).astype(np.float32)[:, None, None]
    theta = np.arctan2(v, u)
    wobble = 1.0 + m1.astype(np.float32)[:, None, None] * np.sin(3 * theta + phase[1]) \
        + m2.astype(np.float32)[:, None, None] * np.sin(5 * theta + phase[2])
    return np.sqrt((u / a) ** 2 + (v / c) ** 2) / wobble


def _bias(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """(b, 3, S, S) smooth multiplicative field 1 ± ~0.1 (bilinear from a 4 x 4 grid per channel)."""
    knots = rng.normal(0.0, 0.06, (b, 3, 4, 4)).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(knots), size=(size, size), mode="bilinear",
                                            align_corners=True)
    return 1.0 + field.numpy()


def generate_block(config: BrainPhantomConfig, block: int, split: np.ndarray) -> BrainBlock:
    """Images [block·B, block·B + len(split)), B = block_size(S), from the stream seeded by (seed, block)."""
    tpl = load_template(config.size, config.min_brain)
    rng = np.random.default_rng([config.seed, 0, block])
    b, size = len(split), config.size
    labels = rng.integers(0, len(CLASSES), b)
    has_roi = rng.random(b) < config.roi_fraction
    shortcut = (split != SPLIT_TEST) & (rng.random(b) < config.shortcut)
    z = rng.integers(0, len(tpl.slices), b)
    flip = rng.random(b) < 0.5
    pick = tpl.offsets[z] + (rng.random(b) * np.diff(tpl.offsets)[z]).astype(np.int64)
    rows, cols = tpl.centres[pick, 0], np.where(flip, size - 1 - tpl.centres[pick, 1], tpl.centres[pick, 1])
    t = np.where(flip[:, None, None], tpl.t1[z][:, :, ::-1], tpl.t1[z])  # (b, S, S)
    brain = np.where(flip[:, None, None], tpl.brain[z][:, :, ::-1], tpl.brain[z])
    base = np.stack([t, 0.75 - 1.2 * np.abs(t - 0.6), 1.25 - t], axis=1)  # (b, 3, S, S) T1ce/FLAIR/T2
    base = np.clip(base, 0.0, 1.0) * brain[:, None]
    d = _tumours(rng, labels, rows, cols, size)
    tumours = (d <= 1.0) & brain
    # blend weight ramps down over d in [soft, 1]: diffuse for edema, a thin edge otherwise
    soft = np.where(labels == 0, 0.6, 0.85).astype(np.float32)[:, None, None]
    strength = rng.uniform(0.5, 1.0, b).astype(np.float32)[:, None, None]
    w = (tumours * strength * (1.0 - _smoothstep(0.0, 1.0, (d - soft) / (1.0 - soft))))[:, None]
    pixels = (base * (1.0 - w) + appearance(labels, d) * w) * _bias(rng, b, size)
    pixels += rng.normal(0.0, 0.02, pixels.shape).astype(np.float32) * brain[:, None]
    markers = marker_masks(size, len(CLASSES))[labels] & shortcut[:, None, None]
    markers &= ~(markers & brain).any(axis=(1, 2))[:, None, None]  # safety net: never on the brain
    lo = pixels.min(axis=(2, 3), keepdims=True)
    hi = pixels.max(axis=(2, 3), keepdims=True)
    unit = (pixels - lo) / np.maximum(hi - lo, 1e-6)  # min-max per image and channel
    unit = np.where(markers[:, None], 1.0, unit)
    images = (unit * 255.0 + 0.5).astype(np.uint8)
    start = block * block_size(size)
    ids = np.char.add(np.char.mod("brain_%06d_z", np.arange(start, start + b)),
                      np.char.mod("%02d", tpl.slices[z])).astype(np.str_)
    return BrainBlock(images=images, rois=tumours & has_roi[:, None, None], has_roi=has_roi,
                      labels=labels.astype(np.int16), ids=ids, split=split.astype(np.uint8),
                      tumours=tumours, brain=brain, markers=markers)


def create_brain_phantom_pool(config: BrainPhantomConfig, out: str | Path, overwrite: bool = False,
                              show_progress: bool | None = None) -> Pool:
    """Write a BraTS-like pool to ``out`` (via ``out.partial``) block by block; memory flat in N."""
    tpl = load_template(config.size, config.min_brain)
    split = assign_splits(config.n, config.test_fraction, config.val_fraction, config.seed)
    attrs = {"brain_phantom": asdict(config), "channel_names": list(CHANNELS),
             "template": f"MNI152 T1 2 mm (nilearn {tpl.version}), {len(tpl.slices)} axial slices"}
    with PoolWriter(out, channels=len(CHANNELS), height=config.size, width=config.size, dtype=np.uint8,
                    classes=list(CLASSES), modality="MR-phantom", source="brain_phantom", attrs=attrs,
                    overwrite=overwrite) as writer:
        return write_blocks(writer, split, config.size, partial(generate_block, config), show_progress)
