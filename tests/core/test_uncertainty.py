"""Uncertainty measures against hand-computed cases and an independent numpy formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xal_engine.core.uncertainty import entropy, least_confidence, margin
from xal_engine.errors import XalError

# one-hot, uniform over 3, and a skewed row
PROBS = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.5, 0.3]])


def test_hand_computed_cases() -> None:
    skewed = -(0.2 * math.log(0.2) + 0.5 * math.log(0.5) + 0.3 * math.log(0.3))
    torch.testing.assert_close(entropy(PROBS), torch.tensor([0.0, math.log(3), skewed]))
    torch.testing.assert_close(margin(PROBS), torch.tensor([1.0, 0.0, 0.2]))
    torch.testing.assert_close(least_confidence(PROBS), torch.tensor([0.0, 2 / 3, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_outputs_are_fp32(dtype: torch.dtype) -> None:
    for fn in (entropy, margin, least_confidence):
        out = fn(PROBS.to(dtype))
        assert out.dtype == torch.float32 and out.shape == (3,)
    # 0·ln 0 = 0 also in half precision: no NaN from log(0)
    assert entropy(PROBS.to(dtype))[0] == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_matches_numpy(batch: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(classes, 0.5), size=batch)
    p[0, 0], p[0, 1:] = 1.0, 0.0  # one exactly one-hot row: 0·ln 0 = 0
    p = p.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    s = np.sort(p, axis=1)
    probs = torch.from_numpy(p)
    np.testing.assert_allclose(entropy(probs).numpy(), h, atol=1e-6)
    np.testing.assert_allclose(margin(probs).numpy(), s[:, -1] - s[:, -2], atol=1e-7)
    np.testing.assert_allclose(least_confidence(probs).numpy(), 1 - s[:, -1], atol=1e-7)
    assert (entropy(probs) <= math.log(classes) + 1e-6).all()


def test_bad_shapes() -> None:
    with pytest.raises(XalError, match=r"probs must have shape \(B, K\) with K >= 2"):
        margin(torch.ones(4, 1))
    with pytest.raises(XalError, match="got \\(3,\\)"):
        entropy(torch.ones(3))
