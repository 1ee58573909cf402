"""score_batch against an independent computation: plain hooks + loss.backward, numpy softmax/entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from xal_engine.core.capture import capture
from xal_engine.core.scoring import BatchScores, score_batch
from xal_engine.errors import XalError
from xal_engine.ops import reference

B, SIZE = 6, 64  # resnet18 layer4 is 2x2 at 64x64


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=3).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, SIZE, SIZE, generator=gen)
    rois = torch.rand(B, SIZE, SIZE, generator=gen) > 0.7
    return images, rois


def independent(model: nn.Module, images: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, A, G) of layer4 from a forward hook with retain_grad and a full loss.backward()."""
    saved: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.retain_grad()
        saved.append(output)

    handle = model.layer4.register_forward_hook(hook)
    logits = model(images)
    handle.remove()
    target = logits.argmax(1) if target is None else target
    logits.gather(1, target[:, None]).sum().backward()
    model.zero_grad(set_to_none=True)
    return logits.detach(), saved[0].detach(), saved[0].grad


def numpy_uncertainty(logits: Tensor) -> tuple[np.ndarray, ...]:
    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    s = np.sort(p, axis=1)
    return p, -(p * np.log(p)).sum(1), s[:, -1] - s[:, -2], 1 - s[:, -1]


