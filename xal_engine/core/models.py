"""Backbones for pool classification: torchvision architectures with the input and head adapted.

A model is built as torchvision's 3-channel, 1000-class network (so a published or local state dict
loads strictly), then its first convolution is adapted to ``in_channels`` and its head replaced by a
fresh ``num_classes`` linear layer. A checkpoint is one ``torch.save`` file holding the
architecture, shapes, class names, target layer and its map size, head dropout, state dict, training
config, pool fingerprint and metrics, enough for ``score`` and ``loop`` to rebuild the model.

Head dropout (``train --head-dropout P``, MC dropout in ``score --mc-samples``): an arch whose head
has no dropout before it (resnet, densenet, convnext) gets its head replaced by a
:class:`DropoutLinear` (dropout on the input, then the same linear layer: the state dict keys do not
change, so checkpoints load either way); an arch that has one (efficientnet_b0's ``classifier.0``,
torchvision's p = 0.2) keeps it, with its p set to P when given.

The default Grad-CAM layer depends on the image size: the deepest of the arch's candidate layers
(its stages) whose map is at least MIN_TARGET_MAP on both sides, read off a shape probe
(:func:`choose_target_layer`).

Transformers (``vit_b_16``, ``swin_t``): their layers output tokens, not (B, C, h, w) maps. Each
built model carries a :class:`TokenLayout` (attribute ``cam_layout``) that gives, per layer name, the
token→map reshape (pytorch-grad-cam's ``reshape_transform`` convention) that capture, the explanation
loss, the shape probe and the compat classes apply to A and G:

- ``vit_b_16``: tokens (B, 1 + h·w, D) → drop the class token → (B, D, h, w), h = w = S/16 for an
  S×S image (ViT needs square images, S a multiple of 16; the model is built for the pool's S, and
  local 224² weights get their position embeddings interpolated, torchvision's
  ``interpolate_embeddings``). Default Grad-CAM layer ``encoder.layers.encoder_layer_11.ln_1`` (the
  last block's first LayerNorm, as pytorch-grad-cam's ViT example: the last block's OUTPUT reaches the
  head only through the class token, so its patch tokens get zero gradient).
- ``swin_t``: stages output channels-last maps (B, h, w, C) → permuted to (B, C, h, w). Candidates
  ``features.1/3/5/7`` (the four stages, /4 … /32); the default is the deepest with a 7×7 map.

``tiny`` (:class:`TinyNet`) is the one arch built here rather than by torchvision: one strided conv,
global pooling, a linear head, random init only; it exists to make host overhead visible in benchmarks.

3-D backbones (volume pools, images (B, C, D, H, W); ``ArchSpec.spatial_dims`` = 3, and
:func:`check_arch_fits` refuses a 2-D arch on a volume pool and vice versa):

- torchvision's video ResNets ``r3d_18``, ``mc3_18``, ``r2plus1d_18``: built as the 3-channel,
  400-class Kinetics model (a local state dict of it loads strictly; the published weights are a
  download, so offline ``--pretrained imagenet`` fails in one line), stem conv ``stem.0`` adapted by
  :func:`adapt_conv_weight` (5-D filters alike), head ``fc``, candidates ``layer1..layer4``. They read
  (B, C, T, H, W): a volume's D takes the T slot, and T is not H or W to them. None strides along D in
  the stem (stride (1, 2, 2)); ``r3d_18`` (3×3×3 convs) and ``r2plus1d_18`` (each factorised into a
  (1, 3, 3) conv then a (3, 1, 1) one) halve D, H, W together from layer2 on, so their maps keep D
  twice H and W (D/8 × H/16 × W/16 at layer4); ``mc3_18`` mixes along D only in the stem and layer1
  (3-D convs; layer2..4 are (1, 3, 3) convs) and never strides along D (maps D × H/16 × W/16 at
  layer4). Put the volume's coarsest-spaced axis in D.
- MONAI's (optional: ``pip install 'xal-engine[volumes]'``) ``densenet121_3d``
  (``DenseNet121(spatial_dims=3)``, /32 like the 2-D one; candidates ``features.denseblock1..3`` and
  ``class_layers.relu``, the ReLU after ``features.norm5``, the same map as denseblock4 and MONAI's
  usual Grad-CAM layer; head ``class_layers.out``) and ``resnet10_3d`` / ``resnet18_3d``
  (``resnet10/18(spatial_dims=3)``: a stride-1 7³ stem conv, then a stride-2 max pool, so /16 at
  layer4; candidates ``layer1..layer4``; head ``fc``). Built directly for C channels, random init (or
  a backbone from ``xal-engine pretrain``).
- ``tiny3d`` (:class:`TinyNet3d`): TinyNet with a Conv3d (7³, stride 4, pad 3), for tests and demos.

Default Grad-CAM layers of the 3-D archs (the same rule: the deepest candidate whose map is at least
MIN_TARGET_MAP on every side), for a cube of side S:

============== ============================= ============================= ========================
arch           S = 32                        S = 64                        S = 128
============== ============================= ============================= ========================
r3d_18         layer2 (16×8×8)               layer3 (16×8×8)               layer4 (16×8×8)
r2plus1d_18    layer2 (16×8×8)               layer3 (16×8×8)               layer4 (16×8×8)
mc3_18         layer2 (32×8×8)               layer3 (64×8×8)               layer4 (128×8×8)
densenet121_3d features.denseblock1 (8³)     features.denseblock2 (8³)     features.denseblock3 (8³)
resnet10/18_3d layer2 (8³)                   layer3 (8³)                   layer4 (8³)
tiny3d         features (8³)                 features (16³)                features (32³)
============== ============================= ============================= ========================

(densenet121_3d reaches ``class_layers.relu``, 7³, at S = 224.)
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from xal_engine.errors import XalError

# Smallest Grad-CAM map (both sides) the default layer must give: the paper's 7x7 (DenseNet-121's
# denseblock4 at 224x224). A coarser map makes the CAM a few blobs and Dice with a lesion coarse.
MIN_TARGET_MAP = 7


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one architecture live (dotted module names)."""

    first_conv: str  # the stem convolution that reads the image (3 input channels unless built for C)
    head: str  # the final nn.Linear (1000 ImageNet / 400 Kinetics logits unless built for K)
    candidates: tuple[str, ...]  # Grad-CAM layers in forward order, shallow to deep (the stages)
    head_dropout: str | None = None  # the arch's own nn.Dropout right before the head, if it has one
    # builds the model for an arch that is not torchvision's (None: torchvision), called with
    # (in_channels, num_classes); one that ignores them gets its stem and head adapted after
    build: Callable[[int, int], nn.Module] | None = None
    layout: TokenLayout | None = None  # transformers: the token→map reshape of their layers
    patch: int = 0  # ViT: the model is built for the image size, square, a multiple of this
    spatial_dims: int = 2  # 2: images (B, C, H, W); 3: volumes (B, C, D, H, W)

    @property
    def target_layer(self) -> str:
        """The deepest candidate: the default at ImageNet's 224x224 for the 2-D archs (a 7x7 map on
        each), at 128³ for the 3-D ones (224³ for densenet121_3d; see the module docstring)."""
        return self.candidates[-1]


