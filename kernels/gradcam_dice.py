"""Fused Grad-CAM -> bilinear upsample -> min-max -> ROI agreement, one Triton launch per batch.

Same math and edge cases as ``xal_engine.ops.reference`` (documented there). The CAM method's own
part (``xal_engine.ops.cam_methods``) runs in torch before the launch and arrives as ONE of:
channel weights w (B, C) fp32, which the kernel contracts with A (Grad-CAM, Grad-CAM++, XGrad-CAM),
or the pre-ReLU map M (B, h, w) fp32 itself (HiResCAM, LayerCAM, EigenCAM); the compile-time flag
``MAP_GIVEN`` picks which. One program per image:

    stage 1   M = sum_k w_k A_k over channel blocks (or M loaded), then N = min-max(ReLU(M)) over
              the feature map, written to the (B, h, w) map output;
    pass 1    tiles over H x W: U = bilinear(N) gathered on the fly, running min/max of U;
    pass 2    tiles over H x W: U again, S = (U - min) / (max - min + 1e-7), threshold, counts,
              sums and the first-index argmax.

Memory traffic per image: A read once (C * h * w elements, any float dtype, loaded into fp32) and w
(C floats), or M (h * w floats) instead of both; the ROI read once (H * W bytes); N written once and
gathered from cache; the full-resolution map is never written. G is read by the method's torch part
(for Grad-CAM one fp32-accumulated mean, so A and G are still each read once per batch). Offsets
into A, M and the ROIs are int64.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops.agreement import RoiAgreement

MAX_FEATURE_PIXELS = 128 * 128  # h * w held in registers by one program
_TILE = 1024  # pixels of the upsampled map per tile


@triton.jit
def _div(num, den):
    """IEEE division (``/`` compiles to an approximate one on CUDA), 1 where den == 0 (masked later)."""
    return tl.math.div_rn(num, tl.where(den > 0, den, 1.0))


@triton.jit
def _source_index(dst, scale, size_in):
    """torch's linear source index (align_corners=False): lower/upper neighbour and weight of upper."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    lo = tl.minimum(src.to(tl.int32), size_in - 1)  # floor, since src >= 0
    lam = tl.minimum(tl.maximum(src - lo.to(tl.float32), 0.0), 1.0)
    hi = lo + (lo < size_in - 1).to(tl.int32)
    return lo, hi, lam


@triton.jit
def _zero_sums(BLOCK_A: tl.constexpr, BLOCK_X: tl.constexpr):
    """The per-lane sums of :func:`_accumulate` over a (BLOCK_A, BLOCK_X) tile, before the first tile."""
    zero_i = tl.zeros([BLOCK_A, BLOCK_X], dtype=tl.int32)
    zero_f = tl.zeros([BLOCK_A, BLOCK_X], dtype=tl.float32)
    return (zero_i, zero_i, zero_i, zero_f, zero_f, tl.full([BLOCK_A, BLOCK_X], -1.0, tl.float32),
            tl.full([BLOCK_A, BLOCK_X], 2147483647, tl.int32), zero_i)


@triton.jit
def _store_metrics(dice_ptr, soft_ptr, energy_ptr, hit_ptr, b, dice, soft, energy, hit):
    """Image (or volume) b's four results."""
    tl.store(dice_ptr + b, dice)
    tl.store(soft_ptr + b, soft)
    tl.store(energy_ptr + b, energy)
    tl.store(hit_ptr + b, hit.to(tl.uint8))


@triton.jit
def _accumulate(s, in_roi, mask, index, threshold, inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r):
    """Pass 2's per-lane running sums over one tile of S (2-D and 3-D kernels): |T & R|, |T|, |R|,
    sum S, sum S R, and max S with its first (row-major) index and R there; indices only grow."""
    att = mask & (s >= threshold)
    inter += (att & in_roi).to(tl.int32)
    n_att += att.to(tl.int32)
    n_roi += in_roi.to(tl.int32)
    s_sum += tl.where(mask, s, 0.0)
    s_roi += tl.where(in_roi, s, 0.0)
    better = mask & (s > best_s)
    best_s = tl.where(better, s, best_s)
    best_i = tl.where(better, index, best_i)
    best_r = tl.where(better, in_roi.to(tl.int32), best_r)
    return inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r


