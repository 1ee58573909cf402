"""The CPU path of stage 2 + ROI agreement equals the reference bit for bit: random odd shapes, slices
of every size, every edge case (all-zero map, NaN map, empty and full ROIs, tau 0 and 1, one image)."""

import pytest
import torch

from xal_engine.ops import cpu_agreement
from xal_engine.ops.cpu_agreement import Workspace, slice_images, upsample_agreement, upsample_agreement_torch
from xal_engine.ops.reference import low_res_cam, roi_agreement, upsample_normalise


def reference(cam, rois, threshold):
    return roi_agreement(upsample_normalise(cam, tuple(rois.shape[1:])), rois, threshold)


def assert_bit_equal(got, want):
    for name, g, w in zip(("dice", "soft_dice", "energy", "hit"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.dtype.is_floating_point:
            assert torch.equal(torch.isnan(g), torch.isnan(w)), name
            g, w = torch.nan_to_num(g, nan=-1.0), torch.nan_to_num(w, nan=-1.0)
        assert torch.equal(g, w), (name, (g.float() - w.float()).abs().max())


@pytest.mark.parametrize("seed", range(12))
def test_random_odd_shapes_equal_the_reference_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(2, 40, (1,), generator=g))
    h, w = (int(v) for v in torch.randint(1, 16, (2,), generator=g))
    height, width = h + int(torch.randint(0, 200, (1,), generator=g)), w + int(torch.randint(0, 200, (1,), generator=g))
    cam = torch.rand(batch, h, w, generator=g)
    rois = torch.rand(batch, height, width, generator=g) < float(torch.rand(1, generator=g))
    threshold = float(torch.rand(1, generator=g))
    want = reference(cam, rois, threshold)
    assert_bit_equal(upsample_agreement(cam, rois, threshold, Workspace()), want)  # compiled where it may
    assert_bit_equal(upsample_agreement_torch(cam, rois, threshold, Workspace()), want)


@pytest.mark.parametrize("slice_pixels", [1, 100, 3000, 1 << 30])
def test_every_slice_size_gives_the_same_bits(monkeypatch, slice_pixels):
    """Slices of 2 images (the smallest), of 3 (the last slice of one joins the one before), of all."""
    monkeypatch.setattr(cpu_agreement, "SLICE_PIXELS", slice_pixels)
    g = torch.Generator().manual_seed(5)
    cam, rois = torch.rand(7, 5, 6, generator=g), torch.rand(7, 33, 41, generator=g) > 0.6
    assert_bit_equal(upsample_agreement(cam, rois, 0.4, Workspace()), reference(cam, rois, 0.4))


def test_slices_hold_at_least_two_images_and_at_most_the_batch():
    assert slice_images(64, 224 * 224) == 10 and slice_images(64, 1024 * 1024) == 2
    assert slice_images(3, 8 * 8) == 3


def edge_cases(side: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Seven maps (side x side) and ROIs (size), one case each: 0 all-zero map, 1 NaN map, 2 a single
    peak on zeros (the argmax is the first of the tied maxima), 3 random, 4 empty ROI, 5 full ROI,
    6 a map with an inf."""
    g = torch.Generator().manual_seed(1)
    cam = torch.rand(7, side, side, generator=g)
    cam[0] = 0.0  # all-zero map: zeros and no hit, even at tau 0
    cam[1] = float("nan")  # a non-finite image: NaN metrics, no hit
    cam[2] = 0.0
    cam[2, side // 2, side // 3] = 1.0  # one peak
    cam[6, 0, side - 1] = float("inf")
    rois = torch.rand(7, *size, generator=g) > 0.5
    rois[4] = False  # empty ROI: zero denominators give 0
    rois[5] = True  # the whole image
    return cam, rois


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_edge_cases_equal_the_reference(threshold):
    cam, rois = edge_cases(7, (50, 45))
    got = upsample_agreement_torch(cam, rois, threshold, Workspace())
    assert_bit_equal(got, reference(cam, rois, threshold))
    assert got[0][0] == 0 and not got[3][0] and torch.isnan(got[0][1]) and not got[3][1]


def test_one_image_and_a_reused_workspace_equal_the_reference():
    g = torch.Generator().manual_seed(2)
    ws = Workspace()
    for batch in (1, 2, 5, 2):  # the workspace is rebuilt per slice shape and reused across calls
        cam, rois = torch.rand(batch, 4, 4, generator=g), torch.rand(batch, 30, 30, generator=g) > 0.5
        assert_bit_equal(upsample_agreement(cam, rois, 0.5, ws), reference(cam, rois, 0.5))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stage_one_with_kept_products_equals_the_reference(method, channels_last):
    """low_res_cam_cpu writes w_k A_k into a kept buffer of A's layout: the reference's maps, bit for bit,
    on contiguous and channels-last maps (the product's layout sets the order of the channel sum)."""
    ws = Workspace()
    g = torch.Generator().manual_seed(11)
    for shape in [(6, 16, 56, 56), (5, 33, 13, 17), (3, 512, 7, 7), (6, 16, 56, 56)]:
        a, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        if channels_last:
            a, grad = a.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
        a[1, 0, 0, 0] = float("nan")  # a non-finite image stays NaN
        got, want = cpu_agreement.low_res_cam_cpu(a, grad, method, ws), low_res_cam(a, grad, method)
        assert torch.equal(torch.nan_to_num(got, nan=-1.0), torch.nan_to_num(want, nan=-1.0)), shape
        assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