class TinyNet(nn.Module):
    """``tiny``: a near-zero-cost model whose only purpose is to make host overhead visible.

    features = Conv2d(C, 16, 7x7, stride 4, pad 3) -> ReLU: the Grad-CAM layer, an (H/4, W/4) map
    (56x56 at 224x224); then global average pooling and ``fc`` (16 -> K). 7·7·C·16 MACs per output
    position, one output per 16 pixels: 7.4M MACs a 224x224x3 image (resnet18: 1.8G).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=4, padding=3), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))  # (B, C, H, W) -> (B, K)


class TinyNet3d(nn.Module):
    """``tiny3d``: :class:`TinyNet` for volumes, built for (in_channels, num_classes) directly.

    features = Conv3d(C, 16, 7³, stride 4, pad 3) -> ReLU: the Grad-CAM layer, a (D/4, H/4, W/4) map
    (8³ at 32³); then global average pooling and ``fc`` (16 -> K). 343·C·16 MACs per output position,
    one output per 64 voxels: 22M MACs a 64³ single-channel volume.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(in_channels, width, 7, stride=4, padding=3), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))  # (B, C, D, H, W) -> (B, K)


def _monai_nets(arch: str) -> Any:
    """``monai.networks.nets``, or an XalError naming the extra when MONAI is not installed."""
    try:
        from monai.networks import nets
    except ImportError:
        raise XalError(f"--arch {arch} needs MONAI (the volumes extra): pip install 'xal-engine[volumes]'") from None
    return nets


def _monai_densenet121(in_channels: int, num_classes: int) -> nn.Module:
    return _monai_nets("densenet121_3d").DenseNet121(spatial_dims=3, in_channels=in_channels,
                                                     out_channels=num_classes)


def _monai_resnet(depth: int) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, num_classes: int) -> nn.Module:
        nets = _monai_nets(f"resnet{depth}_3d")
        return getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=in_channels,
                                                num_classes=num_classes)
    return build


