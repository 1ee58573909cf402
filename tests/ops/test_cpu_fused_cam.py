"""The compiled pass from A to the metrics (ops.cpu_fused.cam_agreement: a weight method's stage 1,
then stage 2 and the agreement) equals the reference bit for bit where it is used: channels-last fp32
activations of odd shapes, every weight method, non-finite and overflowing images, maps the ReLU
zeroes; every other layout and dtype keeps the two-step path."""

import pytest
import torch

pytest.importorskip("numba")

from xal_engine.ops import cpu_fused, gradcam_dice
from xal_engine.ops.reference import gradcam_dice as reference_gradcam_dice

FIELDS = ("dice", "soft_dice", "energy", "hit", "cam")


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def activations(shape, g):
    """Post-ReLU A (zeros included) and G, channels-last, as a CNN's target layer gives them."""
    a = torch.randn(shape, generator=g).clamp_min(0) * (1 + 10 * torch.rand(shape[0], 1, 1, 1, generator=g))
    return channels_last(a), channels_last(torch.randn(shape, generator=g))


def assert_same(got, want):
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.dtype.is_floating_point:
            assert torch.equal(torch.isnan(g), torch.isnan(w)), name
            g, w = torch.nan_to_num(g, nan=-1.0), torch.nan_to_num(w, nan=-1.0)
        assert torch.equal(g, w), (name, (g.float() - w.float()).abs().max())


@pytest.fixture
def fused_calls(monkeypatch):
    """The shapes of the batches that took the compiled pass from A (not counting its probe's)."""
    calls, probing = [], []
    fused, probe = cpu_fused.cam_agreement, cpu_fused._cam_probe

    def counted(acts, *args):
        if not probing:
            calls.append(tuple(acts.shape))
        return fused(acts, *args)

    def probe_uncounted(*args):
        probing.append(True)
        try:
            return probe(*args)
        finally:
            probing.pop()

    monkeypatch.setattr(cpu_fused, "cam_agreement", counted)
    monkeypatch.setattr(cpu_fused, "_cam_probe", probe_uncounted)
    return calls


SHAPES = [((9, 16, 56, 56), (224, 224)), ((5, 12, 13, 17), (100, 61)), ((4, 33, 9, 11), (96, 130)),
          ((3, 64, 7, 7), (224, 224)), ((6, 8, 14, 14), (224, 224)), ((2, 24, 28, 28), (224, 224))]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam"])
def test_weight_methods_take_the_compiled_pass_and_give_the_reference_bits(method, fused_calls):
    g = torch.Generator().manual_seed(0)
    for shape, size in SHAPES:
        assert cpu_fused.cam_fused_matches_torch(*shape[1:], *size), shape  # measured here: every shape
        a, grad = activations(shape, g)
        rois = torch.rand(shape[0], *size, generator=g) < float(torch.rand(1, generator=g))
        threshold = float(torch.rand(1, generator=g))
        got = gradcam_dice(a, grad, rois, threshold, return_cam=True, method=method)
        assert_same(got, reference_gradcam_dice(a, grad, rois, threshold, return_cam=True, method=method))
    assert fused_calls == [shape for shape, _ in SHAPES]


@pytest.mark.parametrize("channels", [16, 64])  # one vector per pixel; torch's row sum (row_sum)
def test_non_finite_and_overflowing_images_are_nan_alone(fused_calls, channels):
    """inf and NaN in A, and an fp32 overflow of sum_c w_c A_c from finite values: that image's N and
    metrics are NaN and its hit False, the others' are the reference's."""
    g = torch.Generator().manual_seed(1)
    a, grad = activations((6, channels, 28, 28), g)
    a[1, 3, 5, 7] = float("inf")
    a[2, 0, 0, 0] = float("nan")
    a[3] = 3e38  # each product finite, their sum not
    grad[3] = 1.0
    rois = torch.rand(6, 224, 224, generator=g) > 0.5
    got = gradcam_dice(a, grad, rois, 0.5, return_cam=True)
    assert_same(got, reference_gradcam_dice(a, grad, rois, 0.5, return_cam=True))
    assert torch.isnan(got.dice[1:4]).all() and not got.hit[1:4].any() and torch.isnan(got.cam[1:4]).all()
    assert not torch.isnan(got.dice[[0, 4, 5]]).any()
    assert fused_calls == [(6, channels, 28, 28)]


