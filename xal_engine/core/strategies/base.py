"""What a strategy is: a per-image score and, for batch-aware strategies, the choice of a whole batch.

The shape of baal's heuristics: one scoring hook per strategy, one ranking function
(:func:`xal_engine.core.acquisition.select`). A per-image strategy only scores; the ranking function
takes the top of the scores (class-balanced as configured). A batch-aware strategy (``batch_aware``)
also sees the whole candidate set and the budget and returns the batch itself, e.g. to spread it
over embedding space; class balance does not apply to it.

Scores are higher = label first. An image whose score is not finite, or whose model output was not
finite (NaN entropy), is not eligible and is never selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from xal_engine.core.fields import PerImage

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig

# Per-candidate numbers of a scoring run (numpy, one row per candidate): any subset of the result
# fields of xal_engine.core.fields, e.g. RunScores(entropy=..., dice=..., pred=...).
RunScores = PerImage[np.ndarray]


@dataclass(frozen=True)
class CandidateSet:
    """What a batch-aware strategy chooses from."""

    scores: RunScores  # the candidates' fields (n rows), every field the strategy `needs`
    score: np.ndarray  # (n,) float64: the strategy's per-image score, -inf where not eligible
    eligible: np.ndarray  # (n,) bool
    labelled_embedding: np.ndarray | None = None  # (m, D): train images the experiment already has

    @property
    def n(self) -> int:
        return int(self.eligible.size)


class Strategy:
    """One acquisition strategy. Subclasses set the class attributes and override :meth:`score`
    (and :meth:`choose` when ``batch_aware``); a registry line in :mod:`.` makes it known."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help: the math
    needs: ClassVar[tuple[str, ...]] = ("entropy",)  # result fields it reads beyond the required ones
    needs_roi: ClassVar[bool] = False  # it ranks by ROI agreement (Dice)
    batch_aware: ClassVar[bool] = False
    how: ClassVar[str] = ""  # how to make a run that stores the optional fields it needs

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        """(score (n,), eligible (n,) bool) for every candidate; higher = label first."""
        raise NotImplementedError

    def choose(self, candidates: CandidateSet, config: SelectConfig, budget: int) -> np.ndarray:
        """(budget,) int64 positions into the candidates, in the order they were chosen; only eligible
        ones. Called for batch-aware strategies only."""
        raise NotImplementedError
