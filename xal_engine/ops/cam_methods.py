"""The CAM-method seam: what differs between Grad-CAM and its family, and nothing else.

The shape of pytorch-grad-cam's ``BaseCAM``: a method supplies EITHER channel weights ``w (B, C)``
from the activations A and gradients G of a target layer (its ``get_cam_weights``), OR a low-resolution
map ``M (B, h, w)`` directly (its ``get_cam_image``). Everything after M is shared by every method
(``ops.reference``, the Triton kernel, the explanation loss, the compat classes):

    M = Σ_k w_k A_k    (weight methods; ``weighted_sum``)      pre-ReLU map      (B, h, w)
    N = min-max(max(M, 0)), U = bilinear(N → H×W), S = min-max(U), threshold, Dice, …

Inputs A, G are (B, C, h, w) in any float dtype; methods compute in fp32 (fp64 stays fp64, for
gradcheck) and are differentiable in A and G (the explanation loss backpropagates through them).
Each method equals pytorch-grad-cam 1.5.7's class of the same name (op for op, in its order):

    gradcam    w = mean_ij G                                                GradCAM
    gradcam++  a = G² / (2G² + ΣA·G³ + 1e-6), 0 where G == 0;               GradCAMPlusPlus
               w = Σ_ij max(G, 0)·a          (ΣA: per-channel sum of A over the map)
    xgradcam   w = Σ_ij G·A / (ΣA + 1e-7)                                  XGradCAM
    hirescam   M = Σ_k G_k ⊙ A_k                                           HiResCAM
    layercam   M = Σ_k max(G_k, 0) ⊙ A_k                                   LayerCAM
    eigencam   M = first principal component of A (no gradients):        EigenCAM
               X = A_b as (h·w, C) minus its per-channel mean, M = X v₁, v₁ the first right
               singular vector of X. SIGN: an SVD fixes v₁ only up to sign (LAPACK, cuSOLVER and
               numpy may differ, and 1.5.7 keeps whatever its LAPACK returns). xal-engine fixes it as
               pytorch-grad-cam's own ``get_2d_projection_with_sign_correction`` does (shipped in 1.5.7,
               Seg-Eigen-CAM Eq. 13): M is negated when |min M| > |max M|, so the salient side is
               positive on every backend. EigenCAM equals 1.5.7 exactly when 1.5.7's LAPACK sign agrees
               with that rule, and otherwise equals its sign-corrected projection.

Non-finite inputs: for every method a non-finite A or G of image b makes some entry of its pre-ReLU
M non-finite, and the shared stage turns that image into NaN (layercam and eigencam, whose math
could hide a −inf gradient or a NaN activation, mark the image explicitly; eigencam reads no G).

Adding a method: one function returning w (B, C) or M (B, h, w), one ``CamMethod`` line in
``CAM_METHODS``, its pytorch-grad-cam parity test in ``tests/ops/test_cam_methods.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xal_engine.errors import XalError

CamFn = Callable[[Tensor, Tensor], Tensor]  # (A, G) (B, C, h, w) -> w (B, C) or M (B, h, w)


def _wide(x: Tensor) -> Tensor:
    """x in fp32, or as it is when already fp32/fp64 (no copy)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _spatial_sum(x: Tensor) -> Tensor:
    """Per-channel sum over the feature map, broadcastable against (B, C, h, w)."""
    return x.sum(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]


def _nan_where_not_finite(m: Tensor, x: Tensor) -> Tensor:
    """M with image b set to NaN where x (B, C, h, w) has a non-finite entry in image b."""
    finite = torch.isfinite(x).flatten(1).all(1)  # [B]
    return torch.where(finite[:, None, None], m, torch.full_like(m, float("nan")))


def weighted_sum(weights: Tensor, activations: Tensor, products: Tensor | None = None) -> Tensor:
    """M = Σ_k w_k A_k (B, h, w): weights (B, C), activations (B, C, h, w), in fp32 (or fp64).

    Elementwise product and sum, not einsum/bmm: a matmul may run in TF32 on a GPU. ``products``: a
    buffer of A's shape and strides for the w_k A_k (a caller's kept one; no autograd through it),
    the same values and the same sum order as a fresh product.
    """
    w = weights[:, :, None, None]
    a = _wide(activations)
    return (w * a if products is None else torch.mul(w, a, out=products)).sum(1)


# -- channel-weight methods: (A, G) -> w (B, C) ------------------------------------------------------

def gradcam_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    # accumulated in fp32 without an fp32 copy of a half-precision G (the kernel path reads G once)
    return gradients.mean(dim=(2, 3), dtype=torch.promote_types(gradients.dtype, torch.float32))  # [B, C]


def gradcam_pp_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    g = _wide(gradients)
    g2 = g**2
    g3 = g2 * g
    aij = g2 / (2 * g2 + _spatial_sum(_wide(activations)) * g3 + 1e-6)  # Eq. 19 of arXiv:1710.11063
    aij = torch.where(g != 0, aij, 0.0)
    return (g.clamp_min(0) * aij).sum(dim=(2, 3))  # [B, C]


