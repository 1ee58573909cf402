"""``dual-diverse``: the dual score's best candidates, spread over embedding space.

    T = the top min(POOL_FACTOR · B, e) eligible candidates by the dual score s = λ·U + (1 - λ)·(1 - Dice)
    w_i = rank of s_i within T / |T|  ∈ (0, 1]     (the best candidate has weight 1)
    batch = weighted k-means++ on T's embeddings: first the best, then P(i) ∝ w_i · D²_i

with D²_i the squared distance to the candidates picked so far. Near-duplicates of a pick have
D² ≈ 0 and are not drawn again, so the batch is not B copies of one failure mode; among candidates far
from the batch the higher dual score is likelier. Ranks make the weights independent of the score's
scale and of --normalise. Only T enters the k-means++ passes, so the cost beyond the dual score is one
partial sort of the candidates plus B passes over POOL_FACTOR · B embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import CandidateSet, RunScores, Strategy
from xal_engine.core.strategies.dual import dual_score
from xal_engine.core.strategies.embedded import EMBEDDINGS_HOW, as_tensor, back, eligible_rows

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig

POOL_FACTOR = 10  # candidates considered per batch slot


class DualDiverse(Strategy):
    name = "dual-diverse"
    summary = (f"dual's top {POOL_FACTOR}×budget spread by score-weighted k-means++ on embeddings "
               "(score --embeddings)")
    needs = ("entropy", "dice", "soft_dice", "embedding")
    needs_roi = True
    batch_aware = True
    how = EMBEDDINGS_HOW

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        score, eligible = dual_score(scores, config)
        return score, eligible & np.isfinite(scores.embedding).all(axis=1)

    def choose(self, candidates: CandidateSet, config: SelectConfig, budget: int) -> np.ndarray:
        from xal_engine.core.diversity import weighted_kmeanspp  # torch, only when it runs

        rows = eligible_rows(candidates)
        budget = min(budget, rows.size)
        size = min(POOL_FACTOR * budget, rows.size)
        s = candidates.score[rows]
        top = np.argpartition(-s, size - 1)[:size] if size < rows.size else np.arange(rows.size)
        top = top[np.argsort(-s[top], kind="stable")]  # best first; ties by candidate position
        weight = (size - np.arange(size)) / size  # rank weights: 1 for the best, 1/size for the last
        x = as_tensor(candidates.scores.embedding[rows[top]], config)
        picks = weighted_kmeanspp(x, as_tensor(weight.astype(np.float32), config), budget, seed=config.seed)
        return back(rows[top], picks)
