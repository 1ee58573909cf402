"""``least-confidence``: 1 - p_max."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.core.strategies.terms import normalise

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class LeastConfidence(Strategy):
    name = "least-confidence"
    summary = "1 - top-1 probability"
    needs = ("entropy", "least_confidence")

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        return (normalise(scores.least_confidence, config.normalise),
                np.ones(scores.least_confidence.shape[0], dtype=bool))
