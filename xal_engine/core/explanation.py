"""The explanation loss: W · (1 − soft Dice(Grad-CAM, ROI)) on labelled images that have an ROI.

The CAM is differentiable end to end (second-order autograd): the channel weights come from
``autograd.grad(score, A, create_graph=True)``, so the loss moves both the activations A and the
head that produced the gradients. Per image b, all in fp32 (fp64 stays fp64, for gradcheck):

    w_bk = mean_ij G_bk,ij                  G = ∂ score_b / ∂ A_b, score_b = logit of the target class
    M_b  = relu(Σ_k w_bk · A_bk)            (h, w)
    N_b  = minmax(M_b)                      (x − min) / (max(x − min) + 1e-7)
    S_b  = minmax(bilinear(N_b → H×W))      half-pixel centres, the map the scoring kernel measures
    soft_dice_b = 2·Σ(S·R) / (ΣS + ΣR)      0 when the denominator is 0

The map S is the design's S (see ``reference.gradcam_dice``), so training optimises the same soft
Dice that scoring reports and the acquisition reads. During training the target is the TRUE label
(the ROI marks that class's lesion); scoring uses the predicted class.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

EPS = 1e-7  # the min-max denominator guard of the kernel contract


def _minmax(x: Tensor) -> Tensor:
    """Per-image min-max over the last two dims of (B, 1, h, w)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    shifted = x - lo
    return shifted / (shifted.amax(dim=(2, 3), keepdim=True) + EPS)


def cam_soft_dice(activations: Tensor, gradients: Tensor, rois: Tensor) -> Tensor:
    """Soft Dice (B,) of the Grad-CAM of (A, G) (B, C, h, w) against rois (B, H, W); differentiable
    in A and G. Computes in fp32, or fp64 when the inputs are fp64."""
    dtype = torch.promote_types(activations.dtype, torch.float32)
    a, g = activations.to(dtype), gradients.to(dtype)
    w = g.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    m = torch.relu((w * a).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    u = F.interpolate(_minmax(m), size=tuple(rois.shape[-2:]), mode="bilinear", align_corners=False)
    s = _minmax(u)[:, 0]  # (B, H, W)
    r = rois.to(dtype)
    inter = (s * r).sum(dim=(1, 2))
    denom = s.sum(dim=(1, 2)) + r.sum(dim=(1, 2))
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(torch.finfo(dtype).tiny), 0.0)


def explanation_loss(activations: Tensor, scores: Tensor, rois: Tensor, has_roi: Tensor) -> Tensor:
    """Mean of 1 − soft Dice over the images with an ROI (0 when there is none), as a scalar that
    backpropagates through the CAM. ``scores`` (B,) are the target logits computed from
    ``activations`` (B, C, h, w); rois (B, H, W) bool; has_roi (B,) bool."""
    (gradients,) = torch.autograd.grad(scores.sum(), activations, create_graph=True)  # (B, C, h, w)
    dice = cam_soft_dice(activations, gradients, rois)  # (B,)
    keep = has_roi.to(dice.dtype)
    return ((1.0 - dice) * keep).sum() / keep.sum().clamp_min(1.0)


class ExplanationTerm:
    """W · explanation_loss for a model in training: a forward hook keeps the target layer's output
    of the latest forward, and a call turns (logits, labels, rois, has_roi) into the loss term.

    Use as a context manager (or call :meth:`close`) so the hook is removed.
    """

    def __init__(self, layer: nn.Module, weight: float) -> None:
        self.weight = weight
        self.activation: Tensor | None = None
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.activation = output if torch.is_grad_enabled() else None

    def __call__(self, logits: Tensor, labels: Tensor, rois: Tensor, has_roi: Tensor) -> Tensor:
        if self.activation is None:
            raise RuntimeError("ExplanationTerm: no activation captured; call it after a forward with grad")
        scores = logits.gather(1, labels[:, None])[:, 0]  # (B,) logit of the true class
        loss = explanation_loss(self.activation, scores, rois, has_roi)
        self.activation = None  # the graph is freed with the batch
        return self.weight * loss

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> ExplanationTerm:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
