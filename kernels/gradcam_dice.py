"""Fused Grad-CAM -> bilinear upsample -> min-max -> ROI agreement, one Triton launch per batch.

Same math and edge cases as ``xal_engine.ops.reference`` (documented there). The CAM method's own
part (``xal_engine.ops.cam_methods``) runs in torch before the launch and arrives as ONE of:
channel weights w (B, C) fp32, which the kernel contracts with A (Grad-CAM, Grad-CAM++, XGrad-CAM),
or the pre-ReLU map M (B, h, w) fp32 itself (HiResCAM, LayerCAM, EigenCAM); the compile-time flag
``MAP_GIVEN`` picks which. Several target layers (``LAYERS`` > 1, up to ``MAX_LAYERS``) arrive as
their pre-ReLU maps packed in one row per image. A program works on one image, or on one band of its
rows:

    stage 1   M = sum_k w_k A_k over channel blocks (or M loaded), then N = min-max(ReLU(M)) over
              the feature map (each layer's own), written to the map output;
    extremes  min and max of U = bilinear(N) (several layers: mean_l bilinear(N_l)) from the output
              rows/columns where they can lie: along one axis each layer's U is affine within a
              group of outputs that share their lower source neighbour (and within the outputs
              clamped to source 0 and the rest of the first group), so over a group its extremes
              lie on the group's ends, and over the image on the grid of (end rows) x (end
              columns), every layer's ends together: at most (2h + 2) x (2w + 2) points per layer
              pair instead of H x W (``SCAN_EXTREMES`` scans every pixel instead: the check and the
              old cost);
    pass      tiles over the band's H x W pixels, column blocks outer so each column's source index
              and weights are computed once per block (one layer): U gathered from N on the fly,
              S = (U - min) / (max - min + 1e-7), threshold, counts, sums and the first-index argmax.

Bands (``programs_per_image`` > 1, when the batch alone cannot fill the GPU or the ROI is large):
every band repeats stage 1 and the extremes (cheap next to the pass) and writes its totals to a
scratch row; the band that finishes last (an atomic count per image, reset by it for the next
launch) combines the rows in band order, so results do not depend on scheduling. One launch per
batch either way.

Memory traffic per image: A read once per band (C * h * w elements, any float dtype, loaded into
fp32) and w (C floats), or M (h * w floats) instead of both; the ROI read once (H * W bytes); N
written once per band and gathered from cache; the full-resolution map is never written. G is read
by the method's torch part (for Grad-CAM one fp32-accumulated mean, so A and G are still each read
once per batch). Offsets into A and M and each image's base are int64; gathers from N and offsets
within one ROI are int32 (the launcher copies an ROI batch whose strides would overflow them).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops.agreement import RoiAgreement

MAX_FEATURE_PIXELS = 128 * 128  # h * w held in registers by one program
MAX_PROGRAMS_PER_IMAGE = 64  # row bands of one image (the scratch rows the last band combines)
_TILE = 1024  # pixels of the upsampled map per tile
_TOTALS = tl.constexpr(8)  # one band's totals: |T & R|, |T|, |R|, first argmax, R there, sum S, sum S R, max S
_NO_INDEX = tl.constexpr(2147483647)  # int32 max: "no pixel yet" for the first-index argmax


@triton.jit
def _div(num, den):
    """IEEE division (``/`` compiles to an approximate one on CUDA), 1 where den == 0 (masked later)."""
    return tl.math.div_rn(num, tl.where(den > 0, den, 1.0))


@triton.jit
def _src(dst, scale):
    """torch's source coordinate of output index dst (align_corners=False), before its clamp at 0."""
    return scale * (dst.to(tl.float32) + 0.5) - 0.5


@triton.jit
def _source_index(dst, scale, size_in):
    """torch's linear source index (align_corners=False): lower/upper neighbour and weight of upper."""
    src = tl.maximum(_src(dst, scale), 0.0)
    lo = tl.minimum(src.to(tl.int32), size_in - 1)  # floor, since src >= 0
    lam = tl.minimum(tl.maximum(src - lo.to(tl.float32), 0.0), 1.0)
    hi = lo + (lo < size_in - 1).to(tl.int32)
    return lo, hi, lam


@triton.jit
def _first_dst(k, scale, size_in):
    """The smallest output index whose lower source neighbour (``_source_index``) is >= k.

    The real-number boundary is ceil((k + 0.5) / scale - 0.5) (k >= 1; all outputs for k = 0, where
    the source index is clamped). fp32 puts the estimate within 1 of the boundary the tiles' own
    float formula draws, and lo grows with the output index, so four steps from estimate - 2 that
    each move on while lo < k land on that boundary exactly.
    """
    est = tl.math.ceil(tl.math.div_rn(k.to(tl.float32) + 0.5, scale) - 0.5).to(tl.int32) - 2
    for _ in tl.static_range(4):
        est += (_source_index(est, scale, size_in)[0] < k).to(tl.int32)
    return tl.where(k == 0, 0, est)


@triton.jit
def _first_unclamped(scale):
    """The first output index whose source coordinate is > 0: the outputs before it are clamped to
    source 0, so U bends there inside its first group (one layer's U stays monotone across the bend;
    a sum of layers may not). Found as ``_first_dst`` finds its boundaries."""
    est = tl.math.ceil(tl.math.div_rn(0.5, scale) - 0.5).to(tl.int32) - 2
    for _ in tl.static_range(4):
        est += (_src(est, scale) <= 0.0).to(tl.int32)
    return est