class TokenGrid:
    """ViT tokens (B, P + h·w, D) → (B, D, h, w): drop the ``prefix`` class token(s), square grid.

    pytorch-grad-cam's ViT ``reshape_transform`` (``t[:, 1:].reshape(B, h, w, D)``, channels first).
    A 4-D input (the patch-embedding conv) passes unchanged.
    """

    def __init__(self, prefix: int = 1) -> None:
        self.prefix = prefix

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4:
            return t
        if t.ndim != 3:
            raise XalError(f"ViT tokens must be (B, T, D), got {tuple(t.shape)}")
        batch, tokens, dim = t.shape
        side = math.isqrt(max(tokens - self.prefix, 0))
        if side * side != tokens - self.prefix or side == 0:
            raise XalError(f"{tokens} tokens are not {self.prefix} class token(s) and a square patch grid")
        return t[:, self.prefix:, :].reshape(batch, side, side, dim).permute(0, 3, 1, 2)


class ChannelsLastMap:
    """Channels-last maps (B, h, w, C) → (B, C, h, w), as pytorch-grad-cam's Swin ``reshape_transform``."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 4:
            raise XalError(f"Swin maps must be (B, h, w, C), got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class TokenLayout:
    """Which layers of a transformer give tokens, and the reshape that makes them (B, C, h, w) maps.

    ``prefixes``: dotted-name prefixes of the token layers (a name equal to one, or below it);
    ``exclude``: names inside them that already give (B, C, h, w).
    """

    prefixes: tuple[str, ...]
    reshape: Callable[[torch.Tensor], torch.Tensor]
    exclude: tuple[str, ...] = ()

    def transform(self, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if name in self.exclude:
            return None
        inside = any(name == p or name.startswith(p + ".") for p in self.prefixes)
        return self.reshape if inside else None


CAM_LAYOUT_ATTR = "cam_layout"  # the attribute of a built transformer that holds its TokenLayout


def layer_reshape(model: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The token→map reshape of ``model``'s layer ``name``; None where the layer gives (B, C, h, w)."""
    layout = getattr(model, CAM_LAYOUT_ATTR, None)
    return layout.transform(name) if isinstance(layout, TokenLayout) else None


def reshape_transform(arch: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's ``reshape_transform`` for ``arch``'s token layers (None for CNNs)."""
    layout = parse_arch(arch).layout
    return None if layout is None else layout.reshape


_RESNET = ArchSpec("conv1", "fc", ("layer1", "layer2", "layer3", "layer4"))
_VIDEO_STAGES = ("layer1", "layer2", "layer3", "layer4")
ARCHS: dict[str, ArchSpec] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    # The paper's layer is the last: the output of denseblock4 (before the final norm).
    "densenet121": ArchSpec("features.conv0", "classifier",
                            tuple(f"features.denseblock{i}" for i in range(1, 5))),
    # features.1..7 are the MBConv stages; features.8 the final 1x1 Conv-BN-SiLU block (1280 channels).
    # classifier = Dropout(0.2), Linear: the arch's own head dropout
    "efficientnet_b0": ArchSpec("features.0.0", "classifier.1", tuple(f"features.{i}" for i in range(1, 9)),
                                head_dropout="classifier.0"),
    # features.1, 3, 5, 7 are the four stages; the even entries are their downsampling layers.
    "convnext_tiny": ArchSpec("features.0.0", "classifier.2", ("features.1", "features.3", "features.5",
                                                                "features.7")),
    # not torchvision's: built here, random init only (see TinyNet); built 3-channel, then adapted
    "tiny": ArchSpec("features.0", "fc", ("features",), build=lambda _channels, _classes: TinyNet()),
    # transformers (see the module docstring): every block's ln_1 has the same patch grid, so the
    # candidates are the twelve and the default is the last one
    "vit_b_16": ArchSpec("conv_proj", "heads.head",
                         tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in range(12)),
                         layout=TokenLayout(("encoder",), TokenGrid(1)), patch=16),
    "swin_t": ArchSpec("features.0.0", "head", ("features.1", "features.3", "features.5", "features.7"),
                       layout=TokenLayout(("features", "norm"), ChannelsLastMap(),
                                          exclude=("features", "features.0.0"))),
    # 3-D (volumes; see the module docstring): torchvision's video ResNets, 3-channel, 400 classes
    **{name: ArchSpec("stem.0", "fc", _VIDEO_STAGES, spatial_dims=3)
       for name in ("r3d_18", "mc3_18", "r2plus1d_18")},
    # MONAI's, built for C channels and K classes (an optional import)
    "densenet121_3d": ArchSpec("features.conv0", "class_layers.out",
                               ("features.denseblock1", "features.denseblock2", "features.denseblock3",
                                "class_layers.relu"), build=_monai_densenet121, spatial_dims=3),
    "resnet10_3d": ArchSpec("conv1", "fc", _VIDEO_STAGES, build=_monai_resnet(10), spatial_dims=3),
    "resnet18_3d": ArchSpec("conv1", "fc", _VIDEO_STAGES, build=_monai_resnet(18), spatial_dims=3),
    "tiny3d": ArchSpec("features.0", "fc", ("features",), build=TinyNet3d, spatial_dims=3),
}

DEFAULT_TARGET_LAYERS: dict[str, str] = {name: spec.target_layer for name, spec in ARCHS.items()}


def parse_arch(arch: str) -> ArchSpec:
    """The spec of ``arch``, or an XalError listing the valid names."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise XalError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHS)}") from None


