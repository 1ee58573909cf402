"""``least-confidence``: 1 - p_max."""

from __future__ import annotations

from xal_engine.core.strategies.terms import FieldStrategy


class LeastConfidence(FieldStrategy):
    name = "least-confidence"
    summary = "1 - top-1 probability"
    needs = ("entropy", "least_confidence")
    field = "least_confidence"
