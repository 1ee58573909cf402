"""3-D backbones for volume pools (xal_engine.core.models): torchvision's video ResNets, MONAI's
DenseNet121 / ResNet with spatial_dims=3, tiny3d; first-conv adaptation, default Grad-CAM layers,
check_arch_fits, head dropout, backbone files and checkpoints of volumes."""

from __future__ import annotations

import functools
import importlib.util
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from xal_engine.core.models import (
    ARCHS,
    DEFAULT_TARGET_LAYERS,
    Checkpoint,
    DropoutLinear,
    LayerChoice,
    adapt_conv_weight,
    archs_for,
    build_model,
    check_arch_fits,
    choose_target_layer,
    feature_map_sizes,
    head_dropout_p,
    head_layer,
    is_backbone_file,
    layer_choice,
    load_checkpoint,
    read_backbone,
    resolve_layer,
    save_backbone,
    save_checkpoint,
)
from xal_engine.errors import XalError

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="needs the monai extra")
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18")
MONAI = ("densenet121_3d", "resnet10_3d", "resnet18_3d")
ARCHS_3D = (*VIDEO, *MONAI, "tiny3d")


def _param(arch: str, *rest: object) -> object:
    return pytest.param(arch, *rest, marks=needs_monai) if arch in MONAI else pytest.param(arch, *rest)


@functools.cache
def _model(arch: str, in_channels: int = 1) -> nn.Module:
    """One seeded random-init model per (arch, channels), 3 classes, shared by the probe tests (the
    probe leaves it as it was: train mode)."""
    torch.manual_seed(0)
    return build_model(arch, 3, in_channels)


def test_the_3d_archs_are_in_the_registry_marked_3d() -> None:
    assert archs_for(3) == ARCHS_3D
    assert all(ARCHS[name].spatial_dims == 2 for name in archs_for(2))
    assert "resnet18" in archs_for(2) and "tiny" in archs_for(2) and len(archs_for(2)) + 7 == len(ARCHS)
    assert {name: DEFAULT_TARGET_LAYERS[name] for name in ARCHS_3D} == {
        "r3d_18": "layer4", "mc3_18": "layer4", "r2plus1d_18": "layer4", "densenet121_3d": "class_layers.relu",
        "resnet10_3d": "layer4", "resnet18_3d": "layer4", "tiny3d": "features"}


# an odd, small volume where the net allows; densenet121_3d is /32 and pools four times (>= 32 a side)
SHAPES = {"densenet121_3d": (32, 35, 37)}


@pytest.mark.parametrize("arch", [_param(a) for a in ARCHS_3D])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_each_3d_arch_gives_logits_and_a_5d_target_map(arch: str, in_channels: int) -> None:
    model = _model(arch, in_channels).eval()
    first = resolve_layer(model, ARCHS[arch].first_conv)
    assert type(first) is nn.Conv3d and first.in_channels == in_channels
    assert head_layer(model, arch).out_features == 3 and type(head_layer(model, arch)) is nn.Linear
    seen: list[torch.Size] = []
    handle = resolve_layer(model, DEFAULT_TARGET_LAYERS[arch]).register_forward_hook(
        lambda m, i, o: seen.append(o.shape))
    x = torch.rand(2, in_channels, *SHAPES.get(arch, (17, 20, 23)))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    model.train()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert len(seen) == 1 and len(seen[0]) == 5 and seen[0][0] == 2  # (B, C, d, h, w): the Grad-CAM A


@needs_monai
@pytest.mark.parametrize("arch,net,kwargs", [
    ("densenet121_3d", "DenseNet121", {"in_channels": 2, "out_channels": 3}),
    ("resnet10_3d", "resnet10", {"n_input_channels": 2, "num_classes": 3}),
])
def test_monai_archs_are_monais_networks(arch: str, net: str, kwargs: dict[str, int]) -> None:
    """The same forward as the network MONAI builds for C channels and K classes, given its weights."""
    from monai.networks import nets

    model = build_model(arch, 3, 2).eval()
    reference = getattr(nets, net)(spatial_dims=3, **kwargs).eval()
    reference.load_state_dict(model.state_dict(), strict=True)  # same keys and shapes
    x = torch.rand(2, 2, 32, 33, 34)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_monai_missing_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("monai", "monai.networks", "monai.networks.nets"):
        monkeypatch.setitem(sys.modules, name, None)  # `import monai` now raises ImportError
    for arch in MONAI:
        with pytest.raises(XalError, match=rf"^--arch {arch} needs MONAI \(the volumes extra\): "
                                           r"pip install 'xal-engine\[volumes\]'$"):
            build_model(arch, 2, 1)
    build_model("tiny3d", 2, 1)  # the others do not need it


