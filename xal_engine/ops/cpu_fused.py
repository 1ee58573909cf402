"""Grad-CAM to the ROI agreement on the CPU in one pass per image, compiled (numba), the reference's bits.

:mod:`xal_engine.ops.cpu_agreement` runs the reference's torch operations over cache-sized slices:
about a dozen passes over each (k, H, W) slice, each a separate kernel. Here one compiled function
does an image's whole stage 2 and its metrics while its (H, W) map stays in L2 (images in parallel
over the torch thread count); nothing (B, H, W) is written. For a weight method (Grad-CAM, ++, X)
on channels-last fp32 A, ``cam_agreement`` also does stage 1 in the same pass, from A and the
weights w (torch computes w): A is read once, and neither w_c A_c nor M is written:

    M   = sum_c w_c A_c      each product rounded once; each pixel's C products summed as torch
                             sums a contiguous row (``row_sum``'s order; written out for C < 32)
    N   = (c - lo) / ((hi - lo) + 1e-7),  c = max(M, +0),  lo, hi = min c, max c
                             (torch's clamp_min keeps a -0.0 of M; here it is +0: equal values,
                             and a zero's sign shows only in results that are zero)

    U   = bilinear(N)            torch's CPU formula, replayed (below)
    lo, hi = min U, max U        order-free
    S   = (U - lo) / ((hi - lo) + 1e-7)      one rounding each, as torch's sub_ and div_
    |S >= tau|, |S >= tau & R|, |R|          integer counts (the reference's fp32 sums of 0/1 are exact)
    max S = (hi - lo) / d                    rounding is monotone, so S peaks where U does
    argmax S                                 the first index where S equals max S
    sum S, sum where(R, S, 0)                torch's cascade sum, replayed (below)
    dice, soft dice, energy, hit             ``reference.agreement_from_sums``, one image at a time

Torch's bilinear on the CPU (half-pixel centres, no antialias), as its build computes it (FMA
contracted): per output index o of an axis of n_in -> n_out, with scale = float(n_in) / float(n_out),

    x   = max(fma(scale, o + 0.5, -0.5), 0),  i0 = min(floor(x), n_in - 1),  i1 = i0 + (i0 < n_in - 1)
    l1  = clamp(x - i0, 0, 1),  l0 = 1 - l1
    row = fma(N[:, j0], m0, N[:, j1] * m1)     along W first, then along H:
    U   = fma(row[i0], l0, row[i1] * l1)

Torch's fp32 sum of a contiguous row of n >= 8 values (``cascade_sum``, ``vectorized_inner_sum``; on
x86 its AVX2 kernel): 8 lanes, 4 vectors side by side, so x is read as rows of 32 summed lane-wise,
in chunks of 2**p rows cascaded over four levels (p = max(4, ceil(log2(rows)) // 4)); then the 4
vectors, the n % 8 tail and the 8 lanes are added in a fixed order (``row_sum``). A chunk's 32 lane
sums are written in LLVM IR as 4 <8 x float> accumulators (``_lane_sums``): numba's compiler kept
32 scalar sums scalar, 3.4x slower.

Whether this torch computes exactly that is checked, not assumed: the first call for a shape runs
both on a fixed random probe and compares S and the metrics bit for bit (:func:`fused_matches_torch`;
N and the metrics for stage 1 too, per channel count, :func:`cam_fused_matches_torch`);
a shape where they differ (another torch build, another CPU) stays on the torch-op path. Without numba
installed, every shape does. The compiled functions live in :mod:`xal_engine.ops.cpu_fused_kernels`,
imported on first use (numba's import costs about half a second).

Fast-math flags: the elementwise functions carry only nnan/ninf/nsz (finite inputs: each map is
checked before its pass), never reassoc or contract, so each operation rounds once as in torch; the
min/max and integer-count loops add reassoc, which vectorises them and cannot change their results.
The sums (``row_sum``, stage 1's products and channel sums) carry none: M may overflow (the image
is then NaN), and its check must see the inf.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch
from torch import Tensor


def _in_parallel(name: str, args: tuple, per_image: int) -> None:
    """The compiled function ``name`` (``agreement`` or ``cam_agreement``) over its images, in
    contiguous parts on torch's thread count; its first ``per_image`` arguments are per image.

    Where numba's threading layer is ``omp`` (:func:`_team`), the parts run on torch's own OpenMP
    threads (``name + "_team"``). Those spin for a while after each torch op, so threads of another
    pool, started right after stage 1, got half a core each: the pass then took as long as a serial
    one (8.8 against 8.6 ms for stage 1 + 2 of 64 images; 6.4 ms on torch's threads). Elsewhere
    (another layer, a forked child: GNU OpenMP does not survive a fork) the calling thread takes the
    first part and a pool of threads that block takes the rest."""
    kernels = _kernels()
    serial = getattr(kernels, name)
    k = args[0].shape[0]
    threads = max(1, min(torch.get_num_threads(), k))
    if threads == 1:
        serial(*args)
        return
    if not _forked and _team():
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # the team's size, this call
        getattr(kernels, name + "_team")(*args, threads)
        return
    cuts = [k * t // threads for t in range(threads + 1)]
    parts = [tuple(a[lo:hi] for a in args[:per_image]) + args[per_image:] for lo, hi in itertools.pairwise(cuts)]
    others = [_pool(threads - 1).submit(serial, *part) for part in parts[1:]]
    serial(*parts[0])  # the calling thread takes the first part
    for f in others:
        f.result()


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="xal-cpu-fused")


_forked = False  # in a forked child: numba's omp layer refuses to run there (SIGTERM), the pool serves


def _after_fork_in_child() -> None:
    global _forked
    _forked = True
    _pool.cache_clear()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.lru_cache(maxsize=1)
def _team() -> bool:
    """Whether numba's parallel functions run on torch's OpenMP threads: its ``omp`` threading layer
    (preferred here over numba's default order, tbb first) binds to the OpenMP runtime already
    loaded, torch's. Launched on first use; its launch sets that runtime's thread count to numba's
    own, so torch's is put back."""
    import numba

    if numba.config.THREADING_LAYER == "default":  # NUMBA_THREADING_LAYER set by the user wins
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    threads = torch.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # launches the layer
        return numba.threading_layer() == "omp"
    except ValueError:  # no threading layer could be loaded: the pool serves
        return False
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """:mod:`xal_engine.ops.cpu_fused_kernels`, imported on first use; None without numba."""
    try:
        return importlib.import_module("xal_engine.ops.cpu_fused_kernels")
    except ImportError:
        return None


def available() -> bool:
    return _kernels() is not None


@functools.lru_cache(maxsize=64)
def bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, l0, l1) of one axis n_in -> n_out: torch's source indices (int64) and weights (fp32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    half = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    # fma(scale, o + 0.5, -0.5): the product is exact in fp64 (24 + 24 bits), so one rounding to fp32
    x = (half.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    x = np.maximum(x, np.float32(0.0))
    i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
    l1 = np.clip(x - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    return i0, i0 + (i0 < n_in - 1), l0, l1


def agreement(cam: Tensor, rois: Tensor, size: tuple[int, int],
              threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(dice, soft_dice, energy, hit) of stage-1 maps cam (k, h, w) fp32 against rois (k, H * W) bool,
    (H, W) = size, k >= 2 (torch then sums each row whole, as for the reference's batch); None where
    a map has a sign bit set (-0.0 or a negative value, which only a hand-made map has): the integer
    min/max would misorder it, and the caller takes the torch-op way."""
    (k, h, w), (height, width) = cam.shape, size
    cam = cam.contiguous()
    dice, soft, energy = (np.empty(k, np.float32) for _ in range(3))
    hit, refused = np.empty(k, np.bool_), np.empty(k, np.bool_)
    args = (cam.numpy(), rois.numpy().view(np.uint8), dice, soft, energy, hit, refused,
            np.float32(threshold), *bilinear_axis(h, height), *bilinear_axis(w, width))
    _in_parallel("agreement", args, 7)
    if refused.any():
        return None
    return torch.from_numpy(dice), torch.from_numpy(soft), torch.from_numpy(energy), torch.from_numpy(hit)


def cam_agreement(activations: Tensor, weights: Tensor, rois: Tensor, size: tuple[int, int],
                  threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(N, dice, soft_dice, energy, hit) of a weight method's stage 1 and then ``agreement``'s pass, in
    one compiled pass per image: channels-last fp32 activations A (k, C, h, w), their weights w (k, C)
    fp32, rois (k, H * W) bool, (H, W) = size, k >= 2. N (k, h, w) = normalise_cam(sum_c w_c A_c);
    A is read once, and neither the products nor M are written."""
    (k, channels, h, w), (height, width) = activations.shape, size
    acts = activations.permute(0, 2, 3, 1).reshape(k, h * w, channels)  # a view of channels-last A
    cam = torch.empty(k, h, w)
    dice, soft, energy = (np.empty(k, np.float32) for _ in range(3))
    hit = np.empty(k, np.bool_)
    args = (acts.numpy(), weights.contiguous().numpy(), cam.numpy(), rois.numpy().view(np.uint8),
            dice, soft, energy, hit, np.float32(threshold), *bilinear_axis(h, height), *bilinear_axis(w, width))
    _in_parallel("cam_agreement", args, 8)
    return cam, torch.from_numpy(dice), torch.from_numpy(soft), torch.from_numpy(energy), torch.from_numpy(hit)


_CHECKED: dict[tuple[int, int, int, int], bool] = {}


def fused_matches_torch(h: int, w: int, height: int, width: int) -> bool:
    """Whether the compiled stage 2 gives torch's S and metrics bit for bit for (h, w) -> (H, W) maps:
    run once per shape and process on a fixed random probe."""
    key = (h, w, height, width)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = available() and height * width >= _kernels().LANES and _probe(h, w, height, width)
        except Exception:  # noqa: BLE001 - a compiler failure on this machine: the torch-op path serves
            _CHECKED[key] = False
    return _CHECKED[key]


PROBE_IMAGES = 4  # random maps and ROIs: another sum order or bilinear formula shows in their bits


def _probe(h: int, w: int, height: int, width: int) -> bool:
    from xal_engine.ops.reference import roi_agreement, upsample_normalise

    g = torch.Generator().manual_seed(0)
    cam = torch.rand(PROBE_IMAGES, h, w, generator=g)
    rois = torch.rand(PROBE_IMAGES, height, width, generator=g) > 0.5
    s = torch.empty(PROBE_IMAGES, height * width)  # S itself, as the metrics' pass computes it
    _kernels().maps(cam.numpy(), s.numpy(), *bilinear_axis(h, height), *bilinear_axis(w, width))
    want_s = upsample_normalise(cam, (height, width))
    if not torch.equal(s, want_s.reshape(PROBE_IMAGES, -1)):
        return False
    got = agreement(cam, rois.reshape(PROBE_IMAGES, -1), (height, width), 0.5)
    want = roi_agreement(want_s, rois, 0.5)
    return got is not None and all(torch.equal(a, b) for a, b in zip(got, want))


_CAM_CHECKED: dict[tuple[int, int, int, int, int], bool] = {}


def cam_fused_matches_torch(channels: int, h: int, w: int, height: int, width: int) -> bool:
    """Whether :func:`cam_agreement` gives torch's N and metrics bit for bit for channels-last (C, h, w)
    activations and (H, W) ROIs: stage 2 passes :func:`fused_matches_torch`, C >= 8 (a vectorised
    channel sum in torch) and a fixed random probe agrees; once per shape and process."""
    key = (channels, h, w, height, width)
    if key not in _CAM_CHECKED:
        try:
            _CAM_CHECKED[key] = (available() and channels >= _kernels().LANES
                                 and fused_matches_torch(h, w, height, width) and _cam_probe(channels, h, w, height, width))
        except Exception:  # noqa: BLE001 - as fused_matches_torch
            _CAM_CHECKED[key] = False
    return _CAM_CHECKED[key]


def _cam_probe(channels: int, h: int, w: int, height: int, width: int) -> bool:
    from xal_engine.ops.cam_methods import weighted_sum
    from xal_engine.ops.reference import normalise_cam, roi_agreement, upsample_normalise

    g = torch.Generator().manual_seed(1)
    acts = torch.randn(PROBE_IMAGES, channels, h, w, generator=g).clamp_min(0)  # post-ReLU: zeros too
    acts = acts.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(PROBE_IMAGES, channels, generator=g)
    rois = torch.rand(PROBE_IMAGES, height, width, generator=g) > 0.5
    want_cam = normalise_cam(weighted_sum(weights, acts))
    want = roi_agreement(upsample_normalise(want_cam, (height, width)), rois, 0.5)
    got_cam, *got = cam_agreement(acts, weights, rois.reshape(PROBE_IMAGES, -1), (height, width), 0.5)
    return torch.equal(got_cam, want_cam) and all(torch.equal(a, b) for a, b in zip(got, want))
