"""What batch-aware strategies share: the eligible candidates' embeddings as a tensor on the
selection device, and the mapping of picks back to candidate positions. torch is imported when a
batch-aware strategy runs, not with the registry (the CLI's start-up stays light)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xal_engine.core.strategies.base import CandidateSet, RunScores, Strategy

if TYPE_CHECKING:
    import torch

    from xal_engine.core.acquisition import SelectConfig

EMBEDDINGS_HOW = "score the run with --embeddings"
# Distance-based strategies on large candidate sets work in the embeddings' top principal components:
# k-center greedy against m labelled centres costs n·(m + B)·D multiply-adds, 10¹² at n = 10⁶,
# m = 10³, D = 512; at 64 components it is 8x less, and the leading components carry most of the
# distances' spread. Small sets keep every dimension.
PROJECT_ABOVE = 50_000  # candidates
PROJECTED_DIM = 64
PCA_SAMPLE = 20_000  # rows the components are fitted on (seeded)


class EmbeddingStrategy(Strategy):
    """A batch-aware strategy that chooses by the embeddings alone: every candidate with a finite
    embedding is eligible, and its per-image score is 0 (the batch is the strategy's choice)."""

    needs = ("entropy", "embedding")
    batch_aware = True
    how = EMBEDDINGS_HOW

    def score(self, scores: RunScores, config: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(scores.entropy.shape[0]), np.isfinite(scores.embedding).all(axis=1)


def eligible_rows(candidates: CandidateSet) -> np.ndarray:
    """(e,) int64 positions of the eligible candidates whose embedding is finite."""
    finite = np.isfinite(candidates.scores.embedding).all(axis=1)
    return np.flatnonzero(candidates.eligible & finite)


def as_tensor(values: np.ndarray, config: SelectConfig) -> torch.Tensor:
    """``values`` on the selection device (--device; CUDA when available for "auto"), dtype kept (the
    diversity functions compute in fp32 chunk by chunk)."""
    import torch

    from xal_engine.core.inputs import resolve_device

    return torch.from_numpy(np.ascontiguousarray(values)).to(resolve_device(config.device))


def labelled_centres(candidates: CandidateSet, config: SelectConfig) -> torch.Tensor | None:
    """(m, D) embeddings of the images already labelled (finite rows), or None."""
    if candidates.labelled_embedding is None or len(candidates.labelled_embedding) == 0:
        return None
    e = candidates.labelled_embedding
    return as_tensor(e[np.isfinite(e).all(axis=1)], config)


def back(rows: np.ndarray, picks: torch.Tensor) -> np.ndarray:
    """Candidate positions of ``picks`` (indices into ``rows``), one host copy."""
    return rows[picks.cpu().numpy()]


def coordinates(candidates: CandidateSet, rows: np.ndarray, config: SelectConfig, centre: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The points (e, D') of candidates ``rows`` and the labelled centres (m, D') on the selection
    device: the embeddings themselves, or, for more than PROJECT_ABOVE candidates of more than
    PROJECTED_DIM dimensions, their coordinates on the top PROJECTED_DIM principal components
    (x - μ)·V, with μ and V (eigenvectors of the covariance, by eigenvalue) fitted on PCA_SAMPLE
    rows drawn with --seed. fp32 (e, 64) at most 256 MB for a million candidates. ``centre=False``
    projects x·V with V from the second moment E[x xᵀ] instead, which keeps inner products <x_i, x_j>
    (what BADGE's gradient distances are made of) rather than distances."""
    import torch

    x = as_tensor(candidates.scores.embedding[rows], config)
    centres = labelled_centres(candidates, config)
    if x.shape[0] <= PROJECT_ABOVE or x.shape[1] <= PROJECTED_DIM:
        return x, centres
    sample = np.sort(np.random.default_rng(config.seed).choice(x.shape[0], PCA_SAMPLE, replace=False))
    fit = x[torch.from_numpy(sample).to(x.device)].float()  # (s, D)
    mean = fit.mean(0) if centre else torch.zeros_like(fit[0])
    fit -= mean
    _, vectors = torch.linalg.eigh(fit.T @ fit)  # ascending eigenvalues
    basis = vectors[:, -PROJECTED_DIM:].flip(1).contiguous()  # (D, 64), largest first

    def project(v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(v.shape[0], PROJECTED_DIM, dtype=torch.float32, device=v.device)
        for i in range(0, v.shape[0], 65536):  # chunked: no fp32 copy of all of v
            torch.mm(v[i:i + 65536].float() - mean, basis, out=out[i:i + 65536])
        return out

    return project(x), None if centres is None else project(centres)
