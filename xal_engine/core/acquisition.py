"""Acquisition: which unlabelled images an expert should label next.

Every strategy turns a scoring run's per-image numbers into one score per candidate, higher = label
first (the shape of baal's heuristics: one ``compute_score`` per strategy, one ranking function).

    entropy        U = -Σ_k p_k ln p_k                      ∈ [0, ln K]
    margin         -(p_top1 - p_top2)                       small margin first
    least-conf.    1 - p_max
    misalignment   1 - Dice(CAM, ROI)                       ∈ [0, 1]
    dual           λ·U + (1 - λ)·(1 - Dice)                 the paper's criterion (λ = 0.3)
    random         a seeded permutation

Images without an ROI have NaN Dice. The rule (``missing_roi``) decides what the attention term is
for them, so that NaN never decides a ranking:
    mean   (default) 1 - Dice := the mean of 1 - Dice over candidates that have an ROI: neutral, the
           image competes on its uncertainty alone;
    last   they rank after every image with an ROI, among themselves by uncertainty (entropy);
    skip   they are not candidates.

Images the model gave no finite output (NaN or inf pixels: NaN entropy, ``pred`` -1) and any image
whose score is not finite are not eligible: they are never selected, whatever the normalisation, and
the normalisations are computed over the finite values alone (a NaN neither sets the min-max range nor
takes a rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xal_engine.core.fields import PerImage
from xal_engine.errors import XalError

STRATEGIES = ("random", "entropy", "margin", "least-confidence", "misalignment", "dual")
ROI_STRATEGIES = ("misalignment", "dual")
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


# Per-candidate numbers of a scoring run (numpy, one row per candidate): any subset of the result
# fields of xal_engine.core.fields, e.g. RunScores(entropy=..., dice=..., pred=...).
RunScores = PerImage[np.ndarray]


@dataclass(frozen=True)
class Selection:
    order: np.ndarray  # [budget] positions into the candidate arrays, best first
    score: np.ndarray  # [n] acquisition score of every candidate (-inf where not eligible)
    eligible: np.ndarray  # [n] bool


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise XalError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def normalise(x: np.ndarray, how: str) -> np.ndarray:
    """Rescale one term over the candidates: none, min-max to [0, 1], or rank / (n - 1), over its n
    finite values; non-finite values become NaN (not eligible, see ``compute_score``)."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    if how == "none" or not finite.any():
        return np.where(finite, x, np.nan)
    out = np.full_like(x, np.nan)
    v = x[finite]
    if how == "minmax":
        lo, hi = v.min(), v.max()
        out[finite] = (v - lo) / (hi - lo) if hi > lo else 0.0
        return out
    ranks = np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64)
    out[finite] = ranks / max(v.size - 1, 1)
    return out


def misalignment(scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """1 - Dice with the missing-ROI rule applied; returns (term [n], has_roi [n])."""
    dice = scores.dice if config.dice == "hard" else scores.soft_dice
    # an image without a finite model output has no meaningful Grad-CAM: it does not count for the mean
    has_roi = np.isfinite(dice) & np.isfinite(scores.entropy)
    term = 1.0 - dice.astype(np.float64)
    if not has_roi.any():
        if config.missing_roi == "skip":
            return np.zeros_like(term), has_roi
        raise XalError(
            f"strategy {config.strategy!r} needs ROI agreement, but no candidate image has an ROI "
            "(use an uncertainty strategy, or label ROIs first)"
        )
    if config.missing_roi == "mean":
        term[~has_roi] = term[has_roi].mean()
    else:  # "last" and "skip" handle these images in `select`; keep the term finite
        term[~has_roi] = 0.0
    return term, has_roi


def compute_score(scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """The acquisition score [n] (higher = label first) and the eligibility mask [n]: an image is
    eligible when the model's output for it is finite (its entropy) and so is its score."""
    score, eligible = _score(scores, config)
    return score, eligible & np.isfinite(score) & np.isfinite(scores.entropy)


def _score(scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    n = scores.entropy.shape[0]
    eligible = np.ones(n, dtype=bool)
    if config.strategy == "random":
        return np.random.default_rng(config.seed).random(n), eligible
    if config.strategy == "entropy":
        return normalise(scores.entropy, config.normalise), eligible
    if config.strategy == "margin":
        return normalise(-scores.margin, config.normalise), eligible
    if config.strategy == "least-confidence":
        return normalise(scores.least_confidence, config.normalise), eligible
    term, has_roi = misalignment(scores, config)
    if config.strategy == "misalignment":
        score = normalise(term, config.normalise)
    else:
        u = normalise(scores.entropy, config.normalise)
        score = config.lam * u + (1.0 - config.lam) * normalise(term, config.normalise)
    if config.missing_roi == "skip":
        eligible &= has_roi
    elif config.missing_roi == "last":
        # below every image with an ROI: shift by the full score range, order among them by entropy
        ent = normalise(scores.entropy, "minmax")
        floor = np.nanmin(score[has_roi]) if np.isfinite(score[has_roi]).any() else 0.0
        score = np.where(has_roi, score, floor - 2.0 + ent)
    return score, eligible


def select(scores: RunScores, config: SelectConfig, labels: np.ndarray | None = None) -> Selection:
    """Top-`budget` candidates by acquisition score, class-balanced as configured.

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