def archs_for(spatial_dims: int) -> tuple[str, ...]:
    """The names of the archs reading ``spatial_dims``-D inputs (2: images, 3: volumes)."""
    return tuple(name for name, spec in ARCHS.items() if spec.spatial_dims == spatial_dims)


def check_arch_fits(arch: str, spatial_dims: int, pool: str | os.PathLike[str] | None = None) -> None:
    """An XalError naming ``--arch`` when ``arch`` does not read ``spatial_dims``-D inputs (a 2-D
    backbone on a volume pool or a 3-D one on an image pool); ``pool`` names the pool in it."""
    spec = parse_arch(arch)
    if spec.spatial_dims == spatial_dims:
        return
    holds = "volumes (3-D)" if spatial_dims == 3 else "2-D images"
    where = f"pool {pool}" if pool is not None else "this pool"
    raise XalError(f"--arch {arch} is a {spec.spatial_dims}-D backbone; {where} holds {holds} "
                   f"(expected one of: {', '.join(archs_for(spatial_dims))})")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name`` (e.g. ``features.denseblock4``), or an XalError."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise XalError(f"model has no layer {name!r} (dotted module name expected)") from None


def check_layer_name(model: nn.Module, arch: str, name: str) -> None:
    """An XalError naming ``--target-layer`` and the arch's stages when ``model`` has no layer ``name``."""
    try:
        model.get_submodule(name)
    except AttributeError:
        raise XalError(f"--target-layer: model has no layer {name!r} (a dotted module name; the {arch} "
                       f"stages are {', '.join(parse_arch(arch).candidates)})") from None


class _ProbeDone(Exception):
    """Raised by the last probe hook to skip the rest of the forward (deeper layers, the head)."""


def _map_dims(image_shape: tuple[int, ...]) -> tuple[int, str]:
    """(spatial dims, the map's shape in words) for an ``image_shape`` (C, H, W) or (C, D, H, W)."""
    if len(image_shape) not in (3, 4):
        raise XalError(f"image shape must be (C, H, W) or (C, D, H, W), got {tuple(image_shape)}")
    dims = len(image_shape) - 1
    return dims, "(B, C, h, w)" if dims == 2 else "(B, C, d, h, w)"


def _check_input_dims(model: nn.Module, dims: int, image_shape: tuple[int, ...]) -> None:
    """An XalError when ``model``'s first convolution is not ``dims``-D: a Conv3d reads an unbatched
    (C, D, H, W) tensor, so a 2-D probe of a 3-D model would otherwise run and give wrong maps."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    model_dims = {nn.Conv2d: 2, nn.Conv3d: 3}.get(type(first), dims)
    if model_dims != dims:
        what, reads = ("image", "(C, D, H, W) volumes") if dims == 2 else ("volume", "(C, H, W) images")
        raise XalError(f"a {'x'.join(map(str, image_shape))} {what} does not fit the model "
                       f"(a {model_dims}-D model: it reads {reads})")


def feature_map_sizes(model: nn.Module, layers: tuple[str, ...] | list[str],
                      image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The (h, w) of each layer's output for an image of ``image_shape`` (C, H, W); the (d, h, w)
    for a volume of ``image_shape`` (C, D, H, W).

    One forward of a (1, *image_shape) zero tensor without gradients, in eval mode (batch norm with
    one image; the training flag is restored after), stopped once every layer has run. An XalError
    when a layer's output is not a (B, C, h, w) — for a volume (B, C, d, h, w) — feature map or the
    image does not fit the model.
    """
    dims, words = _map_dims(image_shape)
    _check_input_dims(model, dims, image_shape)
    sizes: dict[str, tuple[int, ...]] = {}
    wanted = list(dict.fromkeys(layers))

    def hook(name: str) -> Any:
        shape = layer_reshape(model, name)

        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if shape is not None and isinstance(output, torch.Tensor):
                output = shape(output)
            if not (isinstance(output, torch.Tensor) and output.dim() == dims + 2):
                what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise XalError(f"layer {name!r} gives {what}, not a {words} feature map for Grad-CAM")
            sizes[name] = tuple(int(side) for side in output.shape[2:])
            if len(sizes) == len(wanted):
                raise _ProbeDone
        return record

    param = next(model.parameters())
    x = torch.zeros((1, *image_shape), dtype=param.dtype, device=param.device)  # (1, C, [D,] H, W)
    handles = [resolve_layer(model, name).register_forward_hook(hook(name)) for name in wanted]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except _ProbeDone:
        pass
    except (RuntimeError, AssertionError) as err:  # torch._assert (ViT's image size) raises AssertionError
        what = "image" if dims == 2 else "volume"
        raise XalError(f"a {'x'.join(map(str, image_shape))} {what} does not fit the model "
                       f"({_first_line(err)})") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in wanted if name not in sizes]
    if missing:
        raise XalError(f"layer {missing[0]!r} is not on the model's forward path")
    return sizes


