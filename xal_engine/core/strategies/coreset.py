"""``coreset``: k-center greedy on the run's embeddings (Sener & Savarese, 2018): each pick is the
candidate farthest from everything labelled or picked so far, so the batch covers the pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import CandidateSet
from xal_engine.core.strategies.embedded import (
    EmbeddingStrategy,
    back,
    coordinates,
    eligible_rows,
)

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Coreset(EmbeddingStrategy):
    name = "coreset"
    summary = "k-center greedy on embeddings, away from the labelled set (score --embeddings)"

    def choose(self, candidates: CandidateSet, config: SelectConfig, budget: int) -> np.ndarray:
        from xal_engine.core.diversity import kcenter_greedy  # torch, only when it runs

        rows = eligible_rows(candidates)
        x, centres = coordinates(candidates, rows, config)
        return back(rows, kcenter_greedy(x, min(budget, rows.size), centres))
