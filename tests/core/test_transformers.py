"""vit_b_16 and swin_t: the token→map reshape, default layers, and every CAM method against
pytorch-grad-cam 1.5.7 with its ``reshape_transform`` convention (random init, small odd images).

Tolerances: maps 1e-5 as for the CNNs, except XGradCAM on ViT (1e-3): ViT's target layer is a
LayerNorm whose outputs are signed, so its per-channel sums ΣA over the 3×3 patch grid nearly cancel
for some channels and w = Σ G·A / (ΣA + 1e-7) amplifies the fp32 rounding of ΣA (numpy's pairwise
sum vs torch's) — both are equally right, neither is exact. EigenCAM: 1e-4 against the library's
sign-corrected projection (see ``ops.cam_methods``).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam
import pytorch_grad_cam.eigen_cam as eigen_module
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

from xal_engine.core import compat
from xal_engine.core.capture import capture
from xal_engine.core.explanation import ExplanationTerm
from xal_engine.core.models import (
    ChannelsLastMap,
    TokenGrid,
    build_model,
    choose_target_layer,
    feature_map_sizes,
    parse_arch,
    reshape_transform,
)
from xal_engine.core.scoring import score_batch
from xal_engine.errors import XalError

_MODELS: dict[str, torch.nn.Module] = {}
SIZES = {"vit_b_16": (48, 48), "swin_t": (61, 75)}
LAYERS = {"vit_b_16": "encoder.layers.encoder_layer_11.ln_1", "swin_t": "features.5"}
CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "hirescam": "HiResCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM"}


def model(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = build_model(arch, 5, 3, image_size=SIZES[arch]).eval()
    return _MODELS[arch]


def test_token_grid_is_pytorch_grad_cams_vit_reshape() -> None:
    t = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(2, 10, 4)  # class token + 3x3 grid, D = 4
    want = t[:, 1:, :].reshape(2, 3, 3, 4).transpose(2, 3).transpose(1, 2)  # the library's example
    assert torch.equal(TokenGrid(1)(t), want)
    assert TokenGrid(1)(t)[0, :, 0, 1].tolist() == t[0, 2].tolist()  # token 2 = row 0, column 1
    x = torch.zeros(2, 3, 4, 5)
    assert TokenGrid(1)(x) is x and ChannelsLastMap()(x).shape == (2, 5, 3, 4)
    with pytest.raises(XalError, match="are not 1 class token"):
        TokenGrid(1)(torch.zeros(1, 9, 4))


def test_default_layers_and_map_sizes() -> None:
    assert parse_arch("vit_b_16").target_layer == "encoder.layers.encoder_layer_11.ln_1"
    assert parse_arch("swin_t").target_layer == "features.7"
    assert feature_map_sizes(model("vit_b_16"), ["encoder.layers.encoder_layer_11.ln_1"], (3, 48, 48)) == \
        {"encoder.layers.encoder_layer_11.ln_1": (3, 3)}
    assert choose_target_layer(model("swin_t"), "swin_t", (3, 61, 75)).name == "features.3"  # 8x9 map
    assert choose_target_layer(model("swin_t"), "swin_t", (3, 224, 224)).name == "features.7"  # 7x7


def test_vit_needs_square_images_of_whole_patches() -> None:
    with pytest.raises(XalError, match="vit_b_16 needs square images whose side is a multiple of 16; got 48x64"):
        build_model("vit_b_16", 3, 1, image_size=(48, 64))
    net = build_model("vit_b_16", 3, 1, image_size=(32, 32))
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def test_local_vit_weights_at_another_size(tmp_path) -> None:
    torch.manual_seed(1)
    ref = build_model("vit_b_16", 1000, 3)  # a 224² 3-channel state dict, as torchvision's
    path = tmp_path / "vit.pt"
    torch.save(ref.state_dict(), path)
    net = build_model("vit_b_16", 4, 3, pretrained=path, image_size=(32, 32))
    assert net.encoder.pos_embedding.shape == (1, 5, 768)
    torch.testing.assert_close(net.encoder.layers[0].ln_1.weight, ref.encoder.layers[0].ln_1.weight)


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_parity_with_pytorch_grad_cam(arch: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    net = model(arch)
    x = torch.randn(2, 3, *SIZES[arch], generator=torch.Generator().manual_seed(7))
    targets = [ClassifierOutputTarget(c) for c in (1, 3)]  # per-image targets
    layer = LAYERS[arch]
    got = getattr(compat, CLASSES[method])(net, [layer])(input_tensor=x, targets=targets)  # reshape: the arch's
    explicit = getattr(compat, CLASSES[method])(net, [layer], reshape_transform=reshape_transform(arch))
    np.testing.assert_array_equal(explicit(input_tensor=x, targets=targets), got)  # pytorch-grad-cam's convention
    if method == "eigencam":
        monkeypatch.setattr(eigen_module, "get_2d_projection", get_2d_projection_with_sign_correction)
    ref_cls = getattr(pytorch_grad_cam, CLASSES[method])
    with ref_cls(net, [net.get_submodule(layer)], reshape_transform=reshape_transform(arch)) as cam:
        want = cam(input_tensor=x, targets=targets)
    net.zero_grad(set_to_none=True)
    assert (want.reshape(2, -1).max(1) > 0.99).any()
    atol = {"eigencam": 1e-4}.get(method, 1e-3 if (arch, method) == ("vit_b_16", "xgradcam") else 1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_capture_score_and_explanation_use_the_arch_reshape() -> None:
    net = model("vit_b_16")
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    out = capture(net, LAYERS["vit_b_16"], x)
    assert out.activations[0].shape == (3, 768, 3, 3) and out.gradients[0].shape == (3, 768, 3, 3)
    rois = torch.zeros(3, 48, 48, dtype=torch.bool)
    rois[:, :20, :20] = True
    scores = score_batch(net, LAYERS["vit_b_16"], x, rois, return_cam=True, cam_method="layercam")
    assert scores.cam.shape == (3, 3, 3) and torch.isfinite(scores.dice).all()
    net.train()
    try:
        with ExplanationTerm(net.get_submodule(LAYERS["vit_b_16"]), 1.0, "gradcam++",
                             reshape_transform("vit_b_16")) as term:
            with term.forward_context():  # attention with a double backward
                logits = net(x)
            loss = term(logits, torch.tensor([0, 1, 2]), rois, torch.ones(3, dtype=torch.bool))
        loss.backward()
        assert 0 < loss.item() < 1 and net.encoder.layers[11].ln_1.weight.grad is not None
    finally:
        net.eval()
        net.zero_grad(set_to_none=True)
