"""Batch diversity: which `budget` candidates, taken together, cover the pool (pure torch functions).

    k-center greedy   pick argmax_i min_c |x_i - x_c|²                  CoreSet (Sener & Savarese 2018)
    BADGE             k-means++ seeding on g_i = (p_i - e_ŷi) ⊗ h_i     (Ash et al. 2020)
    weighted k-means++  P(i) ∝ w_i · D²_i: high score AND far from the batch  ("dual-diverse")
    TypiClust         most typical point of the largest uncovered k-means clusters (Hacohen et al. 2022)

Every function runs on the device of its input and returns int64 indices (budget,) on that device, in
pick order. Inputs may be fp16/bf16: rows are converted to fp32 (fp64 stays fp64) one chunk at a time,
so the extra memory is O(n) floats plus (chunk, d) and (chunk, tile) blocks, never (n, n) or
(n, budget, d): at n = 10⁶, d = 512 fp16 (1 GB) it is ~10 MB of vectors plus ~0.3 GB of blocks.

Distances use |a - b|² = |a|² + |b|² - 2 a·b with the points shifted by one of them first (distances are
translation-invariant; the shift cuts the cancellation of the expansion), clamped at 0. The pick loops
keep everything on the device: no `.item()` or host copy per pick.

D² sampling (BADGE, weighted k-means++, the k-means init of TypiClust) is inverse-CDF sampling with one
u ~ U[0, 1) (fp64) per pick from a seeded ``torch.Generator`` on the input's device: with C the
cumulative sum of w·D² (fp64), the pick is the first i with C_i ≥ (1 - u)·C_n. Points with w·D² = 0 —
among them every point already chosen (D² is set to exactly 0) — are never drawn. When C_n = 0 the
pick is the unchosen point of largest weight, lowest index among ties (lowest unchosen index when
unweighted). Deterministic for a seed on a given device.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xal_engine.errors import XalError

_TILE = 1 << 24  # elements of one (rows, centres) distance block: 64 MB in fp32
FIT_CAP = 100_000  # TypiClust fits k-means on a seeded subsample of at most this many points
NEIGHBOUR_CAP = 20_000  # TypiClust: kNN of a cluster's members against at most this many of them


class DiversityError(XalError, ValueError):
    """A bad argument to a diversity function (a user error for the CLI, a ValueError for callers)."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _check(name: str, x: Tensor, ndim: int) -> None:
    if x.ndim != ndim or not x.is_floating_point():
        raise DiversityError(f"{name} must be a floating-point tensor with {ndim} dims, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")


def _check_budget(budget: int, n: int, chunk: int = 1) -> None:
    if not 0 <= budget <= n:
        raise DiversityError(f"budget must lie in [0, n = {n}] (the number of candidates), got {budget}")
    if chunk < 1:
        raise DiversityError(f"chunk must be at least 1, got {chunk}")


_CPU_ROWS = 8192  # rows per block on CPU: a reused 16 MB fp32 buffer stays in cache (~4x faster measured)


@dataclass(frozen=True)
class _Rows:
    """Points read in blocks: x (n, d) in its own dtype, with squared norms relative to x_0.

    A block is x[i : i + chunk] copied into one reused fp32 (or fp64) buffer: a fresh (chunk, d)
    allocation per block costs more than the arithmetic on CPU. Blocks are NOT shifted; a shifted
    point c' = c - x_0 enters as x_i·c' - x_0·c' (one scalar), which keeps the cancellation of
    |a|² + |b|² - 2a·b at the scale of the spread instead of the offset of the data. The shift is a
    data point rather than the mean so that data on a coarse grid (small integers) keep exact ties."""

    x: Tensor  # (n, d) any float dtype
    shift: Tensor  # (d,) acc: x_0
    sq: Tensor  # (n,) acc: |x_i - x_0|²
    buf: Tensor  # (chunk, d) acc, reused by `block`
    chunk: int

    def block(self, i: int) -> Tensor:
        """Rows i … i + chunk in the accumulation dtype (≤ chunk, d): a view of the buffer, valid until
        the next call."""
        src = self.x[i : i + self.chunk]
        return self.buf[: src.shape[0]].copy_(src)

    def point(self, idx: Tensor) -> Tensor:
        """Row `idx` (0-d device tensor, no sync), shifted by x_0: (d,)."""
        return self.x.index_select(0, idx.view(1))[0].to(self.shift.dtype) - self.shift


