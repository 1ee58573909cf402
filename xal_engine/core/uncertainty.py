"""Uncertainty of a classifier from its class probabilities p (B, K): one fp32 value per image."""

from __future__ import annotations

import torch
from torch import Tensor

from xal_engine.errors import XalError


def _probs(probs: Tensor, min_classes: int = 1) -> Tensor:
    if probs.ndim != 2 or probs.shape[1] < min_classes:
        raise XalError(f"probs must have shape (B, K) with K >= {min_classes}, got {tuple(probs.shape)}")
    return probs.float()


def entropy(probs: Tensor) -> Tensor:
    """H = -Σ_k p_k ln p_k in nats, with 0·ln 0 = 0 (xlogy). (B,) fp32; 0 for one-hot, ln K for uniform."""
    p = _probs(probs)
    return -torch.special.xlogy(p, p).sum(dim=1)


def margin(probs: Tensor) -> Tensor:
    """p_top1 - p_top2 (B,) fp32: small means the two likeliest classes are close. Needs K >= 2."""
    top2 = _probs(probs, min_classes=2).topk(2, dim=1).values  # (B, 2), descending
    return top2[:, 0] - top2[:, 1]


def least_confidence(probs: Tensor) -> Tensor:
    """1 - max_k p_k (B,) fp32."""
    return 1.0 - _probs(probs).amax(dim=1)
