"""Parity with pytorch-grad-cam 1.5.7 (``pytorch_grad_cam.GradCAM``) on torchvision backbones.

Maps within 1e-5; thresholded masks differ only where |S_ref - τ| < 1e-5; Dice (from score_batch)
within 1e-4 of a numpy Dice computed here from the reference's own maps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from torch import Tensor, nn

from xal_engine.core.compat import GradCAM
from xal_engine.core.scoring import score_batch
from xal_engine.errors import XalError

CLASSES, TAU = 5, 0.5
MAP_ATOL, DICE_ATOL = 1e-5, 1e-4
_MODELS: dict[str, nn.Module] = {}


def model(arch: str) -> nn.Module:
    """torchvision backbone, random init (seeded), eval mode; built once per test session."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = getattr(torchvision.models, arch)(weights=None, num_classes=CLASSES).eval()
    return _MODELS[arch]


def reference_maps(net: nn.Module, layers: list[str], x: Tensor, targets: list | None) -> np.ndarray:
    with RefGradCAM(net, [net.get_submodule(name) for name in layers]) as cam:
        maps = cam(input_tensor=x, targets=targets)
    net.zero_grad(set_to_none=True)  # the reference's full backward fills every parameter's .grad
    return maps


def random_rois(batch: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One random axis-aligned box per image, at least 4x4 pixels."""
    rois = np.zeros((batch, height, width), dtype=bool)
    for roi in rois:
        y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
        roi[y0:rng.integers(y0 + 4, height + 1), x0:rng.integers(x0 + 4, width + 1)] = True
    return rois


def numpy_agreement(s: np.ndarray, r: np.ndarray, tau: float) -> tuple[np.ndarray, ...]:
    """Dice, soft Dice, energy, hit of maps S (B, H, W) vs ROIs R, written out in float64 numpy."""
    s64, rf = s.astype(np.float64), r.astype(np.float64)
    att = s64 >= tau
    inter, size = (att & r).sum((1, 2)), att.sum((1, 2)) + r.sum((1, 2))
    s_sum, sr = s64.sum((1, 2)), (s64 * rf).sum((1, 2))
    dice = np.where(size > 0, 2 * inter / np.maximum(size, 1), 0.0)
    soft = np.where(s_sum + rf.sum((1, 2)) > 0, 2 * sr / np.maximum(s_sum + rf.sum((1, 2)), 1e-30), 0.0)
    energy = np.where(s_sum > 0, sr / np.maximum(s_sum, 1e-30), 0.0)
    flat = s.reshape(len(s), -1)
    hit = r.reshape(len(r), -1)[np.arange(len(r)), flat.argmax(1)] & (flat.max(1) > 0)
    return dice, soft, energy, hit


CASES = [  # arch, target layers, (H, W), batch, explicit targets?
    ("resnet18", ["layer4"], (64, 64), 1, False),
    ("resnet18", ["layer4"], (64, 64), 33, True),
    ("resnet18", ["layer4"], (48, 80), 5, False),
    ("resnet18", ["layer3", "layer4"], (48, 80), 7, False),
    ("resnet18", ["layer3", "layer4"], (64, 64), 1, True),
    ("resnet50", ["layer4"], (64, 64), 3, True),
    ("resnet50", ["layer3", "layer4"], (48, 80), 2, False),
    ("densenet121", ["features.denseblock4"], (48, 80), 2, False),
    ("densenet121", ["features.denseblock3", "features.denseblock4"], (64, 64), 1, True),
]


@pytest.mark.parametrize(("arch", "layers", "size", "batch", "explicit"), CASES,
                         ids=[f"{a}-{'+'.join(l)}-{s[0]}x{s[1]}-b{b}" for a, l, s, b, _ in CASES])
def test_parity_with_pytorch_grad_cam(arch: str, layers: list[str], size: tuple[int, int], batch: int,
                                      explicit: bool) -> None:
    net = model(arch)
    rng = np.random.default_rng(batch * 1000 + size[1])
    x = torch.from_numpy(rng.standard_normal((batch, 3, *size), dtype=np.float32))
    classes = rng.integers(0, CLASSES, batch).tolist() if explicit else None
    ref_targets = None if classes is None else [ClassifierOutputTarget(c) for c in classes]
    ref = reference_maps(net, layers, x, ref_targets)
    got = GradCAM(net, layers)(input_tensor=x, targets=ref_targets)

    assert got.dtype == np.float32 and got.shape == (batch, *size)
    assert (ref.reshape(batch, -1).max(1) > 0.99).any()  # some non-trivial map: the comparison can fail
    np.testing.assert_allclose(got, ref, rtol=0, atol=MAP_ATOL)
    flipped = (got >= TAU) != (ref >= TAU)
    assert (np.abs(ref[flipped] - TAU) < MAP_ATOL).all()

    if len(layers) == 1:  # score_batch is single-layer: its Dice against the reference's maps
        rois = random_rois(batch, *size, rng)
        scores = score_batch(net, layers[0], x, rois, targets=classes, threshold=TAU)
        dice, soft, energy, hit = numpy_agreement(ref, rois, TAU)
        np.testing.assert_allclose(scores.dice.numpy(), dice, rtol=0, atol=DICE_ATOL)
        np.testing.assert_allclose(scores.soft_dice.numpy(), soft, rtol=0, atol=DICE_ATOL)
        np.testing.assert_allclose(scores.energy.numpy(), energy, rtol=0, atol=DICE_ATOL)
        np.testing.assert_array_equal(scores.hit.numpy(), hit)


@pytest.fixture()
def x() -> Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_target_forms_agree(x: Tensor) -> None:
    net = model("resnet18")
    cam = GradCAM(net, [net.layer4])
    classes = [1, 4, 0, 1]
    by_object = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    np.testing.assert_array_equal(cam(input_tensor=x, targets=classes), by_object)
    np.testing.assert_array_equal(cam(input_tensor=x, targets=torch.tensor(classes)), by_object)
    mixed = [ClassifierOutputTarget(1), 4, ClassifierOutputTarget(0), 1]
    np.testing.assert_array_equal(cam(input_tensor=x, targets=mixed), by_object)


def test_other_reference_targets_run_per_image(x: Tensor) -> None:
    """A target that is not a raw logit (softmax score) is called on each logits row, like the reference."""
    net = model("resnet18")
    targets = [ClassifierOutputSoftmaxTarget(c) for c in (0, 2, 2, 3)]
    ref = reference_maps(net, ["layer4"], x, targets)
    got = GradCAM(net, ["layer4"])(input_tensor=x, targets=targets)
    np.testing.assert_allclose(got, ref, rtol=0, atol=MAP_ATOL)
    logit_maps = GradCAM(net, ["layer4"])(input_tensor=x, targets=[0, 2, 2, 3])
    assert np.abs(got - logit_maps).max() > 1e-3  # `.category` alone would have given these


def test_one_target_per_image_required(x: Tensor) -> None:
    net = model("resnet18")
    with pytest.raises(XalError, match="one target per image: got 2 for a batch of 4"):
        GradCAM(net, ["layer4"])(input_tensor=x, targets=[ClassifierOutputTarget(0)] * 2)
    # ... where the reference silently returns all-zero maps for the images left without one
    ref = reference_maps(net, ["layer4"], x, [ClassifierOutputTarget(0)] * 2)
    assert (ref[2:] == 0).all() and (ref[:2].max((1, 2)) > 0.99).all()


def test_no_lasting_side_effects(x: Tensor) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)  # train mode
    with GradCAM(net, ["layer4"]) as cam:
        got = cam(input_tensor=x)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
    ref = reference_maps(net, ["layer4"], x, None)  # the reference puts the model in eval mode for good
    assert not net.training
    np.testing.assert_allclose(got, ref, rtol=0, atol=MAP_ATOL)


def test_bf16_model_gives_fp32_maps(x: Tensor) -> None:
    """The reference fails on bf16 (``.numpy()``); here S is fp32. Tolerance 0.1: bf16 errors in the
    stage-1 map N are ~0.02 (measured in test_scoring), and bilinear weights are a convex combination,
    so they reach S scaled only by the stage-2 min-max of a map whose range is already ~1."""
    net = model("resnet18")
    cam = GradCAM(net, "layer4")  # a bare layer name works too
    want = cam(input_tensor=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cam(input_tensor=x)
    assert got.dtype == np.float32 and 0 < np.abs(got - want).max() < 0.1


def test_unsupported_options(x: Tensor) -> None:
    net = model("resnet18")
    with pytest.raises(XalError, match="aug_smooth and eigen_smooth are not supported"):
        GradCAM(net, ["layer4"])(input_tensor=x, targets=None, aug_smooth=True)
    with pytest.raises(XalError, match=r"target layer 'layer4' must give feature maps \(B, C, h, w\) after "
                                       r"reshape_transform, got \(4, 512, 2\)"):
        GradCAM(net, ["layer4"], reshape_transform=lambda t: t.flatten(2)[..., :2])(input_tensor=x)
    with pytest.raises(XalError, match="target layer 'layer44' not found in ResNet; close names: layer4"):
        GradCAM(net, ["layer44"])
