"""``misalignment``: 1 - Dice(CAM, ROI) ∈ [0, 1], where the model looks away from the expert's region."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.core.strategies.terms import misalignment, normalise, with_missing_roi_rule

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Misalignment(Strategy):
    name = "misalignment"
    summary = "1 - Dice(Grad-CAM, ROI) (--dice hard|soft)"
    needs = ("entropy", "dice", "soft_dice")
    needs_roi = True

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        term, has_roi = misalignment(scores, config)
        return with_missing_roi_rule(normalise(term, config.normalise), has_roi, scores, config)