@triton.jit
def _extreme_dst(j, scale, size_in, size_out, SCAN: tl.constexpr):
    """The j-th output index where U's extremes can lie along one axis, and whether it is one.

    Outputs sharing the lower neighbour k form a group (consecutive, k = j // 2 for j < 2 size_in);
    its first (j even) and last (j odd) output are candidates; a group is empty when downsampling
    skips k. j = 2 size_in and 2 size_in + 1: the two outputs around the bend at the clamp
    (``_first_unclamped``). With size_out <= 2 size_in + 2, or ``SCAN``, every output is a candidate.
    """
    if SCAN:
        return j, j < size_out
    else:
        k = j // 2
        first = _first_dst(k, scale, size_in)
        after = tl.minimum(tl.where(k + 1 >= size_in, size_out, _first_dst(k + 1, scale, size_in)), size_out)
        bend = _first_unclamped(scale) - 1 + (j - 2 * size_in)  # j = 2 size_in, 2 size_in + 1
        ends = j < 2 * size_in
        every = size_out <= 2 * size_in + 2
        dst = tl.where(every, j, tl.where(ends, tl.where(j % 2 == 0, first, after - 1), bend))
        valid = tl.where(ends, first < after, (j < 2 * size_in + 2) & (bend >= 0) & (bend < size_out))
        return dst, tl.where(every, j < size_out, valid)


@triton.jit
def _zero_sums(BLOCK_A: tl.constexpr, BLOCK_X: tl.constexpr):
    """The per-lane sums of :func:`_accumulate` over a (BLOCK_A, BLOCK_X) tile, before the first tile."""
    zero_i = tl.zeros([BLOCK_A, BLOCK_X], dtype=tl.int32)
    zero_f = tl.zeros([BLOCK_A, BLOCK_X], dtype=tl.float32)
    return (zero_i, zero_i, zero_i, zero_f, zero_f, tl.full([BLOCK_A, BLOCK_X], -1.0, tl.float32),
            tl.full([BLOCK_A, BLOCK_X], _NO_INDEX, tl.int32), zero_i)


@triton.jit
def _store_metrics(dice_ptr, soft_ptr, energy_ptr, hit_ptr, b, dice, soft, energy, hit):
    """Image (or volume) b's four results."""
    tl.store(dice_ptr + b, dice)
    tl.store(soft_ptr + b, soft)
    tl.store(energy_ptr + b, energy)
    tl.store(hit_ptr + b, hit.to(tl.uint8))


@triton.jit
def _accumulate(s, in_roi, mask, index, threshold, inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r):
    """Per-lane running sums over one tile of S (2-D and 3-D kernels): |T & R|, |T|, |R|, sum S,
    sum S R, and max S with its first (row-major) index and R there, in any tile order."""
    att = mask & (s >= threshold)
    inter += (att & in_roi).to(tl.int32)
    n_att += att.to(tl.int32)
    n_roi += in_roi.to(tl.int32)
    s_sum += tl.where(mask, s, 0.0)
    s_roi += tl.where(in_roi, s, 0.0)
    better = mask & ((s > best_s) | ((s == best_s) & (index < best_i)))
    best_s = tl.where(better, s, best_s)
    best_i = tl.where(better, index, best_i)
    best_r = tl.where(better, in_roi.to(tl.int32), best_r)
    return inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r


@triton.jit
def _totals(inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r):
    """The per-lane sums of :func:`_accumulate` reduced to one program's: |T & R|, |T|, |R|, sum S,
    sum S R, max S, its first index and R there (0/1)."""
    s_max = tl.max(tl.max(best_s, axis=1), axis=0)
    first = tl.min(tl.min(tl.where(best_s == s_max, best_i, _NO_INDEX), axis=1), axis=0)
    return (tl.sum(tl.sum(inter, axis=1), axis=0), tl.sum(tl.sum(n_att, axis=1), axis=0),
            tl.sum(tl.sum(n_roi, axis=1), axis=0), tl.sum(tl.sum(s_sum, axis=1), axis=0),
            tl.sum(tl.sum(s_roi, axis=1), axis=0), s_max, first,
            tl.max(tl.max(tl.where(best_i == first, best_r, 0), axis=1), axis=0))


@triton.jit
def _metrics(inter_t, att_t, roi_t, s_sum_t, s_roi_t, s_max, hit_r, bad):
    """(dice, soft_dice, energy, hit) from one image's totals, with the reference's edge cases (zero
    denominators give 0, an all-zero map zeros and no hit, bad NaN)."""
    dice_den = (att_t + roi_t).to(tl.float32)
    dice = tl.where(dice_den > 0, _div(2 * inter_t.to(tl.float32), dice_den), 0.0)
    soft_den = s_sum_t + roi_t.to(tl.float32)
    soft = tl.where(soft_den > 0, _div(2.0 * s_roi_t, soft_den), 0.0)
    energy = tl.where(s_sum_t > 0, _div(s_roi_t, s_sum_t), 0.0)
    flat = s_max == 0.0
    dice = tl.where(bad, float("nan"), tl.where(flat, 0.0, dice))
    soft = tl.where(bad, float("nan"), tl.where(flat, 0.0, soft))
    energy = tl.where(bad, float("nan"), tl.where(flat, 0.0, energy))
    hit = (hit_r > 0) & (s_max > 0.0) & (~bad)
    return dice, soft, energy, hit


