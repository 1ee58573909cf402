"""``random``: a seeded permutation, the baseline every strategy must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Random(Strategy):
    name = "random"
    summary = "a seeded random order (--seed)"

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        n = scores.entropy.shape[0]
        return np.random.default_rng(config.seed).random(n), np.ones(n, dtype=bool)
