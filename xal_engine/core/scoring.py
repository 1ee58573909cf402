"""score_batch: one forward, a backward down to the target layer, then uncertainty and ROI agreement.

Per batch: logits → softmax probs → entropy / margin / least confidence; A, G of the target layer →
``gradcam_dice`` → Dice, soft Dice, energy, pointing-game hit. Everything stays on the model's device.

On request, from the same forward: the head's input f (B, D), the pooled penultimate features
(``embedding``), and T MC-dropout passes of the head only over f (:func:`mc_head_probs`, baal's
cached MC inference: the trunk runs once) → BALD, MC entropy, variation ratio. Every other field is
the deterministic pass's (eval mode).

MC dropout masks are a counter-based hash, not a stateful generator: the keep bit of feature d of
the image at pool index i in pass t is a function of (seed, i, t, d) only (:func:`dropout_keep`), so
a result depends neither on the batch an image falls in nor on the shard or the resume point, and is
the same on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from xal_engine.core.capture import GradCamCapture, LayerSpec, Targets, capture, resolve_layer
from xal_engine.core.fields import FIELDS, BatchScores
from xal_engine.core.uncertainty import bald, entropy, least_confidence, margin, mc_entropy, variation_ratio
from xal_engine.errors import XalError
from xal_engine.ops import gradcam_dice, gradcam_dice_layers

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class McDropout:
    """T stochastic passes of the head with dropout ``p`` on its input, masks keyed by ``seed``."""

    samples: int  # T >= 2
    p: float  # in (0, 1)
    seed: int = 0  # in [0, 2**32)

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise XalError(f"--mc-samples must be at least 2, got {self.samples}")
        if not 0.0 < self.p < 1.0:
            raise XalError(f"MC dropout p must lie in (0, 1), got {self.p}")
        if not 0 <= self.seed <= _M32:
            raise XalError(f"--mc-seed must lie in [0, 2**32), got {self.seed}")


def _mul32(x: Tensor, c: int) -> Tensor:
    """x · c mod 2**32 for int64 x in [0, 2**32) and c < 2**32, exact: in 16-bit halves so that no
    product leaves int64 (each < 2**48)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' hash-prospector): a bijective 32-bit integer mix, int64 in and out."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(seed: int, index: Tensor, samples: int, dim: int, p: float) -> Tensor:
    """Dropout keep masks (T, B, D) bool for the images at pool positions ``index`` (B,) int64.

    h = mix(k_i ^ mix(t·D + d)), k_i = mix(mix(mix(seed ^ φ) ^ lo32(i)) ^ hi32(i)), mix = lowbias32;
    u = (h >> 8) / 2**24 ∈ [0, 1) (exact in fp32); kept where u >= p (probability 1 - p, to 2**-24).
    A function of (seed, i, t, d) only. Memory: a few int64 (T, B, D) temporaries.
    """
    device = index.device
    key = _mix32(torch.tensor((seed & _M32) ^ 0x9E3779B9, dtype=torch.int64, device=device))
    i = index.to(torch.int64)
    k = _mix32(_mix32(key ^ (i & _M32)) ^ ((i >> 32) & _M32))  # (B,)
    counter = torch.arange(samples * dim, dtype=torch.int64, device=device).reshape(samples, 1, dim)
    h = _mix32(k[None, :, None] ^ _mix32(counter))  # (T, B, D)
    u = (h >> 8).to(torch.float32) * 2.0 ** -24
    return u >= p


def mc_head_probs(features: Tensor, head: nn.Linear, mc: McDropout, index: Tensor) -> Tensor:
    """Softmax of T MC-dropout passes of ``head`` over pooled features f (B, D): (T, B, K) fp32.

    logits_t = W · (m_t ⊙ f / (1 - p)) + b with m_t = :func:`dropout_keep` (inverted dropout, as
    nn.Dropout), all T passes one batched matmul in fp32: reads B·D features, writes T·B·K probs.
    """
    f = features.float()  # (B, D)
    keep = dropout_keep(mc.seed, index, mc.samples, f.shape[1], mc.p)  # (T, B, D)
    dropped = f[None] * keep * (1.0 / (1.0 - mc.p))  # (T, B, D)
    weight, bias = head.weight.detach().float(), None if head.bias is None else head.bias.detach().float()
    logits = torch.nn.functional.linear(dropped, weight, bias)  # (T, B, K); no graph: weights are constants
    return torch.softmax(logits, dim=2)


