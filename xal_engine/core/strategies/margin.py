"""``margin``: -(p_top1 - p_top2), the smallest margin between the two likeliest classes first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.core.strategies.terms import normalise

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Margin(Strategy):
    name = "margin"
    summary = "smallest top-1 minus top-2 probability first"
    needs = ("entropy", "margin")

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        return normalise(-scores.margin, config.normalise), np.ones(scores.margin.shape[0], dtype=bool)
