"""Grad-CAM capture against plain forward hooks + ``loss.backward()`` on a small conv net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xal_engine.core.capture import GradCamCapture, capture, resolve_layer, target_scores
from xal_engine.errors import XalError

CLASSES = 4


class TinyNet(nn.Module):
    """stem → block1 (conv+BN) → ReLU → block2 (strided conv) → ReLU → dropout → pool → head.

    With ``inplace`` both ReLUs act in place right after a target layer (block1, block2).
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU(inplace=inplace)
        self.block2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.block1(self.stem(x)))
        x = F.relu(self.block2(x), inplace=self.inplace)
        return self.head(self.drop(x.mean(dim=(2, 3))))


def make_net(inplace: bool = False) -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet(inplace)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval and train modes differ
        net.block1[1].running_mean.uniform_(-0.5, 0.5)
        net.block1[1].running_var.uniform_(0.5, 2.0)
    return net


def plain_capture(net: nn.Module, names: list[str], x: Tensor, target: Tensor) -> tuple[list[Tensor], ...]:
    """Independent A, G: forward hooks with retain_grad, then a full loss.backward() in eval mode."""
    net.eval()
    outs: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, inputs: object, output: Tensor, name: str = name) -> None:
            output.retain_grad()
            outs[name] = output
        handles.append(net.get_submodule(name).register_forward_hook(hook))
    logits = net(x)
    logits.gather(1, target[:, None]).sum().backward()
    for h in handles:
        h.remove()
    net.zero_grad()
    return [outs[n].detach() for n in names], [outs[n].grad for n in names]


@pytest.fixture()
def x() -> Tensor:
    return torch.randn(5, 3, 12, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("names", [["block1"], ["block2"], ["block1", "block2"], ["block2", "block1"]])
def test_matches_plain_backward(x: Tensor, names: list[str]) -> None:
    net = make_net()
    target = torch.tensor([0, 1, 2, 3, 1])
    ref_a, ref_g = plain_capture(make_net(), sorted(names), x, target)
    out = capture(net, names, x, target)
    order = [sorted(names).index(n) for n in names]
    for i, j in enumerate(order):
        torch.testing.assert_close(out.activations[i], ref_a[j], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.gradients[i], ref_g[j], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.scores, out.logits.gather(1, target[:, None])[:, 0])
    assert all(p.grad is None for p in net.parameters())
    assert all(a.grad_fn is None and not a.requires_grad for a in out.activations + out.gradients)


def test_in_place_op_after_target_layer(x: Tensor) -> None:
    """ReLU(inplace=True) right after each target layer: A is the pre-ReLU output, G as without in-place."""
    target = torch.tensor([3, 2, 1, 0, 0])
    ref_a, ref_g = plain_capture(make_net(inplace=False), ["block1", "block2"], x, target)
    out = capture(make_net(inplace=True), ["block1", "block2"], x, target)
    assert (out.activations[0] < 0).any()  # not clobbered by the in-place ReLU
    for got, want in zip(out.activations + out.gradients, ref_a + ref_g):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True])
def test_shared_outputs_equal_fresh_copies_batch_after_batch(x: Tensor, inplace: bool) -> None:
    """share_outputs (the scorer's): the same A, G and logits as fresh clones, across batches of two
    shapes. Downstream runs on A itself (no copy) where the model leaves it alone; an in-place ReLU
    right after a layer makes the first batch run again with copies, one kept buffer per layer (its
    storage reused)."""
    names = ["block1", "block2"]
    batches = [x, x.flip(0) * 2, x[:3].clone(), x + 1]
    with GradCamCapture(make_net(inplace), names) as fresh, \
            GradCamCapture(make_net(inplace), names, share_outputs=True) as shared:
        pointers = []
        for images in batches:
            want, got = fresh(images), shared(images)
            for a, b in zip(want.activations + want.gradients + (want.logits,),
                            got.activations + got.gradients + (got.logits,)):
                assert torch.equal(a, b)
            pointers.append([shared._copies[i].data_ptr() for i in range(2)] if inplace else [])
        assert shared._sharing is not inplace
        if inplace:
            assert pointers[0] == pointers[1] and pointers[2] != pointers[1] and pointers[3] != pointers[2]
        else:
            assert shared._copies == {}  # nothing copied
    assert shared._copies == {} and shared._sharing  # released on exit; the next `with` tries sharing again


class _ScalesUnderNoGrad(nn.Module):
    """Changes its input in place where autograd does not see it: only A's version shows it."""

    def forward(self, a: Tensor) -> Tensor:
        with torch.no_grad():
            a.mul_(2)
        return a


