"""``badge``: k-means++ seeding on gradient embeddings (Ash et al., 2020): g = (p - e_ŷ) ⊗ h, the
last layer's loss gradient at the predicted label, large for uncertain images and spread by k-means++
over diverse ones. Computed from the run's probabilities and embeddings, with no backward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import CandidateSet
from xal_engine.core.strategies.embedded import EmbeddingStrategy, as_tensor, back, coordinates, eligible_rows

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


class Badge(EmbeddingStrategy):
    name = "badge"
    summary = "k-means++ on gradient embeddings (p - onehot) ⊗ h (score --embeddings)"
    needs = ("entropy", "probs", "embedding")

    def choose(self, candidates: CandidateSet, config: SelectConfig, budget: int) -> np.ndarray:
        from xal_engine.core.diversity import badge  # torch, only when it runs

        rows = eligible_rows(candidates)
        probs = as_tensor(candidates.scores.probs[rows].astype(np.float32), config)
        h, _ = coordinates(candidates, rows, config, centre=False)  # inner products kept
        return back(rows, badge(probs, h, min(budget, rows.size), seed=config.seed))
