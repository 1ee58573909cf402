"""Stage 2 and the ROI agreement on the CPU in one pass per image, compiled (numba), the reference's bits.

:mod:`xal_engine.ops.cpu_agreement` runs the reference's torch operations over cache-sized slices:
about a dozen passes over each (k, H, W) slice, each a separate kernel. Here one compiled function
does an image's whole stage 2 and its metrics while its (H, W) map stays in L2 (images in parallel
over the torch thread count); nothing (B, H, W) is written:

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
vectors, the n % 8 tail and the 8 lanes are added in a fixed order (``row_sum``).

Whether this torch computes exactly that is checked, not assumed: the first call for a shape runs
both on a fixed random probe and compares S and the metrics bit for bit (:func:`fused_matches_torch`);
a shape where they differ (another torch build, another CPU) stays on the torch-op path. Without numba
installed, every shape does. The compiled functions live in :mod:`xal_engine.ops.cpu_fused_kernels`,
imported on first use (numba's import costs about half a second).

Fast-math flags: the elementwise functions and the sums carry only nnan/ninf/nsz (finite inputs:
each map is checked before its pass), never reassoc or contract, so each operation rounds once as in
torch; the min/max and integer-count loops add reassoc, which vectorises them and cannot change their
results.
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

PER_IMAGE = 7  # the compiled agreement's first 7 arguments are per image (split between threads)


def _in_parallel(args: tuple) -> None:
    """The compiled ``agreement`` over its images, in contiguous parts on torch's thread count.

    Where numba's threading layer is ``omp`` (:func:`_team`), the parts run on torch's own OpenMP
    threads. Those spin for a while after each torch op, so threads of another pool, started right
    after stage 1, got half a core each: the pass then took as long as a serial one (8.8 against
    8.6 ms for stage 1 + 2 of 64 images; 6.4 ms on torch's threads). Elsewhere (another layer, a
    forked child: GNU OpenMP does not survive a fork) the calling thread takes the first part and a
    pool of threads that block takes the rest."""
    kernels = _kernels()
    k = args[0].shape[0]
    threads = max(1, min(torch.get_num_threads(), k))
    if threads == 1:
        kernels.agreement(*args)
        return
    if not _forked and _team():
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # the team's size, this call
        kernels.agreement_team(*args, threads)
        return
    cuts = [k * t // threads for t in range(threads + 1)]
    parts = [tuple(a[lo:hi] for a in args[:PER_IMAGE]) + args[PER_IMAGE:] for lo, hi in itertools.pairwise(cuts)]
    others = [_pool(threads - 1).submit(kernels.agreement, *part) for part in parts[1:]]
    kernels.agreement(*parts[0])  # the calling thread takes the first part
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
    _in_parallel(args)
    if refused.any():
        return None
    return torch.from_numpy(dice), torch.from_numpy(soft), torch.from_numpy(energy), torch.from_numpy(hit)


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
