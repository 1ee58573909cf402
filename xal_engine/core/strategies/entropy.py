"""``entropy``: U = -Σ_k p_k ln p_k ∈ [0, ln K], the model's predictive uncertainty."""

from __future__ import annotations

from xal_engine.core.strategies.terms import FieldStrategy


class Entropy(FieldStrategy):
    name = "entropy"
    summary = "softmax entropy -Σ p ln p"
    field = "entropy"
