"""The compiled functions of :mod:`xal_engine.ops.cpu_fused` (numba), in their own module: importing
numba costs about half a second, so ``cpu_fused`` imports this on the first CPU scoring call, not
with the package. The math, the fast-math flags and why: see ``cpu_fused``'s docstring.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

EPS32 = np.float32(1e-7)  # the min-max epsilon as torch adds it to an fp32 tensor
LANES = 8  # the lanes of torch's fp32 CPU sum on x86 (its AVX2 kernel, on AVX-512 CPUs too)

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


def _lanes_at(builder, base, q, kind):
    """IR: a pointer to the <8 x element> vector ``kind`` at element pointer base + 8 q."""
    return builder.bitcast(builder.gep(base, [ir.Constant(ir.IntType(64), LANES * q)], inbounds=True),
                           kind.as_pointer())


@intrinsic
def _lane_sums(typingctx, x, r, i, j, out):
    """out[:32] = the sum of rows i..j-1 of x (contiguous fp32) seen as (-1, 32), lane by lane from
    zero: torch's 4 vectors of 8 lanes side by side, as 4 <8 x float> accumulators in registers (the
    compiler keeps 32 scalar sums scalar). Plain fadd, no fast-math flags: one rounding per add.
    r: None, or a uint8 mask of x's length: then the values summed are where(r, x, +0)."""
    masked = not isinstance(r, types.NoneType)

    def codegen(context, builder, signature, args):
        i64, vec, bytes8 = ir.IntType(64), ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.IntType(8), LANES)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        mask = context.make_array(signature.args[1])(context, builder, args[1]).data if masked else None
        out_data = context.make_array(signature.args[4])(context, builder, args[4]).data
        start, stop = args[2], args[3]

        def load(q):
            value = builder.load(_lanes_at(builder, row, q, vec), align=4)
            if not masked:
                return value
            keep = builder.icmp_unsigned("!=", builder.load(_lanes_at(builder, row_mask, q, bytes8), align=1),
                                         ir.Constant(bytes8, [0] * LANES))
            return builder.select(keep, value, zero)

        zero = ir.Constant(vec, [0.0] * LANES)
        entry, loop, done = builder.basic_block, builder.append_basic_block("rows"), builder.append_basic_block("done")
        builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)
        builder.position_at_end(loop)
        row_index, sums = builder.phi(i64), [builder.phi(vec) for _ in range(4)]
        offset = builder.mul(row_index, ir.Constant(i64, 4 * LANES))
        row = builder.gep(data, [offset], inbounds=True)
        row_mask = builder.gep(mask, [offset], inbounds=True) if masked else None
        added = [builder.fadd(a, load(q)) for q, a in enumerate(sums)]
        following = builder.add(row_index, ir.Constant(i64, 1))
        row_index.add_incoming(start, entry)
        row_index.add_incoming(following, loop)
        for a, b in zip(sums, added):
            a.add_incoming(zero, entry)
            a.add_incoming(b, loop)
        builder.cbranch(builder.icmp_signed("<", following, stop), loop, done)
        builder.position_at_end(done)
        results = [builder.phi(vec) for _ in range(4)]
        for res, b in zip(results, added):
            res.add_incoming(zero, entry)
            res.add_incoming(b, loop)
        for q, res in enumerate(results):
            builder.store(res, _lanes_at(builder, out_data, q, vec), align=4)
        return context.get_dummy_value()

    return types.void(x, r, i, j, out), codegen


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


@njit(error_model="numpy", cache=True)
def row_sum(x, levels):
    """sum(x) of a contiguous fp32 row of n >= 8 values, in torch's order (its CPU cascade sum,
    vectorized_inner_sum with 8 lanes): x as (-1, 32) rows summed lane-wise in chunks of 2**p rows,
    chunks cascaded over three more levels (every 2**p chunks, and so on), the 4 vectors added, the
    n % 8 tail summed from zero, then the 8 lanes added to it in order; p = ``level_power(n // 32)``;
    ``levels`` (4, 32) scratch: a chunk's sums and the three levels."""
    return _row_sum(x, None, levels)


