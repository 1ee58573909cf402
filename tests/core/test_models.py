"""Backbones, first-conv adaptation, pretrained loading and checkpoints (xal_engine.core.models)."""

from __future__ import annotations

import argparse
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

from xal_engine.core.models import (
    ARCHS,
    DEFAULT_TARGET_LAYERS,
    MIN_TARGET_MAP,
    Checkpoint,
    LayerChoice,
    adapt_conv_weight,
    build_model,
    choose_target_layer,
    feature_map_sizes,
    layer_reshape,
    load_checkpoint,
    resolve_layer,
    save_checkpoint,
)
from xal_engine.errors import XalError


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a].spatial_dims == 2])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_model_logits_shape_and_target_layer(arch: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, in_channels=in_channels, image_size=(32, 32)).eval()
    seen: list[torch.Size] = []
    layer = resolve_layer(model, DEFAULT_TARGET_LAYERS[arch])
    shape = layer_reshape(model, DEFAULT_TARGET_LAYERS[arch]) or (lambda t: t)  # transformers: tokens -> map
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(shape(o).shape))
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, 32, 32))
    handle.remove()
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    # The target layer is a 4-D feature map on the forward path (the Grad-CAM activation).
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0] == 2


def test_bad_arch_lists_valid_names() -> None:
    with pytest.raises(XalError, match="resnet18.*densenet121"):
        build_model("vgg11", 3, 1)


def test_adapt_conv_weight_hand_case() -> None:
    w = torch.tensor([[[[1.0]], [[2.0]], [[6.0]]]])  # (1, 3, 1, 1)
    assert adapt_conv_weight(w, 1).flatten().tolist() == [9.0]  # sum of RGB
    assert adapt_conv_weight(w, 2).flatten().tolist() == [4.5, 4.5]  # mean 3 * 3/2
    assert adapt_conv_weight(w, 6).flatten().tolist() == [1.5] * 6  # mean 3 * 3/6


def _reference_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None).state_dict()


