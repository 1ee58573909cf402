"""The 3-D torch reference (ops.reference3d) against hand-computed volumes and the 2-D reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xal_engine.errors import XalError
from xal_engine.ops import reference, reference3d
from xal_engine.ops.cam_methods import CAM_METHODS

f32 = np.float32
ULP1 = f32(2.0**-23)  # fl(1 + 1e-7) = 1 + 2**-23: the stage-2 denominator when min U = 0, max U = 1
METHODS = list(CAM_METHODS)


def random_volumes(b: int, c: int, dhw: tuple[int, int, int], size: tuple[int, int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, c, *dhw, generator=gen).clamp_min(0)  # a stage output: gradcam++'s ΣA stays > 0
    g = torch.randn(b, c, *dhw, generator=gen)
    return a, g, torch.rand(b, *size, generator=gen) > 0.6


@pytest.mark.parametrize("method", METHODS)
def test_depth_one_is_the_2d_reference(method: str) -> None:
    # d = D = 1: trilinear along a size-1 depth is the identity, so the 3-D path is the 2-D one up to
    # the summation order of the per-channel reductions over (h*w, 1) instead of (h, w) (a few ulp).
    a, g, rois = random_volumes(3, 5, (1, 7, 9), (1, 33, 40), seed=1)
    got = reference3d.gradcam_dice_3d(a, g, rois, 0.4, return_cam=True, method=method)
    ref = reference.gradcam_dice(a[:, :, 0], g[:, :, 0], rois[:, 0], 0.4, return_cam=True, method=method)
    s = reference.gradcam_maps(a[:, :, 0], g[:, :, 0], (33, 40), method)
    assert ((s - 0.4).abs() > 1e-5).all()  # no voxel within float noise of the threshold
    for name in ("dice", "soft_dice", "energy"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-6, msg=name)
    assert torch.equal(got.hit, ref.hit)
    torch.testing.assert_close(got.cam[:, 0], ref.cam, rtol=0, atol=1e-6)
    torch.testing.assert_close(reference3d.gradcam_maps_3d(a, g, (1, 33, 40), method)[:, 0], s, rtol=0,
                               atol=1e-6)


def test_trilinear_and_agreement_by_hand() -> None:
    # A = M on a (1, 1, 2) feature volume [0, 1024] -> N = [0, 1] exactly (1024 + 1e-7 rounds to 1024).
    # Upsampled to (2, 2, 4): depth and height are 1 -> 2 (source index clamps to 0: weight 1 on the only
    # voxel), width 2 -> 4 (scale 0.5): U row = [0, 0.25, 0.75, 1]; S = U / (1 + 2**-23).
    a = torch.tensor([0.0, 1024.0]).view(1, 1, 1, 1, 2)
    den = f32(1) + ULP1
    row = torch.tensor([f32(0), f32(0.25) / den, f32(0.75) / den, f32(1) / den])
    s = reference3d.gradcam_maps_3d(a, torch.ones_like(a), (2, 2, 4))
    torch.testing.assert_close(s, row.expand(1, 2, 2, 4), rtol=0, atol=0)
    rois = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    rois[0, 1, 0, 3] = rois[0, 0, 1, 1] = True  # S = 1/den (attended) and S = 0.25/den (not attended)
    out = reference3d.gradcam_dice_3d(a, torch.ones_like(a), rois, threshold=0.5)
    # attended: x in {2, 3} of all 4 rows (8 voxels); |R| = 2; intersection 1 -> 2 / 10
    assert out.dice.item() == pytest.approx(2 / 10, abs=1e-7)
    s_roi, s_sum = float(row[3] + row[1]), 4 * float(row.sum())
    assert out.soft_dice.item() == pytest.approx(2 * s_roi / (s_sum + 2), rel=1e-6)
    assert out.energy.item() == pytest.approx(s_roi / s_sum, rel=1e-6)
    assert not out.hit.item()  # first maximum (z, y, x) = (0, 0, 3) is outside the ROI
    rois[0, 0, 0, 3] = True
    assert reference3d.gradcam_dice_3d(a, torch.ones_like(a), rois).hit.item()


def test_depth_interpolation_by_hand() -> None:
    # M varies along depth only: (2, 1, 1) = [0, 1024] -> (4, 1, 1): U = [0, 0.25, 0.75, 1] along z.
    a = torch.tensor([0.0, 1024.0]).view(1, 1, 2, 1, 1)
    s = reference3d.gradcam_maps_3d(a, torch.ones_like(a), (4, 3, 2))
    den = f32(1) + ULP1
    col = torch.tensor([f32(0), f32(0.25) / den, f32(0.75) / den, f32(1) / den])
    torch.testing.assert_close(s, col.view(1, 4, 1, 1).expand(1, 4, 3, 2), rtol=0, atol=0)


def test_methods_are_their_volume_definitions() -> None:
    # Each method re-derived directly in 5-D (sums and means over d, h, w), not through the column view.
    a, g, _ = random_volumes(2, 4, (3, 4, 5), (6, 7, 8), seed=2)
    sa = a.sum(dim=(2, 3, 4), keepdim=True)
    g2 = g**2
    pp = torch.where(g != 0, g2 / (2 * g2 + sa * g2 * g + 1e-6), 0.0)
    expected = {
        "gradcam": (g.mean(dim=(2, 3, 4))[:, :, None, None, None] * a).sum(1),
        "gradcam++": ((g.clamp_min(0) * pp).sum(dim=(2, 3, 4))[:, :, None, None, None] * a).sum(1),
        "xgradcam": ((g * a / (sa + 1e-7)).sum(dim=(2, 3, 4))[:, :, None, None, None] * a).sum(1),
        "hirescam": (g * a).sum(1),
        "layercam": (g.clamp_min(0) * a).sum(1),
    }
    for name, m in expected.items():
        torch.testing.assert_close(reference3d.cam_3d(a, g, name), m, rtol=1e-5, atol=1e-5, msg=name)
    # EigenCAM: projection of the centred (d*h*w, C) activations on their first right singular vector
    x = a[0].flatten(1).T.double()
    x = x - x.mean(0)
    v = torch.linalg.svd(x, full_matrices=False)[2][0]
    m = (x @ v).float().view(3, 4, 5)
    m = -m if m.min().abs() > m.max().abs() else m
    torch.testing.assert_close(reference3d.cam_3d(a, g, "eigencam")[0], m, rtol=1e-5, atol=1e-5)


def test_edge_cases_per_volume() -> None:
    a, g, rois = random_volumes(4, 3, (2, 3, 3), (5, 7, 6), seed=3)
    a = a + 0.1
    g[0] = -g[0].abs() - 0.1  # volume 0: every weight negative -> all-zero CAM
    rois[1] = False  # volume 1: empty ROI
    rois[2] = True  # volume 2: full ROI
    a[3, 1, 1, 2, 0] = float("nan")  # volume 3: non-finite input
    out = reference3d.gradcam_dice_3d(a, g, rois, return_cam=True)
    assert out.dice[0] == 0 and out.soft_dice[0] == 0 and out.energy[0] == 0 and not out.hit[0]
    assert out.dice[1] == 0 and out.soft_dice[1] == 0 and out.energy[1] == 0 and not out.hit[1]
    assert out.energy[2] == 1.0 and out.hit[2]
    assert torch.isnan(out.dice[3]) and torch.isnan(out.energy[3]) and not out.hit[3]
    assert torch.isnan(out.cam[3]).all() and not torch.isnan(out.cam[:3]).any()
    alone = reference3d.gradcam_dice_3d(a[:3], g[:3], rois[:3])
    assert torch.equal(alone.dice, out.dice[:3])


def test_one_voxel_feature_map_is_all_zero() -> None:
    a, g, rois = random_volumes(2, 3, (1, 1, 1), (4, 5, 6), seed=4)
    out = reference3d.gradcam_dice_3d(a, g, rois, threshold=0.0)
    assert (out.dice == 0).all() and (out.soft_dice == 0).all() and not out.hit.any()


def test_low_precision_inputs_are_computed_in_fp32() -> None:
    a, g, rois = random_volumes(2, 3, (3, 2, 4), (5, 6, 7), seed=5)
    half = reference3d.gradcam_dice_3d(a.half(), g.bfloat16(), rois, return_cam=True)
    ref = reference3d.gradcam_dice_3d(a.half().float(), g.bfloat16().float(), rois, return_cam=True)
    assert half.cam.dtype == torch.float32
    for x, y in zip(half, ref):
        assert torch.equal(x, y)


def test_empty_batch() -> None:
    a, g, _ = random_volumes(0, 3, (2, 3, 4), (5, 6, 7), seed=0)
    out = reference3d.gradcam_dice_3d(a, g, torch.zeros(0, 5, 6, 7, dtype=torch.bool), return_cam=True)
    assert out.dice.shape == (0,) and out.cam.shape == (0, 2, 3, 4)


def test_wants_volumes() -> None:
    a, g, rois = random_volumes(2, 3, (2, 3, 4), (5, 6, 7), seed=0)
    with pytest.raises(XalError, match=r"activations: expected shape \(B, C, d, h, w\)"):
        reference3d.gradcam_dice_3d(a[:, :, 0], g[:, :, 0], rois[:, 0])
    with pytest.raises(XalError, match=r"rois: expected shape \(B=2, D, H, W\)"):
        reference3d.gradcam_dice_3d(a, g, rois[:, 0])
    with pytest.raises(XalError, match="gives a map, not channel weights"):
        reference3d.method_weights_3d(a, g, "hirescam")
