"""The 3-D reference against MONAI's GradCAM (parity) and pytorch-grad-cam's 3-D GradCAM (a measured bound).

Models: a small random-init MONAI ResNet (basic blocks, 1-1-1-1) and DenseNet (2-2 blocks), both
``spatial_dims=3``, on odd-sized 5-D input; per-image targets (three different classes in one batch).
A and G come from our own capture (forward hook + ``torch.autograd.grad`` of the per-image target
logits), the map from ``reference3d.gradcam_maps_3d``.

MONAI 1.6 computes relu(sum_k w_k A_k) at feature resolution, upsamples it trilinearly
(align_corners=False) and rescales each volume to [1, 0] (``default_normalizer``: INVERTED, 1 = least
attended). Without the stage-1 min-max and the 1e-7 epsilons that is our S up to the affine
invariance of trilinear interpolation, so 1 - MONAI's output equals S to float noise (measured 1.1e-6
resnet, 8.6e-7 densenet, 2-D tolerance 1e-5; soft Dice and energy within 1.5e-7). Its class index is applied as ``logits[:, idx].squeeze()``:
a tensor of mixed per-image classes sums every listed class for every image (wrong maps), so the parity
runs MONAI once per volume with an int class; the test also pins that pitfall.

pytorch-grad-cam 1.5.7 resizes each volume with ``scipy.ndimage.zoom`` (cubic B-spline, corner-aligned
grid, then max(., 0) and min-max) instead of trilinear with half-pixel centres: measured on these models
max |dS| = 0.32 (resnet, 3x3x3 features) and 0.48 (densenet, 4x5x5); Dice at tau = 0.5 differs by
0.048 / 0.109 and soft Dice by 0.022 / 0.119 (asserted below as bounds with a small margin). Coarse
feature volumes make the two resizes differ most; documented in the README.
"""

from __future__ import annotations

import pytest
import torch

from xal_engine.ops import reference3d
from xal_engine.ops.reference import roi_agreement

monai_nets = pytest.importorskip("monai.networks.nets")
monai_visualize = pytest.importorskip("monai.visualize")

SIZE = (34, 38, 42)  # odd, non-cubic input; resnet layer4 gives 3x3x3, densenet's last relu 4x5x5
TARGETS = torch.tensor([0, 2, 1])  # one class per volume, all different


