"""The explanation loss: W · (1 − soft Dice(CAM, ROI)) on labelled images that have an ROI.

The CAM is differentiable end to end (second-order autograd): the gradients come from
``autograd.grad(score, A, create_graph=True)``, so the loss moves both the activations A and the
head that produced the gradients. Per image b, all in fp32 (fp64 stays fp64, for gradcheck):

    M_b  = method(A_b, G_b)                 G = ∂ score_b / ∂ A_b, score_b = logit of the target class
                                            gradcam: Σ_k w_bk · A_bk, w_bk = mean_ij G_bk,ij
    N_b  = minmax(relu(M_b))                (x − min) / (max(x − min) + 1e-7)
    S_b  = minmax(bilinear(N_b → H×W))      half-pixel centres, the map the scoring kernel measures
    soft_dice_b = 2·Σ(S·R) / (ΣS + ΣR)      0 when the denominator is 0

``method`` is the scoring's CAM method code itself (``ops.cam_methods``), and N and S are the
reference's own stages (``ops.reference.normalise_cam`` and ``upsample_normalise``), so training
optimises the same soft Dice that scoring reports and the acquisition reads. During training the target is the TRUE label
(the ROI marks that class's lesion); scoring uses the predicted class.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from xal_engine.ops import reference, reference3d
from xal_engine.ops.cam_methods import CamMethod, get_cam_method


def cam_soft_dice(activations: Tensor, gradients: Tensor, rois: Tensor, method: str | CamMethod = "gradcam") -> Tensor:
    """Soft Dice (B,) of the CAM of (A, G) (B, C, h, w) against rois (B, H, W) (volumes: (B, C, d, h, w)
    against (B, D, H, W), trilinear); differentiable in A and G. Computes in fp32, or fp64 when the
    inputs are fp64."""
    dtype = torch.promote_types(activations.dtype, torch.float32)
    a, g = activations.to(dtype), gradients.to(dtype)
    if a.ndim == 5:
        n = reference3d.normalise_cam_3d(reference3d.cam_3d(a, g, method))  # (B, d, h, w)
        s = reference3d.upsample_normalise_3d(n, tuple(rois.shape[-3:]))  # (B, D, H, W)
    else:
        n = reference.normalise_cam(get_cam_method(method).cam(a, g))  # (B, h, w)
        s = reference.upsample_normalise(n, tuple(rois.shape[-2:]))  # (B, H, W)
    r = rois.to(dtype)
    axes = tuple(range(1, s.ndim))
    inter = (s * r).sum(dim=axes)
    denom = s.sum(dim=axes) + r.sum(dim=axes)
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(torch.finfo(dtype).tiny), 0.0)


def explanation_loss(activations: Tensor, scores: Tensor, rois: Tensor, has_roi: Tensor,
                     method: str | CamMethod = "gradcam") -> Tensor:
    """Mean of 1 − soft Dice over the images with an ROI (0 when there is none), as a scalar that
    backpropagates through the CAM. ``scores`` (B,) are the target logits computed from
    ``activations`` (B, C, h, w); rois (B, H, W) bool; has_roi (B,) bool; ``method`` a CAM method."""
    (gradients,) = torch.autograd.grad(scores.sum(), activations, create_graph=True)  # (B, C, h, w)
    dice = cam_soft_dice(activations, gradients, rois, method)  # (B,)
    keep = has_roi.to(dice.dtype)
    return ((1.0 - dice) * keep).sum() / keep.sum().clamp_min(1.0)


class ExplanationTerm:
    """W · explanation_loss for a model in training: a forward hook keeps the target layer's output
    of the latest forward, and a call turns (logits, labels, rois, has_roi) into the loss term.

    ``method``: the CAM method (``ops.cam_methods``); ``reshape_transform`` maps the layer's output
    to (B, C, h, w) as in :mod:`xal_engine.core.capture` (transformer tokens).
    Use as a context manager (or call :meth:`close`) so the hook is removed.
    """

    def __init__(self, layer: nn.Module, weight: float, method: str | CamMethod = "gradcam",
                 reshape_transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.weight = weight
        self.method = get_cam_method(method)
        self.reshape_transform = reshape_transform
        self.activation: Tensor | None = None
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.activation = output if torch.is_grad_enabled() else None

    def __call__(self, logits: Tensor, labels: Tensor, rois: Tensor, has_roi: Tensor) -> Tensor:
        if self.activation is None:
            raise RuntimeError("ExplanationTerm: no activation captured; call it after a forward with grad")
        scores = logits.gather(1, labels[:, None])[:, 0]  # (B,) logit of the true class
        act = self.activation
        if self.reshape_transform is None:
            loss = explanation_loss(act, scores, rois, has_roi, self.method)
        else:  # G of the raw output, then A and G reshaped alike (a linear view: see core.capture)
            (grad,) = torch.autograd.grad(scores.sum(), act, create_graph=True)
            shape = self.reshape_transform
            dice = cam_soft_dice(shape(act), shape(grad), rois, self.method)
            keep = has_roi.to(dice.dtype)
            loss = ((1.0 - dice) * keep).sum() / keep.sum().clamp_min(1.0)
        self.activation = None  # the graph is freed with the batch
        return self.weight * loss

    @staticmethod
    def forward_context() -> AbstractContextManager[None]:
        """The context of a training forward whose loss includes this term: attention (ViT, Swin)
        on SDPA's math backend, the one whose backward can itself be differentiated (the fused CPU
        and CUDA attention kernels have no double backward). No effect on models without attention."""
        return sdpa_kernel([SDPBackend.MATH])

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> ExplanationTerm:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