@njit(error_model="numpy", cache=True)
def masked_row_sum(x, r, levels):
    """``row_sum`` of where(r, x, 0) (r uint8, x's length), without writing it."""
    return _row_sum(x, r, levels)


@njit(error_model="numpy", cache=True)
def _at(x, r, t):
    return x[t] if r is None or r[t] else np.float32(0)


@njit(error_model="numpy", cache=True)
def _row_sum(x, r, levels):
    n = x.shape[0]
    vectors = n // LANES
    rows = vectors // 4
    power = level_power(rows)
    step, mask = 1 << power, (1 << power) - 1
    part, level1, level2, level3 = levels[0], levels[1], levels[2], levels[3]
    levels[1:] = 0
    i = 0
    while i + step <= rows:
        _lane_sums(x, r, i, i + step, part)  # a chunk's sums, from zero
        i += step
        for k in range(32):
            level1[k] += part[k]
        if (i & (mask << power)) == 0:
            for k in range(32):
                level2[k] += level1[k]
                level1[k] = 0
            if (i & (mask << (2 * power))) == 0:
                for k in range(32):
                    level3[k] += level2[k]
                    level2[k] = 0
    _lane_sums(x, r, i, rows, part)
    for k in range(32):
        part[k] = ((part[k] + level1[k]) + level2[k]) + level3[k]
    for v in range(4 * rows, vectors):  # vectors past the last whole row of 4 join vector 0
        for k in range(LANES):
            part[k] += _at(x, r, v * LANES + k)
    for q in range(1, 4):
        for k in range(LANES):
            part[k] += part[q * LANES + k]
    total = np.float32(0)
    for t in range(vectors * LANES, n):
        total += _at(x, r, t)
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
def _min_max(u):
    """u >= +0 (no sign bit) in place: (u - min u) / ((max u - min u) + 1e-7); returns max of the result."""
    lo, hi = _extremes(u)
    d = (hi - lo) + EPS32
    _normalise(u, lo, d)
    return (hi - lo) / d


@njit(error_model="numpy", cache=True)
def _stage2(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u):
    """S (H * W,) of one stage-1 map N (h, w) >= +0 into u; returns max S."""
    _upsample(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u)
    return _min_max(u)


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


@njit(error_model="numpy", cache=True)
def _agree(cam, r, tau, i0, i1, l0, l1, j0, j1, m0, m1, rows, u, levels):
    """(dice, soft dice, energy, hit) of one finite stage-1 map N (h, w) >= +0 against r (H * W,) uint8;
    rows, u, levels: scratch."""
    s_max = _stage2(cam, i0, i1, l0, l1, j0, j1, m0, m1, rows, u)  # U >= +0: no sign bit
    n_att, n_both, n_roi = _counts(u, r, tau)
    at_max = r[_first(u, s_max)] != 0
    return _metrics(n_both, n_att, n_roi, masked_row_sum(u, r, levels), row_sum(u, levels), s_max, at_max)


