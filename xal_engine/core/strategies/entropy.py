"""``entropy``: U = -Σ_k p_k ln p_k ∈ [0, ln K], the model's predictive uncertainty."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.core.strategies.terms import normalise

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Entropy(Strategy):
    name = "entropy"
    summary = "softmax entropy -Σ p ln p"

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        return normalise(scores.entropy, config.normalise), np.ones(scores.entropy.shape[0], dtype=bool)
