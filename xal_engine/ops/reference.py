"""Pure-torch reference of ``gradcam_dice``: Grad-CAM -> upsample -> normalise -> ROI agreement.

Runs on any device with fp32 arithmetic. Tests, benchmarks and the CPU path share it; the fused
Triton kernel (``xal_engine.kernels.gradcam_dice``) reproduces it operation for operation.

Per image b, with activations A and gradients G of shape (C, h, w) and an ROI mask R of shape (H, W):

    M   = max(0, cam(A, G))                                the CAM method's map      (h, w)
                                                           gradcam: sum_k w_k A_k, w_k = mean_ij G_k
    N   = (M - min M) / (max(M - min M) + 1e-7)            stage-1 min-max           (h, w)
    U   = bilinear(N -> H x W), half-pixel centres (align_corners=False, no antialias)
    S   = (U - min U) / (max(U - min U) + 1e-7)            stage-2 min-max           (H, W)

``cam`` is the method's part (:mod:`xal_engine.ops.cam_methods`: channel weights or a map); the rest
is shared. S equals pytorch-grad-cam's output of the method's class for one layer (``GradCAM`` for
the default ``gradcam``); ``multi_layer_maps`` combines several layers as pytorch-grad-cam does. Agreement with R, at threshold tau:

    dice      = 2 |{S >= tau} & R| / (|{S >= tau}| + |R|)  ties at tau count as attended
    soft_dice = 2 sum(S R) / (sum S + |R|)
    energy    = sum(S R) / sum S                          energy-based pointing game
    hit       = R[argmax S]                                first maximum in row-major order

Edge cases:
- a zero denominator gives 0: an empty ROI gives dice = soft_dice = energy = 0 and hit False;
- an all-zero CAM (S == 0 everywhere: every weighted channel sum is <= 0, or M is constant, as for
  a 1x1 feature map) gives dice = soft_dice = energy = 0 and hit False, for any tau including 0;
- a non-finite value in A or G (or an fp32 overflow of sum_k w_k A_k) gives NaN dice, soft_dice,
  energy, a NaN map and hit False for that image only. Any non-finite A or G makes some entry of the
  pre-ReLU sum non-finite (inf * 0 = NaN, inf * x = +-inf), so the check runs on that sum, before
  the ReLU could turn -inf into 0.

Conditioning: stage 2 divides by max U - min U + 1e-7, so where U is nearly constant (a map resized
to a single row or column, say) the ~1e-7 float noise of any bilinear implementation becomes O(1)
in S; backends agree on S to about 2e-7 / (max U - min U + 1e-7). Upsampled maps (H >= h, W >= w)
of a non-zero CAM typically spread over most of [0, 1] and are well conditioned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.cam_methods import CamMethod, get_cam_method
from xal_engine.ops.checks import check_inputs

EPS = 1e-7  # the min-max epsilon of pytorch-grad-cam


def min_max(x: Tensor) -> Tensor:
    """Per-image (x - min) / (max(x - min) + 1e-7) over all dims but the first, in that op order."""
    flat = x.flatten(1)  # [B, P]
    shifted = flat - flat.amin(1, keepdim=True)
    return (shifted / (shifted.amax(1, keepdim=True) + EPS)).view_as(x)


def normalise_cam(cam: Tensor) -> Tensor:
    """Stage 1 of every method: min-max(ReLU(M)) of a pre-ReLU map M (B, h, w); an image whose M has
    a non-finite entry comes out all NaN. Keeps M's dtype (fp32, or fp64 for gradcheck)."""
    finite = torch.isfinite(cam).flatten(1).all(1)  # [B]
    n = min_max(cam.clamp_min(0.0))
    return torch.where(finite[:, None, None], n, torch.full_like(n, float("nan")))


def low_res_cam(activations: Tensor, gradients: Tensor, method: str | CamMethod = "gradcam",
                products: Tensor | None = None) -> Tensor:
    """Stage-1 map N (B, h, w) float32; all NaN for an image whose pre-ReLU map is not finite.
    ``products``: see :func:`xal_engine.ops.cam_methods.weighted_sum`."""
    cam = get_cam_method(method).cam(activations.float(), gradients.float(), products)  # [B, h, w], pre-ReLU
    return normalise_cam(cam)


