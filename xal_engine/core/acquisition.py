"""Acquisition: which unlabelled images an expert should label next.

Every strategy (one file each under :mod:`xal_engine.core.strategies`, known by name through its
registry) turns a scoring run's per-image numbers into one score per candidate, higher = label
first; :func:`select` is the one ranking function (the shape of baal's heuristics). Per-image
strategies are ranked top-k, class-balanced as configured; batch-aware ones choose the batch
themselves from the whole candidate set and the budget.

    entropy        U = -Σ_k p_k ln p_k                      ∈ [0, ln K]
    margin         -(p_top1 - p_top2)                       small margin first
    least-conf.    1 - p_max
    misalignment   1 - Dice(CAM, ROI)                       ∈ [0, 1]
    dual           λ·U + (1 - λ)·(1 - Dice)                 the paper's criterion (λ = 0.3)
    random         a seeded permutation

Images without an ROI have NaN Dice; the ``missing_roi`` rule (:mod:`.strategies.terms`) decides
their attention term, so that NaN never decides a ranking. Images the model gave no finite output
(NaN or inf pixels: NaN entropy, ``pred`` -1) and any image whose score is not finite are not
eligible: they are never selected, whatever the normalisation, and the normalisations are computed
over the finite values alone (a NaN neither sets the min-max range nor takes a rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xal_engine.core import strategies as _strategies
from xal_engine.core.strategies import CandidateSet, RunScores
from xal_engine.core.strategies.terms import misalignment, normalise
from xal_engine.errors import XalError

__all__ = ["BALANCES", "MISSING_ROI_RULES", "NORMALISATIONS", "ROI_STRATEGIES", "STRATEGIES", "RunScores",
           "SelectConfig", "Selection", "compute_score", "misalignment", "normalise", "select"]

STRATEGIES = _strategies.STRATEGIES
ROI_STRATEGIES = tuple(name for name, s in _strategies.REGISTRY.items() if s.needs_roi)
NORMALISATIONS = ("none", "minmax", "rank")
BALANCES = ("predicted", "none", "oracle")
MISSING_ROI_RULES = ("mean", "last", "skip")


@dataclass(frozen=True)
class SelectConfig:
    strategy: str = "dual"
    budget: int = 100
    lam: float = 0.3  # weight of the uncertainty term in `dual`
    dice: str = "hard"  # "hard" (thresholded) or "soft"
    normalise: str = "none"  # per term, over the candidates, before `dual` combines them
    balance: str = "predicted"  # class balance by predicted class; "oracle" uses TRUE labels
    missing_roi: str = "mean"
    seed: int = 0
    device: str = "auto"  # where batch-aware strategies compute (CUDA when available)

    def __post_init__(self) -> None:
        _check_choice("--strategy", self.strategy, STRATEGIES)
        _check_choice("--dice", self.dice, ("hard", "soft"))
        _check_choice("--normalise", self.normalise, NORMALISATIONS)
        _check_choice("--balance", self.balance, BALANCES)
        _check_choice("--missing-roi", self.missing_roi, MISSING_ROI_RULES)
        if self.budget < 1:
            raise XalError(f"--budget must be at least 1, got {self.budget}")
        if not 0.0 <= self.lam <= 1.0:
            raise XalError(f"--lambda must lie in [0, 1], got {self.lam}")


@dataclass(frozen=True)
class Selection:
    order: np.ndarray  # [budget] positions into the candidate arrays, best first
    score: np.ndarray  # [n] acquisition score of every candidate (-inf where not eligible)
    eligible: np.ndarray  # [n] bool


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise XalError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def compute_score(scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """The acquisition score [n] (higher = label first) and the eligibility mask [n]: an image is
    eligible when the model's output for it is finite (its entropy) and so is its score."""
    score, eligible = _strategies.get(config.strategy).score(scores, config)
    return score, eligible & np.isfinite(score) & np.isfinite(scores.entropy)


def select(scores: RunScores, config: SelectConfig, labels: np.ndarray | None = None,
           labelled_embedding: np.ndarray | None = None) -> Selection:
    """Top-`budget` candidates by acquisition score, class-balanced as configured; a batch-aware
    strategy chooses the batch itself (``labelled_embedding``: (m, D) embeddings of the images
    already labelled, for strategies that spread the batch away from them).

    `balance="predicted"` fills the batch round-robin over predicted classes (best remaining of each
    class in turn, classes visited in the order of their best score); a class that runs out leaves
    its turns to the others. `balance="oracle"` does the same with TRUE labels (`labels`), as the
    paper's code does: it leaks the labels the batch is meant to discover, so it is never a default.
    Ties are broken by candidate position (stable).
    """
    score, eligible = compute_score(scores, config)
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        raise XalError("no candidate image is eligible for selection")
    budget = min(config.budget, n_eligible)
    score = np.where(eligible, score, -np.inf)
    strategy = _strategies.get(config.strategy)
    if strategy.batch_aware:
        chosen = strategy.choose(CandidateSet(scores, score, eligible, labelled_embedding), config, budget)
        return Selection(order=np.asarray(chosen, dtype=np.int64), score=score, eligible=eligible)
    order = np.argsort(-score, kind="stable")[:n_eligible]  # eligible candidates, best first
    if config.balance == "none":
        return Selection(order=order[:budget], score=score, eligible=eligible)
    if config.balance == "oracle":
        if labels is None or (labels[order] < 0).any():
            raise XalError("--balance oracle needs known labels for every candidate image")
        groups = labels[order]
    else:
        groups = scores.pred[order]
    return Selection(order=_round_robin(order, groups, budget), score=score, eligible=eligible)


def _round_robin(order: np.ndarray, groups: np.ndarray, budget: int) -> np.ndarray:
    """Interleave the per-group rankings: 1st of each group, then 2nd of each, …, first `budget`."""
    # position of each candidate within its own group's ranking (0 = that group's best)
    within = np.zeros(order.size, dtype=np.int64)
    for g in np.unique(groups):  # loop over classes (K), not images
        idx = np.flatnonzero(groups == g)
        within[idx] = np.arange(idx.size)
    # sort by (round, overall position): each round takes every group's next best in score order
    interleaved = np.lexsort((np.arange(order.size), within))
    return order[interleaved[:budget]]