def _as_device_tensor(x: Tensor | np.ndarray, device: torch.device, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise XalError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    return x.to(device, non_blocking=True)


def score_batch(
    model: nn.Module,
    target_layer: LayerSpec | Sequence[LayerSpec],
    images: Tensor,
    rois: Tensor | np.ndarray | None = None,
    targets: Targets = None,
    threshold: float = 0.5,
    has_roi: Tensor | np.ndarray | None = None,
    return_cam: bool = False,
    backend: str = "auto",
    head: LayerSpec | None = None,
    return_embedding: bool = False,
    mc: McDropout | None = None,
    index: Tensor | np.ndarray | None = None,
    capturer: GradCamCapture | None = None,
    cam_method: str = "gradcam",
) -> BatchScores:
    """Scores of ``images`` (B, C, H, W); ``rois`` (B, H', W') bool at any resolution, or None. Volumes
    (a 3-D backbone): images (B, C, D, H, W), rois (B, D', H', W'), the 3-D kernel or reference.

    ``head``: the final nn.Linear (e.g. ``fc``); its input, the pooled features, is kept from the same
    forward for ``return_embedding`` (``embedding`` (B, D) fp32) and for ``mc`` (``bald``,
    ``mc_entropy``, ``variation_ratio`` from :func:`mc_head_probs`; needs ``index`` (B,), the images'
    pool positions that key the dropout masks).

    ``capturer``: an active :class:`GradCamCapture` of ``model`` at ``target_layer`` (with ``head`` as its
    feature layer where embeddings or MC dropout are asked for), entered once for many batches: a run
    then resolves layers, freezes parameters and registers hooks once, not per batch. Without it the
    batch is captured one-shot (:func:`~xal_engine.core.capture.capture`).

    ``cam_method``: the CAM method of the map and the ROI metrics (a key of
    :data:`xal_engine.core.cam_methods.CAM_METHODS`; the default is Grad-CAM).

    ``target_layer`` may list several layers (images only): their maps combine as pytorch-grad-cam
    combines them (:func:`xal_engine.ops.gradcam_dice_layers`); there is then no one stage-1 map to
    return (``return_cam`` is refused).

    ``targets`` picks the Grad-CAM class per image (see :func:`xal_engine.core.capture.target_scores`).
    Images without an ROI (``rois`` None, or ``has_roi`` False) get NaN dice/soft_dice/energy and
    ``hit`` False; their uncertainty is computed as usual. An image whose logits are not all finite
    (NaN or inf pixels) gets ``pred`` -1 and no ROI metrics either; its probs and uncertainty are NaN. Under ``torch.autocast`` only the model
    runs in reduced precision; the scores are computed in fp32.
    """
    batch = images.shape[0]
    head_module = None
    if return_embedding or mc is not None:
        if head is None:
            raise XalError("embeddings and MC dropout need the model's head layer (head=...)")
        head_module = resolve_layer(model, head)[1] if capturer is None else capturer.feature_layer
        if mc is not None and not isinstance(head_module, nn.Linear):
            raise XalError(f"MC dropout needs a linear head, got {type(head_module).__name__}")
        if mc is not None and index is None:
            raise XalError("MC dropout needs the images' pool positions (index=...) to key the dropout masks")
    if capturer is None:
        out = capture(model, target_layer, images, targets, feature_layer=head_module)
    else:
        if capturer.model is not model or (head_module is not None and capturer.feature_layer is not head_module):
            raise XalError("capturer must capture this model, with the head as its feature layer")
        out = capturer(images, targets)
    act, grad = out.activations[0], out.gradients[0]
    device = act.device
    several = len(out.activations) > 1
    if several and (return_cam or act.ndim != 4):
        raise XalError("target_layer: several layers combine for images only, without return_cam "
                       "(there is no one stage-1 map)")
    if rois is None:
        # A stand-in empty ROI at feature resolution (cheap) still yields the map; metrics become NaN.
        roi_mask = torch.zeros((batch, *act.shape[2:]), dtype=torch.bool, device=device)
        valid = torch.zeros(batch, dtype=torch.bool, device=device)
    else:
        roi_mask = _as_device_tensor(rois, device, "rois")
        if roi_mask.ndim != act.ndim - 1 or roi_mask.shape[0] != batch:  # (B, H, W); volumes (B, D, H, W)
            expected = f"({batch}, H, W)" if act.ndim == 4 else f"({batch}, D, H, W) (volumes)"
            raise XalError(f"rois must have shape {expected}, got {tuple(roi_mask.shape)}")
        valid = torch.ones(batch, dtype=torch.bool, device=device)
    if has_roi is not None:
        flags = _as_device_tensor(has_roi, device, "has_roi")
        if tuple(flags.shape) != (batch,):
            raise XalError(f"has_roi must have shape ({batch},), got {tuple(flags.shape)}")
        valid = valid & flags.bool()

    # NaN or inf pixels give non-finite logits: no class and no Grad-CAM (NaN probs and uncertainty stay
    # as they are, so that the image is seen as not scored rather than as confident)
    finite = torch.isfinite(out.logits).all(dim=1)  # (B,)
    valid = valid & finite
    with torch.autocast(device.type, enabled=False):
        probs = torch.softmax(out.logits.float(), dim=1)  # (B, K)
        if several:
            roi = gradcam_dice_layers(out.activations, out.gradients, roi_mask.bool(), threshold, backend,
                                      method=cam_method)
        else:
            roi = gradcam_dice(act, grad, roi_mask.bool(), threshold=threshold, return_cam=return_cam,
                               backend=backend, method=cam_method)
    values = {
        "probs": probs,
        "pred": out.logits.argmax(dim=1).masked_fill(~finite, -1),  # -1: the pred field's fill
        "entropy": entropy(probs),
        "margin": margin(probs),
        "least_confidence": least_confidence(probs),
        "dice": roi.dice,
        "soft_dice": roi.soft_dice,
        "energy": roi.energy,
        "hit": roi.hit,
    }
    if return_embedding:
        values["embedding"] = out.features  # (B, D), fp32 in the host copy, fp16 stored
    if mc is not None:
        assert out.features is not None and isinstance(head_module, nn.Linear)
        positions = _as_device_tensor(index, device, "index")
        if tuple(positions.shape) != (batch,):
            raise XalError(f"index must have shape ({batch},), got {tuple(positions.shape)}")
        with torch.autocast(device.type, enabled=False):
            mc_probs = mc_head_probs(out.features, head_module, mc, positions)  # (T, B, K)
        nan = torch.full((batch,), float("nan"), device=device)
        for name, fn in (("bald", bald), ("mc_entropy", mc_entropy), ("variation_ratio", variation_ratio)):
            values[name] = torch.where(finite, fn(mc_probs), nan)  # non-finite logits: NaN, like probs
    for f in FIELDS:  # images without an ROI: NaN ROI metrics, no hit
        if f.needs_roi:
            values[f.name] = torch.where(valid, values[f.name], torch.full_like(values[f.name], f.fill))
    return BatchScores(cam=roi.cam, **values)
