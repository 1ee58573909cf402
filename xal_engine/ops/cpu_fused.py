"""Stage 2 and the ROI agreement on the CPU in one pass per image, compiled (numba), the reference's bits.

:mod:`xal_engine.ops.cpu_agreement` runs the reference's torch operations over cache-sized slices:
about a dozen passes over each (k, H, W) slice, each a separate kernel. Here one compiled function
does an image's whole stage 2 while its (H, W) map stays in L2 (images in parallel over the torch
thread count), and only the two fp32 sums are left to torch (its reduction order is the
reference's, and it runs over the same rows):

    U   = bilinear(N)            torch's CPU formula, replayed (below)
    lo, hi = min U, max U        order-free
    S   = (U - lo) / ((hi - lo) + 1e-7)      one rounding each, as torch's sub_ and div_
    |S >= tau|, |S >= tau & R|, |R|          integer counts (the reference's fp32 sums of 0/1 are exact)
    max S = (hi - lo) / d                    rounding is monotone, so S peaks where U does
    argmax S                                 the first index where S equals max S
    S R                                      written out; torch sums S and S R per row

Torch's bilinear on the CPU (half-pixel centres, no antialias), as its build computes it (FMA
contracted): per output index o of an axis of n_in -> n_out, with scale = float(n_in) / float(n_out),

    x   = max(fma(scale, o + 0.5, -0.5), 0),  i0 = min(floor(x), n_in - 1),  i1 = i0 + (i0 < n_in - 1)
    l1  = clamp(x - i0, 0, 1),  l0 = 1 - l1
    row = fma(N[:, j0], m0, N[:, j1] * m1)     along W first, then along H:
    U   = fma(row[i0], l0, row[i1] * l1)

Whether this torch computes exactly that is checked, not assumed: the first call for a shape runs
both on a fixed random probe and compares S bit for bit (:func:`fused_matches_torch`); a shape
where they differ (another torch build, another CPU) stays on the torch-op path. Without numba
installed, every shape does. The compiled functions live in :mod:`xal_engine.ops.cpu_fused_kernels`,
imported on first use (numba's import costs about half a second).

Fast-math flags: the elementwise functions carry only nnan/ninf/nsz (finite inputs: non-finite images
are masked before the call), never reassoc or contract, so each operation rounds once as in torch;
the min/max and integer-count loops add reassoc, which vectorises them and cannot change their
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


def _in_parallel(k: int, args: tuple) -> None:
    """The compiled ``agreement`` over k images, in contiguous parts on torch's thread count, the
    calling thread taking the first: it releases the GIL, and the pool's threads block between calls
    (an OpenMP pool would spin, taking the cores from the model's next forward pass)."""
    kernels = _kernels()
    threads = max(1, min(torch.get_num_threads(), k))
    if threads == 1:
        kernels.agreement(*args)
        return
    cuts = [k * t // threads for t in range(threads + 1)]
    per_image = kernels.PER_IMAGE
    parts = [tuple(a[lo:hi] for a in args[:per_image]) + args[per_image:] for lo, hi in itertools.pairwise(cuts)]
    others = [_pool(threads - 1).submit(kernels.agreement, *part) for part in parts[1:]]
    kernels.agreement(*parts[0])  # the calling thread takes the first part
    for f in others:
        f.result()


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="xal-cpu-fused")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """:mod:`xal_engine.ops.cpu_fused_kernels`, imported on first use; None without numba."""
    try:
        return importlib.import_module("xal_engine.ops.cpu_fused_kernels")
    except ImportError:
        return None


def available() -> bool:
    return _kernels() is not None


def accepts(cam: Tensor) -> bool:
    """Whether the compiled path takes stage-1 maps ``cam``: fp32 without a sign bit anywhere (N is in
    [0, 1]; a -0.0 or a negative value, which only a hand-made map has, goes the torch-op way)."""
    return cam.dtype == torch.float32 and not bool(torch.signbit(cam).any())


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


def agreement_sums(cam: Tensor, rois: Tensor, size: tuple[int, int], threshold: float, s: Tensor,
                    sr: Tensor) -> tuple[Tensor, ...]:
    """The seven per-image inputs of ``reference.agreement_from_sums`` (|T & R|, |T|, |R|, sum S R, sum S,
    max S, R at the first argmax of S) for cam (k, h, w) fp32 against rois (k, H * W) bool, (H, W) =
    size, k >= 2 (torch then sums each row whole, as for the reference's batch); s and sr (k, H * W)
    fp32 are filled with S and S R."""
    (k, h, w), (height, width) = cam.shape, size
    cam = cam.contiguous()
    valid = torch.isfinite(cam).flatten(1).all(1)  # [k]; a non-finite N gives NaN metrics
    counts = np.empty((k, 3), np.int64)
    s_max, first = np.empty(k, np.float32), np.empty(k, np.int64)
    args = (cam.numpy(), valid.numpy(), rois.numpy().view(np.uint8), s.numpy(), sr.numpy(), counts, s_max, first,
            np.float32(threshold), *bilinear_axis(h, height), *bilinear_axis(w, width))
    _in_parallel(k, args)
    n = torch.from_numpy(counts).float()  # exact below 2**24 pixels per image
    first_t = torch.from_numpy(first)
    return (n[:, 1], n[:, 0], n[:, 2], sr.sum(1), s.sum(1), torch.from_numpy(s_max),
            rois.gather(1, first_t[:, None])[:, 0])


_CHECKED: dict[tuple[int, int, int, int], bool] = {}


def fused_matches_torch(h: int, w: int, height: int, width: int) -> bool:
    """Whether the compiled stage 2 gives torch's S bit for bit for (h, w) -> (H, W): run once per
    shape and process on a fixed random probe of two maps."""
    key = (h, w, height, width)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = available() and _probe(h, w, height, width)
        except Exception:  # noqa: BLE001 - a compiler failure on this machine: the torch-op path serves
            _CHECKED[key] = False
    return _CHECKED[key]


def _probe(h: int, w: int, height: int, width: int) -> bool:
    from xal_engine.ops.reference import upsample_normalise

    g = torch.Generator().manual_seed(0)
    cam = torch.rand(2, h, w, generator=g)
    rois = torch.rand(2, height * width, generator=g) > 0.5
    s, sr = torch.empty(2, height * width), torch.empty(2, height * width)
    agreement_sums(cam, rois, (height, width), 0.5, s, sr)
    return torch.equal(s, upsample_normalise(cam, (height, width)).reshape(2, -1))
