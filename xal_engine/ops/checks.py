"""Argument checks of ``gradcam_dice``: run once per call, by the dispatcher or the public reference."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from torch import Tensor

from xal_engine.errors import XalError

CAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(activations: Tensor, gradients: Tensor, rois: Tensor | np.ndarray, threshold: float) -> Tensor:
    """Validate the arguments of ``gradcam_dice`` and return ``rois`` as a bool tensor.

    A numpy ROI array moves to the activations' device; a non-bool ROI counts non-zero as inside.
    Raises XalError naming the argument and what was expected.
    """
    for name, t in (("activations", activations), ("gradients", gradients)):
        if not isinstance(t, Tensor):
            raise XalError(f"{name}: expected a torch.Tensor (B, C, h, w), got {type(t).__name__}")
        if t.dim() != 4 or min(t.shape[1:]) < 1:
            raise XalError(f"{name}: expected shape (B, C, h, w) with C, h, w >= 1, got {tuple(t.shape)}")
        if t.dtype not in CAM_DTYPES:
            raise XalError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    if activations.shape != gradients.shape:
        raise XalError(
            f"gradients: shape {tuple(gradients.shape)} differs from activations {tuple(activations.shape)}"
        )
    if gradients.device != activations.device:
        raise XalError(f"gradients: on {gradients.device}, activations on {activations.device}")
    if isinstance(rois, np.ndarray):
        rois = torch.from_numpy(rois).to(activations.device)
    if not isinstance(rois, Tensor):
        raise XalError(f"rois: expected a tensor or numpy array (B, H, W), got {type(rois).__name__}")
    if rois.dim() != 3 or rois.shape[0] != activations.shape[0] or min(rois.shape[1:]) < 1:
        raise XalError(
            f"rois: expected shape (B={activations.shape[0]}, H, W) with H, W >= 1, got {tuple(rois.shape)}"
        )
    if rois.device != activations.device:
        raise XalError(f"rois: on {rois.device}, activations on {activations.device}")
    if rois.is_complex():
        raise XalError(f"rois: expected a bool mask, got {rois.dtype}")
    if not isinstance(threshold, Real) or not 0.0 <= float(threshold) <= 1.0:
        raise XalError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    return rois if rois.dtype == torch.bool else rois != 0
