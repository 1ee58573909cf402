import math

import numpy as np
import pytest

from xal_engine.core.acquisition import RunScores, SelectConfig, compute_score, normalise, select
from xal_engine.errors import XalError


def make_scores(entropy, dice, pred=None, margin=None, soft=None) -> RunScores:
    entropy = np.asarray(entropy, dtype=np.float32)
    n = entropy.size
    return RunScores(
        probs=np.full((n, 2), 0.5, dtype=np.float32),
        pred=np.zeros(n, dtype=np.int16) if pred is None else np.asarray(pred, dtype=np.int16),
        entropy=entropy,
        margin=np.zeros(n, np.float32) if margin is None else np.asarray(margin, np.float32),
        least_confidence=entropy / 2,
        dice=np.asarray(dice, dtype=np.float32),
        soft_dice=np.asarray(dice if soft is None else soft, dtype=np.float32),
    )


def test_dual_score_is_the_papers_formula():
    s = make_scores(entropy=[0.1, 0.6, 0.3], dice=[0.9, 0.2, 0.5])
    score, eligible = compute_score(s, SelectConfig(strategy="dual", lam=0.3))
    expected = [0.3 * 0.1 + 0.7 * 0.1, 0.3 * 0.6 + 0.7 * 0.8, 0.3 * 0.3 + 0.7 * 0.5]
    np.testing.assert_allclose(score, expected, rtol=1e-6)
    assert eligible.all()


def test_missing_roi_mean_rule_is_neutral_and_finite():
    # image 2 has no ROI: its misalignment becomes mean(1 - 0.9, 1 - 0.3) = 0.4
    s = make_scores(entropy=[0.5, 0.5, 0.5], dice=[0.9, 0.3, math.nan])
    score, _ = compute_score(s, SelectConfig(strategy="misalignment", missing_roi="mean"))
    np.testing.assert_allclose(score, [0.1, 0.7, 0.4], rtol=1e-6)
    assert np.isfinite(score).all()


def test_missing_roi_last_and_skip():
    s = make_scores(entropy=[0.1, 0.9, 0.5, 0.2], dice=[0.9, math.nan, 0.8, math.nan], pred=[0, 0, 0, 0])
    last = select(s, SelectConfig(strategy="dual", budget=4, balance="none", missing_roi="last"))
    # images with ROI first (by score), then the ROI-less by entropy: 1 (0.9) before 3 (0.2)
    assert last.order.tolist() == [2, 0, 1, 3]
    skip = select(s, SelectConfig(strategy="dual", budget=4, balance="none", missing_roi="skip"))
    assert skip.order.tolist() == [2, 0]


def test_roi_strategy_without_any_roi_is_an_error():
    s = make_scores(entropy=[0.1, 0.2], dice=[math.nan, math.nan])
    with pytest.raises(XalError, match="no candidate image has an ROI"):
        select(s, SelectConfig(strategy="dual", budget=1))


def test_uncertainty_strategies_rank_as_defined():
    s = make_scores(entropy=[0.2, 0.7, 0.4], dice=[0.5] * 3, margin=[0.5, 0.1, 0.05])
    cfg = {"budget": 3, "balance": "none"}
    assert select(s, SelectConfig(strategy="entropy", **cfg)).order.tolist() == [1, 2, 0]
    assert select(s, SelectConfig(strategy="margin", **cfg)).order.tolist() == [2, 1, 0]
    assert select(s, SelectConfig(strategy="least-confidence", **cfg)).order.tolist() == [1, 2, 0]


def test_random_is_seeded_and_a_permutation():
    s = make_scores(entropy=np.zeros(50), dice=np.zeros(50))
    a = select(s, SelectConfig(strategy="random", budget=50, balance="none", seed=3)).order
    b = select(s, SelectConfig(strategy="random", budget=50, balance="none", seed=3)).order
    c = select(s, SelectConfig(strategy="random", budget=50, balance="none", seed=4)).order
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_balance_by_predicted_class_round_robin():
    # scores by entropy; classes: 0,0,0,1,1,2 ; best-first order: 0(.9) 1(.8) 2(.7) 3(.6) 4(.5) 5(.4)
    s = make_scores(entropy=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dice=[0.5] * 6, pred=[0, 0, 0, 1, 1, 2])
    sel = select(s, SelectConfig(strategy="entropy", budget=5, balance="predicted"))
    # round 1: best of class 0, 1, 2 = 0, 3, 5 ; round 2: 1, 4
    assert sel.order.tolist() == [0, 3, 5, 1, 4]


def test_oracle_balance_uses_true_labels_and_needs_them():
    s = make_scores(entropy=[0.9, 0.8, 0.7, 0.6], dice=[0.5] * 4, pred=[0, 0, 0, 0])
    labels = np.array([0, 0, 1, 1])
    sel = select(s, SelectConfig(strategy="entropy", budget=2, balance="oracle"), labels=labels)
    assert sel.order.tolist() == [0, 2]
    with pytest.raises(XalError, match="oracle"):
        select(s, SelectConfig(strategy="entropy", budget=2, balance="oracle"),
               labels=np.array([0, -1, 1, 1]))


def test_normalisations():
    x = np.array([2.0, 4.0, 3.0])
    np.testing.assert_allclose(normalise(x, "minmax"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalise(x, "rank"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalise(np.array([1.0, 1.0]), "minmax"), [0.0, 0.0])


def test_budget_larger_than_candidates_takes_all():
    s = make_scores(entropy=[0.3, 0.1], dice=[0.5, 0.5])
    assert select(s, SelectConfig(strategy="entropy", budget=10, balance="none")).order.tolist() == [0, 1]


@pytest.mark.parametrize("kwargs, flag", [
    ({"strategy": "nope"}, "--strategy"), ({"budget": 0}, "--budget"), ({"lam": 1.5}, "--lambda"),
    ({"balance": "x"}, "--balance"), ({"missing_roi": "x"}, "--missing-roi"),
])
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(XalError, match=flag):
        SelectConfig(**kwargs)


def test_normalisations_ignore_non_finite_values():
    x = np.array([1.0, math.nan, 3.0, 2.0])
    np.testing.assert_allclose(normalise(x, "minmax"), [0.0, math.nan, 1.0, 0.5])
    np.testing.assert_allclose(normalise(x, "rank"), [0.0, math.nan, 1.0, 0.5])
    assert np.isnan(normalise(np.array([math.nan]), "rank")).all()


STRATEGY_NAMES = ("random", "entropy", "margin", "least-confidence", "misalignment", "dual")


@pytest.mark.parametrize("how", ["none", "minmax", "rank"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("missing_roi", ["mean", "last", "skip"])
def test_an_image_without_finite_output_is_never_selected(strategy, how, missing_roi):
    # image 1 had NaN pixels: NaN uncertainty, pred -1; its Dice may be anything
    s = make_scores(entropy=[0.2, math.nan, 0.5, 0.1], dice=[0.5, 0.0, 0.4, math.nan],
                    pred=[0, -1, 1, 0], margin=[-0.3, math.nan, -0.1, -0.6])
    config = SelectConfig(strategy=strategy, normalise=how, missing_roi=missing_roi, budget=4, balance="none")
    score, eligible = compute_score(s, config)
    assert not eligible[1] and eligible[[0, 2]].all()
    assert np.isfinite(score[eligible]).all()
    for balance in ("none", "predicted"):
        order = select(s, SelectConfig(strategy=strategy, normalise=how, missing_roi=missing_roi, budget=4,
                                       balance=balance)).order
        assert 1 not in order.tolist() and len(order) == int(eligible.sum())
