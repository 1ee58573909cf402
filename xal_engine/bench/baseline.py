"""The baseline every benchmark level compares with: what a pytorch-grad-cam (1.5.7) user computes.

    postprocess(A, G, rois)     kernel level: its post-processing after the hooks (host copies, numpy
                                weights, ReLU, per-image min-max + cv2.resize + min-max), numpy metrics
    pipeline(cam, x, rois)      batch/pool level: the full ``GradCAM`` call (full backward, host copies,
                                cv2), then numpy softmax/entropy and ROI agreement
    roi_agreement(maps, rois)   numpy dice, soft dice, energy, hit; zero denominators give 0, as in
                                xal_engine.ops.reference
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam.utils.image import scale_cam_image


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den in float64, 0 where den == 0."""
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def roi_agreement(maps: np.ndarray, rois: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """dice, soft_dice, energy (B,) float64 and hit (B,) bool of maps S (B, H, W) vs bool rois (B, H, W)."""
    s = maps.reshape(len(maps), -1).astype(np.float64)  # [B, P]
    r = rois.reshape(len(maps), -1).astype(bool)  # [B, P]
    att = s >= threshold
    s_roi, s_sum, n_roi = (s * r).sum(1), s.sum(1), r.sum(1)
    hit = r[np.arange(len(r)), s.argmax(1)] & (s.max(1, initial=0.0) > 0) if len(r) else np.zeros(0, bool)
    return {"dice": _ratio(2 * (att & r).sum(1), att.sum(1) + n_roi), "soft_dice": _ratio(2 * s_roi, s_sum + n_roi),
            "energy": _ratio(s_roi, s_sum), "hit": hit}


def entropy(logits: np.ndarray) -> np.ndarray:
    """(B,) natural-log entropy of softmax(logits (B, K)), in numpy."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(1)


def postprocess(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's steps after its hooks, from (B, C, h, w) A, G and (B, H, W) rois."""
    a_np, g_np, r_np = a.float().cpu().numpy(), g.float().cpu().numpy(), rois.cpu().numpy()
    weights = np.mean(g_np, axis=(2, 3))  # GradCAM.get_cam_weights, [B, C]
    cam = np.maximum((weights[:, :, None, None] * a_np).sum(axis=1), 0)  # get_cam_image + ReLU, [B, h, w]
    maps = scale_cam_image(scale_cam_image(cam, (r_np.shape[2], r_np.shape[1])))  # min-max, cv2.resize, min-max
    return {"maps": maps, **roi_agreement(maps, r_np, threshold)}


def pipeline(cam, x: torch.Tensor, rois: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """What a user writes with ``pytorch_grad_cam.GradCAM`` ``cam``: maps of the predicted class, then
    numpy uncertainty and ROI agreement. ``maps`` (B, H, W) float32 and ``logits`` on the host."""
    maps = cam(input_tensor=x, targets=None)  # [B, H, W] float32 numpy
    logits = cam.outputs.detach().float().cpu().numpy()  # [B, K]
    return {"maps": maps, "logits": logits, "entropy": entropy(logits), **roi_agreement(maps, rois, threshold)}
