"""The compiled functions of :mod:`xal_engine.ops.cpu_fused` (numba), in their own module: importing
numba costs about half a second, so ``cpu_fused`` imports this on the first CPU scoring call, not
with the package. The math, the fast-math flags and why: see ``cpu_fused``'s docstring.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

EPS32 = np.float32(1e-7)  # the min-max epsilon as torch adds it to an fp32 tensor
LANES = 8  # the lanes of torch's fp32 CPU sum on x86 (its AVX2 kernel, on AVX-512 CPUs too)

_EXACT = {"nnan", "ninf", "nsz"}  # one rounding per operation, in source order
_ORDER_FREE = _EXACT | {"reassoc"}  # min, max and integer sums only
_Z32 = (np.float32(0),) * (4 * LANES)  # a zeroed block of partial sums

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
        out[i] = s[i] if r[i] else np.float32(0)  # where(R, S, 0)


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def _rows(x, i, j, a):
    """a + rows i..j-1 of x seen as (-1, 32), row after row: the 4 x 8 lane partial sums of torch's
    sum (4 vectors of 8 lanes side by side). Written out so that they stay in registers."""
    (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
     a16, a17, a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31) = a
    for r in range(i, j):
        o = 32 * r
        a0, a1, a2, a3 = a0 + x[o], a1 + x[o + 1], a2 + x[o + 2], a3 + x[o + 3]
        a4, a5, a6, a7 = a4 + x[o + 4], a5 + x[o + 5], a6 + x[o + 6], a7 + x[o + 7]
        a8, a9, a10, a11 = a8 + x[o + 8], a9 + x[o + 9], a10 + x[o + 10], a11 + x[o + 11]
        a12, a13, a14, a15 = a12 + x[o + 12], a13 + x[o + 13], a14 + x[o + 14], a15 + x[o + 15]
        a16, a17, a18, a19 = a16 + x[o + 16], a17 + x[o + 17], a18 + x[o + 18], a19 + x[o + 19]
        a20, a21, a22, a23 = a20 + x[o + 20], a21 + x[o + 21], a22 + x[o + 22], a23 + x[o + 23]
        a24, a25, a26, a27 = a24 + x[o + 24], a25 + x[o + 25], a26 + x[o + 26], a27 + x[o + 27]
        a28, a29, a30, a31 = a28 + x[o + 28], a29 + x[o + 29], a30 + x[o + 30], a31 + x[o + 31]
    return (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
            a16, a17, a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31)


@njit(cache=True)
def level_power(rows):
    """max(4, ceil(log2(rows)) // 4): torch's chunk size 2**p of the cascade over ``rows`` rows."""
    ceil_log2 = 1 if rows <= 2 else 64 - _leading_zeros(rows - 1)
    return max(4, ceil_log2 // 4)


@njit(cache=True)
def _leading_zeros(v):
    n = 64
    while v:
        v >>= 1
        n -= 1
    return n


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def row_sum(x, levels):
    """sum(x) of a contiguous fp32 row of n >= 8 values, in torch's order (its CPU cascade sum,
    vectorized_inner_sum with 8 lanes): x as (-1, 32) rows summed lane-wise in chunks of 2**p rows,
    chunks cascaded over three more levels (every 2**p chunks, and so on), the 4 vectors added, the
    n % 8 tail summed from zero, then the 8 lanes added to it in order; p = ``level_power(n // 32)``;
    ``levels`` (4, 32) scratch."""
    n = x.shape[0]
    vectors = n // LANES
    rows = vectors // 4
    power = level_power(rows)
    step, mask = 1 << power, (1 << power) - 1
    levels[:] = 0
    i = 0
    while i + step <= rows:
        a = _rows(x, i, i + step, _Z32)
        i += step
        for k in range(32):
            levels[0, k] += a[k]
        if (i & (mask << power)) == 0:
            for k in range(32):
                levels[1, k] += levels[0, k]
                levels[0, k] = 0
            if (i & (mask << (2 * power))) == 0:
                for k in range(32):
                    levels[2, k] += levels[1, k]
                    levels[1, k] = 0
    a = _rows(x, i, rows, _Z32)
    part = levels[3]
    for k in range(32):
        part[k] = ((a[k] + levels[0, k]) + levels[1, k]) + levels[2, k]
    for v in range(4 * rows, vectors):  # vectors past the last whole row of 4
        for k in range(LANES):
            part[k] += x[v * LANES + k]
    for q in range(1, 4):
        for k in range(LANES):
            part[k] += part[q * LANES + k]
    total = np.float32(0)
    for t in range(vectors * LANES, n):
        total += x[t]
    for k in range(LANES):
        total += part[k]
    return np.float32(0) + total  # torch adds the row's sum to its zero-filled output


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


@njit(error_model="numpy", cache=True)
def _stage2(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u):
    """S (H * W,) of one stage-1 map N (h, w) >= +0 into u; returns max S."""
    _upsample(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u)
    lo, hi = _extremes(u)
    d = (hi - lo) + EPS32
    _normalise(u, lo, d)
    return (hi - lo) / d


@njit(error_model="numpy", cache=True)
def maps(cam, s, i0, i1, l0, l1, j0, j1, m0, m1):
    """S of stage-1 maps cam (k, h, w) >= +0 into s (k, H * W), as ``agreement`` computes it."""
    rows = np.empty((cam.shape[1], j0.shape[0]), np.float32)
    for b in range(cam.shape[0]):
        _stage2(cam[b], i0, i1, l0, l1, j0, j1, m0, m1, rows, s[b])


@njit(cache=True)
def _check(cam):
    """(finite, signed) of one stage-1 map: every value finite; some value with its sign bit set."""
    finite, signed = True, False
    bits = cam.view(np.int32)
    for i in range(cam.shape[0]):
        finite &= math.isfinite(cam[i])
        signed |= bits[i] < 0
    return finite, signed


@njit(cache=True)
def _ratio(num, den):
    return num / den if den > 0 else np.float32(0)


@njit(cache=True)
def _metrics(n_both, n_att, n_roi, s_roi, s_sum, s_max, roi_at_max):
    """(dice, soft_dice, energy, hit): ``reference.agreement_from_sums`` for one finite image, fp32."""
    if s_max == 0:  # all-zero map: nothing attended, even at tau = 0
        return np.float32(0), np.float32(0), np.float32(0), False
    f_both, f_att, f_roi = np.float32(n_both), np.float32(n_att), np.float32(n_roi)
    dice = _ratio(np.float32(2) * f_both, f_att + f_roi)
    soft = _ratio(np.float32(2) * s_roi, s_sum + f_roi)
    return dice, soft, _ratio(s_roi, s_sum), roi_at_max and s_max > 0


@njit(nogil=True, error_model="numpy", cache=True)
def agreement(cam, rois, dice, soft, energy, hit, refused, tau, i0, i1, l0, l1, j0, j1, m0, m1):
    """Per image b of cam (k, h, w) fp32 and rois (k, H * W) uint8: dice, soft dice, energy and hit
    into dice[b], soft[b], energy[b], hit[b]. A map with a non-finite value gets NaN metrics and no
    hit; a map with a sign bit set (-0.0, a negative value: no stage-1 map has one) is left alone and
    flagged in refused[b], for the caller to take the torch-op way."""
    pixels = rois.shape[1]
    rows = np.empty((cam.shape[1], j0.shape[0]), np.float32)
    u, sr = np.empty(pixels, np.float32), np.empty(pixels, np.float32)
    levels = np.empty((4, 32), np.float32)
    for b in range(cam.shape[0]):
        finite, signed = _check(cam[b].reshape(-1))
        refused[b] = finite and signed
        if not finite or signed:
            dice[b], soft[b], energy[b], hit[b] = np.nan, np.nan, np.nan, False
            continue
        r = rois[b]
        s_max = _stage2(cam[b], i0, i1, l0, l1, j0, j1, m0, m1, rows, u)  # U >= +0: no sign bit (above)
        n_att, n_both, n_roi = _counts(u, r, tau)
        _masked(u, r, sr)
        at_max = r[_first(u, s_max)] != 0
        dice[b], soft[b], energy[b], hit[b] = _metrics(n_both, n_att, n_roi, row_sum(sr, levels),
                                                       row_sum(u, levels), s_max, at_max)


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def agreement_team(cam, rois, dice, soft, energy, hit, refused, tau, i0, i1, l0, l1, j0, j1, m0, m1, parts):
    """``agreement`` over its images in ``parts`` contiguous parts, each run by one thread of the
    threading layer's team; with the ``omp`` layer that team is torch's own OpenMP threads."""
    k = cam.shape[0]
    for t in prange(parts):
        lo, hi = k * t // parts, k * (t + 1) // parts
        agreement(cam[lo:hi], rois[lo:hi], dice[lo:hi], soft[lo:hi], energy[lo:hi], hit[lo:hi], refused[lo:hi],
                  tau, i0, i1, l0, l1, j0, j1, m0, m1)
