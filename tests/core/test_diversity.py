"""Batch diversity against hand-computed greedy orders, autograd and brute-force numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xal_engine.core import diversity
from xal_engine.core.diversity import (
    DiversityError,
    badge,
    badge_gradient_embedding,
    kcenter_greedy,
    sq_dists,
    typiclust,
    weighted_kmeanspp,
)
from xal_engine.errors import XalError

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
LINE = torch.tensor([[0.0], [1.0], [10.0], [11.0], [5.0]])  # 1-D points, mean 5.4


# ------------------------------------------------------------------------------------------ references


def ref_kcenter(x: np.ndarray, budget: int, centres: np.ndarray | None) -> list[int]:
    """Greedy k-center by brute force in fp64 (the full n x n matrix)."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    if centres is None:
        first = int(np.argmax(((x - x.mean(0)) ** 2).sum(1)))
        picks, mind = [first], d[first].copy()
    else:
        picks, mind = [], ((x[:, None] - centres[None]) ** 2).sum(-1).min(1)
    while len(picks) < budget:
        mind[picks] = -np.inf
        i = int(np.argmax(mind))
        picks.append(i)
        mind = np.minimum(mind, d[i])
    return picks


def ref_kmeanspp(g: np.ndarray, first: int, weight: np.ndarray, budget: int, seed: int) -> list[int]:
    """k-means++ seeding on explicit points in fp64, with the documented draw: one fp64 u per pick,
    the first i with C_i >= (1 - u) C_n."""
    gen = torch.Generator().manual_seed(seed)
    picks = [first]
    d2 = ((g - g[first]) ** 2).sum(1)
    while len(picks) < budget:
        d2[picks] = 0
        cdf = np.cumsum(weight * d2)
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        i = int(np.searchsorted(cdf, (1 - u) * cdf[-1], side="left"))
        picks.append(i)
        d2 = np.minimum(d2, ((g - g[i]) ** 2).sum(1))
    return picks


def ref_mean_knn(pts: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    k = min(k, len(pts) - 1)
    return np.sort(d, axis=1)[:, :k].mean(1)


# --------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("device", DEVICES)
def test_sq_dists_match_cdist(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64) + 3, torch.randn(4, 5, generator=g,
                                                                                 dtype=torch.float64)
    out = sq_dists(a.to(device), b.to(device), chunk=3)
    assert out.shape == (7, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), torch.cdist(a, b) ** 2, atol=1e-10, rtol=1e-10)
    assert sq_dists(a.half(), b.half()).dtype == torch.float32


# -------------------------------------------------------------------------------------------- k-center


@pytest.mark.parametrize("chunk", [2, 65536])
def test_kcenter_hand_computed_orders(chunk: int) -> None:
    # no centres: farthest from the mean 5.4 is 11 (index 3); then 0 (D = 121); then 5 (D = 25);
    # then 1 and 10 tie at D = 1: lowest index (1) first
    assert kcenter_greedy(LINE, 5, chunk=chunk).tolist() == [3, 0, 4, 1, 2]
    # centre at 5: D = [25, 16, 25, 36, 0] -> 11; then 0 (25 vs 10's 1); then 1 and 10 tie at 1; 5 last
    assert kcenter_greedy(LINE, 5, centres=torch.tensor([[5.0]]), chunk=chunk).tolist() == [3, 0, 1, 2, 4]
    assert kcenter_greedy(LINE, 2, centres=torch.empty(0, 1), chunk=chunk).tolist() == [3, 0]


def test_kcenter_duplicates_are_never_picked_twice() -> None:
    x = torch.zeros(4, 3)  # every D is 0 after the first pick: the lowest unchosen index next
    assert kcenter_greedy(x, 4, chunk=3).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_kcenter_matches_brute_force_with_tiled_centres(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diversity, "_TILE", 6)  # chunk 3 -> tiles of 2 centres: exercises the tiling
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(50, 6)) + 10, rng.normal(size=(7, 6)) + 10
    got = kcenter_greedy(torch.tensor(x, device=device), 12, torch.tensor(c, device=device), chunk=3)
    assert got.device.type == device and got.dtype == torch.long
    assert got.tolist() == ref_kcenter(x, 12, c)
    assert kcenter_greedy(torch.tensor(x, device=device), 12, chunk=3).tolist() == ref_kcenter(x, 12, None)


