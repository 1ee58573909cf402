"""Fused 3-D Grad-CAM -> trilinear upsample -> min-max -> ROI agreement, one Triton launch per batch.

The volume counterpart of ``gradcam_dice.py``, with the math and edge cases of
``xal_engine.ops.reference3d`` (documented there). The CAM method's own part runs in torch before the
launch and arrives as ONE of: channel weights w (B, C) fp32, contracted here with A (B, C, d, h, w)
(Grad-CAM, Grad-CAM++, XGrad-CAM), or the pre-ReLU map M (B, d, h, w) fp32 (HiResCAM, LayerCAM,
EigenCAM); the compile-time flag ``MAP_GIVEN`` picks which. One program per volume:

    stage 1   M = sum_k w_k A_k over channel blocks (or M loaded), N = min-max(ReLU(M)) over the
              d*h*w feature voxels (held in registers), written to the (B, d, h, w) map output;
    extremes  min and max of U = trilinear(N) on the grid of candidate (z, y, x) outputs where they
              can lie (each axis's group ends, as in ``gradcam_dice.py``): at most
              (2d + 2)(2h + 2)(2w + 2) voxels, 5,832 instead of 2.1M at 8^3 -> 128^3;
    pass      tiles of (BLOCK_R rows of the D*H (z, y) rows) x (BLOCK_X columns x): U = trilinear(N)
              gathered on the fly (8 taps), S = (U - min) / (max - min + 1e-7), threshold, counts,
              sums and the first-index argmax in (z, y, x) row-major order.

Memory traffic per volume: A read once (C*d*h*w elements, any float dtype, loaded into fp32) and w
(C floats), or M (d*h*w floats) instead of both; the ROI read once (D*H*W bytes); N written once
and gathered from cache; the full-resolution volume is never written. Offsets into A, M, N and the
ROIs are int64 (a batch of 128^3 ROIs passes 2^31 bytes at B = 1024; A at B*C*d*h*w); the voxel index
inside one volume is int32 (D*H*W < 2^31 is checked).

Interpolation follows torch's CPU ``upsample_trilinear3d`` op for op: source index
max(scale * (dst + 0.5) - 0.5, 0) with scale = fp32(in) / fp32(out), lambda clamped to [0, 1], and
U = lz0 (ly0 (lx0 n000 + lx1 n001) + ly1 (...)) + lz1 (...), depth outermost.

Parallelism: B programs. That fills a GPU only for batches of ~2 volumes per SM; a volume split over
several programs needs a cross-program min/max before pass 2 (a second launch or a last-program
reduction), which is not done here (see the README's 3-D paragraph).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from xal_engine.kernels.gradcam_dice import (
    _accumulate,
    _check_device,
    _check_out,
    _check_weights,
    _extreme_dst,
    _finish,
    _new_out,
    _normalise,
    _pre_relu_map,
    _source_index,
    _store_metrics,
    _zero_sums,
)

from xal_engine.errors import XalError
from xal_engine.ops.agreement import RoiAgreement

MAX_FEATURE_VOXELS = 16384  # d * h * w held in registers by one program (e.g. 8^3 ... 16x32x32, 25^3)
_TILE = 1024  # voxels of the upsampled volume per tile


@triton.jit
def _trilinear(cam_b, zs, ys, xs, mask, d_in, h_in, w_in, scale_z, scale_y, scale_x):
    """U at output voxels (zs[r], ys[r], xs[c]) of a (rows, BLOCK_X) tile, torch's op order."""
    z_lo, z_hi, lz = _source_index(zs, scale_z, d_in)  # [BLOCK_R]
    y_lo, y_hi, ly = _source_index(ys, scale_y, h_in)  # [BLOCK_R]
    x_lo, x_hi, lx = _source_index(xs, scale_x, w_in)  # [BLOCK_X]
    # int64 row offsets into N (d*h*w <= MAX_FEATURE_VOXELS, but cam_b already is b * d*h*w)
    r00 = cam_b + ((z_lo * h_in + y_lo) * w_in).to(tl.int64)[:, None]
    r01 = cam_b + ((z_lo * h_in + y_hi) * w_in).to(tl.int64)[:, None]
    r10 = cam_b + ((z_hi * h_in + y_lo) * w_in).to(tl.int64)[:, None]
    r11 = cam_b + ((z_hi * h_in + y_hi) * w_in).to(tl.int64)[:, None]
    xl = x_lo[None, :]
    xh = x_hi[None, :]
    lx0 = (1.0 - lx)[None, :]
    lx1 = lx[None, :]
    ly0 = (1.0 - ly)[:, None]
    ly1 = ly[:, None]
    n000 = tl.load(r00 + xl, mask=mask, other=0.0)
    n001 = tl.load(r00 + xh, mask=mask, other=0.0)
    n010 = tl.load(r01 + xl, mask=mask, other=0.0)
    n011 = tl.load(r01 + xh, mask=mask, other=0.0)
    near = ly0 * (lx0 * n000 + lx1 * n001) + ly1 * (lx0 * n010 + lx1 * n011)
    n100 = tl.load(r10 + xl, mask=mask, other=0.0)
    n101 = tl.load(r10 + xh, mask=mask, other=0.0)
    n110 = tl.load(r11 + xl, mask=mask, other=0.0)
    n111 = tl.load(r11 + xh, mask=mask, other=0.0)
    far = ly0 * (lx0 * n100 + lx1 * n101) + ly1 * (lx0 * n110 + lx1 * n111)
    return (1.0 - lz)[:, None] * near + lz[:, None] * far


