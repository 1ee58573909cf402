"""The explanation loss (xal_engine.core.explanation): hand case, the scoring reference, second-order grads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from xal_engine.core.explanation import ExplanationTerm, cam_soft_dice, explanation_loss
from xal_engine.errors import XalError
from xal_engine.ops.reference import gradcam_dice


def test_soft_dice_of_a_hand_computed_cam() -> None:
    # One channel, weight mean(G) = 2 > 0: M = 2A = [[0, 2], [4, 6]] -> N = S = [[0, 1/3], [2/3, 1]]
    # (same size: the bilinear step is the identity). ROI = bottom row:
    # soft Dice = 2 (2/3 + 1) / ((0 + 1/3 + 2/3 + 1) + 2) = 5/6.
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    g = torch.full_like(a, 2.0)
    roi = torch.tensor([[[False, False], [True, True]]])
    assert cam_soft_dice(a, g, roi).item() == pytest.approx(5 / 6, abs=1e-6)
    # Negative weights zero the map: S = 0 everywhere, soft Dice 0.
    assert cam_soft_dice(a, -g, roi).item() == 0.0


@pytest.mark.parametrize("shape,roi_size", [((3, 5, 4, 6), (13, 9)), ((2, 8, 7, 7), (7, 7)), ((1, 2, 3, 2), (32, 20))])
def test_soft_dice_equals_the_scoring_reference(shape: tuple[int, ...], roi_size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen) + 0.2
    rois = torch.rand((shape[0], *roi_size), generator=gen) > 0.6
    expected = gradcam_dice(a, g, rois).soft_dice
    torch.testing.assert_close(cam_soft_dice(a, g, rois), expected, atol=1e-6, rtol=1e-5)


def test_loss_averages_images_with_an_roi_only() -> None:
    # Image 0 as in the hand case (1 - 5/6), image 1 has no ROI and must not count.
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[5.0, 0.0], [0.0, 1.0]]]], requires_grad=True)
    scores = 0.5 * a.sum(dim=(1, 2, 3))  # G = 0.5 everywhere: a positive weight, S as in the hand case
    rois = torch.tensor([[[False, False], [True, True]], [[True, False], [False, False]]])
    loss = explanation_loss(a, scores, rois, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(1 / 6, abs=1e-6)
    none = explanation_loss(a, scores, rois, torch.tensor([False, False]))
    assert none.item() == 0.0


class TinyNet(nn.Module):
    """conv -> tanh (the target layer's output A, 3x4x4) -> global mean -> linear: smooth in its
    parameters, so finite differences are exact up to O(eps^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_second_order_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    net = TinyNet().double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    rois = torch.zeros(2, 8, 8, dtype=torch.bool)
    rois[0, :4, :5] = True
    rois[1, 3:, 2:] = True
    has_roi = torch.tensor([True, True])

    def loss_of(conv_w: torch.Tensor, fc_w: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(nn.functional.conv2d(x, conv_w, net.conv.bias, padding=1))  # (2, 3, 4, 4)
        logits = nn.functional.linear(a.mean(dim=(2, 3)), fc_w, net.fc.bias)  # (2, 2)
        return explanation_loss(a, logits.gather(1, labels[:, None])[:, 0], rois, has_roi)

    params = (net.conv.weight.detach().clone().requires_grad_(), net.fc.weight.detach().clone().requires_grad_())
    assert loss_of(*params).item() > 0.0  # a real, non-trivial loss
    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_term_hooks_the_layer_and_backpropagates_into_both_paths() -> None:
    torch.manual_seed(1)
    net = TinyNet()
    x = torch.randn(3, 1, 4, 4)
    labels = torch.tensor([0, 1, 1])
    rois = torch.zeros(3, 4, 4, dtype=torch.bool)
    rois[:, :2] = True
    with ExplanationTerm(net.act, weight=0.5) as term:
        logits = net(x)
        loss = term(logits, labels, rois, torch.ones(3, dtype=torch.bool))
        a = torch.tanh(net.conv(x))
        expected = 0.5 * explanation_loss(a, net.fc(a.mean(dim=(2, 3))).gather(1, labels[:, None])[:, 0],
                                          rois, torch.ones(3, dtype=torch.bool))
        torch.testing.assert_close(loss, expected)
        loss.backward()
    # the CAM weights come from the head's gradients: the head learns from the term too
    assert net.fc.weight.grad is not None and net.fc.weight.grad.abs().sum() > 0
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0
    assert not net.act._forward_hooks  # removed on exit


# ------------------------------------------------------------------------------ training integration
@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool

    path = tmp_path_factory.mktemp("expl") / "pool.zarr"
    create_synthetic_pool(SyntheticConfig(n=64, size=32, classes=3, shortcut=0.9, seed=1), path)
    return path


def test_explanation_weight_changes_training_and_leaves_no_hook(tiny_pool: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from xal_engine.core import explanation
    from xal_engine.jobs import train as training
    from xal_engine.store import Pool

    terms: list[float] = []
    original = explanation.explanation_loss

    def recording(*args: Any) -> torch.Tensor:
        loss = original(*args)
        terms.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(explanation, "explanation_loss", recording)
    base = training.TrainConfig(epochs=1, batch_size=16, num_workers=0, device="cpu", target_layer="layer2",
                                augment=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = training.train(Pool.open(tiny_pool), base, log=lambda line: None)
        assert terms == []  # W = 0: the term is never computed
        guided = training.train(Pool.open(tiny_pool), replace(base, explanation_weight=1.0), log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert len(terms) >= 2 and all(0.0 < t <= 1.0 for t in terms)  # one term per training batch
    a, b = plain.model.state_dict(), guided.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert guided.checkpoint.config["explanation_weight"] == 1.0
    assert not any(m._forward_hooks for m in guided.model.modules())
    with pytest.raises(XalError, match="explanation_weight must be >= 0"):
        training.train(Pool.open(tiny_pool), replace(base, explanation_weight=-0.1))


METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_soft_dice_equals_the_scoring_reference(method: str) -> None:
    """The loss's CAM is the scoring's method code, not a copy: same soft Dice as gradcam_dice."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 6, 5, 4, generator=gen).clamp_min(0)  # a post-ReLU stage
    g = torch.randn(3, 6, 5, 4, generator=gen)
    rois = torch.rand(3, 11, 9, generator=gen) > 0.5
    expected = gradcam_dice(a, g, rois, method=method).soft_dice
    torch.testing.assert_close(cam_soft_dice(a, g, rois, method), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_backpropagates_through_a_network(method: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rois = torch.zeros(4, 16, 16, dtype=torch.bool)
    rois[:, 2:9, 3:12] = True
    with ExplanationTerm(net[3], 1.0, method) as term:
        loss = term(net(x), torch.tensor([0, 1, 2, 0]), rois, torch.ones(4, dtype=torch.bool))
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert 0 < loss.item() <= 1 and all(gr is not None and torch.isfinite(gr).all() for gr in grads[:2])
    assert grads[0].abs().sum() > 0  # reaches the first conv, through A (and through G unless eigencam)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(XalError, match="cam method: expected one of"):
        ExplanationTerm(nn.Conv2d(1, 1, 1), 1.0, "scorecam")