def test_maps_the_relu_zeroes_give_the_references_zeros(fused_calls):
    """Negative weights on A >= 0: M <= 0 everywhere (-0.0 where a pixel's A is all zero), so N = 0,
    and dice, soft dice and energy are 0 with no hit, as in the reference; next to normal images."""
    g = torch.Generator().manual_seed(2)
    a, grad = activations((4, 16, 14, 14), g)
    a[1, :, :3] = 0.0  # pixels of all-zero channels: each product -0.0 under a negative weight
    grad[1] = -torch.rand(16, 14, 14, generator=g)
    grad[2] = 0.0  # zero weights: M = +0 everywhere
    rois = torch.rand(4, 224, 224, generator=g) > 0.5
    got = gradcam_dice(a, grad, rois, 0.0, return_cam=True)
    assert_same(got, reference_gradcam_dice(a, grad, rois, 0.0, return_cam=True))
    assert (got.cam[1:3] == 0).all() and (got.dice[1:3] == 0).all() and not got.hit[1:3].any()
    assert fused_calls == [(4, 16, 14, 14)]


def test_other_layouts_dtypes_and_channel_counts_keep_the_two_step_path(fused_calls):
    """Contiguous A (torch then sums the channels in another order), bf16 A, fewer than 8 channels
    (no vectorised channel sum in torch) and one image: the two-step path, the reference's bits."""
    g = torch.Generator().manual_seed(3)
    a, grad = activations((5, 16, 14, 14), g)
    rois = torch.rand(5, 224, 224, generator=g) > 0.5
    cases = [(a.contiguous(), grad.contiguous()), (a.bfloat16(), grad.bfloat16()), (a[:1], grad[:1])]
    small, small_grad = activations((5, 4, 14, 14), g)
    assert not cpu_fused.cam_fused_matches_torch(4, 14, 14, 224, 224)
    cases.append((small, small_grad))
    for acts, grads in cases:
        r = rois[:acts.shape[0]]
        got = gradcam_dice(acts, grads, r, 0.5, return_cam=True)
        assert_same(got, reference_gradcam_dice(acts, grads, r, 0.5, return_cam=True))
    assert fused_calls == []


def test_hirescam_and_the_other_map_methods_keep_the_two_step_path(fused_calls):
    g = torch.Generator().manual_seed(4)
    a, grad = activations((4, 16, 14, 14), g)
    rois = torch.rand(4, 224, 224, generator=g) > 0.5
    for method in ("hirescam", "layercam", "eigencam"):
        got = gradcam_dice(a, grad, rois, 0.5, return_cam=True, method=method)
        assert_same(got, reference_gradcam_dice(a, grad, rois, 0.5, return_cam=True, method=method))
    assert fused_calls == []


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_torchs_threads_and_the_thread_pool_give_the_same_bits(monkeypatch, threads):
    g = torch.Generator().manual_seed(5)
    a, grad = activations((11, 16, 28, 28), g)
    rois = torch.rand(11, 224, 224, generator=g) > 0.4
    want = reference_gradcam_dice(a, grad, rois, 0.5, return_cam=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        team = gradcam_dice(a, grad, rois, 0.5, return_cam=True)
        monkeypatch.setattr(cpu_fused, "_team", lambda: False)
        pool = gradcam_dice(a, grad, rois, 0.5, return_cam=True)
    finally:
        torch.set_num_threads(before)
    assert_same(team, want)
    assert_same(pool, want)


def test_a_failing_compiler_leaves_the_shape_to_the_two_step_path(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_CAM_CHECKED", {})

    def broken(*args):
        raise RuntimeError("LLVM ERROR: no such target feature")

    monkeypatch.setattr(cpu_fused, "cam_agreement", broken)
    assert not cpu_fused.cam_fused_matches_torch(16, 56, 56, 224, 224)
    monkeypatch.setattr(cpu_fused, "_kernels", lambda: None)  # without numba, too
    monkeypatch.setattr(cpu_fused, "_CAM_CHECKED", {})
    assert not cpu_fused.cam_fused_matches_torch(16, 56, 56, 224, 224)


def test_activations_that_require_grad_are_read_as_values(fused_calls):
    """A hooked A that was not detached (and a G with a graph): the same values as detached inputs,
    on the compiled pass and on the two-step path, not a RuntimeError from numpy() or out=."""
    g = torch.Generator().manual_seed(6)
    a, grad = activations((4, 16, 14, 14), g)
    rois = torch.rand(4, 224, 224, generator=g) > 0.5
    for acts in (a, a.contiguous()):
        want = reference_gradcam_dice(acts, grad, rois, 0.5, return_cam=True)
        got = gradcam_dice(acts.clone().requires_grad_(), grad.clone().requires_grad_(), rois, 0.5, return_cam=True)
        assert_same(got, want)
        assert not got.cam.requires_grad
    assert fused_calls == [(4, 16, 14, 14)]
