"""Several target layers in one launch (``gradcam_dice_layers``) against the reference's combination
(``reference.multi_layer_maps``, itself equal to pytorch-grad-cam's ``aggregate_multi_layers``, see
tests/ops/test_cam_methods.py), in Triton's interpreter when there is no GPU.

Tolerances as for one layer (test_kernel_gradcam_dice.py): fp32 on both sides, the same rounded
inputs for bf16, summation order aside; maps whose S has pixels within 1e-5 of the threshold are
avoided by the seeds (a pixel there falls either way with float noise).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xal_engine.errors import XalError
from xal_engine.ops import gradcam_dice, gradcam_dice_layers, reference
from xal_engine.ops.cam_methods import get_cam_method
from xal_engine.ops.reference import RoiAgreement

triton = pytest.importorskip("triton")
kg = pytest.importorskip("xal_engine.kernels.gradcam_dice")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kg._interpreted():
    pytest.skip("no GPU and the kernel was not built for TRITON_INTERPRET=1", allow_module_level=True)


def layer_inputs(b: int, layers: list[tuple[int, int, int]], size: tuple[int, int], seed: int,
                 dtype=torch.float32):
    """Post-ReLU A (a stage output) and signed G per layer (C, h, w), and ROIs (B, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    acts = [torch.randn(b, c, h, w, generator=gen).clamp_min(0).to(dtype) for c, h, w in layers]
    grads = [torch.randn(b, c, h, w, generator=gen).to(dtype) for c, h, w in layers]
    return acts, grads, torch.rand(b, *size, generator=gen) > 0.6


def on_device(xs):
    return [x.to(DEVICE) for x in xs]


def near_threshold(acts, grads, size, method, threshold=0.5, tol=1e-5) -> bool:
    s = reference.multi_layer_maps(acts, grads, size, method)
    return bool(((s - threshold).abs() <= tol).any())


def assert_close_results(got: RoiAgreement, want: RoiAgreement, atol: float = 1e-5) -> None:
    assert got.cam is None
    for name in ("dice", "soft_dice", "energy"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(), rtol=0, atol=atol,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


LAYOUTS = [  # (B, layers (C, h, w), (H, W)): what each exercises
    (3, [(5, 7, 7), (4, 14, 14)], (61, 70)),  # a ResNet's layer3 + layer4, odd ROI
    (2, [(6, 5, 9), (3, 3, 4), (7, 8, 8)], (33, 40)),  # three layers, non-square
    (2, [(2, 4, 4), (3, 6, 2), (2, 1, 1), (4, 9, 5)], (20, 23)),  # four layers, a 1x1 map
    (2, [(3, 16, 12), (2, 5, 5)], (8, 7)),  # a layer larger than the ROI: downsampling
]


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++", "eigencam"])
@pytest.mark.parametrize("b, layers, size", LAYOUTS)
def test_layers_match_the_reference(method: str, b: int, layers, size) -> None:
    seed = 0
    acts, grads, rois = layer_inputs(b, layers, size, seed)
    while near_threshold(acts, grads, size, method):  # see the module docstring
        seed += 1
        acts, grads, rois = layer_inputs(b, layers, size, seed)
    want = reference.gradcam_dice_layers_checked(acts, grads, rois, 0.5, method=method)
    got = gradcam_dice_layers(on_device(acts), on_device(grads), rois.to(DEVICE), backend="triton", method=method)
    assert_close_results(got, want)
    maps = reference.multi_layer_maps(acts, grads, size, method).flatten(1)
    top = maps >= maps.amax(1, keepdim=True) - 1e-5  # hits where the maximum is not a near-tie across R
    r = rois.flatten(1)
    sure = ~((top & r).any(1) & (top & ~r).any(1))
    assert torch.equal(got.hit.cpu()[sure], want.hit[sure])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_low_precision(dtype: torch.dtype) -> None:
    acts, grads, rois = layer_inputs(2, [(5, 7, 7), (4, 14, 14)], (45, 52), seed=3, dtype=dtype)
    assert not near_threshold(acts, grads, (45, 52), "gradcam")
    want = reference.gradcam_dice_layers_checked(acts, grads, rois, 0.5)  # same rounded inputs
    got = gradcam_dice_layers(on_device(acts), on_device(grads), rois.to(DEVICE), backend="triton")
    assert_close_results(got, want)


def test_layers_extremes_bands_and_full_scan_agree() -> None:
    # Several layers: the candidate grid is the union of each layer's group ends (U is affine
    # between any of their breakpoints); a full scan and a banded launch give the same results.
    acts, grads, rois = layer_inputs(3, [(4, 7, 7), (3, 5, 11), (2, 3, 3)], (90, 100), seed=8)
    low_res = [get_cam_method("gradcam").cam(a, g).float().contiguous().to(DEVICE) for a, g in zip(acts, grads)]
    base = kg.gradcam_dice_layers_triton(low_res, rois.to(DEVICE), programs_per_image=1)
    for layout in ({"scan_extremes": True, "programs_per_image": 1}, {"programs_per_image": 3},
                   {"tile": (8, 128)}):
        got = kg.gradcam_dice_layers_triton(low_res, rois.to(DEVICE), **layout)
        assert torch.equal(got.hit, base.hit), layout
        for name in ("dice", "soft_dice", "energy"):
            torch.testing.assert_close(getattr(got, name), getattr(base, name), rtol=0, atol=1e-6)


def test_union_of_group_ends_holds_the_extremes_of_the_mean() -> None:
    # The claim behind the grid, on torch's own upsampling: mean of layers' bilinear maps.
    from test_kernel_gradcam_dice import group_ends

    gen = torch.Generator().manual_seed(5)
    size = (224, 224)
    maps = [torch.rand(4, 1, h, w, generator=gen) for h, w in ((7, 7), (14, 14), (28, 28))]
    u = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1).mean(1)
    rows = sorted(set().union(*(group_ends(m.shape[2], size[0]) for m in maps)))
    cols = sorted(set().union(*(group_ends(m.shape[3], size[1]) for m in maps)))
    grid = u[:, rows][:, :, cols]
    torch.testing.assert_close(grid.amax((1, 2)), u.amax((1, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid.amin((1, 2)), u.amin((1, 2)), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_non_finite_layer_spoils_only_its_image() -> None:
    acts, grads, rois = layer_inputs(3, [(4, 6, 6), (3, 3, 5)], (20, 25), seed=2)
    acts[1][1, 0, 2, 2] = float("nan")
    grads[0][2, 1, 0, 0] = float("inf")
    got = gradcam_dice_layers(on_device(acts), on_device(grads), rois.to(DEVICE), backend="triton")
    assert torch.isnan(got.dice.cpu()[1:]).all() and not got.hit.cpu()[1:].any()
    want = reference.gradcam_dice_layers_checked(acts, grads, rois, 0.5)
    assert torch.isnan(want.dice[1:]).all()
    assert_close_results(RoiAgreement(*(t[:1] for t in got[:4]), None), RoiAgreement(*(t[:1] for t in want[:4]), None))


def test_one_layer_is_gradcam_dice_and_errors_are_one_line() -> None:
    acts, grads, rois = layer_inputs(2, [(4, 5, 6)], (11, 13), seed=1)
    one = gradcam_dice_layers(acts, grads, rois)
    direct = gradcam_dice(acts[0], grads[0], rois)
    for x, y in zip(one[:4], direct[:4]):
        assert torch.equal(x, y)
    acts2, grads2, _ = layer_inputs(2, [(4, 5, 6), (3, 2, 2)], (11, 13), seed=1)
    with pytest.raises(XalError, match=r"gradients: expected one per layer's activations \(>= 1 layer\), got 1 for 2"):
        gradcam_dice_layers(acts2, grads2[:1], rois)
    with pytest.raises(XalError, match=r"activations\[1\]: expected 2 images"):
        gradcam_dice_layers([acts2[0], acts2[1][:1]], [grads2[0], grads2[1][:1]], rois[:2])
    five = layer_inputs(2, [(2, 3, 3)] * 5, (11, 13), seed=1)
    with pytest.raises(XalError, match="layers: the kernel combines 2 to 4 target layers, got 5"):
        gradcam_dice_layers(on_device(five[0]), on_device(five[1]), five[2].to(DEVICE), backend="triton")
    # "auto" takes the reference for more layers than the kernel combines (and on CPU tensors)
    auto = gradcam_dice_layers(five[0], five[1], five[2])
    want = reference.gradcam_dice_layers_checked(five[0], five[1], five[2], 0.5)
    for x, y in zip(auto[:4], want[:4]):
        assert torch.equal(x, y)


def test_empty_batch() -> None:
    acts, grads, rois = layer_inputs(0, [(3, 4, 4), (2, 2, 2)], (6, 7), seed=0)
    got = gradcam_dice_layers(on_device(acts), on_device(grads), rois.to(DEVICE), backend="triton")
    assert got.dice.shape == (0,) and got.hit.shape == (0,) and got.cam is None