@dataclass(frozen=True)
class LayerChoice:
    """A Grad-CAM layer and its feature map at the probed image size."""

    name: str
    size: tuple[int, ...]  # (h, w) of its output; (d, h, w) for a volume
    reaches_min: bool  # every side >= MIN_TARGET_MAP

    def describe(self) -> str:
        return f"{self.name} ({'x'.join(map(str, self.size))} map)"


def choose_target_layer(model: nn.Module, arch: str, image_shape: tuple[int, ...]) -> LayerChoice:
    """The deepest candidate layer of ``arch`` whose map at ``image_shape`` (C, H, W) — or (C, D, H, W)
    for a 3-D arch — is at least MIN_TARGET_MAP on every side (its smallest side decides); when none
    is, the one with the largest map (most cells, the deeper on a tie), with ``reaches_min`` False."""
    candidates = parse_arch(arch).candidates
    sizes = feature_map_sizes(model, candidates, image_shape)
    fits = [name for name in candidates if min(sizes[name]) >= MIN_TARGET_MAP]
    if fits:
        return LayerChoice(fits[-1], sizes[fits[-1]], True)
    largest = max(reversed(candidates), key=lambda name: math.prod(sizes[name]))  # deepest on ties
    return LayerChoice(largest, sizes[largest], False)


def layer_choice(model: nn.Module, name: str, image_shape: tuple[int, ...]) -> LayerChoice:
    """``name``'s map at ``image_shape`` (C, H, W) or (C, D, H, W), as a LayerChoice (for a layer given
    by name)."""
    size = feature_map_sizes(model, [name], image_shape)[name]
    return LayerChoice(name, size, min(size) >= MIN_TARGET_MAP)


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt RGB filters (O, 3, k, k) — or 3-D ones (O, 3, kt, kh, kw) — to ``in_channels`` inputs:
    (O, in_channels, k, k), resp. (O, in_channels, kt, kh, kw).

    Each new channel gets the RGB mean scaled by 3 / in_channels, so a grey image (all channels equal)
    gives the same response as before. For 1 channel this is the sum of the RGB filters.
    """
    if in_channels == weight.shape[1]:
        return weight.clone()
    mean = weight.mean(dim=1, keepdim=True)  # (O, 1, *k)
    return (mean * (weight.shape[1] / in_channels)).repeat(1, in_channels, *([1] * (weight.dim() - 2)))


def _replace_first_conv(model: nn.Module, spec: ArchSpec, in_channels: int) -> None:
    old = model.get_submodule(spec.first_conv)
    assert type(old) in (nn.Conv2d, nn.Conv3d), type(old)
    if in_channels == old.in_channels:
        return
    new = type(old)(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(old.weight, in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.set_submodule(spec.first_conv, new)


class DropoutLinear(nn.Linear):
    """``Linear(Dropout(p)(x))``: a head with dropout on its input. Dropout has no parameters, so the
    state dict is a plain ``nn.Linear``'s (``weight``, ``bias``); a forward hook on it sees the
    features before dropout as its input."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def parse_head_dropout(p: float | None, flag: str = "--head-dropout") -> float | None:
    """``p`` when None or in [0, 1), else an XalError naming ``flag``."""
    if p is not None and not 0.0 <= p < 1.0:
        raise XalError(f"{flag} must lie in [0, 1), got {p}")
    return p


def _replace_head(model: nn.Module, spec: ArchSpec, num_classes: int, dropout: float | None) -> None:
    old = model.get_submodule(spec.head)
    assert isinstance(old, nn.Linear)
    if spec.head_dropout is not None:  # the arch's own dropout before the head: set its p
        if dropout is not None:
            own = model.get_submodule(spec.head_dropout)
            assert isinstance(own, nn.Dropout)
            own.p = dropout
        model.set_submodule(spec.head, nn.Linear(old.in_features, num_classes))
    elif dropout:  # > 0: dropout placed before the head
        model.set_submodule(spec.head, DropoutLinear(old.in_features, num_classes, dropout))
    else:
        model.set_submodule(spec.head, nn.Linear(old.in_features, num_classes))


def head_layer(model: nn.Module, arch: str) -> nn.Linear:
    """The final classifier layer of a :func:`build_model` model (its input: the pooled features)."""
    head = model.get_submodule(parse_arch(arch).head)
    if not isinstance(head, nn.Linear):
        raise XalError(f"{arch} head {parse_arch(arch).head!r} is a {type(head).__name__}, not a linear layer")
    return head