def capture(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor):
    """(A, G) of ``layer``: G = d(sum_b logit_b[target_b]) / dA, no parameter gradients needed."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
    return store["a"].detach(), g


def model(name: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if name == "resnet":
        net = monai_nets.ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64],
                                spatial_dims=3, n_input_channels=1, num_classes=3)
        return net.eval(), "layer4"
    net = monai_nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=8,
                              block_config=(2, 2))
    return net.eval(), "class_layers.relu"


@pytest.fixture(scope="module", params=["resnet", "densenet"])
def case(request):
    net, layer_name = model(request.param)
    x = torch.randn(3, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    layer = dict(net.named_modules())[layer_name]
    mon = monai_visualize.GradCAM(nn_module=net, target_layers=layer_name)
    # MONAI's output is (B, 1, D, H, W), inverted: 1 - it is the map
    monai_maps = torch.cat([1 - mon(x=x[i:i + 1], class_idx=int(t)) for i, t in enumerate(TARGETS)])[:, 0]
    a, g = capture(net, layer, x, TARGETS)
    s = reference3d.gradcam_maps_3d(a, g, SIZE)
    # an ROI overlapping the attended region but not equal to it: the map's top region, shifted
    rois = torch.roll(s >= 0.35, shifts=(3, -2, 4), dims=(1, 2, 3))
    return {"name": request.param, "net": net, "layer": layer, "layer_name": layer_name, "x": x, "a": a,
            "g": g, "s": s, "rois": rois, "monai": monai_maps, "monai_cam": mon}


def test_maps_match_monai(case) -> None:
    assert case["a"].shape[2:] == ((3, 3, 3) if case["name"] == "resnet" else (4, 5, 5))
    diff = (case["s"] - case["monai"]).abs().max().item()
    assert diff <= 1e-5, diff  # measured 1.1e-6 (resnet), 8.6e-7 (densenet)


def test_agreement_matches_monai(case) -> None:
    s, m, rois = case["s"], case["monai"], case["rois"]
    ours = reference3d.gradcam_dice_3d(case["a"], case["g"], rois)
    theirs = roi_agreement(m, rois)
    assert (ours.dice > 0.1).all()  # a meaningful overlap, not 0 = 0
    flipped = (s >= 0.5) != (m >= 0.5)
    assert ((s - 0.5).abs()[flipped] < 1e-5).all()  # masks differ only within float noise of tau
    # Dice within 1e-4 plus what the voxels within 1e-5 of tau can move it (each flips either way):
    # densenet volume 0 has a 16-voxel plateau at S = 0.5 +- 7e-7, all 16 flipped: |dDice| = 1.7e-3.
    near = ((s - 0.5).abs() < 1e-5).flatten(1).sum(1)
    slack = 2 * near / ((s >= 0.5).flatten(1).sum(1) + rois.flatten(1).sum(1))
    assert ((ours.dice - theirs[0]).abs() <= 1e-4 + slack).all()
    for got, ref in zip(ours[1:3], theirs[1:3]):  # soft Dice and energy: no threshold, 2-D tolerance
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert torch.equal(ours.hit, theirs[3])


def test_monai_mixed_classes_in_one_batch_are_wrong(case) -> None:
    # MONAI's class_score is logits[:, idx].squeeze(): with idx = (0, 2, 1) every volume gets the
    # gradient of the SUM of the three logits. The per-volume calls above are the correct maps.
    batched = 1 - case["monai_cam"](x=case["x"], class_idx=TARGETS)[:, 0]
    assert (batched - case["monai"]).abs().max() > 0.1


def test_pytorch_grad_cam_3d_difference_is_bounded(case) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(case["net"], [case["layer"]]) as cam:
        theirs = torch.from_numpy(cam(case["x"], [ClassifierOutputTarget(int(t)) for t in TARGETS]))
    assert theirs.shape == (3, *SIZE)
    s, rois = case["s"], case["rois"]
    map_diff = (s - theirs).abs().max().item()
    ours, ref = roi_agreement(s, rois), roi_agreement(theirs, rois)
    dice_diff = (ours[0] - ref[0]).abs().max().item()
    soft_diff = (ours[1] - ref[1]).abs().max().item()
    # cubic spline vs trilinear, corner-aligned vs half-pixel: a real difference, bounded as measured
    # measured (max |dS|, max |dDice|, max |dSoftDice|): resnet (0.318, 0.048, 0.022),
    # densenet (0.479, 0.109, 0.119)
    bounds = {"resnet": (0.35, 0.06, 0.03), "densenet": (0.50, 0.12, 0.13)}[case["name"]]
    assert map_diff > 0.05  # not the same resize: the bound below is not vacuous
    assert all(v <= b for v, b in zip((map_diff, dice_diff, soft_diff), bounds)), (map_diff, dice_diff, soft_diff)


def test_all_zero_cam_monai_attends_everything() -> None:
    # A CAM that is <= 0 everywhere: xal-engine defines S = 0 (dice 0, hit False). MONAI's
    # default_normalizer maps a constant map to 0 (rescale_array returns arr * minv), and 0 means
    # "most attended" in its inverted convention: 1 - its output is all ones, Dice = 2|R| / (N + |R|).
    a = torch.rand(1, 4, 2, 3, 3) + 0.1
    g = -torch.rand(1, 4, 2, 3, 3) - 0.1  # every channel weight negative
    rois = torch.zeros(1, 4, 6, 6, dtype=torch.bool)
    rois[0, 1:3, 2:4, 2:4] = True
    ours = reference3d.gradcam_dice_3d(a, g, rois)
    assert ours.dice.item() == 0 and not ours.hit.item()
    relu_map = torch.zeros(1, 1, 4, 6, 6)  # what MONAI's compute_map gives here
    monai_map = 1 - monai_visualize.class_activation_maps.default_normalizer(relu_map)[:, 0]
    assert torch.equal(monai_map, torch.ones(1, 4, 6, 6))
    assert roi_agreement(monai_map, rois)[0].item() == pytest.approx(2 * 8 / (144 + 8))
