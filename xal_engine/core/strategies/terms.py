"""Terms that several strategies share: normalisation over the candidates, and the attention term
1 - Dice with its rule for images without an ROI.

Images without an ROI have NaN Dice. The rule (``missing_roi``) decides what the attention term is
for them, so that NaN never decides a ranking:
    mean   (default) 1 - Dice := the mean of 1 - Dice over candidates that have an ROI: neutral, the
           image competes on its uncertainty alone;
    last   they rank after every image with an ROI, among themselves by uncertainty (entropy);
    skip   they are not candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import RunScores, Strategy
from xal_engine.errors import XalError

if TYPE_CHECKING:
    from xal_engine.core.acquisition import SelectConfig


def normalise(x: np.ndarray, how: str) -> np.ndarray:
    """Rescale one term over the candidates: none, min-max to [0, 1], or rank / (n - 1), over its n
    finite values; non-finite values become NaN (not eligible)."""
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
    else:  # "last" and "skip" are applied by `with_missing_roi_rule`; keep the term finite
        term[~has_roi] = 0.0
    return term, has_roi


def with_missing_roi_rule(score: np.ndarray, has_roi: np.ndarray, scores: RunScores,
                          config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(score, eligible) of an ROI strategy after the ``skip`` / ``last`` rule (``mean`` is applied
    inside the term)."""
    eligible = np.ones(score.shape[0], dtype=bool)
    if config.missing_roi == "skip":
        eligible &= has_roi
    elif config.missing_roi == "last":
        # below every image with an ROI: shift by the full score range, order among them by entropy
        ent = normalise(scores.entropy, "minmax")
        floor = np.nanmin(score[has_roi]) if np.isfinite(score[has_roi]).any() else 0.0
        score = np.where(has_roi, score, floor - 2.0 + ent)
    return score, eligible


class FieldStrategy(Strategy):
    """A per-image strategy that ranks one result field: score = sign · field, normalised as
    configured (--normalise); every candidate is eligible (non-finite values are dropped by the ranking)."""

    field: str
    sign: float = 1.0  # -1: smallest first

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        values = scores[self.field]
        return normalise(self.sign * values, config.normalise), np.ones(values.shape[0], dtype=bool)
