"""Drop-ins for pytorch-grad-cam's CAM classes: same call, same maps, computed the fast way.

``GradCAM(model, target_layers)(input_tensor=x, targets=[ClassifierOutputTarget(c), …] | None)``
returns float32 numpy (B, H, W) equal to pytorch-grad-cam 1.5.7's output (to ~1e-6), from one
batched forward and one ``autograd.grad`` to the target layers (no parameter gradients, no host copy
until the result). ``GradCAMPlusPlus``, ``XGradCAM``, ``HiResCAM``, ``LayerCAM`` and ``EigenCAM`` do the
same for their method (``xal_engine.ops.cam_methods``; EigenCAM's sign convention is stated there).
Per layer l, as pytorch-grad-cam's ``base_cam.py`` does:

    N_l = minmax(relu(M_l))                   M_l the method's map; stage-1 min-max (reference)
    U_l = bilinear(N_l → H×W)                 half-pixel centres, like cv2.resize; no per-layer min-max
    S   = minmax(mean_l max(U_l, 0))          eps 1e-7; for one layer this is design.md's S

``reshape_transform`` follows pytorch-grad-cam's convention: it maps a target layer's output (e.g.
ViT tokens (B, T, D)) to (B, C, h, w); ``xal_engine.core.models.reshape_transform(arch)`` gives the
one for the transformer backbones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xal_engine.core.capture import CamCapture, GradCamCapture, LayerSpec, Targets
from xal_engine.errors import XalError
from xal_engine.ops import reference
from xal_engine.ops.cam_methods import CamMethod


def combine_layers(out: CamCapture, size: tuple[int, int], method: str | CamMethod = "gradcam") -> Tensor:
    """S (B, H, W) fp32 from the captured A, G of one or more layers, on the capture's device."""
    return reference.multi_layer_maps(out.activations, out.gradients, size, method)


def parse_targets(targets: Sequence[Any] | Targets, batch: int) -> Targets:
    """pytorch-grad-cam targets → engine targets: class indices where possible, else per-row callables.

    ``ClassifierOutputTarget(c)`` and ints become index c (raw logit, like the reference). Other
    callables take one logits row each, as in pytorch-grad-cam. One target per image is required:
    the reference silently zero-fills the maps of images left without one.
    """
    if targets is None or callable(targets) or isinstance(targets, (Tensor, np.ndarray)):
        return targets
    targets = list(targets)
    if len(targets) != batch:
        raise XalError(f"targets must give one target per image: got {len(targets)} for a batch of {batch}")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # Exact type only: other pytorch-grad-cam targets also have `.category` but score differently.
    index = [t.category if type(t) is ClassifierOutputTarget else t for t in targets]
    if all(isinstance(i, (int, np.integer)) for i in index):
        return [int(i) for i in index]
    return _per_row(targets)


def _per_row(targets: list[Any]) -> Callable[[Tensor], Tensor]:
    def scores(logits: Tensor) -> Tensor:  # generic targets: one Python call per image (not the fast path)
        return torch.stack([t(row) if callable(t) else row[int(t)] for t, row in zip(targets, logits)])

    return scores


class GradCAM:
    """``pytorch_grad_cam.GradCAM`` with the same call; the model's train/eval mode is left as found.

    Subclasses name another CAM method (``method``, a key of ``ops.cam_methods.CAM_METHODS``).
    """

    method = "gradcam"

    def __init__(self, model: nn.Module, target_layers: LayerSpec | Sequence[LayerSpec],
                 reshape_transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model = model
        single = isinstance(target_layers, (nn.Module, str))  # a bare layer, not a list of characters
        self.target_layers = [target_layers] if single else list(target_layers)
        self.reshape_transform = reshape_transform
        self._capture()  # checks the layers now, as the reference hooks them now

    def _capture(self) -> GradCamCapture:
        return GradCamCapture(self.model, self.target_layers, reshape_transform=self.reshape_transform)

    def maps(self, input_tensor: Tensor, targets: Sequence[Any] | Targets = None) -> Tensor:
        """S (B, H, W) fp32 as a tensor on the model's device (no host copy)."""
        if input_tensor.ndim != 4:
            raise XalError(f"input_tensor must have shape (B, C, H, W), got {tuple(input_tensor.shape)}")
        param = next(self.model.parameters(), None)
        if param is not None:
            input_tensor = input_tensor.to(param.device)
        with self._capture() as cap:
            out = cap(input_tensor, parse_targets(targets, input_tensor.shape[0]))
        return combine_layers(out, tuple(input_tensor.shape[-2:]), self.method)

    def __call__(self, input_tensor: Tensor, targets: Sequence[Any] | Targets = None,
                 aug_smooth: bool = False, eigen_smooth: bool = False) -> np.ndarray:
        """float32 numpy (B, H, W), like the reference."""
        if aug_smooth or eigen_smooth:
            raise XalError(f"aug_smooth and eigen_smooth are not supported by xal_engine.core.compat."
                           f"{type(self).__name__}")
        return self.maps(input_tensor, targets).cpu().numpy()

    def __enter__(self) -> GradCAM:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None  # hooks live only during a call: nothing to release


class GradCAMPlusPlus(GradCAM):
    """``pytorch_grad_cam.GradCAMPlusPlus``."""

    method = "gradcam++"


class XGradCAM(GradCAM):
    """``pytorch_grad_cam.XGradCAM``."""

    method = "xgradcam"


class HiResCAM(GradCAM):
    """``pytorch_grad_cam.HiResCAM``."""

    method = "hirescam"


class LayerCAM(GradCAM):
    """``pytorch_grad_cam.LayerCAM``."""

    method = "layercam"


class EigenCAM(GradCAM):
    """``pytorch_grad_cam.EigenCAM``: first principal component of A, sign as in ``ops.cam_methods``.

    Targets are accepted (and ignored by the map), as in the reference.
    """

    method = "eigencam"


COMPAT_CLASSES: dict[str, type[GradCAM]] = {
    cls.method: cls for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM)
}