@njit(nogil=True, error_model="numpy", cache=True)
def agreement(cam, rois, dice, soft, energy, hit, refused, tau, i0, i1, l0, l1, j0, j1, m0, m1):
    """Per image b of cam (k, h, w) fp32 and rois (k, H * W) uint8: dice, soft dice, energy and hit
    into dice[b], soft[b], energy[b], hit[b]. A map with a non-finite value gets NaN metrics and no
    hit; a map with a sign bit set (-0.0, a negative value: no stage-1 map has one) is left alone and
    flagged in refused[b], for the caller to take the torch-op way."""
    pixels = rois.shape[1]
    rows = np.empty((cam.shape[1], j0.shape[0]), np.float32)
    u = np.empty(pixels, np.float32)
    levels = np.empty((4, 32), np.float32)
    for b in range(cam.shape[0]):
        finite, signed = _check(cam[b].reshape(-1))
        refused[b] = finite and signed
        if not finite or signed:
            dice[b], soft[b], energy[b], hit[b] = np.nan, np.nan, np.nan, False
            continue
        dice[b], soft[b], energy[b], hit[b] = _agree(cam[b], rois[b], tau, i0, i1, l0, l1, j0, j1, m0, m1,
                                                     rows, u, levels)


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def agreement_team(cam, rois, dice, soft, energy, hit, refused, tau, i0, i1, l0, l1, j0, j1, m0, m1, parts):
    """``agreement`` over its images in ``parts`` contiguous parts, each run by one thread of the
    threading layer's team; with the ``omp`` layer that team is torch's own OpenMP threads."""
    k = cam.shape[0]
    for t in prange(parts):
        lo, hi = k * t // parts, k * (t + 1) // parts
        agreement(cam[lo:hi], rois[lo:hi], dice[lo:hi], soft[lo:hi], energy[lo:hi], hit[lo:hi], refused[lo:hi],
                  tau, i0, i1, l0, l1, j0, j1, m0, m1)


# -- stage 1 of a weight method, fused: M = sum_c w_c A_c, N = min-max(max(M, 0)) -----------------------