def test_pretrained_local_file_one_channel_sums_rgb(tmp_path: Path) -> None:
    state = _reference_state("resnet18", seed=3)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model("resnet18", num_classes=4, in_channels=1, pretrained=path)
    got = model.state_dict()
    torch.testing.assert_close(got["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(got["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert got["fc.weight"].shape == (4, 512)
    # A grey 1-channel image gives the same stem response as the RGB image with equal channels.
    x = torch.rand(1, 1, 16, 16)
    rgb_stem = torch.nn.functional.conv2d(x.expand(1, 3, 16, 16), state["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(model.conv1(x), rgb_stem, rtol=1e-5, atol=1e-5)


def test_pretrained_local_file_five_channels_densenet(tmp_path: Path) -> None:
    state = _reference_state("densenet121", seed=4)
    path = tmp_path / "d121.pth"
    torch.save(state, path)
    model = build_model("densenet121", num_classes=3, in_channels=5, pretrained=path)
    w = state["features.conv0.weight"]
    expected = (w.mean(dim=1, keepdim=True) * 3 / 5).expand(-1, 5, -1, -1)
    torch.testing.assert_close(model.state_dict()["features.conv0.weight"], expected)


def test_pretrained_file_errors(tmp_path: Path) -> None:
    with pytest.raises(XalError, match="not found"):
        build_model("resnet18", 2, 1, pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(_reference_state("resnet18", 0), wrong)
    with pytest.raises(XalError, match=r"wrong\.pth does not fit torchvision resnet34"):
        build_model("resnet34", 2, 1, pretrained=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(XalError, match="not a readable state dict"):
        build_model("resnet18", 2, 1, pretrained=junk)


def test_published_weights_fail_cleanly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(XalError, match=r"published resnet18 weights are not available offline.*URLError"):
        build_model("resnet18", 2, 1, pretrained="imagenet")
    assert len(calls) == 1 and calls[0].endswith(".pth")


def _info(model_arch: str = "resnet18") -> Checkpoint:
    return Checkpoint(arch=model_arch, num_classes=3, in_channels=1, classes=("a", "b", "c"),
                      target_layer="layer4", config={"lr": 0.001, "seed": 1},
                      pool={"fingerprint": "abc"}, metrics={"val_balanced_accuracy": 0.5})


def test_checkpoint_round_trip_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1).eval()
    # Non-default BN statistics, so buffers must round-trip too.
    model.bn1.running_mean.uniform_(-1, 1)
    path = save_checkpoint(tmp_path / "m.pt", model, _info())
    loaded, info = load_checkpoint(path, "cpu")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info == _info()
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(XalError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    model = build_model("resnet18", 3, 1)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    code = tmp_path / "code.pt"
    torch.save(argparse.Namespace(a=1), code)  # arbitrary objects: refused by weights_only
    for bad in (junk, code):
        with pytest.raises(XalError, match=rf"{bad.name} cannot be read: corrupt, not a torch file"):
            load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(XalError, match=r"foreign\.pt is not an xal-engine checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(XalError, match="output directory .* does not exist"):
        save_checkpoint(tmp_path / "nope" / "m.pt", model, _info())
    with pytest.raises(XalError, match="is a directory"):
        save_checkpoint(tmp_path, model, _info())


def _flip_weight_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor record of a torch.save archive (its weights, not its
    pickle: the file still loads)."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        record = max(zf.infolist(), key=lambda i: i.file_size)
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data = bytearray(path.read_bytes())
    data[start + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_weight_byte_is_refused(tmp_path: Path) -> None:
    # torch.load checks no CRC of the tensor records: the flipped file loads with other weights.
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 3, 1), _info())
    _flip_weight_byte(path)
    torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(XalError, match=rf"checkpoint {path} is corrupt: checksum mismatch"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_named_truncated(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 3, 1), _info())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(XalError, match=rf"checkpoint {cut} is corrupt: truncated"):
        load_checkpoint(cut)


def test_a_checkpoint_without_checksum_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, _info())
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload.pop("state_sha256")  # as written before the checksum was recorded
    torch.save(payload, path)
    loaded, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_checkpoint_weights_must_fit_arch(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 3, 1), _info("resnet34"))
    with pytest.raises(XalError, match="weights do not fit resnet34"):
        load_checkpoint(path)


# The default Grad-CAM layer: the deepest stage with a map >= 7x7 at the image size. By hand: resnet and
# densenet halve 4x in the stem (conv + pool), then once per later stage; efficientnet_b0 halves in the
# stem and in features.2, 3, 4 and 6.
@pytest.mark.parametrize("arch,side,name,size", [
    ("resnet18", 32, "layer1", (8, 8)),  # 32/4 = 8; layer2 would be 4x4
    ("resnet18", 64, "layer2", (8, 8)),  # layer3: 4x4
    ("resnet18", 224, "layer4", (7, 7)),  # the usual layer at ImageNet size
    ("densenet121", 32, "features.denseblock1", (8, 8)),
    ("densenet121", 64, "features.denseblock2", (8, 8)),
    ("densenet121", 224, "features.denseblock4", (7, 7)),  # the paper's layer
    ("efficientnet_b0", 32, "features.2", (8, 8)),  # 16 after the stem, 8 after features.2
    ("efficientnet_b0", 64, "features.3", (8, 8)),
    ("efficientnet_b0", 224, "features.8", (7, 7)),  # features.6..8 are all 7x7: the deepest wins
])
def test_default_target_layer_is_the_deepest_with_a_7x7_map(arch: str, side: int, name: str,
                                                            size: tuple[int, int]) -> None:
    model = build_model(arch, 3, 1)
    assert MIN_TARGET_MAP == 7
    assert choose_target_layer(model, arch, (1, side, side)) == LayerChoice(name, size, True)
    assert model.training  # the probe's eval mode is undone


def test_no_candidate_reaching_the_minimum_takes_the_largest_map() -> None:
    model = build_model("resnet18", 3, 3)
    assert choose_target_layer(model, "resnet18", (3, 16, 16)) == LayerChoice("layer1", (4, 4), False)
    # Both sides count: efficientnet_b0 at 24x64 gives features.2 6x16, so features.1 (12x32) is kept.
    eff = build_model("efficientnet_b0", 3, 1)
    assert choose_target_layer(eff, "efficientnet_b0", (1, 24, 64)) == LayerChoice("features.1", (12, 32),
                                                                                     True)


def test_feature_map_sizes_and_errors() -> None:
    model = build_model("resnet18", 3, 1)
    assert feature_map_sizes(model, ["layer4", "layer1"], (1, 64, 96)) == {"layer4": (2, 3),
                                                                          "layer1": (16, 24)}
    with pytest.raises(XalError, match="layer 'fc' gives .*not a \\(B, C, h, w\\) feature map"):
        feature_map_sizes(model, ["fc"], (1, 32, 32))
    with pytest.raises(XalError, match="model has no layer 'layer9'"):
        feature_map_sizes(model, ["layer9"], (1, 32, 32))
    with pytest.raises(XalError, match="a 1x8x8 image does not fit the model"):
        feature_map_sizes(build_model("densenet121", 3, 1), ["features.denseblock4"], (1, 8, 8))


def test_checkpoint_stores_the_target_map_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    model = build_model("resnet18", 3, 1)
    info = Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=("a", "b", "c"),
                      target_layer="layer2", pool={"height": 64, "width": 48}, target_map=(8, 6))
    path = save_checkpoint(tmp_path / "m.pt", model, info)
    loaded = load_checkpoint(path)[1]
    assert loaded == info and loaded.target_map == (8, 6) and loaded.image_size == (1, 64, 48)
    # A checkpoint written before the map was recorded: no entry, same format version.
    payload = torch.load(path, weights_only=True)
    del payload["target_map"]
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")[1]
    assert old.target_map is None and old.target_layer == "layer2" and old.format_version == 1
    assert _info().image_size is None  # no height/width in its pool entry


def test_head_dropout_is_placed_before_the_head_and_keeps_the_state_dict() -> None:
    from torch import nn

    from xal_engine.core.models import DropoutLinear, head_dropout_p, head_layer

    torch.manual_seed(0)
    plain = build_model("resnet18", 3, 1)
    torch.manual_seed(0)
    dropped = build_model("resnet18", 3, 1, head_dropout=0.5)
    assert type(plain.fc) is nn.Linear and isinstance(dropped.fc, DropoutLinear)
    assert (head_dropout_p(plain, "resnet18"), head_dropout_p(dropped, "resnet18")) == (0.0, 0.5)
    assert list(plain.state_dict()) == list(dropped.state_dict())  # same keys: either loads the other
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))  # eval: dropout is the identity
        features = torch.ones(4, 512)
        assert (dropped.fc.train().dropout(features) == 0).any()  # train: it drops
    assert head_layer(dropped, "resnet18") is dropped.fc
    assert isinstance(build_model("densenet121", 3, 1, head_dropout=0.2).classifier, DropoutLinear)
    assert isinstance(build_model("convnext_tiny", 3, 1, head_dropout=0.2).classifier[2], DropoutLinear)
    # efficientnet_b0 has its own dropout before the head: kept (p 0.2), or set to the given p
    eff = build_model("efficientnet_b0", 3, 1)
    assert type(eff.classifier[1]) is nn.Linear and head_dropout_p(eff, "efficientnet_b0") == 0.2
    assert build_model("efficientnet_b0", 3, 1, head_dropout=0.6).classifier[0].p == 0.6
    for bad in (1.0, -0.1):
        with pytest.raises(XalError, match=r"--head-dropout must lie in \[0, 1\)"):
            build_model("resnet18", 3, 1, head_dropout=bad)


def test_checkpoint_records_head_dropout_and_old_checkpoints_load_without_it(tmp_path: Path) -> None:
    from xal_engine.core.models import DropoutLinear

    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, head_dropout=0.3)
    path = save_checkpoint(tmp_path / "m.pt", model, _info())  # info says 0.0: the model's p is recorded
    assert torch.load(path, weights_only=True)["head_dropout"] == 0.3
    loaded, info = load_checkpoint(path)
    assert info.head_dropout == 0.3 and isinstance(loaded.fc, DropoutLinear) and loaded.fc.dropout.p == 0.3
    # written before the entry existed: resnet has no head dropout, efficientnet_b0 its own 0.2
    for arch, want in (("resnet18", 0.0), ("efficientnet_b0", 0.2)):
        info = _info(arch) if arch == "resnet18" else replace(_info(arch), target_layer="features.8")
        save_checkpoint(tmp_path / "new.pt", build_model(arch, 3, 1), info)
        payload = torch.load(tmp_path / "new.pt", weights_only=True)
        del payload["head_dropout"]
        torch.save(payload, tmp_path / "old.pt")
        old_model, old = load_checkpoint(tmp_path / "old.pt")
        assert old.head_dropout == want, arch
        assert not any(isinstance(m, DropoutLinear) for m in old_model.modules())