def head_dropout_p(model: nn.Module, arch: str) -> float:
    """The dropout probability on the head's input in train mode: 0.0 where there is none."""
    spec = parse_arch(arch)
    if spec.head_dropout is not None:
        return float(model.get_submodule(spec.head_dropout).p)
    head = model.get_submodule(spec.head)
    return float(head.dropout.p) if isinstance(head, DropoutLinear) else 0.0


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _load_local_weights(model: nn.Module, path: Path, arch: str,
                        adapt: Callable[[object], object] | None = None) -> None:
    if not path.is_file():
        raise XalError(f"pretrained weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any failure of torch.load: see _read_checkpoint)
        raise XalError(f"pretrained weights file {path} is not a readable state dict "
                       f"({_first_line(err)})") from None
    _load_state(model, state if adapt is None else adapt(state), f"pretrained weights file {path}", arch)


def _load_published_weights(model: nn.Module, arch: str,
                            adapt: Callable[[object], object] | None = None) -> None:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:  # torch.hub cache under $TORCH_HOME first, else a download
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; bad hash: RuntimeError
        home = os.environ.get("TORCH_HOME", "~/.cache/torch")
        raise XalError(
            f"published {arch} weights are not available offline ({type(err).__name__}: {err}); "
            f"place {Path(weights.url).name} under {home}/hub/checkpoints or pass a local file"
        ) from None
    _load_state(model, state if adapt is None else adapt(state), f"published {arch} weights", arch)


def _load_state(model: nn.Module, state: object, what: str, arch: str) -> None:
    if not isinstance(state, dict):
        raise XalError(f"{what} is not a state dict (got {type(state).__name__})")
    classes = model.get_submodule(parse_arch(arch).head).out_features  # 1000 ImageNet, 400 Kinetics
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise XalError(f"{what} does not fit torchvision {arch} (3 channels, {classes} classes): "
                       f"{first}") from None


def vit_image_size(arch: str, image_size: tuple[int, int] | None) -> int:
    """The square side a ViT is built for: ``image_size`` (H, W), or 224; an XalError unless square
    and a multiple of the patch."""
    spec = parse_arch(arch)
    if image_size is None:
        return 224
    h, w = (int(v) for v in image_size)
    if h != w or h % spec.patch or h < spec.patch:
        raise XalError(f"{arch} needs square images whose side is a multiple of {spec.patch}; got {h}x{w}")
    return h


def _vit_state(state: object, side: int, patch: int) -> object:
    """A 224² ViT state dict with its position embeddings interpolated to ``side`` (torchvision's)."""
    if not isinstance(state, dict) or "encoder.pos_embedding" not in state:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return interpolate_embeddings(side, patch, state)


def build_model(arch: str, num_classes: int, in_channels: int,
                pretrained: str | Path | None = None, head_dropout: float | None = None,
                image_size: tuple[int, int] | None = None) -> nn.Module:
    """An ``arch`` reading ``in_channels`` and giving ``num_classes`` logits.

    ``pretrained``: None (random init), ``"imagenet"`` (torchvision's published weights — Kinetics-400
    for the video ResNets — from the torch.hub cache or a download; an XalError when unavailable), a
    path to a torchvision state dict of the 3-channel, 1000-class (video: 400-class) model, or a
    backbone file from ``xal-engine pretrain``. The first conv is adapted by :func:`adapt_conv_weight`;
    the head is always freshly initialised. ``head_dropout``: the dropout p on the head's input (see
    the module docstring); None keeps the arch's own (0 where it has none). ``image_size`` (H, W):
    the images the model will read; only ViT uses it (built for that size, 224 when None).
    """
    spec = parse_arch(arch)
    parse_head_dropout(head_dropout)
    if num_classes < 2:
        raise XalError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise XalError(f"in_channels must be at least 1, got {in_channels}")
    backbone = read_backbone(Path(pretrained)) if pretrained is not None else None
    if backbone is not None:
        pretrained = None  # loaded below, after the stem and head are adapted
    if spec.build is not None and pretrained is not None:
        raise XalError(f"--pretrained: {arch} has no published weights (random init, or a backbone from "
                       "`xal-engine pretrain`); drop the flag")
    extra: dict[str, Any] = {}
    if spec.patch:
        extra["image_size"] = vit_image_size(arch, image_size)
    if spec.build is not None:  # tiny, MONAI: built here (an XalError when the monai extra is missing)
        model = spec.build(in_channels, num_classes)
    else:
        model = torchvision.models.get_model(arch, weights=None, **extra)
    if pretrained is not None:
        adapt = (lambda state: _vit_state(state, extra["image_size"], spec.patch)) if spec.patch else None
        if str(pretrained) == "imagenet":
            _load_published_weights(model, arch, adapt)
        else:
            _load_local_weights(model, Path(pretrained), arch, adapt)
    _replace_first_conv(model, spec, in_channels)
    _replace_head(model, spec, num_classes, head_dropout)
    if backbone is not None:
        load_backbone(model, backbone, arch, in_channels)
    if spec.layout is not None:
        setattr(model, CAM_LAYOUT_ATTR, spec.layout)
    return model


# A backbone file (``xal-engine pretrain``): a trunk pretrained on a pool, without its pretext head.
_BACKBONE_KEY = "xal_backbone"  # its value is the format version
BACKBONE_FORMAT = 1


def save_backbone(path: str | Path, model: nn.Module, arch: str, in_channels: int,
                  meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights but its head (the pretext task's) to ``path`` atomically, with the
    arch, the input channels it reads and ``meta`` (method, pool, epochs, ...)."""
    head = parse_arch(arch).head + "."
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(head)}
    payload = {_BACKBONE_KEY: BACKBONE_FORMAT, "arch": arch, "in_channels": in_channels, "meta": meta,
               "state_dict": state, _CHECKSUM_KEY: state_checksum(state)}
    return _save_atomically(Path(path), payload, "backbone", "backbone.pt")


def _backbone_payload(path: Path) -> dict[str, Any] | None:
    """The payload of a file written by :func:`save_backbone`; None for anything else (torchvision
    weights, a missing or foreign file: the torchvision-weights path reports those)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours
        return None
    return payload if isinstance(payload, dict) and _BACKBONE_KEY in payload else None


def is_backbone_file(path: str | Path) -> bool:
    """Whether ``path`` is a file written by :func:`save_backbone` (rather than torchvision weights)."""
    return _backbone_payload(Path(path)) is not None


def read_backbone(path: Path) -> dict[str, Any] | None:
    """A backbone file's payload, its checksum verified (an XalError naming what is wrong), read once;
    None when ``path`` is not a backbone file ("imagenet", torchvision weights)."""
    payload = _backbone_payload(path)
    if payload is None:
        return None
    if payload.get(_BACKBONE_KEY) != BACKBONE_FORMAT:
        raise XalError(f"backbone file {path}: format {payload.get(_BACKBONE_KEY)!r} is not supported "
                       f"(this xal-engine reads format {BACKBONE_FORMAT})")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or state_checksum(state) != payload.get(_CHECKSUM_KEY):
        raise XalError(f"backbone file {path} is damaged: its weights do not match their checksum")
    return {**payload, "path": str(path)}


def load_backbone(model: nn.Module, backbone: dict[str, Any], arch: str, in_channels: int) -> None:
    """Load a backbone's trunk into ``model`` (``arch`` reading ``in_channels``), keeping its fresh head."""
    where = f"backbone file {backbone['path']}"
    if backbone["arch"] != arch:
        raise XalError(f"{where} holds a {backbone['arch']} trunk, not {arch}; pass --arch {backbone['arch']}")
    if backbone["in_channels"] != in_channels:
        raise XalError(f"{where} reads {backbone['in_channels']}-channel images; this pool has {in_channels}")
    head = parse_arch(arch).head + "."
    missing, unexpected = model.load_state_dict(backbone["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise XalError(f"{where} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")


CHECKPOINT_FORMAT = 1
_CHECKPOINT_KEY = "xal_checkpoint"  # its value is the format version
# sha256 of the state dict (state_checksum): torch.load checks no CRC of the tensor data, so a flipped
# byte in a weight would otherwise load silently. Absent in checkpoints written before it was recorded.
_CHECKSUM_KEY = "state_sha256"


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # bytes of any dtype (bf16 has no numpy type)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """Everything but the weights: what rebuilds the model and says where it came from."""

    arch: str
    num_classes: int
    in_channels: int
    classes: tuple[str, ...]
    target_layer: str
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig as a dict
    pool: dict[str, Any] = field(default_factory=dict)  # path, fingerprint, image size, dtype
    metrics: dict[str, Any] = field(default_factory=dict)
    # (h, w) of the target layer's output at the training image size, (d, h, w) for a volume; None
    # in checkpoints written before it was recorded (an optional entry: the format version is unchanged)
    target_map: tuple[int, ...] | None = None
    # dropout p on the head's input (DropoutLinear or the arch's own); save_checkpoint records the
    # model's p, whatever this says. Absent in older checkpoints: the arch's own (0 for
    # resnet/densenet/convnext, 0.2 for efficientnet_b0). load_checkpoint always gives a float.
    head_dropout: float = 0.0
    format_version: int = CHECKPOINT_FORMAT

    @property
    def image_size(self) -> tuple[int, ...] | None:
        """(C, H, W) of the training images (``pool`` holds H and W), (C, D, H, W) for volumes
        (``pool`` also holds a depth D); None when not recorded."""
        if "height" not in self.pool or "width" not in self.pool:
            return None
        hw = int(self.pool["height"]), int(self.pool["width"])
        depth = self.pool.get("depth")
        return (self.in_channels, *hw) if depth is None else (self.in_channels, int(depth), *hw)


def save_checkpoint(path: str | Path, model: nn.Module, info: Checkpoint) -> Path:
    """Write ``model``'s weights and ``info`` to ``path`` atomically (temp file, then rename)."""
    payload = asdict(info)
    payload["classes"] = list(info.classes)
    payload["target_map"] = list(info.target_map) if info.target_map is not None else None
    payload["head_dropout"] = head_dropout_p(model, info.arch)  # the model's own p, whatever info says
    payload[_CHECKPOINT_KEY] = info.format_version
    payload["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload[_CHECKSUM_KEY] = state_checksum(payload["state_dict"])
    return _save_atomically(Path(path), payload, "checkpoint", "model.pt")


def _save_atomically(path: Path, payload: dict[str, Any], what: str, example: str) -> Path:
    """torch.save ``payload`` to ``path`` through a temporary file and a rename: never half-written."""
    if not path.parent.is_dir():
        raise XalError(f"output directory {path.parent} does not exist")
    if path.is_dir():
        raise XalError(f"{what} path {path} is a directory; expected a file name such as {example}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise XalError(f"checkpoint file {path} not found")
    # torch.load raises anything for a foreign file (UnpicklingError, BadZipFile, even KeyError for a
    # text file): every failure here means "not a checkpoint", reported as one line.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        if _cut_short(path):
            raise XalError(f"checkpoint {path} is corrupt: truncated (an incomplete copy or download?)") from None
        raise XalError(f"checkpoint file {path} cannot be read: corrupt, not a torch file, or not plain "
                       f"data ({_first_line(err)})") from None
    if not isinstance(payload, dict) or _CHECKPOINT_KEY not in payload:
        raise XalError(f"{path} is not an xal-engine checkpoint (no {_CHECKPOINT_KEY!r} entry)")
    version = payload[_CHECKPOINT_KEY]
    if version != CHECKPOINT_FORMAT:
        raise XalError(f"checkpoint {path} has format version {version}; "
                       f"this xal-engine reads version {CHECKPOINT_FORMAT}")
    return payload


def _cut_short(path: Path) -> bool:
    """A file that begins as a zip archive (torch.save's format) but has no end-of-archive record."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:  # unreadable: reported as such by the caller
        return False


def _map_size(value: Any) -> tuple[int, ...] | None:
    """A stored [h, w] (or [d, h, w]) as a tuple; None where absent (older checkpoints)."""
    if value is None:
        return None
    if len(value) not in (2, 3):
        raise ValueError(f"target_map {value!r} is not [h, w] or [d, h, w]")
    return tuple(int(side) for side in value)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model saved at ``path`` on ``device``, in eval mode, with its :class:`Checkpoint`."""
    path = Path(path)
    payload = _read_checkpoint(path)
    try:
        info = Checkpoint(
            arch=str(payload["arch"]), num_classes=int(payload["num_classes"]),
            in_channels=int(payload["in_channels"]), classes=tuple(payload["classes"]),
            target_layer=str(payload["target_layer"]), config=dict(payload["config"]),
            pool=dict(payload["pool"]), metrics=dict(payload["metrics"]),
            target_map=_map_size(payload.get("target_map")), format_version=int(payload[_CHECKPOINT_KEY]),
            head_dropout=float(payload.get("head_dropout") or 0.0))
        recorded = payload.get("head_dropout")  # None (older checkpoints): the arch's own dropout
        state = payload["state_dict"]
        checksum = payload.get(_CHECKSUM_KEY)
        if checksum is not None and checksum != state_checksum(state):
            raise XalError(f"checkpoint {path} is corrupt: checksum mismatch (its weights differ from those "
                           "saved; copy or train it again)")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise XalError(f"checkpoint {path} is incomplete or malformed ({err!r})") from None
    try:
        size = info.image_size
        model = build_model(info.arch, info.num_classes, info.in_channels,
                            head_dropout=None if recorded is None else float(recorded),
                            image_size=None if size is None else size[-2:])
    except XalError as err:
        raise XalError(f"checkpoint {path}: {err}") from None
    info = replace(info, head_dropout=head_dropout_p(model, info.arch))  # absent: the arch's own
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise XalError(f"checkpoint {path}: weights do not fit {info.arch} "
                       f"({info.in_channels} channels, {info.num_classes} classes): "
                       f"{str(err).splitlines()[0]}") from None
    resolve_layer(model, info.target_layer)
    return model.to(device).eval(), info
