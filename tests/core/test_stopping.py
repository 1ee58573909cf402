"""Stabilising predictions: Cohen's kappa against hand-computed cases, and the stopping rule."""

import math

import numpy as np
import pytest

from xal_engine.core.stopping import cohen_kappa, stop_suggested


def test_kappa_of_a_hand_computed_table() -> None:
    # 10 items: a = [0]*6 + [1]*4, b agrees on 5 zeros and 3 ones; p_o = 0.8,
    # p_e = 0.6 * 0.6 + 0.4 * 0.4 = 0.52, kappa = 0.28 / 0.48
    a = np.array([0] * 6 + [1] * 4)
    b = np.array([0] * 5 + [1] + [1] * 3 + [0])
    assert cohen_kappa(a, b) == pytest.approx(0.28 / 0.48, abs=1e-12)


def test_kappa_edge_cases() -> None:
    assert cohen_kappa(np.array([2, 2, 2]), np.array([2, 2, 2])) == 1.0  # one class everywhere
    assert cohen_kappa(np.array([0, 1, 2]), np.array([0, 1, 2])) == pytest.approx(1.0)
    # chance agreement only: a half zeros, b independent of it -> p_o = p_e = 0.5
    assert cohen_kappa(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    # -1 (no prediction) is a class of its own: -1 vs 0 disagrees
    assert cohen_kappa(np.array([-1, 0]), np.array([0, 0])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cohen_kappa(np.array([0, 1]), np.array([0]))


def test_stop_after_the_window_mean_reaches_the_threshold() -> None:
    assert not stop_suggested([math.nan, 0.99, 1.0])  # two finite values: the window is not full
    assert stop_suggested([math.nan, 0.5, 0.99, 0.99, 0.995])
    assert not stop_suggested([0.99, 0.99, 0.98])  # mean 0.9867
    assert stop_suggested([0.9, 0.9], threshold=0.9, window=2)
