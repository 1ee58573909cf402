"""score_batch: one forward, a backward down to the target layer, then uncertainty and ROI agreement.

Per batch: logits → softmax probs → entropy / margin / least confidence; A, G of the target layer →
``gradcam_dice`` → Dice, soft Dice, energy, pointing-game hit. Everything stays on the model's device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from xal_engine.core.capture import LayerSpec, Targets, capture
from xal_engine.core.fields import FIELDS, BatchScores
from xal_engine.core.uncertainty import entropy, least_confidence, margin
from xal_engine.errors import XalError
from xal_engine.ops import gradcam_dice


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
    ``hit`` False; their uncertainty is computed as usual. An image whose logits are not all finite
    (NaN or inf pixels) gets ``pred`` -1 and no ROI metrics either; its probs and uncertainty are NaN. Under ``torch.autocast`` only the model
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

    # NaN or inf pixels give non-finite logits: no class and no Grad-CAM (NaN probs and uncertainty stay
    # as they are, so that the image is seen as not scored rather than as confident)
    finite = torch.isfinite(out.logits).all(dim=1)  # (B,)
    valid = valid & finite
    with torch.autocast(device.type, enabled=False):
        probs = torch.softmax(out.logits.float(), dim=1)  # (B, K)
        roi = gradcam_dice(act, grad, roi_mask.bool(), threshold=threshold, return_cam=return_cam,
                           backend=backend)
    values = {
        "probs": probs,
        "pred": out.logits.argmax(dim=1).masked_fill(~finite, -1),  # -1: the pred field's fill
        "entropy": entropy(probs),
        "margin": margin(probs),
        "least_confidence": least_confidence(probs),
        "dice": roi.dice,
        "soft_dice": roi.soft_dice,
        "energy": roi.energy,
        "hit": roi.hit,
    }
    for f in FIELDS:  # images without an ROI: NaN ROI metrics, no hit
        if f.needs_roi:
            values[f.name] = torch.where(valid, values[f.name], torch.full_like(values[f.name], f.fill))
    return BatchScores(cam=roi.cam, **values)