@triton.jit
def _finish(inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r, bad):
    """(dice, soft_dice, energy, hit) from the per-lane sums of :func:`_accumulate`, with the
    reference's edge cases (zero denominators give 0, an all-zero map zeros and no hit, bad NaN)."""
    inter_t = tl.sum(tl.sum(inter, axis=1), axis=0)
    att_t = tl.sum(tl.sum(n_att, axis=1), axis=0)
    roi_t = tl.sum(tl.sum(n_roi, axis=1), axis=0)
    s_sum_t = tl.sum(tl.sum(s_sum, axis=1), axis=0)
    s_roi_t = tl.sum(tl.sum(s_roi, axis=1), axis=0)
    s_max = tl.max(tl.max(best_s, axis=1), axis=0)
    first = tl.min(tl.min(tl.where(best_s == s_max, best_i, 2147483647), axis=1), axis=0)
    hit = tl.max(tl.max(tl.where(best_i == first, best_r, 0), axis=1), axis=0) > 0
    dice_den = (att_t + roi_t).to(tl.float32)
    dice = tl.where(dice_den > 0, _div(2 * inter_t.to(tl.float32), dice_den), 0.0)
    soft_den = s_sum_t + roi_t.to(tl.float32)
    soft = tl.where(soft_den > 0, _div(2.0 * s_roi_t, soft_den), 0.0)
    energy = tl.where(s_sum_t > 0, _div(s_roi_t, s_sum_t), 0.0)
    flat = s_max == 0.0
    dice = tl.where(bad, float("nan"), tl.where(flat, 0.0, dice))
    soft = tl.where(bad, float("nan"), tl.where(flat, 0.0, soft))
    energy = tl.where(bad, float("nan"), tl.where(flat, 0.0, energy))
    hit = hit & (s_max > 0.0) & (~bad)
    return dice, soft, energy, hit


