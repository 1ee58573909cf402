"""Learning-curve summaries shared by ``xal-engine report`` and the experiments' statistics."""

from __future__ import annotations

import math

import numpy as np

from xal_engine.errors import XalError


def alc(n_labelled: np.ndarray, values: np.ndarray) -> float:
    """Area under the learning curve values(n_labelled), rounds in order: trapezoid area divided by the
    label range, i.e. the mean metric over the labelling budget on the metric's own scale.

    One point: that value. Any NaN value: NaN. A label range of zero over several points: NaN. The
    ALC column of ``xal-engine report`` and of the experiments.
    """
    x = np.asarray(n_labelled, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or not x.size:
        raise XalError(f"alc: expected n_labelled and values of one equal length >= 1, got shapes "
                       f"{x.shape} and {y.shape}")
    if x.size == 1:
        return float(y[0])
    span = float(x[-1] - x[0])
    if span <= 0:
        return math.nan
    area = np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))  # trapezoids (np.trapezoid is numpy >= 2 only)
    return float(area / span)