@triton.jit
def _tile_voxels(r_start, x_start, D, H, W, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr):
    """A (BLOCK_R, BLOCK_X) tile of the (D*H, W) view of the output volume: rows r = z * H + y."""
    rs = r_start + tl.arange(0, BLOCK_R)
    xs = x_start + tl.arange(0, BLOCK_X)
    zs = rs // H
    return rs, zs, rs - zs * H, xs, (rs < D * H)[:, None] & (xs < W)[None, :]


@triton.jit(do_not_specialize=["P"])  # P == 1 (a 1x1x1 feature map) stays a runtime scalar
def _gradcam_dice_3d_kernel(
    a_ptr, w_ptr, m_ptr, roi_ptr, cam_ptr, dice_ptr, soft_ptr, energy_ptr, hit_ptr,
    C, P, d_in, h_in, w_in, D, H, W,
    a_sb, a_sc, a_sp, r_sb, r_sz, r_sy, r_sx,
    scale_z, scale_y, scale_x, threshold,
    MAP_GIVEN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # Stage 1: pre-ReLU M over the flattened d*h*w feature voxels: given, or sum_k w_k A_k by channel blocks.
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    p_mask = p < P
    m = _pre_relu_map(a_ptr, w_ptr, m_ptr, b, p, p_mask, C, P, a_sb, a_sc, a_sp, MAP_GIVEN, BLOCK_C, BLOCK_P)
    n, bad = _normalise(m, p_mask)  # N = min-max(ReLU(M)), NaN for a non-finite M
    cam_b = cam_ptr + b * P
    tl.store(cam_b + p, n, mask=p_mask)
    tl.debug_barrier()  # N is gathered by other threads of this program below

    # Extremes of U on the candidate grid (see gradcam_dice.py: trilinear is affine along each axis
    # within a group of outputs, so a box's extremes lie on its corners): at most
    # (2d + 2)(2h + 2) (z, y) rows x (2w + 2) columns instead of D*H x W voxels; per lane, reduced at the end.
    u_lo = tl.full([BLOCK_R, BLOCK_X], float("inf"), tl.float32)
    u_hi = tl.full([BLOCK_R, BLOCK_X], float("-inf"), tl.float32)
    n_z = tl.minimum(D, 2 * d_in + 2)
    n_y = tl.minimum(H, 2 * h_in + 2)
    for j_start in range(0, n_z * n_y, BLOCK_R):
        j = j_start + tl.arange(0, BLOCK_R)
        zs, z_ok = _extreme_dst(j // n_y, scale_z, d_in, D, False)
        ys, y_ok = _extreme_dst(j % n_y, scale_y, h_in, H, False)
        row_ok = (j < n_z * n_y) & z_ok & y_ok
        for jx in range(0, tl.minimum(W, 2 * w_in + 2), BLOCK_X):
            xs, x_ok = _extreme_dst(jx + tl.arange(0, BLOCK_X), scale_x, w_in, W, False)
            mask = row_ok[:, None] & x_ok[None, :]
            u = _trilinear(cam_b, zs, ys, xs, mask, d_in, h_in, w_in, scale_z, scale_y, scale_x)
            u_lo = tl.minimum(u_lo, tl.where(mask, u, float("inf")))
            u_hi = tl.maximum(u_hi, tl.where(mask, u, float("-inf")))
    u_min = tl.min(tl.min(u_lo, axis=1), axis=0)
    u_den = (tl.max(tl.max(u_hi, axis=1), axis=0) - u_min) + 1e-7  # == max(U - min U) + eps

    # The pass: S, threshold and agreement sums; per-lane argmax keeps the first index.
    inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _zero_sums(BLOCK_R, BLOCK_X)
    roi_b = roi_ptr + b * r_sb
    for r_start in range(0, D * H, BLOCK_R):
        for x_start in range(0, W, BLOCK_X):
            rs, zs, ys, xs, mask = _tile_voxels(r_start, x_start, D, H, W, BLOCK_R, BLOCK_X)
            u = _trilinear(cam_b, zs, ys, xs, mask, d_in, h_in, w_in, scale_z, scale_y, scale_x)
            s = tl.math.div_rn(u - u_min, u_den)
            r_off = (zs.to(tl.int64) * r_sz + ys.to(tl.int64) * r_sy)[:, None] + xs.to(tl.int64)[None, :] * r_sx
            in_roi = tl.load(roi_b + r_off, mask=mask, other=0) != 0
            inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r = _accumulate(
                s, in_roi, mask, rs[:, None] * W + xs[None, :], threshold,
                inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r)

    dice, soft, energy, hit = _finish(inter, n_att, n_roi, s_sum, s_roi, best_s, best_i, best_r, bad)
    _store_metrics(dice_ptr, soft_ptr, energy_ptr, hit_ptr, b, dice, soft, energy, hit)


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gradcam_dice_3d_kernel, InterpretedFunction)


def _voxel_view(t: Tensor) -> Tensor:
    """(B, C, d*h*w) view of t when its voxels share one stride (NCDHW or channels_last_3d), else of a copy."""
    b, c, d, h, w = t.shape
    try:
        return t.view(b, c, d * h * w)
    except RuntimeError:
        return t.contiguous().view(b, c, d * h * w)


def _launch_config(channels: int, voxels: int, depth: int, height: int, width: int) -> dict[str, int]:
    """Block sizes and warps by shape, as the 2-D kernel's: a (BLOCK_C, BLOCK_P) load block of <= 4096
    elements (the whole feature volume per program) and output tiles of <= 1024 voxels."""
    block_p = triton.next_power_of_2(voxels)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_p))
    block_x = min(triton.next_power_of_2(width), 128)
    block_r = max(1, min(triton.next_power_of_2(depth * height), _TILE // block_x))
    if block_p >= 8192:
        num_warps = 16
    elif block_p >= 2048 or block_x * block_r >= 1024:
        num_warps = 8
    else:
        num_warps = 4
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "BLOCK_R": block_r, "BLOCK_X": block_x,
            "num_warps": num_warps}


def gradcam_dice_3d_triton(
    activations: Tensor | None,
    rois: Tensor,
    threshold: float = 0.5,
    return_cam: bool = False,
    *,
    weights: Tensor | None = None,
    low_res: Tensor | None = None,
    out: RoiAgreement | None = None,
) -> RoiAgreement:
    """Launch the fused 3-D kernel on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    Stage 1's input is exactly one of: ``activations`` A (B, C, d, h, w) with ``weights`` w (B, C)
    (M = sum_k w_k A_k in the kernel), or ``low_res``, the pre-ReLU map M (B, d, h, w), with
    ``activations`` None. ``rois``: bool (B, D, H, W). ``xal_engine.ops.gradcam_dice`` checks A, G and
    the ROIs once and runs the CAM method in torch; here only what the kernel itself needs is checked.
    ``out``: optional preallocated buffers: dice, soft_dice, energy (B,) float32, hit (B,) bool and
    cam (B, d, h, w) float32, contiguous on the inputs' device.
    """
    map_given = low_res is not None
    if map_given == (weights is not None) or map_given == (activations is not None):
        raise XalError("gradcam_dice_3d_triton: give either activations and weights, or low_res alone")
    if map_given:
        if low_res.dim() != 4 or low_res.dtype != torch.float32 or not low_res.is_contiguous():
            raise XalError(f"low_res: expected a contiguous float32 map (B, d, h, w), got {low_res.dtype} "
                           f"{tuple(low_res.shape)}")
        batch, d, h, w = low_res.shape
        channels, device = 1, low_res.device
    else:
        if activations.dim() != 5:
            raise XalError(f"activations: expected (B, C, d, h, w), got {tuple(activations.shape)}")
        batch, channels, d, h, w = activations.shape
        device = activations.device
        _check_weights(weights, batch, channels, device)
    _check_device(device)
    if rois.dim() != 4 or rois.shape[0] != batch or rois.device != device:
        raise XalError(f"rois: expected ({batch}, D, H, W) on {device}, got {tuple(rois.shape)} on {rois.device}")
    depth, height, width = rois.shape[1:]
    if d * h * w > MAX_FEATURE_VOXELS:
        raise XalError(f"activations: feature volume {d}x{h}x{w} exceeds the kernel's {MAX_FEATURE_VOXELS} voxels")
    if depth * height * width >= 2**31:
        raise XalError(f"rois: {depth}x{height}x{width} voxels exceed the kernel's int32 voxel index")
    if out is None:
        out = _new_out(batch, (batch, d, h, w), device)
    _check_out(out, batch, (d, h, w), device)
    if batch == 0:
        return out._replace(cam=out.cam if return_cam else None)
    if map_given:
        a, w_in, m_in = low_res, low_res, low_res  # A and w unused: any valid pointer
        a_strides = (0, 0, 0)
    else:
        a = _voxel_view(activations)  # [B, C, d*h*w]
        w_in, m_in = weights.contiguous(), weights  # M unused
        a_strides = (a.stride(0), a.stride(1), a.stride(2))
    roi_bytes = rois.view(torch.uint8)
    # torch's scales: fp32(in) / fp32(out), correctly rounded here rather than approximated on the device
    scales = [float(np.float32(i) / np.float32(o)) for i, o in ((d, depth), (h, height), (w, width))]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _gradcam_dice_3d_kernel[(batch,)](
            a, w_in, m_in, roi_bytes, out.cam, out.dice, out.soft_dice, out.energy, out.hit.view(torch.uint8),
            channels, d * h * w, d, h, w, depth, height, width,
            *a_strides, *roi_bytes.stride(),
            *scales, float(threshold),
            MAP_GIVEN=map_given,
            **_launch_config(channels, d * h * w, depth, height, width),
        )
    return out._replace(cam=out.cam if return_cam else None)


__all__ = ["MAX_FEATURE_VOXELS", "gradcam_dice_3d_triton"]
