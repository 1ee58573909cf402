"""Statistics that decide between two active-learning strategies run on the same seeds.

A comparison is paired by seed: seed s of strategy A and seed s of strategy B share the initial labelled
set and the model initialisation, so d_s = a_s - b_s removes the between-seed variance that unpaired
mean ± std tables carry. Per comparison (:func:`paired_test`, :func:`compare`):

    mean diff      d̄ = mean(d_s);  std of diffs s_d (ddof = 1)
    CI             percentile bootstrap of d̄: resample the n seeds with replacement, ``resamples`` times
    p_permutation  sign-flip test of d̄: under H0 (no difference) each d_s is as likely -d_s; p is the
                   share of the 2^n sign patterns with |mean| >= |d̄| (exact for n <= 16, Monte Carlo above)
    p_wilcoxon     Wilcoxon signed-rank test (scipy.stats.wilcoxon; all-zero differences: p = 1)

How many seeds (:func:`seeds_needed`): n = ceil(((z_{1-α/2} + z_power) · σ_d / δ)²), at least ``minimum``.
The metric per seed is either the final round or the area under its learning curve (:func:`alc`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, wilcoxon

from xal_engine.core.curves import alc
from xal_engine.errors import XalError

__all__ = ["PairedComparison", "alc", "compare", "paired_bootstrap_ci", "paired_test", "seeds_needed", "sign_flip_p",
           "wilcoxon_p"]

EXACT_MAX_N = 16  # 2^16 = 65,536 sign patterns: exact enumeration; above, Monte Carlo
MONTE_CARLO_PATTERNS = 100_000  # p's Monte Carlo standard error <= 0.0016
_CHUNK_ENTRIES = 2_000_000  # (resamples or sign patterns) x n entries held at once


def _diffs(diffs: np.ndarray, where: str) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or not d.size:
        raise XalError(f"{where}: expected a 1-D array of >= 1 paired differences, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise XalError(f"{where}: paired differences must be finite; {int((~np.isfinite(d)).sum())} are not")
    return d


def paired_bootstrap_ci(diffs: np.ndarray, level: float = 0.95, resamples: int = 10_000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI (low, high) of mean(diffs): the seeds (entries of the (n,) ``diffs``) are
    resampled with replacement ``resamples`` times; deterministic for a given ``seed``.

    With few seeds (n < 10) the percentile interval is narrower than the nominal level (it ignores the
    uncertainty of the spread): another reason for :func:`seeds_needed`'s minimum.
    """
    d = _diffs(diffs, "paired_bootstrap_ci")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise XalError(f"paired_bootstrap_ci: expected 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, _CHUNK_ENTRIES // d.size)
    for start in range(0, resamples, chunk):  # chunks of resamples, each one vectorised
        k = min(chunk, resamples - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)  # (k,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def sign_flip_p(diffs: np.ndarray, patterns: int = MONTE_CARLO_PATTERNS, seed: int = 0) -> float:
    """Two-sided p of the sign-flip permutation test of mean(diffs) = 0.

    n <= 16: exact, the share of all 2^n sign patterns ε with |mean(ε·d)| >= |mean(d)| (the observed
    pattern included, so p >= 2/2^n). n > 16: ``patterns`` random patterns (fixed ``seed``),
    p = (1 + hits) / (1 + patterns), which never reports 0.
    """
    d = _diffs(diffs, "sign_flip_p")
    n = d.size
    observed = abs(d.sum())  # sums instead of means: same order, one division fewer
    tol = 1e-12 * max(float(np.abs(d).sum()), 1.0)  # a pattern equal to the observed one counts, float noise aside
    if n <= EXACT_MAX_N:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0  # (2^n, n): bit j of row i
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, patterns, chunk):
        k = min(chunk, patterns - start)
        signs = rng.integers(0, 2, size=(k, n)) * 2.0 - 1.0  # (k, n) of ±1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + patterns)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided p of the Wilcoxon signed-rank test (scipy's defaults: zero differences dropped, exact
    distribution for small n without ties); p = 1 when every difference is zero."""
    d = _diffs(diffs, "wilcoxon_p")
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """A (seed-paired) minus B on one metric: d_s = a_s - b_s over the ``n`` seeds both have."""

    a: str
    b: str
    n: int
    mean_diff: float
    std_diff: float  # sample std of the d_s (ddof = 1); NaN for one seed
    ci_low: float
    ci_high: float
    level: float  # of the CI
    p_permutation: float
    p_wilcoxon: float
    wins: int  # seeds with a > b
    losses: int  # seeds with a < b (ties: n - wins - losses)

    def verdict(self, delta: float = 0.02, min_seeds: int = 10) -> str:
        """A plain phrase from the CI against 0 and against the margin ±``delta``. A difference is claimed
        only where the sign-flip p agrees (p < 1 - level): with few seeds a bootstrap CI can exclude 0
        while the exact test cannot (n = 3 all positive: p = 0.25). Below ``min_seeds`` a caveat follows."""
        if not delta > 0:
            raise XalError(f"verdict: expected delta > 0, got {delta}")
        if self.n < 2:
            return f"cannot decide: {self.n} seed, a paired comparison needs at least 2"
        ci = f"CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}]"
        alpha = 1.0 - self.level
        inside = -delta < self.ci_low and self.ci_high < delta
        if (self.ci_low > 0 or self.ci_high < 0) and self.p_permutation < alpha:
            higher = self.a if self.ci_low > 0 else self.b
            small = f"; by less than {delta:g} (CI inside ±{delta:g})" if inside else ""
            phrase = f"{higher} higher: {ci} excludes 0{small}"
        elif self.ci_low > 0 or self.ci_high < 0:
            phrase = (f"no detectable difference ({ci} excludes 0 but sign-flip p = {self.p_permutation:.3g} "
                      f">= {alpha:.3g}: too few seeds)")
        elif inside:
            phrase = f"equivalent within ±{delta:g}: {ci} lies inside (-{delta:g}, {delta:g})"
        else:
            phrase = (f"no detectable difference ({ci} includes 0; |effect| >= {delta:g} cannot be excluded: "
                      f"more seeds needed)")
        if self.n < min_seeds:
            phrase += f" [only {self.n} seeds, fewer than {min_seeds}: the bootstrap CI runs narrow]"
        return phrase


def paired_test(a: np.ndarray, b: np.ndarray, *, names: tuple[str, str] = ("A", "B"), level: float = 0.95,
                resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    """Compare (n,) ``a`` and (n,) ``b`` paired by position (seed): bootstrap CI of mean(a - b), exact /
    Monte Carlo sign-flip p, Wilcoxon p, wins and losses."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise XalError(f"paired_test: expected a and b of one equal length (one value per seed), got shapes "
                       f"{a.shape} and {b.shape}")
    d = _diffs(a - b, "paired_test")
    low, high = paired_bootstrap_ci(d, level=level, resamples=resamples, seed=seed)
    return PairedComparison(
        a=names[0], b=names[1], n=int(d.size), mean_diff=float(d.mean()),
        std_diff=float(d.std(ddof=1)) if d.size > 1 else math.nan, ci_low=low, ci_high=high, level=level,
        p_permutation=sign_flip_p(d, seed=seed), p_wilcoxon=wilcoxon_p(d),
        wins=int(np.count_nonzero(d > 0)), losses=int(np.count_nonzero(d < 0)))


