"""Uncertainty of a classifier from its class probabilities p (B, K), or from T MC-dropout passes
p (T, B, K) (BALD, MC entropy, variation ratio): one fp32 value per image."""

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


# ---------------------------------------------------------------- MC dropout: T stochastic passes
# The functions below read p (T, B, K): the softmax of T stochastic passes over the same B images.


def _mc_probs(probs: Tensor) -> Tensor:
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[2] < 1:
        raise XalError(f"MC probs must have shape (T, B, K) with T, K >= 1, got {tuple(probs.shape)}")
    return probs.float()


def mc_entropy(probs: Tensor) -> Tensor:
    """Entropy of the mean softmax H[p̄], p̄ = (1/T) Σ_t p_t, in nats: (B,) fp32 in [0, ln K]."""
    return entropy(_mc_probs(probs).mean(dim=0))  # (B, K) -> (B,)


def bald(probs: Tensor) -> Tensor:
    """BALD mutual information I = H[p̄] - (1/T) Σ_t H[p_t] in nats (Houlsby et al. 2011): (B,) fp32 in
    [0, ln K]. 0 when every pass agrees; the expected entropy is the aleatoric part. Clamped at 0: by
    Jensen I >= 0, a negative value is fp32 rounding of two nearly equal entropies."""
    p = _mc_probs(probs)  # (T, B, K)
    expected = -torch.special.xlogy(p, p).sum(dim=2).mean(dim=0)  # (B,) mean_t H[p_t]
    return (mc_entropy(p) - expected).clamp_min(0.0)


def variation_ratio(probs: Tensor) -> Tensor:
    """1 - f_m / T, f_m = the number of passes whose argmax is the modal class: (B,) fp32 in
    [0, 1 - 1/T] (0: every pass votes the same class). Ties in a pass's argmax go to the lower class."""
    p = _mc_probs(probs)
    votes = torch.nn.functional.one_hot(p.argmax(dim=2), p.shape[2]).sum(dim=0)  # (B, K) passes per class
    return 1.0 - votes.amax(dim=1).float() / p.shape[0]