def _rows(x: Tensor, chunk: int) -> _Rows:
    """One pass over x: |x_i - x_0|² (n,). Blocks of `chunk` rows on CUDA, at most _CPU_ROWS on CPU."""
    n, d = x.shape
    acc = _acc(x.dtype)
    chunk = max(1, min(chunk, n, _CPU_ROWS if x.device.type == "cpu" else n))
    buf = torch.empty(chunk, d, dtype=acc, device=x.device)
    shift = x[0].to(acc) if n else torch.zeros(d, dtype=acc, device=x.device)
    sq = torch.empty(n, dtype=acc, device=x.device)
    rows = _Rows(x, shift, sq, buf, chunk)
    for i in range(0, n, chunk):
        sq[i : i + chunk] = (rows.block(i) - shift).square().sum(1)
    return rows


def _mean(rows: _Rows) -> Tensor:
    """The mean of x (d,), one pass."""
    total = torch.zeros_like(rows.shift)
    for i in range(0, rows.x.shape[0], rows.chunk):
        total += rows.block(i).sum(0)
    return total / rows.x.shape[0]


def _dist_to(rows: _Rows, c: Tensor) -> Tensor:
    """|x_i - c|² (n,) for one point given shifted, c' = c - x_0 (d,): one pass over x."""
    n = rows.x.shape[0]
    const = c.square().sum() + 2 * (rows.shift @ c)  # |c'|² + 2 x_0·c'
    out = torch.empty(n, dtype=c.dtype, device=c.device)
    for i in range(0, n, rows.chunk):
        # |x_i - x_0|² + |c'|² - 2 (x_i·c' - x_0·c') for one block: (r, d) @ (d, 1) (the GEMM path
        # is ~1.5x faster than GEMV on CPU)
        j = min(i + rows.chunk, n)
        torch.addmm((rows.sq[i:j] + const)[:, None], rows.block(i), c[:, None], alpha=-2, out=out[i:j, None])
    return out.clamp_min_(0)


