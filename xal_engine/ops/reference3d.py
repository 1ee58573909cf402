"""Pure-torch reference of ``gradcam_dice`` for volumes: 3-D Grad-CAM -> trilinear -> min-max -> ROI agreement.

The 2-D reference (:mod:`xal_engine.ops.reference`) one dimension up, with the same math, op order
and edge cases; the fused 3-D Triton kernel (``xal_engine.kernels.gradcam_dice_3d``) reproduces it.
Per volume b, with activations A and gradients G of shape (C, d, h, w) and an ROI R (D, H, W):

    M   = max(0, cam(A, G))                                the CAM method's map      (d, h, w)
                                                           gradcam: sum_k w_k A_k, w_k = mean_xyz G_k
    N   = (M - min M) / (max(M - min M) + 1e-7)            stage-1 min-max           (d, h, w)
    U   = trilinear(N -> D x H x W), half-pixel centres (align_corners=False, no antialias)
    S   = (U - min U) / (max(U - min U) + 1e-7)            stage-2 min-max           (D, H, W)
    dice, soft_dice, energy, hit of S against R            exactly as in 2-D (``roi_agreement``:
                                                           first maximum in (z, y, x) row-major order)

Why a separate module rather than 5-D branches in the 2-D functions: those functions are the
contract of the 2-D kernel, the CPU fast path (``cpu_agreement``) and the compat classes, and stay
byte for byte as they are; here only what depends on the rank differs (the interpolation mode and
the NaN broadcast), and everything rank-free is reused: ``min_max`` and ``roi_agreement`` flatten all
non-batch dims, so they are the 2-D code itself.

CAM methods: every method of :mod:`xal_engine.ops.cam_methods` extends to volumes by viewing the
(d, h, w) grid as a (d*h*w, 1) "image": channel weights average or sum over all voxels (Grad-CAM's
w_k = mean over d, h, w, as pytorch-grad-cam's and MONAI's 3-D Grad-CAM), Grad-CAM++'s and
XGrad-CAM's sum of A runs over the volume, HiResCAM and LayerCAM are elementwise, and EigenCAM
projects the (d*h*w, C) activations on their first principal component. The view is free for
contiguous and channels_last_3d tensors and leaves the 2-D method code (and its numbers) unchanged.

Edge cases are the 2-D ones: zero denominators give 0, an all-zero CAM (including a 1x1x1 feature
map) gives zeros and hit False, a non-finite A or G gives NaN values, a NaN map and hit False for
that volume only. The reference materialises S (B, D, H, W) in fp32 (8 MiB per 128^3 volume); the
kernel never does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.cam_methods import CamMethod, get_cam_method
from xal_engine.ops.checks import check_inputs
from xal_engine.ops.reference import agreement_result, min_max, roi_agreement


def as_columns(x: Tensor) -> Tensor:
    """(B, C, d, h, w) -> (B, C, d*h*w, 1): the 2-D methods' input with the volume as one column."""
    b, c, d, h, w = x.shape
    return x.reshape(b, c, d * h * w, 1)


def method_weights_3d(activations: Tensor, gradients: Tensor, method: str | CamMethod = "gradcam") -> Tensor:
    """Channel weights w (B, C) of a weight method (gradcam, gradcam++, xgradcam) for volumes."""
    cam_method = get_cam_method(method)
    if cam_method.weights is None:
        raise XalError(f"cam method: {cam_method.name} gives a map, not channel weights")
    return cam_method.weights(as_columns(activations), as_columns(gradients))


def cam_3d(activations: Tensor, gradients: Tensor, method: str | CamMethod = "gradcam") -> Tensor:
    """Pre-ReLU map M (B, d, h, w) in fp32 (fp64 for fp64 inputs) of ``method`` for volumes."""
    b, _, d, h, w = activations.shape
    m = get_cam_method(method).cam(as_columns(activations), as_columns(gradients))  # [B, dhw, 1]
    return m.view(b, d, h, w)


def normalise_cam_3d(cam: Tensor) -> Tensor:
    """Stage 1: min-max(ReLU(M)) of M (B, d, h, w); a volume with a non-finite entry comes out all NaN."""
    finite = torch.isfinite(cam).flatten(1).all(1)  # [B]
    n = min_max(cam.clamp_min(0.0))
    return torch.where(finite[:, None, None, None], n, torch.full_like(n, float("nan")))


def low_res_cam_3d(activations: Tensor, gradients: Tensor, method: str | CamMethod = "gradcam") -> Tensor:
    """Stage-1 map N (B, d, h, w) float32; all NaN for a volume whose pre-ReLU map is not finite."""
    return normalise_cam_3d(cam_3d(activations.float(), gradients.float(), method))


def upsample_normalise_3d(cam: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Stage 2: trilinear N (B, d, h, w) -> (B, D, H, W) with half-pixel centres, then per-volume min-max."""
    u = F.interpolate(cam[:, None], size=size, mode="trilinear", align_corners=False, antialias=False)
    return min_max(u[:, 0])


def gradcam_maps_3d(activations: Tensor, gradients: Tensor, size: tuple[int, int, int],
                    method: str | CamMethod = "gradcam") -> Tensor:
    """S (B, D, H, W) float32 at ``size``; NaN for a volume with non-finite inputs."""
    return upsample_normalise_3d(low_res_cam_3d(activations, gradients, method), size)


def gradcam_dice_3d(
    activations: Tensor,
    gradients: Tensor,
    rois: Tensor | np.ndarray,
    threshold: float = 0.5,
    return_cam: bool = False,
    *,
    method: str | CamMethod = "gradcam",
) -> RoiAgreement:
    """Reference ``gradcam_dice`` for volumes: A/G (B, C, d, h, w), rois (B, D, H, W) at any D x H x W.

    ``cam`` is the stage-1 map N (B, d, h, w) when ``return_cam``. Materialises S; see the module
    docstring for the math and the edge cases.
    """
    rois = check_inputs(activations, gradients, rois, threshold, spatial_dims=(3,))
    return gradcam_dice_3d_checked(activations, gradients, rois, threshold, return_cam, method=method)


def gradcam_dice_3d_checked(activations: Tensor, gradients: Tensor, rois: Tensor, threshold: float,
                            return_cam: bool, *, method: str | CamMethod = "gradcam") -> RoiAgreement:
    """``gradcam_dice_3d`` on inputs that ``check_inputs`` already returned (rois a bool tensor)."""
    cam = low_res_cam_3d(activations, gradients, method)  # [B, d, h, w]
    return agreement_result(cam, rois, threshold, return_cam, _upsampled_agreement_3d)


def _upsampled_agreement_3d(cam: Tensor, rois: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage 2 (trilinear) and the ROI agreement of N (B, d, h, w) against rois (B, D, H, W)."""
    return roi_agreement(upsample_normalise_3d(cam, (rois.shape[1], rois.shape[2], rois.shape[3])), rois, threshold)


__all__ = ["cam_3d", "gradcam_dice_3d", "gradcam_dice_3d_checked", "gradcam_maps_3d", "low_res_cam_3d",
           "method_weights_3d", "normalise_cam_3d", "upsample_normalise_3d"]
