"""The torch reference of gradcam_dice against hand-computed cases and a numpy/cv2 re-derivation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xal_engine.ops.reference import gradcam_dice, gradcam_maps, low_res_cam, roi_agreement

f32 = np.float32
ULP1 = f32(2.0**-23)  # fl(1 + 1e-7) = 1 + 2**-23: the stage-2 denominator when min U = 0, max U = 1


def single_channel(m: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = M, G = 1 (so w = 1 and the pre-ReLU CAM is M exactly), shape (1, 1, h, w)."""
    a = torch.tensor(m, dtype=torch.float32)[None, None]
    return a, torch.ones_like(a)


def mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)[None]


def test_exact_tie_at_threshold_counts_as_attended() -> None:
    # M max 1024 makes fl(1024 + 1e-7) = 1024, so N = M / 1024 exactly: N = [[0, 1], [0.5 + 2**-24, 0]].
    # Stage 2 (identity size, U = N): S = N / (1 + 2**-23) = [[0, 1 - 2**-23], [0.5, 0]] exactly.
    a, g = single_channel([[0.0, 1024.0], [512.0 + 2.0**-14, 0.0]])
    s = gradcam_maps(a, g, (2, 2))
    assert s[0, 1, 0].item() == 0.5
    assert s[0, 0, 1].item() == 1.0 - 2.0**-23
    out = gradcam_dice(a, g, mask([[0, 0], [1, 0]]), threshold=0.5)
    s_sum = f32(1) - ULP1 + f32(0.5)
    # attended {(0,1), (1,0)}, ROI {(1,0)}: 2*1 / (2 + 1); with S > tau it would be 0.
    assert out.dice.item() == pytest.approx(2 / 3, abs=1e-7)
    assert out.soft_dice.item() == f32(1.0) / (s_sum + f32(1))
    assert out.energy.item() == f32(0.5) / s_sum
    assert not out.hit.item()  # argmax (0, 1) is outside the ROI
    assert gradcam_dice(a, g, mask([[0, 1], [0, 0]])).hit.item()


