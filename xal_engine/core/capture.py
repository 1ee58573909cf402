"""Grad-CAM capture: activations A and gradients G of target layers, with no parameter gradient.

Inside :class:`GradCamCapture` the model is in eval mode with every parameter frozen. A forward hook
turns the first target layer that runs into a detached leaf (no graph is built upstream of it); target
layers further downstream stay graph tensors, so one ``torch.autograd.grad(Σ_b score_b, [A_1, …])``
gives every G. No host copy, no retained graph; hooks, train/eval flags and ``requires_grad`` are
restored on exit, also after an exception.

A ``reshape_transform`` (pytorch-grad-cam's convention) maps a target layer's output to (B, C, h, w)
before anything reads it: transformer tokens (B, T, D) to a patch grid, channels-last stages
(B, h, w, C) to channels-first. Without one, a model built by ``core.models`` for a transformer
(vit_b_16, swin_t) supplies its own per layer (``core.models.layer_reshape``), so train, score and
loop need no flag. It is applied to A and, being a linear view (select, reshape, permute), to G as
the gradient of the raw output; otherwise a target layer must output (B, C, h, w), or (B, C, d, h, w)
for a 3-D backbone on volumes.

A ``feature_layer`` (the classifier head) adds one more forward hook that keeps its input, the
pooled penultimate features (B, D), from the same forward: embeddings and cached MC-dropout passes
of the head need no second trunk pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch
from torch import Tensor, nn

from xal_engine.core.models import layer_reshape
from xal_engine.errors import XalError

LayerSpec = nn.Module | str
# One target per image: None (predicted class), class indices (B,), or logits (B, K) -> scores (B,).
Targets = None | Tensor | np.ndarray | Sequence[int] | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CamCapture:
    """What one capture returns; every tensor is detached and stays on the model's device."""

    logits: Tensor  # (B, K) model output, model dtype
    scores: Tensor  # (B,) fp32 target score per image (raw logit for a class target)
    activations: tuple[Tensor, ...]  # per target layer: A (B, C, h, w)
    gradients: tuple[Tensor, ...]  # per target layer: G = d(Σ_b score_b)/dA, same shape and dtype as A
    features: Tensor | None = None  # (B, D) input of the feature layer, model dtype; None without one


def resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """(dotted name, module) of a target layer given as a submodule or a dotted name like ``layer4``."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name, module
        raise XalError(f"target layer {type(layer).__name__} is not a submodule of {type(model).__name__}")
    if not isinstance(layer, str):
        raise XalError(f"target layer must be a module or a dotted name, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return layer, modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "see model.named_modules() for names"
    raise XalError(f"target layer '{layer}' not found in {type(model).__name__}; {hint}")


def target_scores(logits: Tensor, targets: Targets) -> Tensor:
    """Σ-able (B,) fp32 scores: the raw logit of the target class (like ClassifierOutputTarget)."""
    if logits.ndim != 2:
        raise XalError(f"model output must be logits of shape (B, K), got {tuple(logits.shape)}")
    batch, classes = logits.shape
    if callable(targets) and not isinstance(targets, Tensor):
        scores = targets(logits)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (batch,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise XalError(f"targets callable must return one score per image, shape ({batch},); got {shape}")
        return scores.float()
    if targets is None:
        index = logits.detach().argmax(dim=1)
    else:
        if not isinstance(targets, (Tensor, np.ndarray)):
            targets = list(targets)  # host ints: check the range here, where it costs no sync
            if any(not 0 <= int(t) < classes for t in targets):
                raise XalError(f"targets must be class indices in [0, {classes}), got {targets}")
        index = torch.as_tensor(targets, device=logits.device)
        if index.ndim != 1 or index.shape[0] != batch:
            raise XalError(f"targets must give one class per image: expected shape ({batch},), "
                           f"got {tuple(index.shape)}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise XalError(f"targets must be integer class indices, got dtype {index.dtype}")
    return logits.float().gather(1, index.long()[:, None])[:, 0]  # (B,)


class GradCamCapture:
    """Context manager capturing A and G of ``target_layers`` for batches of images.

    >>> with GradCamCapture(model, "layer4") as capture:
    ...     out = capture(images)              # targets=None: the predicted class
    ...     a, g = out.activations[0], out.gradients[0]
    """

    def __init__(self, model: nn.Module, target_layers: LayerSpec | Sequence[LayerSpec],
                 feature_layer: LayerSpec | None = None,
                 reshape_transform: Callable[[Tensor], Tensor] | None = None, *,
                 share_outputs: bool = False) -> None:
        layers = [target_layers] if isinstance(target_layers, (nn.Module, str)) else list(target_layers)
        if not layers:
            raise XalError("at least one target layer is required")
        self.model = model
        resolved = [resolve_layer(model, layer) for layer in layers]
        self.layer_names = [name for name, _ in resolved]
        self.reshape_transform = reshape_transform
        self._shapes = [reshape_transform if reshape_transform is not None else layer_reshape(model, name)
                        for name in self.layer_names]  # per layer: output -> (B, C, h, w), or None
        self.layers = [module for _, module in resolved]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._training: list[nn.Module] = []  # modules that were in train mode on entry
        self._frozen: list[nn.Parameter] = []  # parameters that required grad on entry
        self._acts: list[Tensor | None] = []
        self.feature_name, self.feature_layer = (None, None) if feature_layer is None else \
            resolve_layer(model, feature_layer)
        self._features: list[Tensor] | None = None  # inside __call__: the feature layer's input, once
        self._active = False
        # share_outputs: downstream runs on A itself, no copy (a 13 MB pass per 64-image 224x224 batch
        # of a small model on the CPU), while the model leaves A alone. One that changes it in place
        # (an in-place op on the leaf raises; one under no_grad bumps A's version) has that batch run
        # again with copies, and so have its later batches: a copy into one buffer per layer kept
        # across calls (a fresh 13 MB copy per batch costs about as much in page faults as a small
        # model's forward). For callers done with a batch's graph before the next call (the scorer),
        # not for a caller that keeps graphs alive (create_graph, several captures backpropagated
        # together).
        self.share_outputs = share_outputs
        self._sharing = share_outputs  # until the model changes a shared A
        self._versions: list[int] = []  # per target layer: A's version when handed downstream
        self._copies: dict[int, Tensor] = {}

    def __enter__(self) -> GradCamCapture:  # noqa: PYI034  (typing.Self needs Python 3.11)
        if self._active:  # a second enter would save the frozen state as the one to restore
            raise RuntimeError("GradCamCapture is already active; use one `with` block at a time")
        # Only what differs is recorded and flipped: entering with an eval, frozen model costs two scans.
        self._training = [m for m in self.model.modules() if m.training]
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        try:
            if self._training:
                self.model.eval()  # BatchNorm running stats, no Dropout
            for p in self._frozen:
                p.requires_grad_(False)
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._hook(i)))
            if self.feature_layer is not None:
                self._handles.append(self.feature_layer.register_forward_hook(self._feature_hook))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._training:
            module.training = True  # per module: a caller's mixed train/eval state comes back as it was
        for p in self._frozen:
            p.requires_grad_(True)
        self._training, self._frozen, self._acts, self._features = [], [], [], None
        self._copies.clear()
        self._sharing = self.share_outputs
        self._active = False

    def _feature_hook(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if self._features is None:  # a plain model(x) inside the `with` block
            return
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor) or x.ndim != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise XalError(f"feature layer '{self.feature_name}' must read pooled features (B, D), got {got}")
        if self._features:
            raise XalError(f"feature layer '{self.feature_name}' ran twice in one forward pass")
        self._features.append(x.detach())

    def _hook(self, index: int) -> Callable[[nn.Module, object, object], Tensor | None]:
        def hook(module: nn.Module, inputs: object, output: object) -> Tensor | None:
            if not self._acts:  # a plain model(x) inside the `with` block: leave the output alone
                return None
            name = self.layer_names[index]
            if not isinstance(output, Tensor):
                raise XalError(f"target layer '{name}' must output a tensor, got {type(output).__name__}")
            shape = self._shapes[index]
            shaped = output if shape is None else shape(output.detach())
            if not isinstance(shaped, Tensor) or shaped.ndim not in (4, 5):  # 2-D maps or 3-D volumes
                got = tuple(shaped.shape) if isinstance(shaped, Tensor) else type(shaped).__name__
                how = "must output feature maps (B, C, h, w) or (B, C, d, h, w)" if shape is None else \
                    "must give feature maps (B, C, h, w) after reshape_transform"
                raise XalError(f"target layer '{name}' {how}, got {got}")
            if self._acts[index] is not None:
                raise XalError(f"target layer '{name}' ran twice in one forward pass; pick a layer that runs once")
            downstream = output.requires_grad and any(a is not None for a in self._acts)
            # The first target layer becomes a leaf: nothing upstream is recorded. Later target layers
            # downstream of it stay graph tensors so the one autograd.grad reaches all of them.
            act = output if downstream else output.detach().requires_grad_()
            self._acts[index] = act
            if self._sharing:  # downstream gets A itself (share_outputs), checked after the forward
                self._versions[index] = act._version
                return act
            # Downstream gets a copy: an in-place op right after the layer (ReLU(inplace=True), +=)
            # then changes neither the recorded A nor a leaf (in-place on a grad leaf is an error).
            return self._copy(index, act) if self.share_outputs else act.clone()

        return hook

    def _copy(self, index: int, act: Tensor) -> Tensor:
        """act.clone()'s value and autograd (CopyBackwards to act), written into layer index's kept buffer."""
        buf = self._copies.get(index)
        if buf is None or buf.shape != act.shape or buf.dtype != act.dtype or buf.device != act.device \
                or buf.stride() != act.stride():
            buf = self._copies[index] = torch.empty_like(act, memory_format=torch.preserve_format).detach()
        return buf.detach().copy_(act)  # a fresh leaf on the kept storage each call, then the graph edge

    def _forward(self, images: Tensor) -> object:
        """The model's output, the target layers' A recorded by the hooks; while sharing, run again
        with copies where the model changed a shared A in place."""
        while True:
            self._acts = [None] * len(self.layers)
            self._versions = [0] * len(self.layers)
            self._features = [] if self.feature_layer is not None else None
            sharing = self._sharing
            try:
                output = self.model(images)
            except torch.OutOfMemoryError:  # copies need more memory, not less
                raise
            except RuntimeError:  # e.g. an in-place op on the shared leaf: with copies it may run
                if not sharing:
                    raise
                self._sharing = False
                continue
            if sharing and any(a is not None and a._version != v for a, v in zip(self._acts, self._versions)):
                self._sharing = False  # changed in place without autograd (under no_grad, via .data)
                continue
            return output

    def __call__(self, images: Tensor, targets: Targets = None) -> CamCapture:
        """One forward and a backward down to the target layers only."""
        if not self._active:
            raise RuntimeError("GradCamCapture must be used inside a `with` block")
        try:
            with torch.enable_grad():
                logits = self._forward(images)
                if not isinstance(logits, Tensor):
                    raise XalError(f"model must return a logits tensor (B, K), got {type(logits).__name__}")
                missing = [n for n, a in zip(self.layer_names, self._acts) if a is None]
                if self._features == []:
                    missing.append(str(self.feature_name))
                if missing:
                    raise XalError(f"target layer(s) {', '.join(missing)} did not run in the forward pass")
                scores = target_scores(logits, targets)
                if not scores.requires_grad:
                    raise XalError(f"the model output does not depend on target layer(s) "
                                   f"{', '.join(self.layer_names)}")
                acts = [a for a in self._acts if a is not None]
                # Σ_b score_b: image b's score depends only on image b (eval mode), so dΣ/dA_b = dscore_b/dA_b.
                grads = torch.autograd.grad(scores.sum(), acts, materialize_grads=True)
            features = self._features[0] if self._features else None
        finally:
            self._acts, self._features = [], None
        shapes = [s or (lambda t: t) for s in self._shapes]
        return CamCapture(
            logits=logits.detach(),
            scores=scores.detach(),
            activations=tuple(s(a.detach()) for s, a in zip(shapes, acts)),
            gradients=tuple(s(g) for s, g in zip(shapes, grads)),
            features=features,
        )


def capture(model: nn.Module, target_layers: LayerSpec | Sequence[LayerSpec], images: Tensor,
            targets: Targets = None, feature_layer: LayerSpec | None = None,
            reshape_transform: Callable[[Tensor], Tensor] | None = None) -> CamCapture:
    """One-shot :class:`GradCamCapture`: enter, capture one batch, restore the model."""
    with GradCamCapture(model, target_layers, feature_layer, reshape_transform) as cap:
        return cap(images, targets)
