"""Acquisition strategies, one file each, known by name through :data:`REGISTRY`.

Adding a strategy: a file here with a :class:`~.base.Strategy` subclass, and its line below. The CLI
choices (``select``, ``loop``), the loop, the report and the benchmarks read the registry.
"""

from __future__ import annotations

from xal_engine.core.strategies.badge import Badge
from xal_engine.core.strategies.bald import Bald
from xal_engine.core.strategies.base import CandidateSet, RunScores, Strategy
from xal_engine.core.strategies.coreset import Coreset
from xal_engine.core.strategies.dual import Dual
from xal_engine.core.strategies.dual_diverse import DualDiverse
from xal_engine.core.strategies.entropy import Entropy
from xal_engine.core.strategies.least_confidence import LeastConfidence
from xal_engine.core.strategies.margin import Margin
from xal_engine.core.strategies.misalignment import Misalignment
from xal_engine.core.strategies.random import Random
from xal_engine.core.strategies.typiclust import TypiClust

REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Random(),
    Entropy(),
    Margin(),
    LeastConfidence(),
    Misalignment(),
    Dual(),
    Bald(),
    Coreset(),
    Badge(),
    DualDiverse(),
    TypiClust(),
)}
STRATEGIES: tuple[str, ...] = tuple(REGISTRY)

__all__ = ["REGISTRY", "STRATEGIES", "CandidateSet", "RunScores", "Strategy", "get", "strategy_help"]


def get(name: str) -> Strategy:
    """The strategy called ``name``; KeyError when unknown (SelectConfig checks names first)."""
    return REGISTRY[name]


def strategy_help() -> str:
    """One clause per strategy, for --help: "random: a seeded random order; entropy: ..."."""
    return "; ".join(f"{name}: {s.summary}" for name, s in REGISTRY.items())
