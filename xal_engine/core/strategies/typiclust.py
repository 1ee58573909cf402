"""``typiclust``: the most typical image of each of the largest clusters not yet labelled (Hacohen et al.,
2022): a label-free choice for cold start (``loop --initial-strategy typiclust``) or a batch that
covers the pool's dense regions. Needs only embeddings, from any model (score --embeddings)."""

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


class TypiClust(EmbeddingStrategy):
    name = "typiclust"
    summary = "the most typical image of each largest uncovered k-means cluster (score --embeddings)"

    def choose(self, candidates: CandidateSet, config: SelectConfig, budget: int) -> np.ndarray:
        from xal_engine.core.diversity import typiclust  # torch, only when it runs

        rows = eligible_rows(candidates)
        x, centres = coordinates(candidates, rows, config)
        picks = typiclust(x, min(budget, rows.size), centres, seed=config.seed)
        return back(rows, picks)