# ---------------------------------------------------------------- tiny: the host-overhead benchmark model
def _tiny_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: A = relu(conv(x, 7x7, stride 4, pad 3)), logits = fc(mean_hw(A)); (A, logits)."""
    conv = model.features[0]
    act = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=4, padding=3))  # (B, 16, h, w)
    return act, act.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias  # (B, K)


@pytest.mark.parametrize("in_channels,classes", [(1, 2), (3, 5)])
def test_tiny_builds_for_any_channels_and_classes(in_channels: int, classes: int) -> None:
    from torch import nn

    torch.manual_seed(0)
    model = build_model("tiny", classes, in_channels).eval()
    assert DEFAULT_TARGET_LAYERS["tiny"] == "features" and type(model.fc) is nn.Linear
    assert model.features[0].in_channels == in_channels and model.fc.out_features == classes
    x = torch.rand(2, in_channels, 224, 224)
    with torch.no_grad():
        act, want = _tiny_reference(model, x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert act.shape[-2:] == (56, 56)  # (224 + 2·3 - 7) // 4 + 1
    assert choose_target_layer(model, "tiny", (in_channels, 224, 224)) == LayerChoice("features", (56, 56), True)
    assert choose_target_layer(model, "tiny", (in_channels, 32, 32)) == LayerChoice("features", (8, 8), True)
    assert sum(p.numel() for p in model.parameters()) == 16 * (49 * in_channels + 1) + classes * 17


def test_tiny_refuses_published_weights(tmp_path: Path) -> None:
    """tiny has no torchvision weights (a backbone from `xal-engine pretrain` it does take:
    tests/jobs/test_pretrain.py)."""
    for pretrained in ("imagenet", tmp_path / "w.pth"):
        with pytest.raises(XalError, match=r"^--pretrained: tiny has no published weights"):
            build_model("tiny", 3, 3, pretrained=pretrained)


def test_tiny_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 3, 1)
    x, y = torch.rand(8, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grad = model.fc.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.fc.weight, before["fc.weight"] - 0.5 * grad)  # plain SGD, by hand
    assert not torch.equal(model.features[0].weight, before["features.0.weight"])  # the conv learns too
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x), y) < loss


def test_tiny_checkpoint_round_trip_and_head_dropout(tmp_path: Path) -> None:
    from xal_engine.core.models import DropoutLinear, head_dropout_p, head_layer

    torch.manual_seed(0)
    model = build_model("tiny", 3, 3, head_dropout=0.4)
    assert isinstance(model.fc, DropoutLinear) and head_dropout_p(model, "tiny") == 0.4
    assert head_layer(model, "tiny") is model.fc
    info = Checkpoint(arch="tiny", num_classes=3, in_channels=3, classes=("a", "b", "c"),
                      target_layer="features", pool={"height": 32, "width": 32}, target_map=(8, 8))
    loaded, got = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, info))
    assert got == replace(info, head_dropout=0.4)
    assert isinstance(loaded.fc, DropoutLinear) and loaded.fc.dropout.p == 0.4 and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_tiny_score_batch_grad_cam_on_its_conv_and_embeddings() -> None:
    from xal_engine.core.scoring import score_batch
    from xal_engine.ops import reference

    torch.manual_seed(0)
    model = build_model("tiny", 3, 3).eval()
    x = torch.rand(4, 3, 64, 64)
    rois = torch.zeros(4, 64, 64, dtype=torch.bool)
    rois[:, 8:40, 16:48] = True
    got = score_batch(model, "features", x, rois=rois, head="fc", return_embedding=True, return_cam=True)
    # reference: A and dlogit[pred]/dA by autograd on the hand-written forward, then the reference kernel
    act, logits = _tiny_reference(model, x)
    act.retain_grad()
    pred = logits.argmax(dim=1)
    logits.gather(1, pred[:, None]).sum().backward()
    want = reference.gradcam_dice(act.detach(), act.grad, rois, threshold=0.5, return_cam=True)
    assert torch.equal(got.pred, pred)
    torch.testing.assert_close(got.probs, logits.detach().softmax(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.cam, want.cam, rtol=1e-4, atol=1e-6)  # (4, 16, 16): the conv's map
    for name in ("dice", "soft_dice", "energy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.embedding, act.detach().mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)  # (4, 16)