@intrinsic
def _pixel_sums(typingctx, a, w, m, vectors):
    """m[p] = sum_c w[c] a[p, c] for a (P, C) C-contiguous fp32 and C = 8 * vectors (a literal, 1 to 3),
    in ``_weighted_map``'s order with the 8 lanes as one <8 x float>: lanes = ((0 + w_0 a_0) + w_1 a_1
    ...) + 0 + 0 + 0, then total = (0 + lane 0) + ... + lane 7, m = 0 + total. Plain fmul and fadd."""
    if not isinstance(vectors, types.IntegerLiteral) or not (isinstance(a, types.Array) and a.layout == "C"):
        return None
    count = vectors.literal_value

    def codegen(context, builder, signature, args):
        f32, i64, vec = ir.FloatType(), ir.IntType(64), ir.VectorType(ir.FloatType(), LANES)
        acts = context.make_array(signature.args[0])(context, builder, args[0])
        pixels = cgutils.unpack_tuple(builder, acts.shape, 2)[0]
        weights_data = context.make_array(signature.args[1])(context, builder, args[1]).data
        out = context.make_array(signature.args[2])(context, builder, args[2]).data

        weights = [builder.load(_lanes_at(builder, weights_data, q, vec), align=4) for q in range(count)]
        zero, scalar_zero = ir.Constant(vec, [0.0] * LANES), ir.Constant(f32, 0.0)
        entry, loop, done = builder.basic_block, builder.append_basic_block("pixels"), builder.append_basic_block("done")
        builder.cbranch(builder.icmp_signed(">", pixels, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        p = builder.phi(i64)
        row = builder.gep(acts.data, [builder.mul(p, ir.Constant(i64, LANES * count))], inbounds=True)
        lanes = zero
        for q in range(count):
            lanes = builder.fadd(lanes, builder.fmul(weights[q], builder.load(_lanes_at(builder, row, q, vec), align=4)))
        for _ in range(3):  # the three empty partial sums of torch's row of 4 vectors
            lanes = builder.fadd(lanes, zero)
        total = scalar_zero
        for k in range(LANES):
            total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(ir.IntType(32), k)))
        builder.store(builder.fadd(scalar_zero, total), builder.gep(out, [p], inbounds=True))
        following = builder.add(p, ir.Constant(i64, 1))
        p.add_incoming(ir.Constant(i64, 0), entry)
        p.add_incoming(following, loop)
        builder.cbranch(builder.icmp_signed("<", following, pixels), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(a, w, m, vectors), codegen


@njit(error_model="numpy", cache=True)
def _weighted_map(a, w, m, products, levels):
    """m (P,) = M of one channels-last image a (P, C) fp32, weights w (C,), as torch's w * A then
    sum(1) gives it: each product rounded once, each pixel's C products summed as a contiguous row in
    ``row_sum``'s order. For 8 <= C < 32 (fewer than 4 vectors of 8) that order is written out:
    lane k = (0 + x[k]) + x[8 + k] + ..., plus three empty partials, total = (0 + tail) + lane 0 + ...
    + lane 7, and 0 + total (``_pixel_sums`` where C is a multiple of 8, 2.6x faster for C = 16).
    No fast-math flags: M may overflow, and zeros keep torch's signs."""
    pixels, channels = a.shape
    vectors = channels // LANES
    if channels % LANES == 0 and vectors < 4:  # C = 8, 16, 24: the same sums, 8 lanes at a time
        if vectors == 1:
            _pixel_sums(a, w, m, 1)
        elif vectors == 2:
            _pixel_sums(a, w, m, 2)
        else:
            _pixel_sums(a, w, m, 3)
        return
    if vectors >= 4:
        for p in range(pixels):
            for c in range(channels):
                products[c] = w[c] * a[p, c]
            m[p] = row_sum(products, levels)
        return
    zero = np.float32(0)
    for p in range(pixels):
        total = zero
        for t in range(vectors * LANES, channels):
            total += w[t] * a[p, t]
        for k in range(LANES):
            lane = zero + w[k] * a[p, k]
            for v in range(1, vectors):
                lane += w[v * LANES + k] * a[p, v * LANES + k]
            total += ((lane + zero) + zero) + zero
        m[p] = zero + total


@njit(cache=True)
def _all_finite(m):
    finite = True
    for i in range(m.shape[0]):
        finite &= math.isfinite(m[i])
    return finite


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def _relu(m, out):
    """out = max(m, +0): torch's clamp_min(0) up to the sign of zeros (a -0.0 of M becomes +0 here),
    which leaves every later value equal (a zero's sign shows only in results that are zero)."""
    for i in range(m.shape[0]):
        out[i] = m[i] if m[i] > 0 else np.float32(0)


@njit(nogil=True, error_model="numpy", cache=True)
def cam_agreement(acts, weights, cam, rois, dice, soft, energy, hit, tau, i0, i1, l0, l1, j0, j1, m0, m1):
    """Per image b of channels-last activations acts (k, h * w, C) fp32 with weights (k, C) fp32:
    the stage-1 map N = min-max(max(M, 0)), M = sum_c w_c A_c, into cam[b] (h, w), then ``agreement``'s
    metrics of it against rois[b]. A non-finite M gives an all-NaN N, NaN metrics and no hit."""
    pixels, (h, width) = rois.shape[1], cam.shape[1:]
    rows = np.empty((h, j0.shape[0]), np.float32)
    u = np.empty(pixels, np.float32)
    levels = np.empty((4, 32), np.float32)
    m, products = np.empty(h * width, np.float32), np.empty(acts.shape[2], np.float32)
    for b in range(acts.shape[0]):
        n = cam[b].reshape(-1)
        _weighted_map(acts[b], weights[b], m, products, levels)
        if not _all_finite(m):
            n[:] = np.nan
            dice[b], soft[b], energy[b], hit[b] = np.nan, np.nan, np.nan, False
            continue
        _relu(m, n)
        _min_max(n)
        dice[b], soft[b], energy[b], hit[b] = _agree(cam[b], rois[b], tau, i0, i1, l0, l1, j0, j1, m0, m1,
                                                     rows, u, levels)


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def cam_agreement_team(acts, weights, cam, rois, dice, soft, energy, hit, tau, i0, i1, l0, l1, j0, j1, m0, m1,
                       parts):
    """``cam_agreement`` in ``parts`` contiguous parts on the threading layer's team (``agreement_team``)."""
    k = acts.shape[0]
    for t in prange(parts):
        lo, hi = k * t // parts, k * (t + 1) // parts
        cam_agreement(acts[lo:hi], weights[lo:hi], cam[lo:hi], rois[lo:hi], dice[lo:hi], soft[lo:hi],
                      energy[lo:hi], hit[lo:hi], tau, i0, i1, l0, l1, j0, j1, m0, m1)