def xgradcam_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    a = _wide(activations)
    return (_wide(gradients) * a / (_spatial_sum(a) + 1e-7)).sum(dim=(2, 3))  # [B, C]


# -- map methods: (A, G) -> M (B, h, w), pre-ReLU ----------------------------------------------------

def hirescam_map(activations: Tensor, gradients: Tensor) -> Tensor:
    return (_wide(gradients) * _wide(activations)).sum(1)  # [B, h, w]


def layercam_map(activations: Tensor, gradients: Tensor) -> Tensor:
    g = _wide(gradients)
    m = (g.clamp_min(0) * _wide(activations)).sum(1)  # [B, h, w]
    return _nan_where_not_finite(m, g)  # max(-inf, 0) = 0 would hide a non-finite gradient


def eigencam_map(activations: Tensor, gradients: Tensor) -> Tensor:
    """Projection on the first principal component, sign fixed so that |max M| >= |min M|.

    The SVD runs in fp64 (the component is as accurate as the activations allow, whatever the
    singular-value gap) and M comes back in the activations' compute dtype.

    Differentiated (the explanation loss), v₁ comes from an SVD without a graph and one power step
    v = XᵀX v₁ / |XᵀX v₁| carries the gradient: the SVD's own backward divides by σᵢ² − σⱼ² over
    every pair and gives NaN once two singular values tie (dead channels after a ReLU: several
    zeros), whereas the step's gradient is finite; at v₁ the step returns v₁ (to rounding), and its
    gradient is the eigenvector's to first order in σ₂²/σ₁².
    """
    a = _wide(activations)
    batch, _, h, w = a.shape
    finite = torch.isfinite(a).flatten(1).all(1)  # [B]
    x = torch.where(finite[:, None, None, None], a, 0.0).double().flatten(2).transpose(1, 2)  # [B, hw, C]
    x = x - x.mean(dim=1, keepdim=True)  # centre each channel over the map
    if torch.is_grad_enabled() and x.requires_grad:
        with torch.no_grad():
            v1 = torch.linalg.svd(x, full_matrices=False)[2][:, 0, :, None]  # [B, C, 1]
        v = x.transpose(1, 2) @ (x @ v1)  # [B, C, 1]: XᵀX v₁
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    else:
        v = torch.linalg.svd(x, full_matrices=False)[2][:, 0, :, None]  # vh [B, min(hw, C), C] -> v₁
    m = (x @ v)[..., 0]  # [B, hw]
    flip = m.amin(1).abs() > m.amax(1).abs()  # [B]
    m = torch.where(flip[:, None], -m, m).to(a.dtype).view(batch, h, w)
    return torch.where(finite[:, None, None], m, torch.full_like(m, float("nan")))


@dataclass(frozen=True)
class CamMethod:
    """One CAM method: exactly one of ``weights`` (A, G → w (B, C)) and ``low_res`` (A, G → M)."""

    name: str
    reference_class: str  # the pytorch-grad-cam class it equals
    title: str  # how captions and reports name it
    weights: CamFn | None = None
    low_res: CamFn | None = None
    uses_gradients: bool = True

    def cam(self, activations: Tensor, gradients: Tensor, products: Tensor | None = None) -> Tensor:
        """Pre-ReLU M (B, h, w) in fp32 (fp64 for fp64 inputs); ``products`` as :func:`weighted_sum`'s
        (weight methods only)."""
        if self.weights is not None:
            return weighted_sum(self.weights(activations, gradients), activations, products)
        assert self.low_res is not None
        return self.low_res(activations, gradients)


CAM_METHODS: dict[str, CamMethod] = {
    m.name: m for m in (
        CamMethod("gradcam", "GradCAM", "Grad-CAM", weights=gradcam_weights),
        CamMethod("gradcam++", "GradCAMPlusPlus", "Grad-CAM++", weights=gradcam_pp_weights),
        CamMethod("xgradcam", "XGradCAM", "XGrad-CAM", weights=xgradcam_weights),
        CamMethod("hirescam", "HiResCAM", "HiResCAM", low_res=hirescam_map),
        CamMethod("layercam", "LayerCAM", "LayerCAM", low_res=layercam_map),
        CamMethod("eigencam", "EigenCAM", "Eigen-CAM", low_res=eigencam_map, uses_gradients=False),
    )
}
DEFAULT_CAM_METHOD = "gradcam"


def check_cam_method(name: object) -> str:
    """``name`` when it names a registered CAM method; XalError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in CAM_METHODS:
        raise XalError(f"cam method: expected one of {', '.join(CAM_METHODS)}, got {name!r}")
    return name


def get_cam_method(name: str | CamMethod) -> CamMethod:
    """The registered :class:`CamMethod` for ``name`` (a ``CamMethod`` passes through)."""
    return name if isinstance(name, CamMethod) else CAM_METHODS[check_cam_method(name)]


__all__ = ["CAM_METHODS", "DEFAULT_CAM_METHOD", "CamMethod", "check_cam_method", "get_cam_method",
           "weighted_sum"]