@triton.jit
def _upsampled_tile(cam_b, y_start, x_start, H, W, h_in, w_in, scale_y, scale_x,
                    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """U on a (BLOCK_Y, BLOCK_X) tile, same op order as torch: ly0 (lx0 n00 + lx1 n01) + ly1 (...)."""
    ys = y_start + tl.arange(0, BLOCK_Y)
    xs = x_start + tl.arange(0, BLOCK_X)
    mask = (ys < H)[:, None] & (xs < W)[None, :]
    y_lo, y_hi, ly = _source_index(ys, scale_y, h_in)  # [BLOCK_Y]
    x_lo, x_hi, lx = _source_index(xs, scale_x, w_in)  # [BLOCK_X]
    row_lo = cam_b + (y_lo * w_in)[:, None]
    row_hi = cam_b + (y_hi * w_in)[:, None]
    n00 = tl.load(row_lo + x_lo[None, :], mask=mask, other=0.0)
    n01 = tl.load(row_lo + x_hi[None, :], mask=mask, other=0.0)
    n10 = tl.load(row_hi + x_lo[None, :], mask=mask, other=0.0)
    n11 = tl.load(row_hi + x_hi[None, :], mask=mask, other=0.0)
    lx0 = (1.0 - lx)[None, :]
    lx1 = lx[None, :]
    u = (1.0 - ly)[:, None] * (lx0 * n00 + lx1 * n01) + ly[:, None] * (lx0 * n10 + lx1 * n11)
    return u, ys, xs, mask


@triton.jit(do_not_specialize=["HW"])  # HW == 1 stays a runtime float-convertible scalar
def _gradcam_dice_kernel(
    a_ptr, w_ptr, m_ptr, roi_ptr, cam_ptr, dice_ptr, soft_ptr, energy_ptr, hit_ptr,
    C, HW, h_in, w_in, H, W,
    a_sb, a_sc, a_sp, r_sb, r_sy, r_sx,
    scale_y, scale_x, threshold,
    MAP_GIVEN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # Stage 1: pre-ReLU M over the flattened feature map: given, or sum_k w_k A_k by channel blocks.
    p = tl.arange(0, BLOCK_HW).to(tl.int64)
    p_mask = p < HW
    if MAP_GIVEN:
        m = tl.load(m_ptr + b * HW + p, mask=p_mask, other=0.0)
    else:
        m = tl.zeros([BLOCK_HW], dtype=tl.float32)
        for c_start in range(0, C, BLOCK_C):
            c = c_start + tl.arange(0, BLOCK_C).to(tl.int64)
            c_mask = c < C
            cp_mask = c_mask[:, None] & p_mask[None, :]  # [BLOCK_C, BLOCK_HW]
            w_k = tl.load(w_ptr + b * C + c, mask=c_mask, other=0.0)  # [BLOCK_C]
            a = tl.load(a_ptr + b * a_sb + c[:, None] * a_sc + p[None, :] * a_sp, mask=cp_mask, other=0.0)
            m += tl.sum(w_k[:, None] * a.to(tl.float32), axis=0)
    # Any non-finite A or G leaves a non-finite entry in M (see ops.cam_methods); inf - inf = NaN.
    bad = tl.max(tl.where(p_mask & ((m - m) != 0.0), 1, 0), axis=0) > 0
    m = tl.maximum(m, 0.0)
    m_min = tl.min(tl.where(p_mask, m, float("inf")), axis=0)
    shifted = m - m_min
    n = tl.math.div_rn(shifted, tl.max(tl.where(p_mask, shifted, 0.0), axis=0) + 1e-7)
    n = tl.where(bad, float("nan"), n)
    cam_b = cam_ptr + b * HW
    tl.store(cam_b + p, n, mask=p_mask)
    tl.debug_barrier()  # N is gathered by other threads of this program below

    # Pass 1: per-lane running min/max of U over all tiles, reduced at the end.
    u_lo = tl.full([BLOCK_Y, BLOCK_X], float("inf"), tl.float32)
    u_hi = tl.full([BLOCK_Y, BLOCK_X], float("-inf"), tl.float32)
    for y_start in range(0, H, BLOCK_Y):
        for x_start in range(0, W, BLOCK_X):
            u, ys, xs, mask = _upsampled_tile(cam_b, y_start, x_start, H, W, h_in, w_in, scale_y, scale_x,
                                              BLOCK_Y, BLOCK_X)
            u_lo = tl.minimum(u_lo, tl.where(mask, u, float("inf")))
            u_hi = tl.maximum(u_hi, tl.where(mask, u, float("-inf")))
    u_min = tl.min(tl.min(u_lo, axis=1), axis=0)
    u_den = (tl.max(tl.max(u_hi, axis=1), axis=0) - u_min) + 1e-7  # == max(U - min U) + eps

    # Pass 2: S, threshold and agreement sums; per-lane argmax keeps the first index (indices only grow).
    inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _zero_sums(BLOCK_Y, BLOCK_X)
    roi_b = roi_ptr + b * r_sb
    for y_start in range(0, H, BLOCK_Y):
        for x_start in range(0, W, BLOCK_X):
            u, ys, xs, mask = _upsampled_tile(cam_b, y_start, x_start, H, W, h_in, w_in, scale_y, scale_x,
                                              BLOCK_Y, BLOCK_X)
            s = tl.math.div_rn(u - u_min, u_den)
            r_off = ys.to(tl.int64)[:, None] * r_sy + xs.to(tl.int64)[None, :] * r_sx
            in_roi = tl.load(roi_b + r_off, mask=mask, other=0) != 0
            inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _accumulate(
                s, in_roi, mask, ys[:, None] * W + xs[None, :], threshold,
                inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r)

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


def _launch_config(channels: int, pixels: int, height: int, width: int) -> dict[str, int]:
    """Block sizes and warps by shape.

    A (BLOCK_C, BLOCK_HW) load block holds <= 4096 elements (one whole feature map per program); a
    tile of the upsampled map holds <= 1024 pixels, four per thread at 8 warps, which keeps the eight
    per-lane accumulators in about 126 registers on sm_90 (two programs per SM, no spills; feature
    maps above 64x64 run at 16 warps and spill a few hundred bytes).
    """
    block_hw = triton.next_power_of_2(pixels)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_hw))
    block_x = min(triton.next_power_of_2(width), 128)
    block_y = max(1, min(triton.next_power_of_2(height), _TILE // block_x))
    if block_hw >= 8192:
        num_warps = 16
    elif block_hw >= 2048 or block_x * block_y >= 1024:
        num_warps = 8
    else:
        num_warps = 4
    return {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "BLOCK_Y": block_y, "BLOCK_X": block_x,
            "num_warps": num_warps}


def _check_out(out: RoiAgreement, batch: int, h: int, w: int, device: torch.device) -> None:
    """Preallocated outputs must be contiguous, on ``device``, with the shapes and dtypes written."""
    for name, shape, dtype in (("dice", (batch,), torch.float32), ("soft_dice", (batch,), torch.float32),
                               ("energy", (batch,), torch.float32), ("hit", (batch,), torch.bool),
                               ("cam", (batch, h, w), torch.float32)):
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
) -> RoiAgreement:
    """Launch the fused kernel on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    Stage 1's input is exactly one of: ``activations`` A (B, C, h, w) with ``weights`` w (B, C)
    (M = sum_k w_k A_k in the kernel), or ``low_res``, the pre-ReLU map M (B, h, w), with
    ``activations`` None. ``xal_engine.ops.gradcam_dice`` checks A, G and the ROIs once, runs the CAM
    method (``ops.cam_methods``) in torch to get w or M, and calls this; here only what the kernel
    itself needs is checked (device, shapes of w / M, feature-map and ROI size limits, ``out``).
    ``out``: optional preallocated buffers to reuse across batches: dice, soft_dice, energy (B,)
    float32, hit (B,) bool and cam (B, h, w) float32, all contiguous on the inputs' device.
    """
    map_given = low_res is not None
    if map_given == (weights is not None) or map_given == (activations is not None):
        raise XalError("gradcam_dice_triton: give either activations and weights, or low_res alone")
    if map_given:
        if low_res.dim() != 3 or low_res.dtype != torch.float32 or not low_res.is_contiguous():
            raise XalError(f"low_res: expected a contiguous float32 map (B, h, w), got {low_res.dtype} "
                           f"{tuple(low_res.shape)}")
        batch, h, w = low_res.shape
        channels, device = 1, low_res.device
    else:
        batch, channels, h, w = activations.shape
        device = activations.device
        if weights.shape != (batch, channels) or weights.dtype != torch.float32 or weights.device != device:
            raise XalError(f"weights: expected float32 ({batch}, {channels}) on {device}, got {weights.dtype} "
                           f"{tuple(weights.shape)} on {weights.device}")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreted()):
        raise XalError(
            f"activations: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
            f"set before import), got {device}"
        )
    if rois.shape[0] != batch or rois.device != device:
        raise XalError(f"rois: expected ({batch}, H, W) on {device}, got {tuple(rois.shape)} on {rois.device}")
    height, width = rois.shape[1], rois.shape[2]
    if h * w > MAX_FEATURE_PIXELS:
        raise XalError(f"activations: feature map {h}x{w} exceeds the kernel's {MAX_FEATURE_PIXELS} pixels")
    if height * width >= 2**31:
        raise XalError(f"rois: {height}x{width} pixels exceed the kernel's int32 pixel index")
    if out is None:
        f32 = {"dtype": torch.float32, "device": device}
        out = RoiAgreement(torch.empty(batch, **f32), torch.empty(batch, **f32), torch.empty(batch, **f32),
                           torch.empty(batch, dtype=torch.bool, device=device),
                           torch.empty(batch, h, w, **f32))
    _check_out(out, batch, h, w, device)
    if batch == 0:
        return out._replace(cam=out.cam if return_cam else None)
    if map_given:
        a, w_in, m_in = low_res, low_res, low_res  # A and w unused: any valid pointer
        a_strides = (0, 0, 0)
    else:
        a = _pixel_view(activations)
        w_in, m_in = weights.contiguous(), weights  # M unused
        a_strides = (a.stride(0), a.stride(1), a.stride(3))
    roi_bytes = rois.view(torch.uint8)
    # torch's scales: fp32(h) / fp32(H), correctly rounded here rather than approximated on the device
    scale_y, scale_x = float(np.float32(h) / np.float32(height)), float(np.float32(w) / np.float32(width))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _gradcam_dice_kernel[(batch,)](
            a, w_in, m_in, roi_bytes, out.cam, out.dice, out.soft_dice, out.energy, out.hit.view(torch.uint8),
            channels, h * w, h, w, height, width,
            *a_strides, roi_bytes.stride(0), roi_bytes.stride(1), roi_bytes.stride(2),
            scale_y, scale_x, float(threshold),
            MAP_GIVEN=map_given,
            **_launch_config(channels, h * w, height, width),
        )
    return out._replace(cam=out.cam if return_cam else None)


__all__ = ["MAX_FEATURE_PIXELS", "gradcam_dice_triton"]
