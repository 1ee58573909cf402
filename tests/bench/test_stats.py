"""xal_engine.bench.stats: paired comparisons of strategies over seeds, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from xal_engine.bench import stats
from xal_engine.bench.stats import PairedComparison
from xal_engine.errors import XalError


def test_alc_hand_example_and_edge_cases() -> None:
    # labels 10, 20, 40; values 0.5, 0.7, 0.8: trapezoids 10·0.6 + 20·0.75 = 21, over range 30 -> 0.7
    assert stats.alc([10, 20, 40], [0.5, 0.7, 0.8]) == pytest.approx(0.7, abs=1e-12)
    assert stats.alc([10, 20], [0.5, 0.5]) == pytest.approx(0.5)  # a flat curve: its value
    assert stats.alc([25], [0.61]) == pytest.approx(0.61)
    assert math.isnan(stats.alc([10, 20, 30], [0.5, math.nan, 0.8]))
    assert math.isnan(stats.alc([10, 10], [0.5, 0.6]))  # no label range
    with pytest.raises(XalError, match="alc: expected n_labelled and values of one equal length"):
        stats.alc([10, 20], [0.5])


def test_exact_sign_flip_p_hand_cases() -> None:
    # d = [1, 2, 3], |sum| = 6: only all-plus and all-minus reach it -> 2/8
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # d = [1, 1, 1, -1]: |sum| = 2; sums over the 16 patterns: ±4 (2), ±2 (8), 0 (6) -> 10/16
    assert stats.sign_flip_p([1.0, 1.0, 1.0, -1.0]) == pytest.approx(10 / 16)
    assert stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert stats.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(0.25)  # ties with the observed pattern count


def test_monte_carlo_sign_flip_p_matches_exact_enumeration() -> None:
    rng = np.random.default_rng(7)
    d = rng.normal(0.01, 0.03, size=17)  # n = 17 > 16: Monte Carlo
    n = d.size
    signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    exact = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))  # brute force, 131,072 patterns
    p = stats.sign_flip_p(d)
    se = math.sqrt(exact * (1 - exact) / stats.MONTE_CARLO_PATTERNS)
    assert abs(p - exact) < 4 * se + 1e-5
    assert stats.sign_flip_p(d) == p  # fixed seed: deterministic


def test_bootstrap_ci_of_constant_diffs_is_a_point() -> None:
    assert stats.paired_bootstrap_ci(np.full(12, 0.03)) == pytest.approx((0.03, 0.03), abs=1e-15)


def test_bootstrap_ci_width_and_determinism_on_a_normal_sample() -> None:
    sigma, n = 0.04, 200
    d = np.random.default_rng(11).normal(0.01, sigma, size=n)
    low, high = stats.paired_bootstrap_ci(d)
    assert low < d.mean() < high
    assert high - low == pytest.approx(2 * 1.959964 * sigma / math.sqrt(n), rel=0.15)
    assert stats.paired_bootstrap_ci(d, seed=0) == (low, high)
    assert stats.paired_bootstrap_ci(d, seed=1) != (low, high)
    low90, high90 = stats.paired_bootstrap_ci(d, level=0.90)
    assert low < low90 < high90 < high


def test_bootstrap_ci_coverage_near_nominal() -> None:
    rng = np.random.default_rng(5)
    trials, covered = 200, 0
    for t in range(trials):
        d = rng.normal(0.02, 0.05, size=30)
        low, high = stats.paired_bootstrap_ci(d, resamples=2000, seed=t)
        covered += low <= 0.02 <= high
    assert 0.88 <= covered / trials <= 0.99  # percentile bootstrap at n = 30: a little under 0.95


def test_wilcoxon_hand_case_and_scipy() -> None:
    assert stats.wilcoxon_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)  # W- = 0: exact 2 · 1/8
    assert stats.wilcoxon_p([0.0, 0.0, 0.0, 0.0]) == 1.0
    d = np.random.default_rng(2).normal(0.01, 0.02, size=15)
    assert stats.wilcoxon_p(d) == pytest.approx(wilcoxon(d).pvalue, rel=1e-12)


def test_paired_test_fields() -> None:
    a = np.array([0.80, 0.82, 0.79, 0.85])
    b = np.array([0.78, 0.83, 0.75, 0.85])  # d = 0.02, -0.01, 0.04, 0
    c = stats.paired_test(a, b, names=("xal", "random"))
    assert (c.a, c.b, c.n, c.wins, c.losses) == ("xal", "random", 4, 2, 1)
    assert c.mean_diff == pytest.approx(0.0125)
    assert c.std_diff == pytest.approx(np.std([0.02, -0.01, 0.04, 0.0], ddof=1))
    # |sum| = 0.05; sums of ±0.02 ±0.01 ±0.04 (±0 twice): 0.07 and 0.05 reach it -> 8/16 with the zero
    assert c.p_permutation == pytest.approx(0.5)
    assert c.p_wilcoxon == pytest.approx(wilcoxon([0.02, -0.01, 0.04, 0.0]).pvalue)
    assert c.ci_low <= c.mean_diff <= c.ci_high and c.level == 0.95
    with pytest.raises(XalError, match="paired_test: expected a and b of one equal length"):
        stats.paired_test([1.0, 2.0], [1.0])
    with pytest.raises(XalError, match="paired differences must be finite; 1 are not"):
        stats.paired_test([1.0, math.nan], [1.0, 2.0])


def _comparison(low: float, high: float, p: float = 0.001, n: int = 10) -> PairedComparison:
    return PairedComparison(a="xal", b="random", n=n, mean_diff=(low + high) / 2, std_diff=0.01, ci_low=low,
                            ci_high=high, level=0.95, p_permutation=p, p_wilcoxon=p, wins=5, losses=5)


def test_verdict_phrases() -> None:
    assert _comparison(0.01, 0.05).verdict(0.02) == "xal higher: CI [+0.0100, +0.0500] excludes 0"
    assert _comparison(-0.05, -0.03).verdict(0.02) == "random higher: CI [-0.0500, -0.0300] excludes 0"
    assert _comparison(0.005, 0.015).verdict(0.02) == (
        "xal higher: CI [+0.0050, +0.0150] excludes 0; by less than 0.02 (CI inside ±0.02)")
    assert _comparison(-0.01, 0.015).verdict(0.02) == (
        "equivalent within ±0.02: CI [-0.0100, +0.0150] lies inside (-0.02, 0.02)")
    assert _comparison(-0.01, 0.03).verdict(0.02) == (
        "no detectable difference (CI [-0.0100, +0.0300] includes 0; |effect| >= 0.02 cannot be excluded: "
        "more seeds needed)")
    assert _comparison(0.01, 0.05, p=0.25, n=3).verdict(0.02) == (
        "no detectable difference (CI [+0.0100, +0.0500] excludes 0 but sign-flip p = 0.25 >= 0.05: too few "
        "seeds) [only 3 seeds, fewer than 10: the bootstrap CI runs narrow]")
    assert _comparison(0.01, 0.05, p=0.03, n=6).verdict(0.02, min_seeds=5) == (
        "xal higher: CI [+0.0100, +0.0500] excludes 0")
    assert _comparison(0.1, 0.1, p=1.0, n=1).verdict() == (
        "cannot decide: 1 seed, a paired comparison needs at least 2")
    with pytest.raises(XalError, match="verdict: expected delta > 0"):
        _comparison(0.0, 0.1).verdict(0.0)


def test_verdict_on_computed_comparisons() -> None:
    rng = np.random.default_rng(4)
    b = rng.normal(0.8, 0.03, size=20)
    assert stats.paired_test(b + 0.05 + rng.normal(0, 0.005, 20), b).verdict().startswith("A higher")
    assert stats.paired_test(b + rng.normal(0, 0.002, 20), b).verdict().startswith("equivalent within ±0.02")
    # three seeds, all higher: the CI excludes 0, the exact test cannot go below 2/8
    three = stats.paired_test([0.9, 0.91, 0.92], [0.8, 0.8, 0.8])
    assert three.ci_low > 0 and three.p_permutation == pytest.approx(0.25)
    assert three.verdict().startswith("no detectable difference (CI [+0.1000, +0.1200] excludes 0 but")


def test_compare_pairs_common_finite_seeds() -> None:
    per_seed = {"xal": {0: 0.80, 1: 0.82, 2: 0.79, 3: 0.85, 4: 0.9},
                "random": {0: 0.78, 1: 0.83, 2: 0.75, 3: 0.85, 5: 0.7, 6: math.nan}}
    c = stats.compare(per_seed, "xal", "random")
    ref = stats.paired_test([0.80, 0.82, 0.79, 0.85], [0.78, 0.83, 0.75, 0.85], names=("xal", "random"))
    assert c == ref
    per_seed["xal"][3] = math.nan  # seed 3 no longer counts
    assert stats.compare(per_seed, "xal", "random").n == 3
    with pytest.raises(XalError, match="no values for strategy 'entropy'; have \\['random', 'xal'\\]"):
        stats.compare(per_seed, "xal", "entropy")
    with pytest.raises(XalError, match="share no seed with finite values"):
        stats.compare({"x": {0: 1.0}, "y": {1: 1.0}}, "x", "y")


def test_seeds_needed() -> None:
    # ceil((1.95996 + 0.84162)^2 · (0.05 / 0.02)^2) = ceil(7.8489 · 6.25) = ceil(49.06) = 50
    assert stats.seeds_needed(0.05, 0.02) == 50
    assert stats.seeds_needed(0.01, 0.02) == 10  # formula gives 2: the minimum
    assert stats.seeds_needed(0.01, 0.02, minimum=1) == 2
    assert stats.seeds_needed(0.05, 0.02, power=0.9) == math.ceil((1.959964 + 1.281552) ** 2 * 6.25)  # 66
    with pytest.raises(XalError, match="seeds_needed: expected finite std_diff >= 0"):
        stats.seeds_needed(math.nan)