# ----------------------------------------------------------------------------------------------- BADGE


def test_badge_embedding_equals_autograd() -> None:
    torch.manual_seed(0)
    n, d, k = 6, 5, 4
    linear = torch.nn.Linear(d, k).double()
    h = torch.randn(n, d, dtype=torch.float64)
    probs = torch.softmax(linear(h), 1).detach()
    want = []
    for i in range(n):
        logits = linear(h[i : i + 1])
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
        (grad,) = torch.autograd.grad(loss, linear.weight)  # (K, d)
        want.append(grad.reshape(-1))
    got = badge_gradient_embedding(probs, h)
    assert got.shape == (n, k * d)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-10, rtol=1e-10)


def test_badge_implicit_distances_equal_explicit() -> None:
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(30, 4, generator=g, dtype=torch.float64), 1)
    h = torch.randn(30, 7, generator=g, dtype=torch.float64)
    emb = badge_gradient_embedding(probs, h)
    b = diversity._badge(probs, h, chunk=4)
    torch.testing.assert_close(b.g_sq, emb.square().sum(1), atol=1e-12, rtol=1e-12)
    for i in (0, 13, 29):
        want = ((emb - emb[i]) ** 2).sum(1)
        torch.testing.assert_close(diversity._badge_dist_to(b, torch.tensor(i)), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_badge_picks_equal_kmeanspp_on_explicit_embedding(seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 10)
    probs = torch.softmax(2 * torch.randn(40, 3, generator=g, dtype=torch.float64), 1)
    h = torch.randn(40, 5, generator=g, dtype=torch.float64)
    emb = badge_gradient_embedding(probs, h).numpy()
    first = int(np.argmax((emb**2).sum(1)))
    want = ref_kmeanspp(emb, first, np.ones(40), 10, seed)
    got = badge(probs, h, 10, seed=seed, chunk=7).tolist()
    assert got == want and len(set(got)) == 10


def test_badge_confident_duplicates_fall_back_to_lowest_unchosen() -> None:
    probs = torch.tensor([[1.0, 0.0]] * 4)  # q = 0: every gradient embedding is 0
    assert badge(probs, torch.ones(4, 3), 4).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------- weighted k-means++


def test_weighted_kmeanspp_never_picks_zero_weight_while_others_remain() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [1000.0]])  # the far point has weight 0
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for seed in range(20):
        picks = weighted_kmeanspp(x, w, 5, seed=seed, chunk=4).tolist()
        assert 5 not in picks and len(set(picks)) == 5
        assert weighted_kmeanspp(x, w, 6, seed=seed).tolist()[-1] == 5


def test_weighted_kmeanspp_fallback_order_when_every_d2_is_zero() -> None:
    # identical points: first argmax w (1), then by weight, lowest index among ties, zero weights last
    w = torch.tensor([0.0, 2.0, 1.0, 0.0, 1.0])
    assert weighted_kmeanspp(torch.zeros(5, 2), w, 5).tolist() == [1, 2, 4, 0, 3]


def test_weighted_kmeanspp_two_far_clusters_one_pick_each() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 8, generator=g) * 0.01, torch.randn(30, 8, generator=g) * 0.01 + 5])
    w = torch.rand(80, generator=g) + 0.1
    for seed in range(10):
        picks = weighted_kmeanspp(x, w, 2, seed=seed, chunk=16)
        assert picks[0] == torch.argmax(w)
        assert sorted(int(p) >= 50 for p in picks) == [False, True]


def test_weighted_kmeanspp_draws_with_probability_w_d2() -> None:
    # first pick: index 0 (w = 2); then w·D² = [0, 1·1, 1·9]: P(index 2) = 0.9
    x, w = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([2.0, 1.0, 1.0])
    seconds = [int(weighted_kmeanspp(x, w, 2, seed=s)[1]) for s in range(4000)]
    assert seconds.count(0) == 0
    assert abs(seconds.count(2) / 4000 - 0.9) < 0.025  # 5 standard deviations


