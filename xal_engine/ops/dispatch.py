"""``gradcam_dice``: one entry point that picks the fused Triton kernel or the pure-torch reference.

Both backends have the semantics documented in :mod:`xal_engine.ops.reference`; ``"auto"`` takes the
kernel for CUDA tensors whose feature map fits it (``MAX_FEATURE_PIXELS`` of the kernel module) and
the reference elsewhere (on CPU tensors its cache-blocked form, :mod:`xal_engine.ops.cpu_agreement`,
equal bit for bit).

Volumes: 5-D activations/gradients (B, C, d, h, w) with 4-D ROIs (B, D, H, W) take the 3-D kernel
(``xal_engine.kernels.gradcam_dice_3d``, feature volumes up to its ``MAX_FEATURE_VOXELS``) on CUDA
and the 3-D reference (:mod:`xal_engine.ops.reference3d`) elsewhere; the 2-D path is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch import Tensor

from xal_engine.errors import XalError
from xal_engine.ops import reference, reference3d
from xal_engine.ops.agreement import RoiAgreement
from xal_engine.ops.cam_methods import CamMethod, get_cam_method
from xal_engine.ops.checks import check_inputs
from xal_engine.ops.cpu_agreement import gradcam_dice_cpu

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def pick_backend(backend: str, activations: Tensor) -> str:
    """"triton" or "torch" for ``backend`` and the activations' device and feature-map size."""
    if backend not in BACKENDS:
        raise XalError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if not activations.is_cuda or activations.dim() not in (4, 5):
        return "torch"
    if activations.dim() == 5:
        from xal_engine.kernels.gradcam_dice_3d import MAX_FEATURE_VOXELS

        return "triton" if math.prod(activations.shape[2:]) <= MAX_FEATURE_VOXELS else "torch"
    from xal_engine.kernels.gradcam_dice import MAX_FEATURE_PIXELS

    return "triton" if activations.shape[2] * activations.shape[3] <= MAX_FEATURE_PIXELS else "torch"


def gradcam_dice(
    activations: Tensor,
    gradients: Tensor,
    rois: Tensor | np.ndarray,
    threshold: float = 0.5,
    return_cam: bool = False,
    backend: Backend = "auto",
    *,
    method: str | CamMethod = "gradcam",
) -> RoiAgreement:
    """Grad-CAM of (B, C, h, w) activations/gradients vs (B, H, W) ROIs: dice, soft_dice, energy, hit.

    Volumes: (B, C, d, h, w) activations/gradients vs (B, D, H, W) ROIs, trilinear upsampling, the
    same values (:mod:`xal_engine.ops.reference3d`); ``cam`` is then N (B, d, h, w).
    fp32/fp16/bf16 inputs, fp32 arithmetic; ``cam`` is the stage-1 map N (B, h, w) when
    ``return_cam``. ``method`` names the CAM method (``xal_engine.ops.cam_methods.CAM_METHODS``;
    the default ``gradcam`` is Grad-CAM). Non-finite A or G give NaN values and hit False for that
    image. Raises XalError for bad shapes, dtypes, devices, threshold, backend or method
    (``"triton"`` on CPU tensors needs TRITON_INTERPRET=1 set before import).
    """
    cam_method = get_cam_method(method)
    rois = check_inputs(activations, gradients, rois, threshold, spatial_dims=(2, 3))  # the only check
    if activations.dim() == 5:
        if pick_backend(backend, activations) == "torch":
            return reference3d.gradcam_dice_3d_checked(activations, gradients, rois, threshold, return_cam,
                                                       method=cam_method)
        return triton_backend_3d(activations, gradients, rois, threshold, return_cam, method=cam_method)
    if pick_backend(backend, activations) == "torch":
        if activations.device.type == "cpu":  # the reference's numbers, cache-blocked (cpu_agreement)
            return gradcam_dice_cpu(activations, gradients, rois, threshold, return_cam, method=cam_method)
        return reference.gradcam_dice_checked(activations, gradients, rois, threshold, return_cam,
                                              method=cam_method)
    return triton_backend(activations, gradients, rois, threshold, return_cam, method=cam_method)