@triton.jit
def _finish(inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r, bad):
    """(dice, soft_dice, energy, hit) from the per-lane sums of one program that saw every pixel."""
    inter_t, att_t, roi_t, s_sum_t, s_roi_t, s_max, _first, hit_r = _totals(
        inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r)
    return _metrics(inter_t, att_t, roi_t, s_sum_t, s_roi_t, s_max, hit_r, bad)


@triton.jit
def _columns(xs, scale_x, w_in):
    """Per-column gather indices and weights of a column block, [1, BLOCK_X] each."""
    x_lo, x_hi, lx = _source_index(xs, scale_x, w_in)
    return x_lo[None, :], x_hi[None, :], (1.0 - lx)[None, :], lx[None, :]


@triton.jit
def _upsample(cam_b, ys, x_lo, x_hi, lx0, lx1, mask, scale_y, h_in, w_in):
    """U on rows ys x a column block, same op order as torch: ly0 (lx0 n00 + lx1 n01) + ly1 (...)."""
    y_lo, y_hi, ly = _source_index(ys, scale_y, h_in)  # [BLOCK_Y]
    row_lo = cam_b + (y_lo * w_in)[:, None]  # int32 offsets within N
    row_hi = cam_b + (y_hi * w_in)[:, None]
    n00 = tl.load(row_lo + x_lo, mask=mask, other=0.0)
    n01 = tl.load(row_lo + x_hi, mask=mask, other=0.0)
    n10 = tl.load(row_hi + x_lo, mask=mask, other=0.0)
    n11 = tl.load(row_hi + x_hi, mask=mask, other=0.0)
    return (1.0 - ly)[:, None] * (lx0 * n00 + lx1 * n01) + ly[:, None] * (lx0 * n10 + lx1 * n11)


@triton.jit
def _combine_bands(part_img, bands, bad, BLOCK_P: tl.constexpr):
    """(dice, soft_dice, energy, hit) from an image's band rows of totals, in band order."""
    q = tl.arange(0, BLOCK_P)
    q_ok = q < bands
    row = part_img + q * _TOTALS
    inter_t = tl.sum(tl.load(row + 0, mask=q_ok, other=0, cache_modifier=".cg"), axis=0)
    att_t = tl.sum(tl.load(row + 1, mask=q_ok, other=0, cache_modifier=".cg"), axis=0)
    roi_t = tl.sum(tl.load(row + 2, mask=q_ok, other=0, cache_modifier=".cg"), axis=0)
    first_q = tl.load(row + 3, mask=q_ok, other=_NO_INDEX, cache_modifier=".cg")
    hit_q = tl.load(row + 4, mask=q_ok, other=0, cache_modifier=".cg")
    s_sum_t = tl.sum(tl.load(row + 5, mask=q_ok, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True), axis=0)
    s_roi_t = tl.sum(tl.load(row + 6, mask=q_ok, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True), axis=0)
    s_max_q = tl.where(q_ok, tl.load(row + 7, mask=q_ok, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True),
                       -1.0)
    s_max = tl.max(s_max_q, axis=0)
    first = tl.min(tl.where(s_max_q == s_max, first_q, _NO_INDEX), axis=0)
    hit_r = tl.max(tl.where(q_ok & (first_q == first), hit_q, 0), axis=0)
    return _metrics(inter_t, att_t, roi_t, s_sum_t, s_roi_t, s_max, hit_r, bad)