def test_weighted_kmeanspp_matches_reference_and_seed_rules() -> None:
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(60, 4)), rng.random(60)
    got = weighted_kmeanspp(torch.tensor(x), torch.tensor(w), 15, seed=5, chunk=8).tolist()
    assert got == ref_kmeanspp(x, int(np.argmax(w)), w, 15, seed=5)
    assert weighted_kmeanspp(torch.tensor(x), torch.tensor(w), 15, seed=5).tolist() == got
    assert len({tuple(weighted_kmeanspp(torch.tensor(x), torch.tensor(w), 15, seed=s).tolist())
                for s in range(4)}) > 1


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_weighted_kmeanspp_rejects_bad_weights(bad: float) -> None:
    with pytest.raises(DiversityError, match="finite and >= 0"):
        weighted_kmeanspp(torch.zeros(3, 2), torch.tensor([1.0, bad, 1.0]), 2)


# ------------------------------------------------------------------------------------------- TypiClust


def four_clusters() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [30.0, 30.0]])
    sizes = [80, 60, 40, 25]
    labels = np.repeat(np.arange(4), sizes)
    pts = centres[labels] + rng.normal(size=(len(labels), 2))
    perm = rng.permutation(len(labels))  # clusters interleaved in the index order
    return torch.tensor(pts[perm], dtype=torch.float32), labels[perm], centres


@pytest.mark.parametrize("device", DEVICES)
def test_typiclust_picks_the_most_typical_point_of_each_cluster_largest_first(device: str) -> None:
    x, labels, centres = four_clusters()
    picks = typiclust(x.to(device), 4, k_neighbours=20, seed=0).cpu().numpy()
    assert labels[picks].tolist() == [0, 1, 2, 3]  # one per cluster, by size
    pts = x.numpy().astype(np.float64)
    for p in picks:
        members = np.flatnonzero(labels == labels[p])
        assert p == members[np.argmin(ref_mean_knn(pts[members], 20))]
        assert np.linalg.norm(pts[p] - centres[labels[p]]) < 1.0


def test_typiclust_skips_the_cluster_that_holds_a_labelled_point() -> None:
    x, labels, _ = four_clusters()
    picks = typiclust(x, 3, labelled=torch.tensor([[0.5, -0.5]]), seed=1).numpy()
    assert labels[picks].tolist() == [1, 2, 3]
    # two labelled points in cluster 0: k = 2 + 2 = 4 clusters again, and the two largest uncovered win
    two = typiclust(x, 2, labelled=torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), seed=1).numpy()
    assert labels[two].tolist() == [1, 2]


def test_typiclust_neighbour_subsample_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diversity, "NEIGHBOUR_CAP", 30)  # clusters above 30 members use 30 neighbours
    monkeypatch.setattr(diversity, "FIT_CAP", 150)  # and k-means is fitted on 150 of the 205 points
    x, labels, centres = four_clusters()
    picks = typiclust(x, 4, seed=0).numpy()
    assert labels[picks].tolist() == [0, 1, 2, 3]
    assert all(np.linalg.norm(x.numpy()[p] - centres[labels[p]]) < 1.5 for p in picks)


# ------------------------------------------------------------------------------------- dtypes, errors


def test_fp16_input_gives_the_same_picks_as_fp32() -> None:
    g = torch.Generator().manual_seed(5)
    x16 = (torch.randn(300, 16, generator=g) + 2).half()
    w = torch.rand(300, generator=g)
    assert kcenter_greedy(x16, 20, chunk=64).tolist() == kcenter_greedy(x16.float(), 20, chunk=64).tolist()
    assert (weighted_kmeanspp(x16, w, 20, seed=3).tolist()
            == weighted_kmeanspp(x16.float(), w, 20, seed=3).tolist())
    probs = torch.softmax(torch.randn(300, 3, generator=g), 1)
    assert badge(probs.half(), x16, 10).tolist() == badge(probs.half().float(), x16.float(), 10).tolist()


def test_budget_beyond_n_is_a_value_error() -> None:
    x = torch.zeros(3, 2)
    calls = [lambda: kcenter_greedy(x, 4), lambda: weighted_kmeanspp(x, torch.ones(3), 4),
             lambda: badge(torch.full((3, 2), 0.5), x, 4), lambda: typiclust(x, 4)]
    for call in calls:
        with pytest.raises(ValueError, match=r"budget must lie in \[0, n = 3\]"):
            call()
    assert issubclass(DiversityError, XalError)
    assert kcenter_greedy(x, 0).tolist() == []
