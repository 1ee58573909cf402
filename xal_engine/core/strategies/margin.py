"""``margin``: -(p_top1 - p_top2), the smallest margin between the two likeliest classes first."""

from __future__ import annotations

from xal_engine.core.strategies.terms import FieldStrategy


class Margin(FieldStrategy):
    name = "margin"
    summary = "smallest top-1 minus top-2 probability first"
    needs = ("entropy", "margin")
    field = "margin"
    sign = -1.0