@pytest.mark.parametrize("targets", [None, [2, 0, 1, 1, 0, 2]])
def test_matches_independent_computation(model: nn.Module, batch: tuple[Tensor, Tensor],
                                         targets: list[int] | None) -> None:
    images, rois = batch
    got = score_batch(model, "layer4", images, rois, targets=targets, threshold=0.4, return_cam=True)
    logits, a, g = independent(model, images, None if targets is None else torch.tensor(targets))
    want = reference.gradcam_dice(a, g, rois, threshold=0.4, return_cam=True)
    p, h, m, lc = numpy_uncertainty(logits)
    np.testing.assert_allclose(got.probs.numpy(), p, atol=1e-6)
    np.testing.assert_allclose(got.entropy.numpy(), h, atol=1e-6)
    np.testing.assert_allclose(got.margin.numpy(), m, atol=1e-6)
    np.testing.assert_allclose(got.least_confidence.numpy(), lc, atol=1e-6)
    assert torch.equal(got.pred, logits.argmax(1))
    for name in ("dice", "soft_dice", "energy", "cam"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5)
    assert torch.equal(got.hit, want.hit)
    assert got.dice.dtype == got.entropy.dtype == torch.float32 and got.pred.dtype == torch.int64
    assert (got.dice > 0).any()  # a test on non-trivial maps
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_missing_rois_give_nan(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    images, rois = batch
    full = score_batch(model, "layer4", images, rois)
    has_roi = np.array([True, False, True, False, False, True])
    part = score_batch(model, "layer4", images, rois.numpy(), has_roi=has_roi)
    keep = torch.from_numpy(has_roi)
    for name in ("dice", "soft_dice", "energy"):
        v = getattr(part, name)
        assert torch.isnan(v[~keep]).all()
        torch.testing.assert_close(v[keep], getattr(full, name)[keep])
    assert not part.hit[~keep].any() and torch.equal(part.hit[keep], full.hit[keep])
    torch.testing.assert_close(part.entropy, full.entropy)

    none = score_batch(model, "layer4", images, None, return_cam=True)
    assert all(torch.isnan(getattr(none, n)).all() for n in ("dice", "soft_dice", "energy"))
    assert not none.hit.any()
    out = capture(model, "layer4", images)
    torch.testing.assert_close(none.cam, reference.low_res_cam(out.activations[0], out.gradients[0]))
    torch.testing.assert_close(none.probs, full.probs)


def test_non_finite_pixels_give_pred_minus_one_and_nan_scores(model: nn.Module,
                                                              batch: tuple[Tensor, Tensor]) -> None:
    images, rois = batch
    bad = images.clone()
    bad[1, 0, 5, 5] = float("nan")
    bad[4, 2, 0, 0] = float("inf")
    full = score_batch(model, "layer4", images, rois)
    got = score_batch(model, "layer4", bad, rois)
    broken = torch.tensor([False, True, False, False, True, False])
    assert got.pred[broken].tolist() == [-1, -1]  # the pred field's fill, not class 0
    assert torch.isnan(got.probs[broken]).all() and torch.isnan(got.entropy[broken]).all()
    assert all(torch.isnan(getattr(got, n)[broken]).all() for n in ("dice", "soft_dice", "energy"))
    assert not got.hit[broken].any()
    assert torch.equal(got.pred[~broken], full.pred[~broken])  # eval mode: the others are unaffected
    torch.testing.assert_close(got.entropy[~broken], full.entropy[~broken])
    torch.testing.assert_close(got.dice[~broken], full.dice[~broken])


def test_channels_last_same_as_contiguous(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    images, rois = batch
    want = score_batch(model, model.layer4, images, rois, return_cam=True)
    got = score_batch(model, model.layer4, images.contiguous(memory_format=torch.channels_last), rois,
                      return_cam=True)
    assert_scores_close(got, want, atol=1e-5)


def assert_scores_close(got: BatchScores, want: BatchScores, atol: float, dice_atol: float | None = None) -> None:
    for name in ("probs", "entropy", "margin", "least_confidence", "soft_dice", "energy", "cam"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=atol)
    torch.testing.assert_close(got.dice, want.dice, rtol=0, atol=dice_atol or atol)
    assert torch.equal(got.pred, want.pred)


def test_autocast_bf16_close_to_fp32(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.002): through resnet18's ~20 layers the
    measured errors are ~0.003 in probs and ~0.02 in the normalised map N (one 2x2 map, values ~1).
    Tolerances: 0.05 absolute (≈ 2.5x the measured worst case) for probs, uncertainty, soft Dice,
    energy and N; Dice counts thresholded pixels, and any pixel with |S - τ| < 0.05 may flip, so it
    gets 0.1."""
    images, rois = batch
    fp32 = score_batch(model, "layer4", images, rois, return_cam=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = capture(model, "layer4", images)
        bf16 = score_batch(model, "layer4", images, rois, return_cam=True)
    assert out.activations[0].dtype == out.gradients[0].dtype == torch.bfloat16
    assert bf16.probs.dtype == bf16.cam.dtype == torch.float32
    assert not torch.equal(bf16.cam, fp32.cam)  # reduced precision really ran
    assert_scores_close(bf16, fp32, atol=0.05, dice_atol=0.1)


def test_bad_arguments(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    images, rois = batch
    with pytest.raises(XalError, match=r"rois must have shape \(6, H, W\), got \(5, 64, 64\)"):
        score_batch(model, "layer4", images, rois[:5])
    with pytest.raises(XalError, match=r"has_roi must have shape \(6,\), got \(2,\)"):
        score_batch(model, "layer4", images, rois, has_roi=torch.ones(2, dtype=torch.bool))
    with pytest.raises(XalError, match="target layer 'layer5' not found in ResNet; close names: layer4"):
        score_batch(model, "layer5", images, rois)
    with pytest.raises(XalError, match="one class per image"):
        score_batch(model, "layer4", images, rois, targets=[0, 1])
    with pytest.raises(XalError, match="backend: expected one of auto, triton, torch, got 'cuda'"):
        score_batch(model, "layer4", images, rois, backend="cuda")  # passed through to gradcam_dice


def test_several_target_layers_combine_as_pytorch_grad_cam(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    # layer3 (4x4) and layer4 (2x2) at 64x64: the agreement of the combined map (reference.multi_layer_maps,
    # equal to pytorch-grad-cam's aggregation in tests/ops/test_cam_methods.py) from hooks of our own.
    images, rois = batch
    targets = [2, 0, 1, 1, 0, 2]
    got = score_batch(model, ["layer3", "layer4"], images, rois, targets=targets, threshold=0.4)
    saved: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.retain_grad()
        saved.append(output)

    handles = [model.layer3.register_forward_hook(hook), model.layer4.register_forward_hook(hook)]
    logits = model(images)
    for h in handles:
        h.remove()
    logits.gather(1, torch.tensor(targets)[:, None]).sum().backward()
    model.zero_grad(set_to_none=True)
    maps = reference.multi_layer_maps([s.detach() for s in saved], [s.grad for s in saved], (SIZE, SIZE))
    dice, soft, energy, hit = reference.roi_agreement(maps, rois, 0.4)
    for name, want in (("dice", dice), ("soft_dice", soft), ("energy", energy)):
        torch.testing.assert_close(getattr(got, name), want, rtol=0, atol=1e-5)
    assert torch.equal(got.hit, hit) and got.cam is None
    single = score_batch(model, "layer4", images, rois, targets=targets, threshold=0.4)
    assert not torch.equal(got.soft_dice, single.soft_dice)  # the second layer changed the map
    with pytest.raises(XalError, match="target_layer: several layers combine for images only, without return_cam"):
        score_batch(model, ["layer3", "layer4"], images, rois, targets=targets, return_cam=True)
