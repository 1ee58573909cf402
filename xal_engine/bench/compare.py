"""What the benchmark levels share after measuring: parity checks that refuse wrong answers, and ratios.

A provider is timed only after its results agree with the reference's (``check`` raises
:class:`ParityError` otherwise), and its row says so in the ``check`` column:
    pass        compared with the reference, within the stated tolerances
    reference   the results the others are compared with
    -           nothing to compare (plain inference, the loader), or a row without a number
Ratios are taken between rows of one run: ``speedup_vs_grad_cam`` = t(grad-cam) / t(provider) in the
same case, ``ratio_vs_plain`` = t(plain) / t(provider) in the same case and dtype (both > 1: faster).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

GRAD_CAM, PLAIN = "grad-cam", "plain"
CHECK_PASS, CHECK_REFERENCE, CHECK_NONE = "pass", "reference", "-"


class BenchError(RuntimeError):
    """A benchmark that could not produce its figures (a provider failed or disagreed)."""


class ParityError(BenchError):
    """A provider's results differ from the reference's: no speed is reported for it."""


def near_tie_hits(maps: np.ndarray, rois: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """(B,) True where pixels within ``tol`` of max S lie both inside and outside the ROI: there the
    first maximum, and so ``hit``, is float noise."""
    s, r = maps.reshape(len(maps), -1), rois.reshape(len(maps), -1).astype(bool)
    near = s >= s.max(1, keepdims=True, initial=-np.inf) - tol
    return (near & r).any(1) & (near & ~r).any(1)


def max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| in float64 over finite reference entries; inf where got is not finite there."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    ok = np.isfinite(ref)
    return float(np.abs(got[ok] - ref[ok]).max(initial=0.0)) if np.isfinite(got[ok]).all() else np.inf


def check(name: str, got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
          tolerances: Mapping[str, float], ties: np.ndarray | None = None) -> dict[str, float]:
    """Max error of each value named in ``tolerances``; ``hit`` must be equal away from ``ties``.

    Raises ParityError naming the provider, the value, the error and the tolerance.
    """
    errors = {key: max_error(got[key], ref[key]) for key in tolerances}
    for key, tol in tolerances.items():
        if not errors[key] <= tol:
            raise ParityError(f"{name}: {key} differs from the reference by {errors[key]:.3g} (> {tol:g})")
    if "hit" in got and "hit" in ref:
        ties = np.zeros(len(ref["hit"]), bool) if ties is None else ties
        if ((np.asarray(got["hit"]) != np.asarray(ref["hit"])) & ~ties).any():
            raise ParityError(f"{name}: hit differs from the reference away from near-ties of max S")
    return errors


def add_ratios(rows: list[dict], time_key: str, case_key: str = "benchmark") -> None:
    """Fill ``speedup_vs_grad_cam`` and ``ratio_vs_plain`` of every row in place ("" without a baseline)."""

    def time_of(provider: str, case: str, dtype: str | None) -> float | None:
        for row in rows:
            if (row["provider"] == provider and row[case_key] == case
                    and (dtype is None or row["dtype"] == dtype) and row.get(time_key) not in (None, "")):
                return float(row[time_key])
        return None

    for row in rows:
        t = row.get(time_key)
        grad_cam = time_of(GRAD_CAM, row[case_key], None)
        plain = time_of(PLAIN, row[case_key], row["dtype"])
        numeric = t not in (None, "") and float(t) > 0
        row["speedup_vs_grad_cam"] = round(grad_cam / float(t), 3) if numeric and grad_cam else ""
        row["ratio_vs_plain"] = round(plain / float(t), 3) if numeric and plain else ""
