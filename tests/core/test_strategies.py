"""The strategy seam: the registry, and each batch-aware strategy through the one ranking function
against a case whose answer is known by hand or by the diversity function it wraps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xal_engine.core import diversity, strategies
from xal_engine.core.acquisition import RunScores, SelectConfig, compute_score, select
from xal_engine.core.strategies.dual_diverse import POOL_FACTOR


def scores(embedding, entropy=None, dice=None, probs=None, bald=None) -> RunScores:
    embedding = np.asarray(embedding, dtype=np.float16)
    n = embedding.shape[0]
    entropy = np.full(n, 0.5, np.float32) if entropy is None else np.asarray(entropy, np.float32)
    probs = np.full((n, 2), 0.5, np.float32) if probs is None else np.asarray(probs, np.float32)
    return RunScores(
        probs=probs, pred=probs.argmax(1).astype(np.int16), entropy=entropy, margin=np.zeros(n, np.float32),
        least_confidence=np.zeros(n, np.float32),
        dice=np.full(n, 0.5, np.float32) if dice is None else np.asarray(dice, np.float32),
        soft_dice=np.full(n, 0.5, np.float32) if dice is None else np.asarray(dice, np.float32),
        embedding=embedding, **({} if bald is None else {"bald": np.asarray(bald, np.float32)}))


def cfg(strategy: str, budget: int, **kw) -> SelectConfig:
    return SelectConfig(strategy=strategy, budget=budget, balance="none", device="cpu", **kw)


def test_every_strategy_is_registered_once_with_a_summary() -> None:
    assert set(strategies.STRATEGIES) == {"random", "entropy", "margin", "least-confidence", "misalignment",
                                          "dual", "bald", "coreset", "badge", "dual-diverse", "typiclust"}
    for name, s in strategies.REGISTRY.items():
        assert s.name == name and s.summary and "entropy" in s.needs
        assert s.batch_aware == (type(s).choose is not strategies.Strategy.choose)
    assert "coreset: k-center greedy" in strategies.strategy_help()


def test_coreset_picks_in_the_k_center_order_away_from_the_labelled_set() -> None:
    # 1-D points, labelled at 0. Min d² to {0}: [0, 1, 121, 36, 25, 100] -> 11 (position 2). To {0, 11}:
    # [0, 1, 0, 25, 25, 1] -> 6 and 5 tie, the lower position wins: 6 (3). To {0, 11, 6}:
    # [0, 1, 0, 0, 1, 1] -> 1, 5 and 10 tie: 1 (1).
    x = [[0.0], [1.0], [11.0], [6.0], [5.0], [10.0]]
    got = select(scores(x), cfg("coreset", 3), labelled_embedding=np.array([[0.0]], np.float16))
    assert got.order.tolist() == [2, 3, 1]


def test_coreset_never_picks_an_ineligible_candidate() -> None:
    x = [[0.0], [100.0], [50.0], [1.0]]
    got = select(scores(x, entropy=[0.5, math.nan, 0.5, 0.5]), cfg("coreset", 3))
    assert 1 not in got.order.tolist() and sorted(got.order.tolist()) == [0, 2, 3]
    x_nan = np.array(x, np.float16)
    x_nan[2] = np.nan  # a NaN embedding is not eligible either
    got = select(scores(x_nan), cfg("coreset", 2))
    assert 2 not in got.order.tolist()


def test_badge_through_select_equals_the_diversity_function() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
    h = rng.normal(size=(40, 8)).astype(np.float16)
    got = select(scores(h, probs=probs), cfg("badge", 6, seed=3))
    want = diversity.badge(torch.from_numpy(probs), torch.from_numpy(h), 6, seed=3)
    assert got.order.tolist() == want.tolist()


def test_dual_diverse_takes_the_best_then_the_far_cluster_not_a_near_duplicate() -> None:
    # the 5 best dual scores sit on one point (cluster A), a weaker one far away (B): after A's best,
    # P(B) = w_B·100 / (w_B·100 + Σ_A w·1e-6) ≈ 1, while top-k dual would take A's duplicates
    emb = [[0.0], [0.001], [0.002], [0.001], [0.0], [10.0], [5.0]]
    dice = [0.0, 0.05, 0.1, 0.15, 0.2, 0.6, 0.99]
    s = scores(emb, dice=dice)
    got = select(s, cfg("dual-diverse", 2))
    assert got.order.tolist()[0] == 0 and got.order.tolist()[1] in (5, 6)
    top = select(s, cfg("dual", 2)).order.tolist()
    assert top == [0, 1]
    assert POOL_FACTOR * 2 >= 7  # every candidate is in the considered set here


def test_dual_diverse_only_considers_the_top_candidates() -> None:
    # budget 1: the considered set is the top POOL_FACTOR candidates; the first pick is the best dual
    n = 3 * POOL_FACTOR
    dice = np.linspace(0.0, 0.9, n)
    got = select(scores(np.arange(n, dtype=np.float32)[:, None], dice=dice), cfg("dual-diverse", 1))
    assert got.order.tolist() == [0]
    score, _ = compute_score(scores(np.zeros((n, 1)), dice=dice), cfg("dual-diverse", 1))
    np.testing.assert_allclose(score, 0.3 * 0.5 + 0.7 * (1 - dice), rtol=1e-6)


def test_typiclust_through_select_picks_one_typical_point_per_cluster() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], np.float32)
    sizes = [40, 30, 20, 10]
    x = np.concatenate([c + rng.normal(scale=0.5, size=(k, 2)) for c, k in zip(centres, sizes)])
    got = select(scores(x.astype(np.float32)), cfg("typiclust", 4))
    cluster = np.repeat(np.arange(4), sizes)
    assert cluster[got.order].tolist() == [0, 1, 2, 3]  # largest cluster first


def test_bald_ranks_by_mutual_information() -> None:
    got = select(scores(np.zeros((4, 1)), bald=[0.1, 0.4, math.nan, 0.2]), cfg("bald", 3))
    assert got.order.tolist() == [1, 3, 0]


@pytest.mark.parametrize("name", ["coreset", "badge", "dual-diverse", "typiclust"])
def test_a_budget_above_the_eligible_count_selects_them_all(name: str) -> None:
    x = np.arange(5, dtype=np.float32)[:, None]
    got = select(scores(x, entropy=[0.5, 0.5, math.nan, 0.5, 0.5]), cfg(name, 10))
    assert sorted(got.order.tolist()) == [0, 1, 3, 4]


def test_large_candidate_sets_keep_distances_in_their_principal_components(monkeypatch) -> None:
    """Above PROJECT_ABOVE candidates the strategies work on the top components; for data of rank 3 in
    100 dimensions the 64 components keep every distance (centred) and inner product (uncentred)."""
    from xal_engine.core.strategies import embedded

    monkeypatch.setattr(embedded, "PROJECT_ABOVE", 50)
    monkeypatch.setattr(embedded, "PCA_SAMPLE", 80)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(120, 3)) @ rng.normal(size=(3, 100)) + 5.0).astype(np.float32)
    c = candidates_of(x, labelled=x[:4])
    rows = np.arange(120)
    sq = lambda a, b: (a.double()[:, None] - b.double()[None]).square().sum(-1)
    for centre, measure in ((True, sq), (False, lambda a, b: a.double() @ b.double().T)):
        got, centres = embedded.coordinates(c, rows, cfg("coreset", 1), centre=centre)
        assert got.shape == (120, 64) and centres is not None and centres.shape == (4, 64)
        want = torch.from_numpy(c.scores.embedding.astype(np.float32))  # the fp16 values ranked
        scale = float(measure(want, want).abs().max())
        torch.testing.assert_close(measure(got, got), measure(want, want), rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(measure(centres, got), measure(want[:4], want), rtol=0, atol=1e-4 * scale)
    small, _ = embedded.coordinates(candidates_of(x[:40]), np.arange(40), cfg("coreset", 1))
    assert small.shape == (40, 100)  # at most PROJECT_ABOVE candidates: every dimension


def candidates_of(x: np.ndarray, labelled: np.ndarray | None = None):
    from xal_engine.core.strategies import CandidateSet

    s = scores(x.astype(np.float32))
    return CandidateSet(s, np.zeros(len(x)), np.ones(len(x), dtype=bool), labelled)
