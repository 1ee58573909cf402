"""The result type of ``gradcam_dice``, shared by the reference, the dispatcher and the Triton kernel."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class RoiAgreement(NamedTuple):
    """Per-image agreement of the Grad-CAM map with the ROI; ``cam`` is N (B, h, w) on request."""

    dice: Tensor  # (B,) float32
    soft_dice: Tensor  # (B,) float32
    energy: Tensor  # (B,) float32
    hit: Tensor  # (B,) bool
    cam: Tensor | None  # (B, h, w) float32, stage-1 normalised map N