@triton.jit
def _pre_relu_map(a_ptr, w_ptr, m_ptr, b, p, p_mask, C, P, a_sb, a_sc, a_sp, MAP_GIVEN: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Image b's pre-ReLU M over its P flattened feature pixels (2-D and 3-D kernels): given (M rows
    of P), or sum_k w_k A_k by channel blocks of (BLOCK_C, BLOCK_P), A in any float dtype, fp32 sums."""
    if MAP_GIVEN:
        m = tl.load(m_ptr + b * P + p, mask=p_mask, other=0.0)
    else:
        m = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C).to(tl.int64)
            c_mask = c < C
            cp_mask = c_mask[:, None] & p_mask[None, :]  # [BLOCK_C, BLOCK_P]
            w_k = tl.load(w_ptr + b * C + c, mask=c_mask, other=0.0)  # [BLOCK_C]
            a = tl.load(a_ptr + b * a_sb + c[:, None] * a_sc + p[None, :] * a_sp, mask=cp_mask, other=0.0)
            m += tl.sum(w_k[:, None] * a.to(tl.float32), axis=0)
    return m


@triton.jit
def _normalise(m, p_mask):
    """Stage 1's shared part on one pre-ReLU map M (flattened, valid where p_mask): N = min-max(ReLU(M)),
    all NaN when M has a non-finite entry (any non-finite A or G leaves one, see ops.cam_methods;
    inf - inf = NaN); and that flag."""
    bad = tl.max(tl.where(p_mask & ((m - m) != 0.0), 1, 0), axis=0) > 0
    m = tl.maximum(m, 0.0)
    m_min = tl.min(tl.where(p_mask, m, float("inf")), axis=0)
    shifted = m - m_min
    n = tl.math.div_rn(shifted, tl.max(tl.where(p_mask, shifted, 0.0), axis=0) + 1e-7)
    return tl.where(bad, float("nan"), n), bad


@triton.jit
def _layer(layer_ptr, scale_ptr, l):
    """Layer l of several: its (h, w, h * w, offset of its map in the packed maps, scale_y, scale_x)."""
    return (tl.load(layer_ptr + 4 * l), tl.load(layer_ptr + 4 * l + 1), tl.load(layer_ptr + 4 * l + 2),
            tl.load(layer_ptr + 4 * l + 3), tl.load(scale_ptr + 2 * l), tl.load(scale_ptr + 2 * l + 1))


@triton.jit
def _layers_mean(cam_b, layer_ptr, scale_ptr, ys, xs, mask, LAYERS: tl.constexpr, BLOCK_Y: tl.constexpr,
                 BLOCK_X: tl.constexpr):
    """U = mean_l bilinear(N_l) on rows ys x columns xs, as pytorch-grad-cam aggregates layers (its
    clip at 0 changes nothing: every U_l >= 0, and NaN stays NaN); the sum in layer order, then / L."""
    u = tl.zeros([BLOCK_Y, BLOCK_X], tl.float32)
    for l in tl.static_range(LAYERS):
        h_l, w_l, _hw, offset, sy, sx = _layer(layer_ptr, scale_ptr, l)
        x_lo, x_hi, lx0, lx1 = _columns(xs, sx, w_l)
        u += _upsample(cam_b + offset, ys, x_lo, x_hi, lx0, lx1, mask, sy, h_l, w_l)
    return u * (1.0 / LAYERS)


@triton.jit(do_not_specialize=["HW"])  # HW == 1 stays a runtime float-convertible scalar
def _gradcam_dice_kernel(
    a_ptr, w_ptr, m_ptr, roi_ptr, cam_ptr, dice_ptr, soft_ptr, energy_ptr, hit_ptr, part_ptr, count_ptr,
    layer_ptr, scale_ptr,
    C, HW, h_in, w_in, H, W, bands, band_rows,
    a_sb, a_sc, a_sp, r_sb, r_sy, r_sx,
    scale_y, scale_x, threshold,
    MAP_GIVEN: tl.constexpr, SCAN_EXTREMES: tl.constexpr, SPLIT: tl.constexpr, LAYERS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // bands).to(tl.int64)
    band = pid % bands
    p = tl.arange(0, BLOCK_HW).to(tl.int64)
    cam_b = cam_ptr + b * HW

    # Stage 1: pre-ReLU M over the flattened feature map: given, or sum_k w_k A_k by channel blocks;
    # several layers (LAYERS > 1): each given, packed in one row of HW = sum_l h_l w_l, its own N.
    if LAYERS == 1:
        p_mask = p < HW
        m = _pre_relu_map(a_ptr, w_ptr, m_ptr, b, p, p_mask, C, HW, a_sb, a_sc, a_sp, MAP_GIVEN, BLOCK_C, BLOCK_HW)
        n, bad = _normalise(m, p_mask)
        tl.store(cam_b + p, n, mask=p_mask)  # every band writes the same bits
    else:
        bad = False
        for l in tl.static_range(LAYERS):
            _h, _w, hw_l, offset, _sy, _sx = _layer(layer_ptr, scale_ptr, l)
            p_mask = p < hw_l
            n, bad_l = _normalise(tl.load(m_ptr + b * HW + offset + p, mask=p_mask, other=0.0), p_mask)
            bad = bad | bad_l
            tl.store(cam_b + offset + p, n, mask=p_mask)
    tl.debug_barrier()  # N is gathered by other threads of this program below

    # Extremes of U on the candidate grid (every pixel with SCAN_EXTREMES), per lane, reduced at the end.
    # Several layers: U is affine between the union of their group ends, so the grid is that union,
    # (ends of layer r's rows) x (ends of layer c's columns) for every pair (r, c).
    u_lo = tl.full([BLOCK_Y, BLOCK_X], float("inf"), tl.float32)
    u_hi = tl.full([BLOCK_Y, BLOCK_X], float("-inf"), tl.float32)
    if LAYERS == 1:
        rows_e = H if SCAN_EXTREMES else tl.minimum(H, 2 * h_in + 2)
        cols_e = W if SCAN_EXTREMES else tl.minimum(W, 2 * w_in + 2)
        for jx in range(0, cols_e, BLOCK_X):
            xs, x_ok = _extreme_dst(jx + tl.arange(0, BLOCK_X), scale_x, w_in, W, SCAN_EXTREMES)
            x_lo, x_hi, lx0, lx1 = _columns(xs, scale_x, w_in)
            for jy in range(0, rows_e, BLOCK_Y):
                ys, y_ok = _extreme_dst(jy + tl.arange(0, BLOCK_Y), scale_y, h_in, H, SCAN_EXTREMES)
                mask = y_ok[:, None] & x_ok[None, :]
                u = _upsample(cam_b, ys, x_lo, x_hi, lx0, lx1, mask, scale_y, h_in, w_in)
                u_lo = tl.minimum(u_lo, tl.where(mask, u, float("inf")))
                u_hi = tl.maximum(u_hi, tl.where(mask, u, float("-inf")))
    else:
        for lr in tl.static_range(1 if SCAN_EXTREMES else LAYERS):
            h_r, _w, _hw, _o, sy_r, _sx = _layer(layer_ptr, scale_ptr, lr)
            for lc in tl.static_range(1 if SCAN_EXTREMES else LAYERS):
                _h, w_c, _hw2, _o2, _sy2, sx_c = _layer(layer_ptr, scale_ptr, lc)
                rows_e = H if SCAN_EXTREMES else tl.minimum(H, 2 * h_r + 2)
                cols_e = W if SCAN_EXTREMES else tl.minimum(W, 2 * w_c + 2)
                for jx in range(0, cols_e, BLOCK_X):
                    xs, x_ok = _extreme_dst(jx + tl.arange(0, BLOCK_X), sx_c, w_c, W, SCAN_EXTREMES)
                    for jy in range(0, rows_e, BLOCK_Y):
                        ys, y_ok = _extreme_dst(jy + tl.arange(0, BLOCK_Y), sy_r, h_r, H, SCAN_EXTREMES)
                        mask = y_ok[:, None] & x_ok[None, :]
                        u = _layers_mean(cam_b, layer_ptr, scale_ptr, ys, xs, mask, LAYERS, BLOCK_Y, BLOCK_X)
                        u_lo = tl.minimum(u_lo, tl.where(mask, u, float("inf")))
                        u_hi = tl.maximum(u_hi, tl.where(mask, u, float("-inf")))
    u_min = tl.min(tl.min(u_lo, axis=1), axis=0)
    u_den = (tl.max(tl.max(u_hi, axis=1), axis=0) - u_min) + 1e-7  # == max(U - min U) + eps

    # The band's rows: S, threshold and agreement sums, column blocks outer.
    inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _zero_sums(BLOCK_Y, BLOCK_X)
    roi_b = roi_ptr + b * r_sb
    y_begin = band * band_rows
    y_end = tl.minimum(H, y_begin + band_rows)
    for x_start in range(0, W, BLOCK_X):
        xs = x_start + tl.arange(0, BLOCK_X)
        x_lo, x_hi, lx0, lx1 = _columns(xs, scale_x, w_in)  # one layer: once per column block
        x_ok = (xs < W)[None, :]
        r_col = xs[None, :] * r_sx
        for y_start in range(y_begin, y_end, BLOCK_Y):
            ys = y_start + tl.arange(0, BLOCK_Y)
            mask = (ys < y_end)[:, None] & x_ok
            if LAYERS == 1:
                u = _upsample(cam_b, ys, x_lo, x_hi, lx0, lx1, mask, scale_y, h_in, w_in)
            else:
                u = _layers_mean(cam_b, layer_ptr, scale_ptr, ys, xs, mask, LAYERS, BLOCK_Y, BLOCK_X)
            s = tl.math.div_rn(u - u_min, u_den)
            in_roi = tl.load(roi_b + (ys[:, None] * r_sy + r_col), mask=mask, other=0) != 0
            inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _accumulate(
                s, in_roi, mask, ys[:, None] * W + xs[None, :], threshold,
                inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r)

    if SPLIT:
        # This band's totals to its scratch row; the last band of the image to finish combines them.
        inter_t, att_t, roi_t, s_sum_t, s_roi_t, s_max, first, hit_r = _totals(
            inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r)
        part_img = part_ptr + b * (bands * _TOTALS)
        row = part_img + band * _TOTALS
        tl.store(row + 0, inter_t)
        tl.store(row + 1, att_t)
        tl.store(row + 2, roi_t)
        tl.store(row + 3, first)
        tl.store(row + 4, hit_r)
        tl.store(row + 5, s_sum_t.to(tl.int32, bitcast=True))
        tl.store(row + 6, s_roi_t.to(tl.int32, bitcast=True))
        tl.store(row + 7, s_max.to(tl.int32, bitcast=True))
        tl.debug_barrier()  # every thread's stores before the release below
        done = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")  # bands finished before this one
        if done == bands - 1:
            dice, soft, energy, hit = _combine_bands(part_img, bands, bad, BLOCK_P)
            _store_metrics(dice_ptr, soft_ptr, energy_ptr, hit_ptr, b, dice, soft, energy, hit)
            tl.store(count_ptr + b, 0)  # zero again for the next launch
    else:
        dice, soft, energy, hit = _finish(inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r, bad)
        _store_metrics(dice_ptr, soft_ptr, energy_ptr, hit_ptr, b, dice, soft, energy, hit)


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gradcam_dice_kernel, InterpretedFunction)


def _pixel_view(t: Tensor) -> Tensor:
    """t itself when its (h, w) pixels share one stride (NCHW or channels_last), else a copy."""
    _, _, h, w = t.shape
    return t if h == 1 or t.stride(2) == w * t.stride(3) else t.contiguous()


def _tile(height: int, width: int) -> tuple[int, int]:
    """(BLOCK_Y, BLOCK_X) of at most ``_TILE`` pixels that computes the fewest padded lanes over the
    H x W map, a tile costing at least 256 (a sweep of 8 warps), the wider on a tie: 224 x 224 takes
    32 x 32 tiles, where 8 x 128 would compute 256 columns for 224."""
    def cost(bx: int) -> tuple[int, int]:
        by = max(1, min(triton.next_power_of_2(height), _TILE // bx))
        return -(-height // by) * -(-width // bx) * max(by * bx, 256), -bx

    bx = min((min(triton.next_power_of_2(width), c) for c in (128, 64, 32, 16)), key=cost)
    return max(1, min(triton.next_power_of_2(height), _TILE // bx)), bx


def _launch_config(channels: int, pixels: int, height: int, width: int) -> dict[str, int]:
    """Block sizes and warps by shape.

    A (BLOCK_C, BLOCK_HW) load block holds <= 4096 elements (one whole feature map per program); a
    tile of the upsampled map holds <= 1024 pixels, four per thread at 8 warps, which keeps the eight
    per-lane accumulators within 128 registers on sm_90 (two programs per SM; feature maps above
    64x64 run at 16 warps). ``benchmarks/scripts/kernel_registers.py`` reports them per shape.
    """
    block_hw = triton.next_power_of_2(pixels)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_hw))
    block_y, block_x = _tile(height, width)
    if block_hw >= 8192:
        num_warps = 16
    elif block_hw >= 2048 or block_x * block_y >= 1024:
        num_warps = 8
    else:
        num_warps = 4
    return {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "BLOCK_Y": block_y, "BLOCK_X": block_x,
            "num_warps": num_warps}


PROGRAMS_PER_SM = 2  # at <= 128 registers x 256 threads: 65536 registers per SM
LARGE_BAND_PIXELS = 256 * 256  # at or above this many pixels per image a band each
INTERPRETER_SMS = 2  # a nominal device for TRITON_INTERPRET=1, so small test batches take bands too


def _plan_bands(batch: int, height: int, block_y: int, width: int, sm_count: int,
                programs_per_image: int | None = None) -> tuple[int, int]:
    """(bands, rows per band) for one image: enough programs for ``PROGRAMS_PER_SM`` per SM when
    the batch has fewer, one per ``LARGE_BAND_PIXELS`` of a large ROI, or ``programs_per_image``;
    at most one per row tile and ``MAX_PROGRAMS_PER_IMAGE``; bands hold whole row tiles."""
    row_tiles = -(-height // block_y)
    if programs_per_image is None:
        slots = PROGRAMS_PER_SM * sm_count
        want = max(-(-slots // batch) if batch < slots else 1, -(-height * width // LARGE_BAND_PIXELS))
    else:
        want = programs_per_image
    tiles_per_band = -(-row_tiles // max(1, min(want, row_tiles, MAX_PROGRAMS_PER_IMAGE)))
    return -(-row_tiles // tiles_per_band), tiles_per_band * block_y


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


_BAND_COUNTS: dict[tuple[torch.device, int], Tensor] = {}


def _band_counts(device: torch.device, batch: int) -> Tensor:
    """Per-image counts of finished bands, zero between launches (the last band resets its image's):
    one buffer per device and stream, so launches that may overlap never share one."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counts = _BAND_COUNTS.get((device, stream))
    if counts is None or counts.numel() < batch:
        counts = torch.zeros(max(batch, 256), dtype=torch.int32, device=device)
        _BAND_COUNTS[(device, stream)] = counts
    return counts


def _check_out(out: RoiAgreement, batch: int, low_res: tuple[int, ...], device: torch.device) -> None:
    """Preallocated outputs must be contiguous, on ``device``, with the shapes and dtypes written
    (``low_res``: the stage-1 map's (h, w), or (d, h, w) for volumes)."""
    for name, shape, dtype in (("dice", (batch,), torch.float32), ("soft_dice", (batch,), torch.float32),
                               ("energy", (batch,), torch.float32), ("hit", (batch,), torch.bool),
                               ("cam", (batch, *low_res), torch.float32)):
        t = getattr(out, name)
        if not (isinstance(t, Tensor) and t.shape == shape and t.dtype == dtype and t.device == device
                and t.is_contiguous()):
            raise XalError(f"out.{name}: expected a contiguous {dtype} tensor of shape {shape} on {device}")


def gradcam_dice_triton(
    activations: Tensor | None,
    rois: Tensor,
    threshold: float = 0.5,
    return_cam: bool = False,
    *,
    weights: Tensor | None = None,
    low_res: Tensor | None = None,
    out: RoiAgreement | None = None,
    programs_per_image: int | None = None,
    scan_extremes: bool = False,
    tile: tuple[int, int] | None = None,
) -> RoiAgreement:
    """Launch the fused kernel on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    Stage 1's input is exactly one of: ``activations`` A (B, C, h, w) with ``weights`` w (B, C)
    (M = sum_k w_k A_k in the kernel), or ``low_res``, the pre-ReLU map M (B, h, w), with
    ``activations`` None. ``xal_engine.ops.gradcam_dice`` checks A, G and the ROIs once, runs the CAM
    method (``ops.cam_methods``) in torch to get w or M, and calls this; here only what the kernel
    itself needs is checked (device, shapes of w / M, feature-map and ROI size limits, ``out``).
    ``out``: optional preallocated buffers to reuse across batches: dice, soft_dice, energy (B,)
    float32, hit (B,) bool and cam (B, h, w) float32, all contiguous on the inputs' device.
    ``programs_per_image`` (row bands per image, default by batch, ROI and SM count),
    ``scan_extremes`` (min/max over every pixel rather than the candidate grid) and ``tile``
    ((BLOCK_Y, BLOCK_X), powers of two, at most 1024 pixels; default by ROI size) change the work's
    layout, not the results beyond float summation order: they are for benchmarks and tests.
    """
    map_given = low_res is not None
    if map_given == (weights is not None) or map_given == (activations is not None):
        raise XalError("gradcam_dice_triton: give either activations and weights, or low_res alone")
    if map_given:
        _check_map("low_res", low_res)
        batch, h, w = low_res.shape
        channels, device = 1, low_res.device
    else:
        batch, channels, h, w = activations.shape
        device = activations.device
        _check_weights(weights, batch, channels, device)
    _check_device(device)
    _check_rois(rois, batch, device)
    _check_feature_map(h, w)
    if out is None:
        out = _new_out(batch, (batch, h, w), device)
    _check_out(out, batch, (h, w), device)
    if batch == 0:
        return out._replace(cam=out.cam if return_cam else None)
    if map_given:
        a, w_in, m_in = low_res, low_res, low_res  # A and w unused: any valid pointer
        a_strides = (0, 0, 0)
    else:
        a = _pixel_view(activations)
        w_in, m_in = weights.contiguous(), weights  # M unused
        a_strides = (a.stride(0), a.stride(1), a.stride(3))
    # torch's scales: fp32(h) / fp32(H), correctly rounded here rather than approximated on the device
    scale_y, scale_x = _scale(h, rois.shape[1]), _scale(w, rois.shape[2])
    _launch((a, w_in, m_in), a_strides, channels, (h, w), (scale_y, scale_x), None, rois, threshold, out,
            map_given=map_given, programs_per_image=programs_per_image, scan_extremes=scan_extremes, tile=tile)
    return out._replace(cam=out.cam if return_cam else None)


MAX_LAYERS = 4  # target layers one launch combines (each a compiled variant)


def gradcam_dice_layers_triton(
    low_res: Sequence[Tensor],
    rois: Tensor,
    threshold: float = 0.5,
    *,
    programs_per_image: int | None = None,
    scan_extremes: bool = False,
    tile: tuple[int, int] | None = None,
) -> RoiAgreement:
    """Several target layers in one launch: the pre-ReLU maps M_l (B, h_l, w_l) float32 of 2 to
    ``MAX_LAYERS`` layers (any sizes) against (B, H, W) ROIs, combined as pytorch-grad-cam combines
    layers (``reference.multi_layer_maps``): N_l = min-max(ReLU(M_l)) each, U = mean_l bilinear(N_l),
    S = min-max(U), then the agreement as for one layer. ``cam`` is None (there is no one stage-1
    map); layout arguments as :func:`gradcam_dice_triton`."""
    low_res = list(low_res)
    if not 2 <= len(low_res) <= MAX_LAYERS:
        raise XalError(f"layers: the kernel combines 2 to {MAX_LAYERS} target layers, got {len(low_res)}")
    for i, m in enumerate(low_res):
        _check_map(f"low_res[{i}]", m)
        if m.shape[0] != low_res[0].shape[0] or m.device != low_res[0].device:
            raise XalError(f"low_res[{i}]: expected {low_res[0].shape[0]} maps on {low_res[0].device}, "
                           f"got {m.shape[0]} on {m.device}")
        _check_feature_map(m.shape[1], m.shape[2])
    batch, device = low_res[0].shape[0], low_res[0].device
    _check_device(device)
    _check_rois(rois, batch, device)
    sizes = tuple((m.shape[1], m.shape[2]) for m in low_res)
    packed = torch.cat([m.reshape(batch, h * w) for m, (h, w) in zip(low_res, sizes)], dim=1)  # [B, sum_l h_l w_l]
    out = _new_out(batch, tuple(packed.shape), device)  # cam: each layer's N, packed (scratch)
    if batch > 0:
        layers, scales = _layer_table(sizes, (rois.shape[1], rois.shape[2]), device)
        largest = max(h * w for h, w in sizes)
        _launch((packed, packed, packed), (0, 0, 0), 1, (1, packed.shape[1]), (1.0, 1.0),
                (layers, scales, len(sizes), largest),
                rois, threshold, out, map_given=True, programs_per_image=programs_per_image,
                scan_extremes=scan_extremes, tile=tile)
    return out._replace(cam=None)


def _scale(size_in: int, size_out: int) -> float:
    return float(np.float32(size_in) / np.float32(size_out))


@functools.lru_cache(maxsize=64)
def _layer_table(sizes: tuple[tuple[int, int], ...], size: tuple[int, int], device: torch.device
                 ) -> tuple[Tensor, Tensor]:
    """Per layer (h, w, h * w, offset in the packed maps) int32 and (scale_y, scale_x) float32, on
    ``device``: kept per layout, so a scoring run copies them to the device once."""
    offsets = np.cumsum([0] + [h * w for h, w in sizes])[:-1]
    table = [[h, w, h * w, int(o)] for (h, w), o in zip(sizes, offsets)]
    scales = [[_scale(h, size[0]), _scale(w, size[1])] for h, w in sizes]
    return (torch.tensor(table, dtype=torch.int32).flatten().to(device),
            torch.tensor(scales, dtype=torch.float32).flatten().to(device))


def _check_map(name: str, m: Tensor) -> None:
    if not isinstance(m, Tensor) or m.dim() != 3 or m.dtype != torch.float32 or not m.is_contiguous():
        raise XalError(f"{name}: expected a contiguous float32 map (B, h, w), got "
                       f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not (device.type == "cpu" and _interpreted()):
        raise XalError(
            f"activations: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
            f"set before import), got {device}"
        )


def _check_weights(weights: Tensor, batch: int, channels: int, device: torch.device) -> None:
    if weights.shape != (batch, channels) or weights.dtype != torch.float32 or weights.device != device:
        raise XalError(f"weights: expected float32 ({batch}, {channels}) on {device}, got {weights.dtype} "
                       f"{tuple(weights.shape)} on {weights.device}")


def _check_rois(rois: Tensor, batch: int, device: torch.device) -> None:
    if rois.dim() != 3 or rois.shape[0] != batch or rois.device != device:
        raise XalError(f"rois: expected ({batch}, H, W) on {device}, got {tuple(rois.shape)} on {rois.device}")
    if rois.shape[1] * rois.shape[2] >= 2**31:
        raise XalError(f"rois: {rois.shape[1]}x{rois.shape[2]} pixels exceed the kernel's int32 pixel index")


def _check_feature_map(h: int, w: int) -> None:
    if h * w > MAX_FEATURE_PIXELS:
        raise XalError(f"activations: feature map {h}x{w} exceeds the kernel's {MAX_FEATURE_PIXELS} pixels")


def _new_out(batch: int, cam_shape: tuple[int, ...], device: torch.device) -> RoiAgreement:
    f32 = {"dtype": torch.float32, "device": device}
    return RoiAgreement(torch.empty(batch, **f32), torch.empty(batch, **f32), torch.empty(batch, **f32),
                        torch.empty(batch, dtype=torch.bool, device=device), torch.empty(cam_shape, **f32))


def _launch(stage1: tuple[Tensor, Tensor, Tensor], a_strides: tuple[int, int, int], channels: int,
            feature: tuple[int, int], scales: tuple[float, float], layers: tuple[Tensor, Tensor, int, int] | None,
            rois: Tensor, threshold: float, out: RoiAgreement, *, map_given: bool,
            programs_per_image: int | None, scan_extremes: bool, tile: tuple[int, int] | None) -> None:
    """The one launch over a batch: ``stage1`` = (A, w, M) pointers, ``feature`` (h, w) of one layer
    (several: (1, packed width), ``layers`` their (table, scales, count, largest h * w)); results
    into ``out``."""
    if programs_per_image is not None and programs_per_image < 1:
        raise XalError(f"programs_per_image: expected >= 1, got {programs_per_image}")
    if tile is not None and not (len(tile) == 2 and all(t >= 1 and t & (t - 1) == 0 for t in tile)
                                 and tile[0] * tile[1] <= _TILE):
        raise XalError(f"tile: expected two powers of two with at most {_TILE} pixels, got {tile}")
    batch, height, width = rois.shape
    device = rois.device
    roi_bytes = rois.view(torch.uint8)
    if (height - 1) * roi_bytes.stride(1) + (width - 1) * roi_bytes.stride(2) >= 2**31:
        roi_bytes = roi_bytes.contiguous()  # offsets within one ROI are int32 in the kernel
    h, w = feature
    if layers is None:
        layer_table, layer_scales, n_layers, pixels = out.dice, out.dice, 1, h * w  # tables unused
    else:
        layer_table, layer_scales, n_layers, pixels = layers
    config = _launch_config(channels, pixels, height, width)
    if tile is not None:
        config["BLOCK_Y"], config["BLOCK_X"] = tile
    bands, band_rows = _plan_bands(batch, height, config["BLOCK_Y"], width, _sm_count(device), programs_per_image)
    split = bands > 1
    if split:
        part = torch.empty(batch * bands * _TOTALS.value, dtype=torch.int32, device=device)
        counts = _band_counts(device, batch)
    else:
        part = counts = out.dice  # unused without bands: any valid pointer
    a, w_in, m_in = stage1
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _gradcam_dice_kernel[(batch * bands,)](
            a, w_in, m_in, roi_bytes, out.cam, out.dice, out.soft_dice, out.energy, out.hit.view(torch.uint8),
            part, counts, layer_table, layer_scales,
            channels, h * w, h, w, height, width, bands, band_rows,
            *a_strides, roi_bytes.stride(0), roi_bytes.stride(1), roi_bytes.stride(2),
            *scales, float(threshold),
            MAP_GIVEN=map_given, SCAN_EXTREMES=scan_extremes, SPLIT=split, LAYERS=n_layers,
            BLOCK_P=triton.next_power_of_2(bands), **config,
        )


__all__ = ["MAX_FEATURE_PIXELS", "MAX_LAYERS", "MAX_PROGRAMS_PER_IMAGE", "gradcam_dice_layers_triton",
           "gradcam_dice_triton"]