def test_an_output_changed_in_place_without_autograd_is_copied(x: Tensor) -> None:
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ScalesUnderNoGrad(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))

    with GradCamCapture(net(), "0") as fresh, GradCamCapture(net(), "0", share_outputs=True) as shared:
        want, got = fresh(x), shared(x)
        assert not shared._sharing
    for a, b in zip(want.activations + want.gradients + (want.logits,), got.activations + got.gradients + (got.logits,)):
        assert torch.equal(a, b)
    assert not torch.equal(want.activations[0] * 2, want.activations[0])  # the change would have shown


def test_targets(x: Tensor) -> None:
    net = make_net()
    with GradCamCapture(net, "block2") as cap:
        pred = cap(x)
        argmax = pred.logits.argmax(dim=1)
        torch.testing.assert_close(pred.scores, pred.logits.amax(dim=1))
        as_list = cap(x, argmax.tolist())
        as_callable = cap(x, lambda logits: logits.gather(1, argmax[:, None])[:, 0])
        doubled = cap(x, lambda logits: 2 * logits[:, 1])
    for out in (as_list, as_callable):
        torch.testing.assert_close(out.gradients[0], pred.gradients[0])
    _, g1 = plain_capture(make_net(), ["block2"], x, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(doubled.gradients[0], 2 * g1[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([0, 1, 2], r"one class per image: expected shape \(5,\), got \(3,\)"),
        (torch.zeros(6, dtype=torch.long), r"expected shape \(5,\), got \(6,\)"),
        ([0, 1, 2, 3, 4], r"class indices in \[0, 4\)"),
        (torch.zeros(5), "integer class indices"),
        (lambda logits: logits, r"one score per image, shape \(5,\); got \(5, 4\)"),
    ],
)
def test_bad_targets(x: Tensor, targets: object, message: str) -> None:
    logits = torch.randn(5, CLASSES)
    with pytest.raises(XalError, match=message):
        target_scores(logits, targets)  # type: ignore[arg-type]


def snapshot(net: nn.Module) -> tuple[list[bool], list[bool], int]:
    hooks = sum(len(m._forward_hooks) for m in net.modules())
    return [m.training for m in net.modules()], [p.requires_grad for p in net.parameters()], hooks


def test_state_restored_also_after_errors(x: Tensor) -> None:
    net = make_net()
    net.train()
    net.block1.eval()  # a mixed train/eval state must come back as it was
    net.stem.weight.requires_grad_(False)  # and so must a caller's frozen parameter
    before = snapshot(net)
    assert before[2] == 0
    with GradCamCapture(net, ["block1"]) as cap:
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert snapshot(net)[2] == 1
        out = cap(x)
        torch.testing.assert_close(net(x), out.logits)  # a plain forward inside the block still works
    assert snapshot(net) == before
    # eval mode inside: same as an eval-mode plain computation (BatchNorm stats, no dropout)
    _, ref_g = plain_capture(make_net(), ["block1"], x, out.logits.argmax(dim=1))
    torch.testing.assert_close(out.gradients[0], ref_g[0], rtol=1e-5, atol=1e-7)
    net.train()
    net.block1.eval()
    with pytest.raises(ValueError, match="boom"), GradCamCapture(net, "block2"):
        raise ValueError("boom")
    assert snapshot(net) == before
    with pytest.raises(XalError, match="one class per image"), GradCamCapture(net, "block2") as cap:
        cap(x, [0])
    assert snapshot(net) == before
    with pytest.raises(RuntimeError, match="already active"), cap, cap:
        pass
    assert snapshot(net) == before
    assert all(p.grad is None for p in net.parameters())


def test_layer_names() -> None:
    net = make_net()
    assert resolve_layer(net, "block1.0") == ("block1.0", net.block1[0])
    assert resolve_layer(net, net.block2) == ("block2", net.block2)
    with pytest.raises(XalError, match="target layer 'block3' not found in TinyNet; close names: block2, block1"):
        resolve_layer(net, "block3")
    with pytest.raises(XalError, match="not a submodule of TinyNet"):
        resolve_layer(net, nn.Conv2d(1, 1, 1))


def test_layer_that_does_not_run_or_is_not_a_feature_map(x: Tensor) -> None:
    net = make_net()
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(XalError, match="unused did not run"):
        capture(net, ["block1", "unused"], x)
    with pytest.raises(XalError, match=r"'head' must output feature maps \(B, C, h, w\) or \(B, C, d, h, w\), got \(5, 4\)"):
        capture(net, "head", x)
    assert snapshot(net)[2] == 0


def test_channels_last_and_no_grad_caller(x: Tensor) -> None:
    net = make_net()
    ref = capture(net, ["block1", "block2"], x)
    with torch.no_grad():  # the capture enables grad itself
        out = capture(net.to(memory_format=torch.channels_last), ["block1", "block2"],
                      x.contiguous(memory_format=torch.channels_last))
    for got, want in zip(out.activations + out.gradients, ref.activations + ref.gradients):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