def gradcam_dice_layers(
    activations: Sequence[Tensor],
    gradients: Sequence[Tensor],
    rois: Tensor | np.ndarray,
    threshold: float = 0.5,
    backend: Backend = "auto",
    *,
    method: str | CamMethod = "gradcam",
) -> RoiAgreement:
    """``gradcam_dice`` of several target layers' A, G (B, C_l, h_l, w_l) (2-D; any C_l, h_l, w_l)
    against (B, H, W) ROIs, the layers combined as pytorch-grad-cam combines them
    (:func:`xal_engine.ops.reference.multi_layer_maps`): per layer N_l, U = mean_l bilinear(N_l),
    S = min-max(U); ``cam`` is None. One layer is ``gradcam_dice`` itself. ``"auto"`` takes the
    kernel's one launch (``gradcam_dice_layers_triton``) for CUDA tensors of at most ``MAX_LAYERS``
    layers whose maps fit it, the reference elsewhere.
    """
    cam_method = get_cam_method(method)
    activations, gradients = list(activations), list(gradients)
    if not activations or len(activations) != len(gradients):
        raise XalError(f"gradients: expected one per layer's activations (>= 1 layer), got {len(gradients)} "
                       f"for {len(activations)}")
    first = activations[0]
    for i, a in enumerate(activations[1:], 1):
        if isinstance(a, Tensor) and isinstance(first, Tensor) and (a.shape[0] != first.shape[0]
                                                                    or a.device != first.device):
            raise XalError(f"activations[{i}]: expected {first.shape[0]} images on {first.device}, got "
                           f"{a.shape[0]} on {a.device}")
    checked = [check_inputs(activations[0], gradients[0], rois, threshold)]  # rois as a bool tensor once
    checked += [check_inputs(a, g, checked[0], threshold) for a, g in zip(activations[1:], gradients[1:])]
    if len(activations) == 1:
        return gradcam_dice(activations[0], gradients[0], checked[0], threshold, False, backend, method=cam_method)
    from xal_engine.kernels.gradcam_dice import MAX_LAYERS

    kernel = {pick_backend(backend, a) for a in activations} == {"triton"}  # each layer's map fits it
    if not kernel or (backend == "auto" and len(activations) > MAX_LAYERS):
        return reference.gradcam_dice_layers_checked(activations, gradients, checked[0], threshold,
                                                     method=cam_method)
    from xal_engine.kernels.gradcam_dice import gradcam_dice_layers_triton

    low_res = [cam_method.cam(a, g).float().contiguous() for a, g in zip(activations, gradients)]  # pre-ReLU M_l
    return gradcam_dice_layers_triton(low_res, checked[0], threshold)


def triton_backend(activations: Tensor, gradients: Tensor, rois: Tensor, threshold: float = 0.5,
                   return_cam: bool = False, *, method: str | CamMethod = "gradcam",
                   out: RoiAgreement | None = None) -> RoiAgreement:
    """The kernel path of ``gradcam_dice`` on checked inputs (rois a bool tensor on A's device).

    The method's part runs in torch before the one launch: channel weights w (B, C), which the
    kernel contracts with A, or the pre-ReLU map M (B, h, w), which the kernel reads instead of A.
    ``out``: preallocated result buffers, as ``gradcam_dice_triton`` takes them.
    """
    from xal_engine.kernels.gradcam_dice import gradcam_dice_triton

    cam_method = get_cam_method(method)
    if cam_method.weights is not None:
        weights = cam_method.weights(activations, gradients).float()  # [B, C]
        return gradcam_dice_triton(activations, rois, threshold, return_cam, weights=weights, out=out)
    low_res = cam_method.cam(activations, gradients).float().contiguous()  # [B, h, w], pre-ReLU
    return gradcam_dice_triton(None, rois, threshold, return_cam, low_res=low_res, out=out)


def triton_backend_3d(activations: Tensor, gradients: Tensor, rois: Tensor, threshold: float = 0.5,
                      return_cam: bool = False, *, method: str | CamMethod = "gradcam",
                      out: RoiAgreement | None = None) -> RoiAgreement:
    """The 3-D kernel path on checked volumes: A, G (B, C, d, h, w), rois bool (B, D, H, W) on A's device.

    As ``triton_backend``: the method's part in torch (weights w (B, C) or the pre-ReLU map
    M (B, d, h, w), over the volume as ``reference3d`` defines them), then the one launch.
    """
    from xal_engine.kernels.gradcam_dice_3d import gradcam_dice_3d_triton

    cam_method = get_cam_method(method)
    if cam_method.weights is not None:
        weights = reference3d.method_weights_3d(activations, gradients, cam_method).float()  # [B, C]
        return gradcam_dice_3d_triton(activations, rois, threshold, return_cam, weights=weights, out=out)
    low_res = reference3d.cam_3d(activations, gradients, cam_method).float().contiguous()  # [B, d, h, w]
    return gradcam_dice_3d_triton(None, rois, threshold, return_cam, low_res=low_res, out=out)


__all__ = ["BACKENDS", "Backend", "RoiAgreement", "gradcam_dice", "gradcam_dice_layers", "pick_backend",
           "triton_backend", "triton_backend_3d"]