def test_weights_relu_and_bilinear_by_hand() -> None:
    # w = (mean[1, 3], mean[-1, -1]) = (2, -1); M = 2 [0, 512] - [1, 1] = [-1, 1023] -> ReLU [0, 1023]
    # -> N = [0, 1]. Bilinear 1x2 -> 2x4 (scale 0.5, src x = 0.5 (x + 0.5) - 0.5 clamped to [0, 1]):
    # U row = [0, 0.25, 0.75, 1]; S = U / (1 + 2**-23).
    a = torch.tensor([[[[0.0, 512.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
    g = torch.tensor([[[[1.0, 3.0]], [[-1.0, -1.0]]]])
    den = f32(1) + ULP1
    row = [f32(0), f32(0.25) / den, f32(0.75) / den, f32(1) / den]
    s = gradcam_maps(a, g, (2, 4))
    torch.testing.assert_close(s, torch.tensor([row, row])[None], rtol=0, atol=0)
    out = gradcam_dice(a, g, mask([[0, 1, 1, 0], [0, 0, 0, 0]]), threshold=0.5)
    # attended: columns 2, 3 of both rows (4 px); ROI: 2 px; intersection: (0, 2).
    assert out.dice.item() == pytest.approx(2 * 1 / (4 + 2), abs=1e-7)
    s_roi, s_sum = row[1] + row[2], 2 * sum(row)
    assert out.soft_dice.item() == pytest.approx(2 * s_roi / (s_sum + 2), rel=1e-6)
    assert out.energy.item() == pytest.approx(s_roi / s_sum, rel=1e-6)
    assert not out.hit.item()  # first maximum is (0, 3)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_all_zero_cam_gives_zeros(threshold: float) -> None:
    # Every weighted channel sum is negative: M = ReLU(-A) = 0, S = 0; even tau = 0 attends nothing.
    a = torch.rand(2, 3, 4, 5) + 0.1
    g = -torch.rand(2, 3, 4, 5) - 0.1
    out = gradcam_dice(a, g, torch.ones(2, 8, 8, dtype=torch.bool), threshold=threshold, return_cam=True)
    for v in (out.dice, out.soft_dice, out.energy):
        assert torch.equal(v, torch.zeros(2))
    assert not out.hit.any()
    assert torch.equal(out.cam, torch.zeros(2, 4, 5))


def test_one_by_one_feature_map_is_an_all_zero_cam() -> None:
    a, g = torch.rand(2, 4, 1, 1) + 1, torch.rand(2, 4, 1, 1) + 1  # positive M, but constant
    out = gradcam_dice(a, g, torch.ones(2, 5, 7, dtype=torch.bool))
    assert torch.equal(out.dice, torch.zeros(2)) and torch.equal(out.energy, torch.zeros(2))
    assert not out.hit.any()


def test_empty_and_full_roi() -> None:
    torch.manual_seed(1)
    a, g = torch.randn(1, 3, 5, 6), torch.randn(1, 3, 5, 6)
    s = gradcam_maps(a, g, (9, 11))[0]
    empty = gradcam_dice(a, g, torch.zeros(1, 9, 11, dtype=torch.bool))
    assert (empty.dice.item(), empty.soft_dice.item(), empty.energy.item(), empty.hit.item()) == (0, 0, 0, False)
    full = gradcam_dice(a, g, torch.ones(1, 9, 11, dtype=torch.bool), threshold=0.3)
    n_att, n = int((s >= 0.3).sum()), 99
    assert full.dice.item() == pytest.approx(2 * n_att / (n_att + n), abs=1e-7)
    assert full.soft_dice.item() == pytest.approx(2 * s.sum().item() / (s.sum().item() + n), rel=1e-6)
    assert full.energy.item() == 1.0  # sum(S R) and sum(S) are the same sum
    assert full.hit.item()


def test_non_finite_image_is_nan_and_does_not_disturb_others() -> None:
    torch.manual_seed(2)
    a, g = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    rois = torch.rand(3, 12, 10) > 0.5
    clean = gradcam_dice(a, g, rois, return_cam=True)
    a[1, 2, 3, 4] = float("nan")
    g[2, 0, 0, 0] = float("-inf")
    out = gradcam_dice(a, g, rois, return_cam=True)
    for v in (out.dice, out.soft_dice, out.energy):
        assert torch.isnan(v[1:]).all()
    assert not out.hit[1:].any()
    assert torch.isnan(out.cam[1:]).all()
    for v, ref in zip(out[:4], clean[:4]):
        assert torch.equal(v[0], ref[0])
    assert torch.equal(out.cam[0], clean.cam[0])


def test_minus_inf_activation_is_caught_before_relu() -> None:
    a, g = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)  # weights > 0: -inf would become ReLU 0
    a[0, 1, 1, 1] = float("-inf")
    assert torch.isnan(gradcam_dice(a, g, torch.ones(1, 4, 4, dtype=torch.bool)).dice).all()


def gradcam_numpy(a: np.ndarray, g: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam 1.5.7 for one layer, written out: numpy weights, ReLU, min-max, cv2, min-max."""
    weights = np.mean(g, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    maps = []
    for img in cam:  # per-image loop and host arithmetic, as in the reference library
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        img = cv2.resize(np.float32(img), (size[1], size[0]))  # cv2 takes (width, height)
        img = img - np.min(img)
        maps.append(img / (1e-7 + np.max(img)))
    return np.float32(maps)


@pytest.mark.parametrize(
    "shape, size",
    [((3, 5, 7, 9), (33, 40)), ((2, 8, 16, 12), (8, 5)), ((2, 16, 7, 7), (224, 224)), ((1, 3, 4, 6), (4, 6))],
)
def test_matches_numpy_cv2_rederivation(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape) + size[0])
    a = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    rois = rng.random((shape[0], *size)) > 0.6
    s_np = gradcam_numpy(a, g, size)
    s = gradcam_maps(torch.from_numpy(a), torch.from_numpy(g), size).numpy()
    np.testing.assert_allclose(s, s_np, rtol=0, atol=1e-5)  # gradcam-reference.md parity target
    tau = 0.5
    # Masks may differ only where |S_ref - tau| < 1e-5; Dice is re-derived from the reference mask
    # with those few pixels taken from the engine (a flip there is float noise, not an error).
    ambiguous = np.abs(s_np - tau) < 1e-5
    assert not ((s >= tau) != (s_np >= tau))[~ambiguous].any()
    assert ambiguous.mean() < 1e-3
    att = np.where(ambiguous, s >= tau, s_np >= tau).reshape(shape[0], -1)
    r = rois.reshape(shape[0], -1)
    flat_s = s_np.reshape(shape[0], -1).astype(np.float64)
    dice_np = 2 * (att & r).sum(1) / (att.sum(1) + r.sum(1))
    soft_np = 2 * (flat_s * r).sum(1) / (flat_s.sum(1) + r.sum(1))
    energy_np = (flat_s * r).sum(1) / flat_s.sum(1)
    # Pointing game: the engine's argmax must be one of the reference's maxima within 1e-5 (upsampled
    # maps have near-ties at the top), and hit is the ROI there.
    top = s.reshape(shape[0], -1).argmax(1)
    assert (flat_s[np.arange(shape[0]), top] >= flat_s.max(1) - 1e-5).all()
    hit_np = r[np.arange(shape[0]), top]
    out = gradcam_dice(torch.from_numpy(a), torch.from_numpy(g), torch.from_numpy(rois), threshold=tau)
    np.testing.assert_allclose(out.dice.numpy(), dice_np, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.soft_dice.numpy(), soft_np, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.energy.numpy(), energy_np, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out.hit.numpy(), hit_np)


def test_low_res_cam_is_stage_one_map() -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 6, 5, 4), dtype=np.float32)
    g = rng.standard_normal((2, 6, 5, 4), dtype=np.float32)
    cam = np.maximum((np.mean(g, axis=(2, 3))[:, :, None, None] * a).sum(axis=1), 0)
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    cam = cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))
    n = low_res_cam(torch.from_numpy(a), torch.from_numpy(g))
    np.testing.assert_allclose(n.numpy(), cam, rtol=0, atol=1e-6)
    # same-size upsampling is the identity, so the map S of an identity-size call is N renormalised
    torch.testing.assert_close(gradcam_maps(torch.from_numpy(a), torch.from_numpy(g), (5, 4)),
                               n / (1 + 1e-7), rtol=0, atol=1e-6)


def test_roi_agreement_on_given_maps() -> None:
    maps = torch.tensor([[[0.2, 0.6], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # image 2: all-zero map
    rois = torch.tensor([[[True, False], [True, False]], [[True, True], [False, False]]])
    dice, soft, energy, hit = roi_agreement(maps, rois, threshold=0.5)
    # image 1: attended {0.6, 0.5, 1.0}, ROI {0.2, 0.5}: inter 1 -> 2/5; sum S 2.3, sum S R 0.7.
    torch.testing.assert_close(dice, torch.tensor([2 / 5, 0.0]))
    torch.testing.assert_close(soft, torch.tensor([1.4 / 4.3, 0.0]))
    torch.testing.assert_close(energy, torch.tensor([0.7 / 2.3, 0.0]))
    assert hit.tolist() == [False, False]


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
    big_h=st.integers(1, 40), big_w=st.integers(1, 40), seed=st.integers(0, 2**16),
)
def test_maps_match_numpy_cv2_on_any_shape(c: int, h: int, w: int, big_h: int, big_w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, c, h, w), dtype=np.float32)
    g = rng.standard_normal((2, c, h, w), dtype=np.float32)
    a_t, g_t = torch.from_numpy(a), torch.from_numpy(g)
    s = gradcam_maps(a_t, g_t, (big_h, big_w)).numpy()
    # Stage 2 divides by max U - min U + 1e-7: bilinear float noise (~2e-7 between cv2 and torch) is
    # amplified by 1 / (that range) when U is nearly constant (e.g. a map resized to one column), so
    # the bound is 1e-5 for well-spread maps and 1e-6 / (range + 1e-7) below range 0.1.
    u = F.interpolate(low_res_cam(a_t, g_t)[:, None], size=(big_h, big_w), mode="bilinear", align_corners=False)
    spread = (u.flatten(1).amax(1) - u.flatten(1).amin(1)).numpy()
    atol = np.maximum(1e-5, 1e-6 / (spread + 1e-7))[:, None, None]
    assert (np.abs(s - gradcam_numpy(a, g, (big_h, big_w))) <= atol).all()


def test_hit_uses_the_first_maximum_in_row_major_order() -> None:
    a, g = single_channel([[1024.0, 0.0], [0.0, 1024.0]])  # S = 1 - 2**-23 at (0, 0) and (1, 1)
    assert gradcam_dice(a, g, mask([[1, 0], [0, 0]])).hit.item()
    assert not gradcam_dice(a, g, mask([[0, 0], [0, 1]])).hit.item()
