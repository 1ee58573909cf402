"""The CAM-family drop-ins against pytorch-grad-cam 1.5.7's classes of the same name, on torchvision
backbones (random init, seeded) with odd input sizes and per-image targets; and score_batch's
``cam_method`` Dice against numpy Dice of the reference's maps.

Tolerances: maps 1e-5 and Dice 1e-4 (gradcam-reference.md) for the gradient methods; EigenCAM 1e-4 on
maps against 1.5.7's projection with its own sign correction applied (``ops.cam_methods`` states the
convention; 1.5.7's plain EigenCAM must then equal ours or the map of the negated component).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam
import pytorch_grad_cam.eigen_cam as eigen_module
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
from test_compat import CLASSES, DICE_ATOL, MAP_ATOL, TAU, model, numpy_agreement, random_rois
from torch import Tensor, nn

from xal_engine.bench.compare import near_tie_hits
from xal_engine.core import compat
from xal_engine.core.scoring import score_batch

EIGEN_ATOL = 1e-4
NAMES = {"gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
         "layercam": "LayerCAM", "eigencam": "EigenCAM"}


def reference_maps(method: str, net: nn.Module, layers: list[str], x: Tensor, targets: list | None) -> np.ndarray:
    cls = getattr(pytorch_grad_cam, NAMES.get(method, "GradCAM"))
    with cls(net, [net.get_submodule(name) for name in layers]) as cam:
        maps = cam(input_tensor=x, targets=targets)
    net.zero_grad(set_to_none=True)
    return maps


CASES = [  # arch, layers, (H, W), batch
    ("resnet18", ["layer4"], (61, 75), 3),
    ("resnet18", ["layer3", "layer4"], (48, 80), 2),
    ("resnet50", ["layer4"], (67, 53), 2),
    ("densenet121", ["features.denseblock4"], (71, 65), 2),
]


@pytest.mark.parametrize("method", list(NAMES))
@pytest.mark.parametrize(("arch", "layers", "size", "batch"), CASES,
                         ids=[f"{a}-{'+'.join(l)}-{s[0]}x{s[1]}-b{b}" for a, l, s, b in CASES])
def test_method_parity_with_pytorch_grad_cam(method: str, arch: str, layers: list[str], size: tuple[int, int],
                                             batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    net = model(arch)
    rng = np.random.default_rng(batch * 1000 + size[1])
    x = torch.from_numpy(rng.standard_normal((batch, 3, *size), dtype=np.float32))
    classes = rng.integers(0, CLASSES, batch).tolist()  # per-image targets
    targets = [ClassifierOutputTarget(c) for c in classes]
    cls = getattr(compat, NAMES[method])
    got = cls(net, layers)(input_tensor=x, targets=targets)
    assert got.dtype == np.float32 and got.shape == (batch, *size)
    if method == "eigencam":
        plain = reference_maps(method, net, layers, x, targets)
        monkeypatch.setattr(eigen_module, "get_2d_projection", get_2d_projection_with_sign_correction)
    ref = reference_maps(method, net, layers, x, targets)
    assert (ref.reshape(batch, -1).max(1) > 0.99).any()  # some non-trivial map: the comparison can fail
    atol = EIGEN_ATOL if method == "eigencam" else MAP_ATOL
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    if method == "eigencam" and len(layers) == 1:  # plain 1.5.7: same image, or its sign flipped
        for i in range(batch):
            assert np.abs(plain[i] - ref[i]).max() <= atol or np.abs(plain[i] - got[i]).max() > 1e-2
    if len(layers) == 1:  # score_batch's metrics against numpy ones of the reference's maps
        rois = random_rois(batch, *size, rng)
        scores = score_batch(net, layers[0], x, rois, targets=classes, threshold=TAU, cam_method=method)
        dice, soft, energy, hit = numpy_agreement(ref, rois, TAU)
        tie = (np.abs(ref - TAU) < atol).any((1, 2))  # a pixel within the map tolerance of tau may flip
        dice_atol = DICE_ATOL * (10 if method == "eigencam" else 1)
        np.testing.assert_allclose(scores.dice.numpy()[~tie], dice[~tie], rtol=0, atol=dice_atol)
        np.testing.assert_allclose(scores.soft_dice.numpy(), soft, rtol=0, atol=dice_atol)
        np.testing.assert_allclose(scores.energy.numpy(), energy, rtol=0, atol=dice_atol)
        sure = ~near_tie_hits(ref, rois, atol)
        np.testing.assert_array_equal(scores.hit.numpy()[sure], hit[sure])


def test_score_batch_default_method_unchanged() -> None:
    net = model("resnet18")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    rois = np.zeros((3, 64, 64), dtype=bool)
    rois[:, 10:40, 20:50] = True
    a = score_batch(net, "layer4", x, rois, return_cam=True)
    b = score_batch(net, "layer4", x, rois, return_cam=True, cam_method="gradcam")
    c = score_batch(net, "layer4", x, rois, return_cam=True, cam_method="layercam")
    assert torch.equal(a.dice, b.dice) and torch.equal(a.cam, b.cam)
    assert not torch.equal(a.cam, c.cam)