# ---------------------------------------------------------------- first conv: the 2-D rule on 5-D filters
def test_adapt_conv_weight_on_5d_filters_hand_case() -> None:
    w = torch.tensor([1.0, 2.0, 6.0]).reshape(1, 3, 1, 1, 1).repeat(2, 1, 3, 1, 2)  # (2, 3, 3, 1, 2)
    assert adapt_conv_weight(w, 1).shape == (2, 1, 3, 1, 2)
    assert adapt_conv_weight(w, 1).unique().tolist() == [9.0]  # sum of RGB
    assert adapt_conv_weight(w, 2).shape == (2, 2, 3, 1, 2) and adapt_conv_weight(w, 2).unique().tolist() == [4.5]
    assert adapt_conv_weight(w, 6).unique().tolist() == [1.5]  # mean 3 * 3/6
    assert torch.equal(adapt_conv_weight(w, 3), w)


@pytest.fixture(scope="module")
def mc3_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision mc3_18 state dict (3 channels, 400 Kinetics classes), seeded, in a local file."""
    torch.manual_seed(5)
    state = torchvision.models.get_model("mc3_18", weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "mc3_18.pth"
    torch.save(state, path)
    return path, state


def test_local_video_weights_one_channel_sums_rgb(mc3_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = mc3_weights
    model = build_model("mc3_18", num_classes=4, in_channels=1, pretrained=path)
    got = model.state_dict()
    torch.testing.assert_close(got["stem.0.weight"], state["stem.0.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(got["layer4.1.conv2.0.weight"], state["layer4.1.conv2.0.weight"])
    assert got["fc.weight"].shape == (4, 512)  # a fresh head
    # A grey 1-channel volume gives the same stem response as the 3-channel volume with equal channels.
    x = torch.rand(1, 1, 5, 12, 14)
    rgb_stem = torch.nn.functional.conv3d(x.expand(1, 3, 5, 12, 14), state["stem.0.weight"],
                                          stride=(1, 2, 2), padding=(1, 3, 3))
    torch.testing.assert_close(model.stem[0](x), rgb_stem, rtol=1e-5, atol=1e-5)


def test_local_video_weights_four_channels(mc3_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = mc3_weights
    model = build_model("mc3_18", num_classes=2, in_channels=4, pretrained=path)
    w = state["stem.0.weight"]  # (64, 3, 3, 7, 7)
    expected = (w.mean(dim=1, keepdim=True) * 3 / 4).expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(model.state_dict()["stem.0.weight"], expected)


def test_video_weights_errors(mc3_weights: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(XalError, match=r"mc3_18\.pth does not fit torchvision r3d_18 \(3 channels, 400 classes\)"):
        build_model("r3d_18", 2, 1, pretrained=mc3_weights[0])
    # The published Kinetics weights are a download: one line offline.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(XalError, match=r"^published mc3_18 weights are not available offline.*URLError.*"
                                       r"place mc3_18-a90a0ba3\.pth under"):
        build_model("mc3_18", 2, 1, pretrained="imagenet")
    assert len(calls) == 1 and calls[0].endswith("mc3_18-a90a0ba3.pth")


@pytest.mark.parametrize("arch", [_param(a) for a in (*MONAI, "tiny3d")])
def test_archs_built_here_refuse_published_weights(arch: str, tmp_path: Path) -> None:
    for pretrained in ("imagenet", tmp_path / "w.pth"):
        with pytest.raises(XalError, match=rf"^--pretrained: {arch} has no published weights"):
            build_model(arch, 3, 1, pretrained=pretrained)


# ---------------------------------------------------------------- the default Grad-CAM layer of volumes
# By hand (cube side S): r3d_18 and r2plus1d_18 keep D in the stem (stride (1, 2, 2)), then halve D, H, W
# from layer2 on; mc3_18 never strides along D; MONAI's resnets have a stride-1 stem and a stride-2 max
# pool, then halve from layer2 on; MONAI's DenseNet121 halves twice in the stem and once per transition;
# tiny3d's conv strides 4.
@pytest.mark.parametrize("arch,side,name,size", [_param(*case) for case in [
    ("r3d_18", 32, "layer2", (16, 8, 8)),  # layer3: (8, 4, 4)
    ("r3d_18", 64, "layer3", (16, 8, 8)),
    ("r2plus1d_18", 32, "layer2", (16, 8, 8)),
    ("r2plus1d_18", 64, "layer3", (16, 8, 8)),
    ("mc3_18", 32, "layer2", (32, 8, 8)),  # D is never halved: the smallest side decides
    ("mc3_18", 64, "layer3", (64, 8, 8)),
    ("densenet121_3d", 32, "features.denseblock1", (8, 8, 8)),  # 32 / 2 / 2
    ("densenet121_3d", 64, "features.denseblock2", (8, 8, 8)),
    ("densenet121_3d", 128, "features.denseblock3", (8, 8, 8)),
    ("resnet10_3d", 32, "layer2", (8, 8, 8)),  # 32 / 2 (max pool) / 2
    ("resnet10_3d", 64, "layer3", (8, 8, 8)),
    ("resnet18_3d", 32, "layer2", (8, 8, 8)),
    ("resnet18_3d", 64, "layer3", (8, 8, 8)),
    ("tiny3d", 32, "features", (8, 8, 8)),
    ("tiny3d", 64, "features", (16, 16, 16)),
]])
def test_default_target_layer_is_the_deepest_with_a_7_cube(arch: str, side: int, name: str,
                                                          size: tuple[int, int, int]) -> None:
    model = _model(arch)
    assert choose_target_layer(model, arch, (1, side, side, side)) == LayerChoice(name, size, True)
    assert model.training  # the probe's eval mode is undone


def test_anisotropic_volumes_and_no_candidate_reaching_the_minimum() -> None:
    r3d = _model("r3d_18")
    # (16, 64, 64): layer2 (8, 16, 16); layer3 (4, 8, 8) has a side under 7
    assert choose_target_layer(r3d, "r3d_18", (1, 16, 64, 64)) == LayerChoice("layer2", (8, 16, 16), True)
    # D = 4: no stage reaches 7 along D; the largest map is layer1's (4·16·16 = 1024 cells)
    assert choose_target_layer(r3d, "r3d_18", (1, 4, 32, 32)) == LayerChoice("layer1", (4, 16, 16), False)
    assert choose_target_layer(_model("tiny3d"), "tiny3d", (1, 8, 9, 40)) == \
        LayerChoice("features", (2, 3, 10), False)
    choice = layer_choice(r3d, "layer3", (1, 40, 64, 72))
    assert choice == LayerChoice("layer3", (10, 8, 9), True) and choice.describe() == "layer3 (10x8x9 map)"


def test_feature_map_sizes_of_volumes_and_errors() -> None:
    model = _model("r3d_18")
    assert feature_map_sizes(model, ["layer4", "layer1"], (1, 16, 64, 96)) == {"layer4": (2, 4, 6),
                                                                              "layer1": (16, 32, 48)}
    with pytest.raises(XalError, match=r"layer 'fc' gives \(1, 3\), not a \(B, C, d, h, w\) feature map"):
        feature_map_sizes(model, ["fc"], (1, 16, 32, 32))
    # A Conv3d reads an unbatched (C, D, H, W): a 2-D probe would run, so it is refused up front.
    with pytest.raises(XalError, match=r"^a 1x32x32 image does not fit the model \(a 3-D model: it reads "
                                       r"\(C, D, H, W\) volumes\)$"):
        feature_map_sizes(_model("tiny3d"), ["features"], (1, 32, 32))
    with pytest.raises(XalError, match=r"^a 1x8x32x32 volume does not fit the model \(a 2-D model"):
        feature_map_sizes(build_model("tiny", 3, 1), ["features"], (1, 8, 32, 32))
    with pytest.raises(XalError, match=r"image shape must be \(C, H, W\) or \(C, D, H, W\), got \(1, 32\)"):
        feature_map_sizes(model, ["layer1"], (1, 32))


@needs_monai
def test_a_volume_too_small_for_densenet_is_one_line() -> None:
    with pytest.raises(XalError, match=r"^a 1x8x8x8 volume does not fit the model"):
        feature_map_sizes(_model("densenet121_3d"), ["class_layers.relu"], (1, 8, 8, 8))


# ---------------------------------------------------------------- check_arch_fits
def test_check_arch_fits_refuses_the_other_dimensionality() -> None:
    check_arch_fits("r3d_18", 3)
    check_arch_fits("resnet18", 2, pool="p.zarr")
    with pytest.raises(XalError) as err:
        check_arch_fits("r3d_18", 2, pool="/data/chest.zarr")
    assert str(err.value) == ("--arch r3d_18 is a 3-D backbone; pool /data/chest.zarr holds 2-D images "
                              f"(expected one of: {', '.join(archs_for(2))})")
    with pytest.raises(XalError) as err:
        check_arch_fits("densenet121", 3)
    assert str(err.value) == ("--arch densenet121 is a 2-D backbone; this pool holds volumes (3-D) "
                              "(expected one of: r3d_18, mc3_18, r2plus1d_18, densenet121_3d, resnet10_3d, "
                              "resnet18_3d, tiny3d)")
    with pytest.raises(XalError, match="unknown architecture 'r3d_50'"):
        check_arch_fits("r3d_50", 3)


# ---------------------------------------------------------------- head dropout (MC dropout)
@pytest.mark.parametrize("arch", [_param(a) for a in ARCHS_3D])
def test_head_dropout_goes_before_each_3d_head(arch: str) -> None:
    model = build_model(arch, 3, 1, head_dropout=0.5)
    head = head_layer(model, arch)
    assert isinstance(head, DropoutLinear) and head.dropout.p == 0.5 and head_dropout_p(model, arch) == 0.5
    assert list(model.state_dict()) == list(_model(arch).state_dict())  # same keys as without dropout
    assert head_dropout_p(_model(arch), arch) == 0.0


def test_tiny3d_head_dropout_drops_in_train_mode_only() -> None:
    torch.manual_seed(0)
    plain = build_model("tiny3d", 3, 2)
    dropped = build_model("tiny3d", 3, 2, head_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))  # eval: dropout is the identity
        assert (dropped.fc.train().dropout(torch.ones(4, 16)) == 0).any()  # train: it drops


# ---------------------------------------------------------------- tiny3d by hand
def _tiny3d_reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = relu(conv3d(x, 7³, stride 4, pad 3)), logits = fc(mean_dhw(A)); (A, logits)."""
    conv = model.features[0]
    act = torch.relu(torch.nn.functional.conv3d(x, conv.weight, conv.bias, stride=4, padding=3))
    return act, act.mean(dim=(2, 3, 4)) @ model.fc.weight.T + model.fc.bias


