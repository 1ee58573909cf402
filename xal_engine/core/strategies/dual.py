"""``dual``: λ·U + (1 - λ)·(1 - Dice), the paper's criterion (λ = 0.3): unsure AND looking at the wrong
place. U is the softmax entropy; both terms normalised alike (--normalise) before they combine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.core.strategies.terms import misalignment, normalise, with_missing_roi_rule

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


def dual_score(scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(λ·U + (1 - λ)·(1 - Dice) (n,), eligible (n,)) with the missing-ROI rule applied."""
    term, has_roi = misalignment(scores, config)
    u = normalise(scores.entropy, config.normalise)
    score = config.lam * u + (1.0 - config.lam) * normalise(term, config.normalise)
    return with_missing_roi_rule(score, has_roi, scores, config)


class Dual(Strategy):
    name = "dual"
    summary = "λ·entropy + (1 - λ)·(1 - Dice) (--lambda, default 0.3)"
    needs = ("entropy", "dice", "soft_dice")
    needs_roi = True

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        return dual_score(scores, config)