def _nearest(rows: _Rows, centres: Tensor) -> tuple[Tensor, Tensor]:
    """min_c |x_i - c|² and its argmin (lowest centre index among ties), both (n,), for centres (k, d)
    in x's coordinates. Tiles of (chunk rows) x (tile centres) with chunk · tile ≤ 2²⁴ elements."""
    n = rows.x.shape[0]
    c = centres.to(rows.shift.dtype) - rows.shift  # (k, d) shifted by x_0
    const = c.square().sum(1) + 2 * (c @ rows.shift)  # (k,) |c'|² + 2 x_0·c'
    tile = max(1, _TILE // rows.chunk)
    best = torch.full((n,), torch.inf, dtype=c.dtype, device=c.device)
    arg = torch.zeros(n, dtype=torch.long, device=c.device)
    for i in range(0, n, rows.chunk):
        b = rows.block(i)  # (r, d)
        b_best, b_arg = best[i : i + rows.chunk], arg[i : i + rows.chunk]  # views
        for j in range(0, c.shape[0], tile):
            d2 = torch.addmm(rows.sq[i : i + rows.chunk, None] + const[None, j : j + tile], b,
                             c[j : j + tile].T, alpha=-2).clamp_min_(0)  # (r, tile)
            v, a = d2.min(1)
            better = v < b_best  # strict: an earlier tile wins ties
            b_best.copy_(torch.where(better, v, b_best))
            b_arg.copy_(torch.where(better, a + j, b_arg))
    return best, arg


def sq_dists(a: Tensor, b: Tensor, chunk: int = 65536) -> Tensor:
    """Squared Euclidean distances (n_a, n_b), fp32 (fp64 for fp64 inputs), ≥ 0.

    |a_i - b_j|² = |a_i|² + |b_j|² - 2 a_i·b_j with both sides shifted by b_0; a is read in
    chunks of rows. The output itself is n_a x n_b: for small b (tests, centres, kNN blocks)."""
    _check("a", a, 2)
    _check("b", b, 2)
    if a.shape[1] != b.shape[1]:
        raise DiversityError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    acc = _acc(torch.promote_types(a.dtype, b.dtype))
    bc = b.to(device=a.device, dtype=acc)
    shift = bc[0].clone()
    bc = bc - shift  # (n_b, d)
    b_sq = bc.square().sum(1)  # (n_b,)
    out = torch.empty(a.shape[0], b.shape[0], dtype=acc, device=a.device)
    for i in range(0, a.shape[0], chunk):
        ai = a[i : i + chunk].to(acc) - shift  # (chunk, d)
        out[i : i + chunk] = torch.addmm(ai.square().sum(1, keepdim=True) + b_sq, ai, bc.T, alpha=-2)
    return out.clamp_min_(0)


# --------------------------------------------------------------------------------------------- k-center


def kcenter_greedy(x: Tensor, budget: int, centres: Tensor | None = None, chunk: int = 65536) -> Tensor:
    """CoreSet k-center greedy: `budget` indices into x (n, d), in pick order.

    With S the chosen set (initially the `centres` (m, d), e.g. embeddings of labelled images), keep
    D_i = min_{c ∈ S} |x_i - c|² (n,) and repeat: i* = argmax_i D_i (lowest index among ties),
    S ← S ∪ {x_i*}, D_i ← min(D_i, |x_i - x_i*|²) — one chunked pass over x per pick. This is the
    2-approximation of min_S max_i min_{c ∈ S} |x_i - c| (Gonzalez 1985). Chosen points are never picked
    again (D is set to -inf), even when every remaining D is 0 (then the lowest unchosen index).
    Without centres (None or m = 0) the first pick is the point farthest from the mean of x.
    Cost: budget + 3 passes over x (+ one (n, m) tiled pass for the centres); memory O(n) + blocks.
    """
    _check("x", x, 2)
    n = x.shape[0]
    _check_budget(budget, n, chunk)
    out = torch.empty(budget, dtype=torch.long, device=x.device)
    if budget == 0:
        return out
    rows = _rows(x, chunk)
    if centres is not None and centres.shape[0] > 0:
        _check("centres", centres, 2)
        if centres.shape[1] != x.shape[1]:
            raise DiversityError(f"centres must have d = {x.shape[1]} columns like x, got {centres.shape[1]}")
        d, _ = _nearest(rows, centres.to(x.device))
        start = 0
    else:  # first pick: the point farthest from the mean of x
        first = torch.argmax(_dist_to(rows, _mean(rows) - rows.shift))
        out[0] = first
        d = _dist_to(rows, rows.point(first))
        d.index_fill_(0, first.view(1), -torch.inf)
        start = 1
    for k in range(start, budget):
        i = torch.argmax(d)  # 0-d, first maximum
        out[k] = i
        d = torch.minimum(d, _dist_to(rows, rows.point(i)))
        d.index_fill_(0, i.view(1), -torch.inf)
    return out


# ------------------------------------------------------------------------------------------- D² sampling


def _d2_sampling(dist_to: Callable[[Tensor], Tensor], first: Tensor, weight: Tensor | None, budget: int,
                 gen: torch.Generator) -> Tensor:
    """k-means++ seeding from the 0-d index `first`: see the module docstring for the draw rule.

    `dist_to(i)` gives |x_j - x_i|² (n,) for a 0-d index i. `weight` (n,) ≥ 0 or None (all 1)."""
    d2 = dist_to(first)
    n, device = d2.shape[0], d2.device
    out = torch.empty(budget, dtype=torch.long, device=device)
    out[0] = first
    d2.index_fill_(0, first.view(1), 0)
    w = None if weight is None else weight.to(device=device, dtype=torch.float64)
    # fallback order when every w·D² is 0: largest weight among the unchosen, then lowest index
    fallback = torch.zeros(n, dtype=torch.float64, device=device) if w is None else w.clone()
    fallback.index_fill_(0, first.view(1), -torch.inf)
    tiny = torch.finfo(torch.float64).tiny
    for k in range(1, budget):
        p = d2.double() if w is None else d2.double() * w  # (n,)
        cdf = torch.cumsum(p, 0)
        total = cdf[-1]
        u = torch.rand((), generator=gen, dtype=torch.float64, device=device)
        target = ((1 - u) * total).clamp_min(tiny).view(1)  # ∈ (0, C_n]
        drawn = torch.searchsorted(cdf, target).clamp_max(n - 1)[0]  # first i with C_i ≥ target
        i = torch.where(total > 0, drawn, torch.argmax(fallback))
        out[k] = i
        d2 = torch.minimum(d2, dist_to(i))
        d2.index_fill_(0, i.view(1), 0)
        fallback.index_fill_(0, i.view(1), -torch.inf)
    return out


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def weighted_kmeanspp(x: Tensor, weight: Tensor, budget: int, seed: int = 0, chunk: int = 65536) -> Tensor:
    """k-means++ seeding weighted by an acquisition score: `budget` indices into x (n, d), pick order.

    First pick: argmax_i w_i (lowest index among ties). Then P(i) ∝ w_i · D²_i with
    D²_i = min_{c chosen} |x_i - x_c|²: a candidate needs both a high score and distance from the batch.
    Zero-weight points are drawn only once no point with w_i · D²_i > 0 is left, and then after every
    unchosen point of positive weight. `weight` (n,) must be finite and ≥ 0. One pass over x per pick.
    """
    _check("x", x, 2)
    n = x.shape[0]
    _check_budget(budget, n, chunk)
    if weight.shape != (n,):
        raise DiversityError(f"weight must have shape ({n},) like the rows of x, got {tuple(weight.shape)}")
    weight = weight.to(x.device)
    if not bool((torch.isfinite(weight) & (weight >= 0)).all()):  # one sync, before the loop
        raise DiversityError("weight must be finite and >= 0 for every candidate")
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    rows = _rows(x, chunk)
    first = torch.argmax(weight.double())
    return _d2_sampling(lambda i: _dist_to(rows, rows.point(i)), first, weight, budget,
                        _generator(x.device, seed))


# -------------------------------------------------------------------------------------------------- BADGE


def badge_gradient_embedding(probs: Tensor, h: Tensor) -> Tensor:
    """g_i = (p_i - e_ŷi) ⊗ h_i (n, K·d), ŷ_i = argmax_k p_ik: the gradient of the cross-entropy at the
    pseudo-label ŷ w.r.t. the last linear layer's weight W (K, d), row-major flattened, up to sign
    (∂CE/∂W = (p - e_ŷ) hᵀ). Materialises n·K·d floats: for tests and small n."""
    q = _pseudo_residual(probs, h)
    return (q[:, :, None] * h.to(q.dtype)[:, None, :]).reshape(h.shape[0], -1)


def _pseudo_residual(probs: Tensor, h: Tensor) -> Tensor:
    """q = p - onehot(argmax p) (n, K), in the accumulation dtype."""
    _check("probs", probs, 2)
    _check("h", h, 2)
    if probs.shape[0] != h.shape[0]:
        raise DiversityError(f"probs and h must have the same rows, got {probs.shape[0]} and {h.shape[0]}")
    q = probs.to(_acc(torch.promote_types(probs.dtype, h.dtype))).clone()
    q.scatter_add_(1, q.argmax(1, keepdim=True), torch.full_like(q[:, :1], -1.0))
    return q


@dataclass(frozen=True)
class _Badge:
    """Gradient embeddings kept implicit: <g_i, g_j> = <q_i, q_j> · <h_i, h_j>."""

    q: Tensor  # (n, K) acc
    h: _Rows  # (n, d) read in blocks into one reused buffer
    g_sq: Tensor  # (n,) |g_i|² = |q_i|² |h_i|²


def _badge(probs: Tensor, h: Tensor, chunk: int) -> _Badge:
    q = _pseudo_residual(probs, h)
    rows = _rows(h, chunk)
    h_sq = torch.empty(h.shape[0], dtype=q.dtype, device=h.device)
    for i in range(0, h.shape[0], rows.chunk):
        h_sq[i : i + rows.chunk] = rows.block(i).to(q.dtype).square().sum(1)
    return _Badge(q, rows, q.square().sum(1) * h_sq)


def _badge_dist_to(b: _Badge, i: Tensor) -> Tensor:
    """|g_j - g_i|² = |g_j|² + |g_i|² - 2 <q_j, q_i><h_j, h_i> (n,) for a 0-d index i, ≥ 0.
    One pass over h and q; no (n, K·d) tensor."""
    qq = b.q @ b.q.index_select(0, i.view(1))[0]  # (n,)
    hi = b.h.x.index_select(0, i.view(1))[0].to(b.h.buf.dtype)  # (d,)
    hh = torch.empty(qq.shape[0], dtype=b.h.buf.dtype, device=qq.device)
    for j in range(0, qq.shape[0], b.h.chunk):
        k = min(j + b.h.chunk, qq.shape[0])
        torch.mv(b.h.block(j), hi, out=hh[j:k])
    return (b.g_sq + b.g_sq.index_select(0, i.view(1)) - 2 * qq * hh.to(qq.dtype)).clamp_min_(0)


def badge(probs: Tensor, h: Tensor, budget: int, seed: int = 0, chunk: int = 65536) -> Tensor:
    """BADGE: k-means++ seeding on the gradient embeddings g_i = (p_i - e_ŷi) ⊗ h_i, without forming them.

    probs (n, K) class probabilities, h (n, d) penultimate features. First pick: argmax_i |g_i|² =
    |q_i|²|h_i|² (lowest index among ties), as BADGE does; then P(i) ∝ D²_i, the min squared gradient
    distance to the chosen points, computed from |g_i - g_c|² = |q_i|²|h_i|² + |q_c|²|h_c|²
    - 2 <q_i, q_c><h_i, h_c> (q = p - e_ŷ). When every remaining D² is 0 the lowest unchosen indices.
    One pass over h per pick; memory O(n·K).
    """
    _check("h", h, 2)
    n = h.shape[0]
    _check_budget(budget, n, chunk)
    b = _badge(probs.to(h.device), h, chunk)
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=h.device)
    return _d2_sampling(lambda i: _badge_dist_to(b, i), torch.argmax(b.g_sq), None, budget,
                        _generator(h.device, seed))