def compare(per_seed: Mapping[str, Mapping[int, float]], a: str, b: str, **kwargs) -> PairedComparison:
    """:func:`paired_test` of strategies ``a`` and ``b`` from ``per_seed[strategy][seed] = value`` (final
    round or ALC), over the seeds where both have a finite value; ``kwargs`` go to :func:`paired_test`."""
    for name in (a, b):
        if name not in per_seed:
            raise XalError(f"compare: no values for strategy {name!r}; have {sorted(per_seed)}")
    seeds = sorted(s for s in set(per_seed[a]) & set(per_seed[b])
                   if math.isfinite(per_seed[a][s]) and math.isfinite(per_seed[b][s]))
    if not seeds:
        raise XalError(f"compare: strategies {a!r} and {b!r} share no seed with finite values "
                       f"({a}: {sorted(per_seed[a])}, {b}: {sorted(per_seed[b])})")
    return paired_test([per_seed[a][s] for s in seeds], [per_seed[b][s] for s in seeds], names=(a, b), **kwargs)


def seeds_needed(std_diff: float, delta: float = 0.02, alpha: float = 0.05, power: float = 0.8,
                 minimum: int = 10) -> int:
    """Seeds for a two-sided paired test at level ``alpha`` to detect a mean difference ``delta`` with
    probability ``power``, given the std ``std_diff`` of the per-seed differences (measured on a pilot run).

    Normal approximation for a paired mean difference: d̄ ~ N(δ, σ_d² / n), so
    n = ceil(((z_{1-α/2} + z_power) · σ_d / δ)²); e.g. σ_d = 0.05, δ = 0.02: ceil(7.849 · 6.25) = 50.
    The t distribution would add one or two seeds at small n; ``minimum`` (10) covers that range and keeps
    the bootstrap CI near its nominal level.
    """
    if not (math.isfinite(std_diff) and std_diff >= 0 and delta > 0 and 0 < alpha < 1 and 0 < power < 1):
        raise XalError(f"seeds_needed: expected finite std_diff >= 0, delta > 0, 0 < alpha, power < 1; got "
                       f"std_diff={std_diff}, delta={delta}, alpha={alpha}, power={power}")
    z = norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power)
    return max(int(minimum), math.ceil((z * std_diff / delta) ** 2 - 1e-9))  # 1e-9: no +1 from float noise
