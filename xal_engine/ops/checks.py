"""Argument checks of ``gradcam_dice``: run once per call, by the dispatcher or the public reference."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from torch import Tensor

from xal_engine.errors import XalError

CAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


LAYOUTS = {2: "(B, C, h, w)", 3: "(B, C, d, h, w)"}  # activations/gradients of images, of volumes


def check_inputs(activations: Tensor, gradients: Tensor, rois: Tensor | np.ndarray, threshold: float,
                 *, spatial_dims: tuple[int, ...] = (2,)) -> Tensor:
    """Validate the arguments of ``gradcam_dice`` and return ``rois`` as a bool tensor.

    ``spatial_dims``: what the caller computes: 2 = images, A and G (B, C, h, w) with rois (B, H, W)
    (the default: the 2-D reference); 3 = volumes, A and G (B, C, d, h, w) with rois (B, D, H, W).

    A numpy ROI array moves to the activations' device; a non-bool ROI counts non-zero as inside.
    Raises XalError naming the argument and what was expected.
    """
    for name, t in (("activations", activations), ("gradients", gradients)):
        if not isinstance(t, Tensor):
            layouts = " or ".join(LAYOUTS[n] for n in spatial_dims)
            raise XalError(f"{name}: expected a torch.Tensor {layouts}, got {type(t).__name__}")
        if t.dim() - 2 not in spatial_dims or min(t.shape[1:]) < 1:
            expected = " or ".join(f"{LAYOUTS[n]} with {LAYOUTS[n][4:-1]} >= 1" for n in spatial_dims)
            raise XalError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
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
        kind = "(B, D, H, W)" if activations.dim() == 5 else "(B, H, W)"
        raise XalError(f"rois: expected a tensor or numpy array {kind}, got {type(rois).__name__}")
    if rois.dim() != activations.dim() - 1 or rois.shape[0] != activations.shape[0] or min(rois.shape[1:]) < 1:
        if activations.dim() == 5:  # volumes: (B, C, d, h, w) activations want (B, D, H, W) ROIs
            raise XalError(f"rois: expected shape (B={activations.shape[0]}, D, H, W) with D, H, W >= 1 for "
                           f"5-D activations, got {tuple(rois.shape)}")
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
