"""score_batch: one forward, a backward down to the target layer, then uncertainty and ROI agreement.

Per batch: logits → softmax probs → entropy / margin / least confidence; A, G of the target layer →
``gradcam_dice`` → Dice, soft Dice, energy, pointing-game hit. Everything stays on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from xal_engine.core.capture import LayerSpec, Targets, capture
from xal_engine.core.uncertainty import entropy, least_confidence, margin
from xal_engine.errors import XalError
from xal_engine.ops import gradcam_dice


@dataclass(frozen=True)
class BatchScores:
    """Per-image results of one batch, on the model's device. ROI metrics are NaN where no ROI exists."""

    probs: Tensor  # (B, K) fp32 softmax of the logits
    pred: Tensor  # (B,) int64 argmax of the logits
    entropy: Tensor  # (B,) fp32, nats
    margin: Tensor  # (B,) fp32
    least_confidence: Tensor  # (B,) fp32
    dice: Tensor  # (B,) fp32
    soft_dice: Tensor  # (B,) fp32
    energy: Tensor  # (B,) fp32
    hit: Tensor  # (B,) bool
    cam: Tensor | None = None  # (B, h, w) fp32 normalised low-resolution map N, when asked for


def _as_device_tensor(x: Tensor | np.ndarray, device: torch.device, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise XalError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    return x.to(device, non_blocking=True)


def score_batch(
    model: nn.Module,
    target_layer: LayerSpec,
    images: Tensor,
    rois: Tensor | np.ndarray | None = None,
    targets: Targets = None,
    threshold: float = 0.5,
    has_roi: Tensor | np.ndarray | None = None,
    return_cam: bool = False,
    backend: str = "auto",
) -> BatchScores:
    """Scores of ``images`` (B, C, H, W); ``rois`` (B, H', W') bool at any resolution, or None.

    ``targets`` picks the Grad-CAM class per image (see :func:`xal_engine.core.capture.target_scores`).
    Images without an ROI (``rois`` None, or ``has_roi`` False) get NaN dice/soft_dice/energy and
    ``hit`` False; their uncertainty is computed as usual. Under ``torch.autocast`` only the model
    runs in reduced precision; the scores are computed in fp32.
    """
    batch = images.shape[0]
    out = capture(model, target_layer, images, targets)
    act, grad = out.activations[0], out.gradients[0]
    device = act.device
    if rois is None:
        # A stand-in empty ROI at feature resolution (cheap) still yields the map; metrics become NaN.
        roi_mask = torch.zeros((batch, *act.shape[-2:]), dtype=torch.bool, device=device)
        valid = torch.zeros(batch, dtype=torch.bool, device=device)
    else:
        roi_mask = _as_device_tensor(rois, device, "rois")
        if roi_mask.ndim != 3 or roi_mask.shape[0] != batch:
            raise XalError(f"rois must have shape ({batch}, H, W), got {tuple(roi_mask.shape)}")
        valid = torch.ones(batch, dtype=torch.bool, device=device)
    if has_roi is not None:
        flags = _as_device_tensor(has_roi, device, "has_roi")
        if tuple(flags.shape) != (batch,):
            raise XalError(f"has_roi must have shape ({batch},), got {tuple(flags.shape)}")
        valid = valid & flags.bool()

    with torch.autocast(device.type, enabled=False):
        probs = torch.softmax(out.logits.float(), dim=1)  # (B, K)
        roi = gradcam_dice(act, grad, roi_mask.bool(), threshold=threshold, return_cam=return_cam,
                           backend=backend)
    nan = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
    return BatchScores(
        probs=probs,
        pred=out.logits.argmax(dim=1),
        entropy=entropy(probs),
        margin=margin(probs),
        least_confidence=least_confidence(probs),
        dice=torch.where(valid, roi.dice, nan),
        soft_dice=torch.where(valid, roi.soft_dice, nan),
        energy=torch.where(valid, roi.energy, nan),
        hit=roi.hit & valid,
        cam=roi.cam,
    )
