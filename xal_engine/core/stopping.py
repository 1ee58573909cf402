"""When to stop labelling: stabilising predictions (Bloodgood & Vijay-Shanker, 2009).

Between consecutive rounds the model's predictions on a fixed stop set (every train-split image,
labelled or not: it never changes) are compared by Cohen's kappa

    κ = (p_o - p_e) / (1 - p_e),   p_o = mean(a == b),   p_e = Σ_k (n_a,k / n)(n_b,k / n)

(κ = 1 when both predict one class everywhere). When κ's mean over the last ``STOP_WINDOW`` rounds
reaches ``STOP_KAPPA``, further labels are unlikely to change the model's decisions much: the loop
records the signal in its metrics (it does not stop by itself) and ``report`` plots κ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STOP_KAPPA = 0.99  # the SP method's default agreement threshold
STOP_WINDOW = 3  # rounds averaged


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two (n,) integer label vectors (n >= 1); entries < 0 (no prediction) count as
    their own class."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"cohen_kappa needs two equal (n,) vectors, n >= 1; got {a.shape} and {b.shape}")
    classes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: a.size], inverse[a.size:]
    p_o = float(np.mean(ia == ib))
    p_e = float(np.dot(np.bincount(ia, minlength=classes.size), np.bincount(ib, minlength=classes.size))
                / (a.size * a.size))
    if p_e >= 1.0:
        return 1.0 if p_o >= 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


def stop_suggested(kappas: Sequence[float], threshold: float = STOP_KAPPA, window: int = STOP_WINDOW) -> bool:
    """Whether the mean κ of the last ``window`` rounds (finite values, oldest first) is >= threshold."""
    finite = [k for k in kappas if math.isfinite(k)]
    return len(finite) >= window and float(np.mean(finite[-window:])) >= threshold
