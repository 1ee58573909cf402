"""The compiled functions of :mod:`xal_engine.ops.cpu_fused` (numba), in their own module: importing
numba costs about half a second, so ``cpu_fused`` imports this on the first CPU scoring call, not
with the package. The math, the fast-math flags and why: see ``cpu_fused``'s docstring.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

EPS32 = np.float32(1e-7)  # the min-max epsilon as torch adds it to an fp32 tensor
PER_IMAGE = 8  # agreement's first 8 arguments are per image (split between threads), the rest shared

_EXACT = {"nnan", "ninf", "nsz"}  # one rounding per operation, in source order
_ORDER_FREE = _EXACT | {"reassoc"}  # min, max and integer sums only


@intrinsic
def _fma(typingctx, a, b, c):
    """fma(a, b, c) = a * b + c rounded once (llvm.fma.f32), as torch's contracted kernels."""
    f32 = ir.FloatType()

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def _upsample(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u):
    """U (H * W,) of one stage-1 map N (h, w); rows (h, W) is scratch."""
    h, width = cam.shape[0], j0.shape[0]
    for p in range(h):
        for j in range(width):
            rows[p, j] = _fma(cam[p, j0[j]], m0[j], cam[p, j1[j]] * m1[j])
    for i in range(i0.shape[0]):
        a, b, wa, wb, base = i0[i], i1[i], l0[i], l1[i], i * width
        for j in range(width):
            u[base + j] = _fma(rows[a, j], wa, rows[b, j] * wb)


@njit(fastmath=_ORDER_FREE, error_model="numpy", cache=True)
def _extremes(u):
    """(min, max) of u >= +0 (no sign bit): such floats order as their bits do as int32, and integer
    min/max vectorise where float ones (NaN-aware) do not."""
    bits = u.view(np.int32)
    lo, hi = bits[0], bits[0]
    for i in range(bits.shape[0]):
        lo, hi = min(lo, bits[i]), max(hi, bits[i])
    return np.array([lo, hi], np.int32).view(np.float32)


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def _normalise(u, lo, d):
    for i in range(u.shape[0]):
        u[i] = (u[i] - lo) / d


@njit(fastmath=_ORDER_FREE, error_model="numpy", cache=True)
def _counts(s, r, tau):
    n_att, n_both, n_roi = 0, 0, 0
    for i in range(s.shape[0]):
        t, m = s[i] >= tau, r[i]
        n_att += t
        n_both += t & m
        n_roi += m
    return n_att, n_both, n_roi


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def _masked(s, r, out):
    for i in range(s.shape[0]):
        out[i] = s[i] * np.float32(r[i])


@njit(fastmath=_ORDER_FREE, error_model="numpy", cache=True)
def _first(s, value):
    """The first index i with s[i] == value (0 if none), found 64 at a time: a block's count
    vectorises, the scan of one block does not."""
    n = s.shape[0]
    whole = n - n % 64
    for a in range(0, whole, 64):
        hits = 0
        for i in range(64):  # a fixed trip count: vectorised
            hits += s[a + i] == value
        if hits:
            for i in range(a, a + 64):
                if s[i] == value:
                    return i
    for i in range(whole, n):
        if s[i] == value:
            return i
    return 0


@njit(nogil=True, error_model="numpy", cache=True)
def agreement(cam, valid, rois, s, sr, counts, s_max, first, tau, i0, i1, l0, l1, j0, j1, m0, m1):
    """Per image b of cam (k, h, w) fp32 and rois (k, H * W) uint8: S into s[b], S R into sr[b],
    (|T|, |T & R|, |R|) into counts[b], max S and its first index. Images with valid[b] False
    (a non-finite map) get max S = NaN, which turns their metrics into NaN downstream."""
    for b in range(cam.shape[0]):
        if not valid[b]:
            s_max[b], first[b] = np.float32(np.nan), 0
            counts[b, 0], counts[b, 1], counts[b, 2] = 0, 0, 0
            continue
        rows = np.empty((cam.shape[1], j0.shape[0]), np.float32)
        u = s[b]
        _upsample(cam[b], i0, i1, l0, l1, j0, j1, m0, m1, rows, u)
        lo, hi = _extremes(u)  # U >= +0: the caller passes maps without a sign bit
        d = (hi - lo) + EPS32
        _normalise(u, lo, d)
        counts[b, 0], counts[b, 1], counts[b, 2] = _counts(u, rois[b], tau)
        _masked(u, rois[b], sr[b])
        s_max[b] = (hi - lo) / d
        first[b] = _first(u, s_max[b])