@pytest.mark.parametrize("in_channels,classes", [(1, 2), (4, 5)])
def test_tiny3d_matches_its_hand_written_forward(in_channels: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model("tiny3d", classes, in_channels).eval()
    x = torch.rand(2, in_channels, 17, 20, 23)
    with torch.no_grad():
        act, want = _tiny3d_reference(model, x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert act.shape[2:] == (5, 5, 6)  # (17 + 6 - 7) // 4 + 1, ...
    assert sum(p.numel() for p in model.parameters()) == 16 * (343 * in_channels + 1) + classes * 17


# ---------------------------------------------------------------- Grad-CAM on MONAI's usual layer
@needs_monai
def test_densenet121_3d_class_layers_relu_gradient_is_the_head_weight() -> None:
    """class_layers.relu -> global average pool -> out: dscore/dA[c, voxel] = W[pred, c] / (d·h·w), so
    its Grad-CAM weights are the head's (the CAM of Zhou et al.); the ReLU is in place, captured anyway."""
    from xal_engine.core.capture import capture

    torch.manual_seed(0)
    model = build_model("densenet121_3d", 3, 1).eval()
    got = capture(model, "class_layers.relu", torch.rand(2, 1, 64, 64, 64))
    act, grad = got.activations[0], got.gradients[0]
    assert act.shape == (2, 1024, 2, 2, 2) and (act >= 0).all()
    pred = got.logits.argmax(dim=1)
    want = (model.class_layers.out.weight[pred] / 8)[:, :, None, None, None].expand_as(grad)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- backbone files and checkpoints
def test_tiny3d_backbone_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pretext = build_model("tiny3d", 4, 2)  # e.g. 4 rotation classes
    path = save_backbone(tmp_path / "backbone.pt", pretext, "tiny3d", 2, {"method": "rotation"})
    assert is_backbone_file(path)
    payload = read_backbone(path)
    assert payload is not None and payload["arch"] == "tiny3d" and payload["in_channels"] == 2
    assert sorted(payload["state_dict"]) == ["features.0.bias", "features.0.weight"]  # no head
    model = build_model("tiny3d", 3, 2, pretrained=path)
    assert torch.equal(model.features[0].weight, pretext.features[0].weight)
    assert torch.equal(model.features[0].bias, pretext.features[0].bias)
    assert model.fc.out_features == 3  # a fresh head
    with pytest.raises(XalError, match="reads 2-channel images; this pool has 1"):
        build_model("tiny3d", 3, 1, pretrained=path)
    with pytest.raises(XalError, match="holds a tiny3d trunk, not tiny; pass --arch tiny3d"):
        build_model("tiny", 3, 2, pretrained=path)


def test_tiny3d_checkpoint_records_depth_and_a_3d_map(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny3d", 3, 1, head_dropout=0.3)
    info = Checkpoint(arch="tiny3d", num_classes=3, in_channels=1, classes=("a", "b", "c"),
                      target_layer="features", pool={"height": 40, "width": 36, "depth": 16},
                      target_map=(4, 10, 9), head_dropout=0.3)
    loaded, got = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, info))
    assert got == info and got.image_size == (1, 16, 40, 36) and got.target_map == (4, 10, 9)
    assert isinstance(loaded.fc, DropoutLinear) and loaded.fc.dropout.p == 0.3
    x = torch.rand(2, 1, 16, 40, 36)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert feature_map_sizes(loaded, [got.target_layer], got.image_size) == {"features": got.target_map}