def upsample_normalise(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Stage 2: bilinear N (B, h, w) -> (B, H, W) with half-pixel centres, then per-image min-max."""
    u = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False, antialias=False)
    return min_max(u[:, 0])


def gradcam_maps(activations: Tensor, gradients: Tensor, size: tuple[int, int],
                 method: str | CamMethod = "gradcam") -> Tensor:
    """S (B, H, W) float32, pytorch-grad-cam's map of ``method``'s class at ``size``; NaN for
    non-finite inputs."""
    return upsample_normalise(low_res_cam(activations, gradients, method), size)


def multi_layer_maps(activations: Sequence[Tensor], gradients: Sequence[Tensor], size: tuple[int, int],
                     method: str | CamMethod = "gradcam") -> Tensor:
    """S (B, H, W) float32 from several target layers, as pytorch-grad-cam's ``aggregate_multi_layers``:

        U_l = bilinear(N_l -> H x W)        per layer: stage-1 map, upsampled (no per-layer stage 2)
        S   = min-max(mean_l max(U_l, 0))   eps 1e-7

    For one layer this is ``gradcam_maps`` (max(U, 0) = U since N >= 0). Layers may differ in C, h, w.
    """
    if len(activations) != len(gradients) or not activations:
        raise XalError(f"multi_layer_maps: expected as many gradients as activations (>= 1), got "
                       f"{len(gradients)} and {len(activations)}")
    upsampled = [
        F.interpolate(low_res_cam(a, g, method)[:, None], size=size, mode="bilinear", align_corners=False,
                      antialias=False)  # [B, 1, H, W] U_l
        for a, g in zip(activations, gradients)
    ]
    return min_max(torch.cat(upsampled, dim=1).clamp_min(0).mean(dim=1))  # [B, H, W]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den in float32, 0 where den == 0."""
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def roi_agreement(maps: Tensor, rois: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dice, soft_dice, energy, hit) of maps S (B, H, W) in [0, 1] against bool ROIs (B, H, W).

    Edge cases as in the module docstring: zero denominators give 0, an all-zero map gives zeros and
    hit False, a map with a NaN gives NaN and hit False.
    """
    s = maps.float().flatten(1)  # [B, P]
    r = rois.flatten(1)  # [B, P] bool
    attended = s >= threshold
    return agreement_from_sums(
        n_both=(attended & r).sum(1), n_att=attended.sum(1), n_roi=r.sum(1),  # [B] int64, exact
        s_roi=torch.where(r, s, 0.0).sum(1), s_sum=s.sum(1),  # sum(S R), sum(S)
        s_max=s.amax(1), roi_at_max=r.gather(1, s.argmax(1, keepdim=True))[:, 0],
    )


def agreement_from_sums(n_both: Tensor, n_att: Tensor, n_roi: Tensor, s_roi: Tensor, s_sum: Tensor,
                        s_max: Tensor, roi_at_max: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dice, soft_dice, energy, hit) from each image's counts |T & R|, |T|, |R|, sums sum(S R),
    sum(S), max S and R at the first argmax of S (all (B,)), with the module docstring's edge cases."""
    dice = _ratio(2 * n_both, n_att + n_roi)
    soft_dice = _ratio(2 * s_roi, s_sum + n_roi)
    energy = _ratio(s_roi, s_sum)
    hit = roi_at_max & (s_max > 0)
    flat = s_max == 0  # all-zero map: nothing attended, even at tau = 0
    zero = torch.zeros_like(dice)
    dice, soft_dice, energy = (torch.where(flat, zero, v) for v in (dice, soft_dice, energy))
    bad = torch.isnan(s_max)  # amax propagates NaN
    nan = torch.full_like(dice, float("nan"))
    dice, soft_dice, energy = (torch.where(bad, nan, v) for v in (dice, soft_dice, energy))
    return dice, soft_dice, energy, hit & ~bad


def gradcam_dice(
    activations: Tensor,
    gradients: Tensor,
    rois: Tensor | np.ndarray,
    threshold: float = 0.5,
    return_cam: bool = False,
    *,
    method: str | CamMethod = "gradcam",
) -> RoiAgreement:
    """Reference ``gradcam_dice``: activations/gradients (B, C, h, w), rois (B, H, W) at any H x W.

    Materialises S (B, H, W) in memory, unlike the fused kernel. See the module docstring for the
    math and the edge cases.
    """
    rois = check_inputs(activations, gradients, rois, threshold)
    return gradcam_dice_checked(activations, gradients, rois, threshold, return_cam, method=method)


def gradcam_dice_checked(activations: Tensor, gradients: Tensor, rois: Tensor, threshold: float,
                         return_cam: bool, *, method: str | CamMethod = "gradcam") -> RoiAgreement:
    """``gradcam_dice`` on inputs that ``check_inputs`` already returned (rois a bool tensor)."""
    cam = low_res_cam(activations, gradients, method)  # [B, h, w]
    return agreement_result(cam, rois, threshold, return_cam, upsampled_agreement)


def gradcam_dice_layers_checked(activations: Sequence[Tensor], gradients: Sequence[Tensor], rois: Tensor,
                                threshold: float, *, method: str | CamMethod = "gradcam") -> RoiAgreement:
    """The agreement of several layers' combined map (``multi_layer_maps``) with checked bool rois
    (B, H, W); ``cam`` None (there is no one stage-1 map)."""
    maps = multi_layer_maps(activations, gradients, (rois.shape[1], rois.shape[2]), method)  # [B, H, W]
    if maps.shape[0] == 0:
        empty = maps.new_zeros(0)
        return RoiAgreement(empty, empty, empty, empty.bool(), None)
    return RoiAgreement(*roi_agreement(maps, rois, threshold), None)


def upsampled_agreement(cam: Tensor, rois: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage 2 and the ROI agreement of stage-1 maps N (B, h, w) against rois (B, H, W)."""
    return roi_agreement(upsample_normalise(cam, (rois.shape[1], rois.shape[2])), rois, threshold)


Agreement = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor, Tensor]]


def agreement_result(cam: Tensor, rois: Tensor, threshold: float, return_cam: bool,
                     agree: Agreement) -> RoiAgreement:
    """The RoiAgreement of stage-1 maps ``cam`` (B, ...): ``agree(cam, rois, threshold)`` (stage 2 and
    the metrics, 2-D or 3-D), empty results for an empty batch, ``cam`` kept when asked for."""
    if cam.shape[0] == 0:
        empty = cam.new_zeros(0)
        return RoiAgreement(empty, empty, empty, empty.bool(), cam if return_cam else None)
    dice, soft_dice, energy, hit = agree(cam, rois, threshold)
    return RoiAgreement(dice, soft_dice, energy, hit, cam if return_cam else None)