# ---------------------------------------------------------------------------------------------- TypiClust


def _kmeans(x: Tensor, k: int, iters: int, gen: torch.Generator, chunk: int) -> Tensor:
    """k centres (k, d) in x's accumulation dtype: k-means++ init (first centre uniform), then up to
    `iters` Lloyd steps (stops early when no assignment changes); an emptied cluster keeps its centre."""
    rows = _rows(x, chunk)
    n = x.shape[0]
    first = torch.randint(n, (), generator=gen, device=x.device)
    init = _d2_sampling(lambda i: _dist_to(rows, rows.point(i)), first, None, k, gen)
    c = x.index_select(0, init).to(rows.shift.dtype)  # (k, d)
    prev = None
    for _ in range(iters):
        _, a = _nearest(rows, c)  # (n,)
        if prev is not None and torch.equal(a, prev):  # one sync per iteration
            break
        sums = torch.zeros_like(c)
        for i in range(0, n, rows.chunk):
            sums.index_add_(0, a[i : i + rows.chunk], rows.block(i))
        counts = torch.bincount(a, minlength=k).to(c.dtype)[:, None]  # (k, 1)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        prev = a
    return c


def _mean_knn_dist(x: Tensor, members: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Mean Euclidean distance (s,) of each member to its min(k, s - 1) nearest other members; when the
    cluster has more than NEIGHBOUR_CAP members the neighbours are drawn from a seeded subsample of
    NEIGHBOUR_CAP of them (k is then min(k, NEIGHBOUR_CAP - 1)). Blocks of (rows, neighbours) ≤ 2²⁴."""
    s = members.numel()
    if s == 1:
        return torch.zeros(1, dtype=_acc(x.dtype), device=x.device)
    nb = members
    if s > NEIGHBOUR_CAP:
        nb = members[torch.randperm(s, generator=gen, device=x.device)[:NEIGHBOUR_CAP]]
    kk = min(k, nb.numel() - 1)
    ref = x.index_select(0, nb).to(_acc(x.dtype))  # (s_nb, d)
    shift = ref[0].clone()
    ref -= shift  # shifted by the first neighbour
    ref_sq = ref.square().sum(1)  # (s_nb,)
    rc = max(1, _TILE // nb.numel())
    out = torch.empty(s, dtype=ref.dtype, device=x.device)
    for i in range(0, s, rc):
        idx = members[i : i + rc]
        r = x.index_select(0, idx).to(ref.dtype) - shift  # (rc, d)
        d2 = torch.addmm(r.square().sum(1, keepdim=True) + ref_sq, r, ref.T, alpha=-2).clamp_min_(0)
        d2.masked_fill_(idx[:, None] == nb[None, :], torch.inf)  # not its own neighbour
        out[i : i + rc] = d2.topk(kk, dim=1, largest=False).values.sqrt().mean(1)
    return out


def typiclust(x: Tensor, budget: int, labelled: Tensor | None = None, k_neighbours: int = 20, seed: int = 0,
              iters: int = 20, chunk: int = 65536) -> Tensor:
    """TypiClust (cold start): the most typical point of each of the largest uncovered clusters.

    1. k-means of x (n, d) into k = min(m + budget, n_fit) clusters (m labelled points), fitted on a
       seeded subsample of n_fit = min(n, FIT_CAP) points; every point and every labelled point is then
       assigned to its nearest centre.
    2. Clusters are visited by (labelled points in it ↑, size ↓, cluster index ↑); each visit picks
       the most typical unchosen member and counts it as labelled, so uncovered clusters go first,
       largest first, and a budget beyond them continues round-robin (as in the authors' code).
    3. typicality(x) = 1 / mean |x - x_j| over its min(k_neighbours, size - 1) nearest neighbours in its
       cluster (see `_mean_knn_dist` for the NEIGHBOUR_CAP subsample); the pick is the largest
       typicality, lowest index among ties; a singleton cluster gives its only point.
    Returns indices into x (budget,), in pick order. One generator seeded by `seed` drives the
    subsamples and the k-means++ init.
    """
    _check("x", x, 2)
    n = x.shape[0]
    _check_budget(budget, n, chunk)
    if budget == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if k_neighbours < 1 or iters < 0:
        raise DiversityError(f"k_neighbours must be >= 1 and iters >= 0, got {k_neighbours} and {iters}")
    m = 0 if labelled is None else labelled.shape[0]
    if labelled is not None and m > 0:
        _check("labelled", labelled, 2)
        if labelled.shape[1] != x.shape[1]:
            raise DiversityError(f"labelled must have d = {x.shape[1]} columns like x, got {labelled.shape[1]}")
    gen = _generator(x.device, seed)
    fit = x
    if n > FIT_CAP:
        fit = x.index_select(0, torch.randperm(n, generator=gen, device=x.device)[:FIT_CAP].sort().values)
    k = min(m + budget, fit.shape[0])
    centres = _kmeans(fit, k, iters, gen, chunk)
    _, assign = _nearest(_rows(x, chunk), centres)  # (n,)
    covered = torch.zeros(k, dtype=torch.long, device=x.device)
    if m > 0:
        _, lab = _nearest(_rows(labelled.to(x.device), chunk), centres)
        covered = torch.bincount(lab, minlength=k)
    order = torch.argsort(assign, stable=True)  # members of each cluster, ascending index
    sizes = torch.bincount(assign, minlength=k)
    offsets = [0, *torch.cumsum(sizes, 0).tolist()]  # host copies of k numbers, once
    heap = [(c, -s, j) for j, (c, s) in enumerate(zip(covered.tolist(), sizes.tolist())) if s > 0]
    heapq.heapify(heap)
    ranked: dict[int, Tensor] = {}  # cluster -> its members, most typical first (computed on first visit)
    taken: dict[int, int] = {}
    picks = []
    while len(picks) < budget:  # one iteration per pick, not per image
        c, neg_size, j = heapq.heappop(heap)
        if j not in ranked:
            members = order[offsets[j] : offsets[j + 1]]
            ranked[j] = members[torch.argsort(_mean_knn_dist(x, members, k_neighbours, gen), stable=True)]
            taken[j] = 0
        picks.append(ranked[j][taken[j]])
        taken[j] += 1
        if taken[j] < -neg_size:
            heapq.heappush(heap, (c + 1, neg_size, j))
    return torch.stack(picks)
