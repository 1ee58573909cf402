"""``gradcam_dice``: one entry point that picks the fused Triton kernel or the pure-torch reference.

Both backends have the semantics documented in :mod:`xal_engine.ops.reference`; ``"auto"`` takes the
kernel for CUDA tensors whose feature map fits it (``MAX_FEATURE_PIXELS`` of the kernel module) and
the reference elsewhere.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops import reference
from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.checks import check_inputs

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def pick_backend(backend: str, activations: Tensor) -> str:
    """"triton" or "torch" for ``backend`` and the activations' device and feature-map size."""
    if backend not in BACKENDS:
        raise XalError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if not activations.is_cuda or activations.dim() != 4:
        return "torch"
    from xal_engine.kernels.gradcam_dice import MAX_FEATURE_PIXELS

    return "triton" if activations.shape[2] * activations.shape[3] <= MAX_FEATURE_PIXELS else "torch"


def gradcam_dice(
    activations: Tensor,
    gradients: Tensor,
    rois: Tensor | np.ndarray,
    threshold: float = 0.5,
    return_cam: bool = False,
    backend: Backend = "auto",
) -> RoiAgreement:
    """Grad-CAM of (B, C, h, w) activations/gradients vs (B, H, W) ROIs: dice, soft_dice, energy, hit.

    fp32/fp16/bf16 inputs, fp32 arithmetic; ``cam`` is the stage-1 map N (B, h, w) when
    ``return_cam``. Non-finite A or G give NaN values and hit False for that image. Raises XalError
    for bad shapes, dtypes, devices, threshold or backend (``"triton"`` on CPU tensors needs
    TRITON_INTERPRET=1 set before import).
    """
    rois = check_inputs(activations, gradients, rois, threshold)  # the only check of this call
    if pick_backend(backend, activations) == "torch":
        return reference.gradcam_dice_checked(activations, gradients, rois, threshold, return_cam)
    from xal_engine.kernels.gradcam_dice import gradcam_dice_triton

    return gradcam_dice_triton(activations, gradients, rois, threshold, return_cam)


__all__ = ["BACKENDS", "Backend", "RoiAgreement", "gradcam_dice", "pick_backend"]
