"""Supervised training of a pool classifier, with model selection on the validation split.

Training images: split 0 (train pool) with a known label, or only those an AL experiment labelled
(``al/<experiment>/labelled_round >= 0``). Selection: the epoch with the best validation balanced
accuracy, ties broken by the lower validation loss. The test split (2) is never read here. A pool
without labelled validation images still trains: the epoch with the lowest training loss is kept and
``metrics["selected_by"]`` says ``"train_loss"`` (the log warns), so an AL round on a pool without a
validation split works but cannot claim a validated model.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xal_engine.core.augment import AugmentConfig, augment_batch
from xal_engine.core.cam_methods import check_cam_method
from xal_engine.core.explanation import ExplanationTerm
from xal_engine.core.inputs import channels_last, resolve_device, to_unit_float
from xal_engine.core.models import (
    MIN_TARGET_MAP,
    Checkpoint,
    LayerChoice,
    build_model,
    check_arch_fits,
    check_layer_name,
    choose_target_layer,
    head_dropout_p,
    layer_choice,
    layer_reshape,
    parse_arch,
    resolve_layer,
)
from xal_engine.errors import XalError
from xal_engine.jobs.runtime import torch_threads
from xal_engine.jobs.streaming import worker_errors
from xal_engine.progress import progress
from xal_engine.store import SPLIT_TRAIN, SPLIT_VAL, Pool
from xal_engine.store.dataset import (
    Block,
    BlockDataset,
    EpochPermutation,
    block_loader,
    rebatch,
    select_indices,
)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults of ``xal-engine train``; the CLI maps its flags onto these fields."""

    arch: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    amp: bool = True  # autocast (bf16 where supported, else fp16 + grad scaling) on CUDA only
    class_weighting: bool = True  # cross entropy weighted by inverse class frequency
    augment: bool = True
    recalibrate_bn: bool = True  # exact batch-norm statistics after each epoch (see _Trainer)
    num_workers: int = 2  # DataLoader worker processes decoding blocks
    labelled_only: str | None = None  # AL experiment whose labelled images are the training set
    target_layer: str | None = None  # Grad-CAM layer stored in the checkpoint; None: chosen by pick_target_layer
    normalize_mean: tuple[float, ...] | None = None  # applied after scaling to [0, 1]
    normalize_std: tuple[float, ...] | None = None
    shuffle_buffer: int = 256  # images shuffled together (blocks are shuffled as wholes)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    explanation_weight: float = 0.0  # W: adds W·(1 − soft Dice(CAM, ROI)) on images with an ROI
    cam_method: str = "gradcam"  # the CAM of the explanation loss (core.cam_methods.CAM_METHODS)
    threads: int | None = None  # torch intra-op threads while training; None: the process's setting
    # dropout p on the classifier's input (recorded in the checkpoint; MC dropout at scoring); None: the
    # arch's own (none for resnet/densenet/convnext, 0.2 for efficientnet_b0)
    head_dropout: float | None = None


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module  # best epoch's weights, eval mode, on the training device
    checkpoint: Checkpoint
    metrics: dict[str, Any]  # also in checkpoint.metrics
    history: list[dict[str, float]]  # one row per epoch


def parse_config(config: TrainConfig) -> TrainConfig:
    """Check every field; an XalError names the field, its value and what was expected."""
    parse_arch(config.arch)
    try:
        check_cam_method(config.cam_method)
    except XalError as err:
        raise XalError(f"cam_method: {str(err).removeprefix('cam method: ')}") from None
    checks = [("epochs", config.epochs >= 1, ">= 1"),
              ("batch_size", config.batch_size >= 2, ">= 2 (batch norm needs two images)"),
              ("lr", config.lr > 0, "> 0"), ("weight_decay", config.weight_decay >= 0, ">= 0"),
              ("num_workers", config.num_workers >= 0, ">= 0"),
              ("shuffle_buffer", config.shuffle_buffer >= 0, ">= 0"),
              ("explanation_weight", config.explanation_weight >= 0, ">= 0"),
              ("threads", config.threads is None or config.threads >= 1, ">= 1"),
              ("head_dropout", config.head_dropout is None or 0 <= config.head_dropout < 1, "in [0, 1)")]
    for name, ok, expected in checks:
        if not ok:
            raise XalError(f"{name} must be {expected}, got {getattr(config, name)}")
    return config


def check_inputs(pool: Pool, config: TrainConfig) -> tuple[TrainConfig, torch.device]:
    """Everything ``train`` checks before it reads an image: the fields, the pool's classes, the
    normalisation against the pool's channels, the device. The config and the resolved device."""
    config = parse_config(config)
    check_arch_fits(config.arch, len(pool.spatial), pool.path)
    k = len(pool.classes)
    if k < 2:
        raise XalError(f"pool {pool.path} lists {k} class(es) in its 'classes' attribute; training needs >= 2")
    for name, values in (("normalize_mean", config.normalize_mean), ("normalize_std", config.normalize_std)):
        if values is not None and len(values) not in (1, pool.channels):
            raise XalError(f"{name} has {len(values)} values; the pool has {pool.channels} channel(s)")
    if config.normalize_std is not None and min(config.normalize_std) <= 0:
        raise XalError(f"normalize_std must be > 0, got {config.normalize_std}")
    return config, resolve_device(config.device)


def check_target_layer(config: TrainConfig) -> None:
    """An XalError before any work when ``config.target_layer`` is not a layer of ``config.arch``
    (checked on a throwaway model: layer names do not depend on the class or channel count)."""
    if config.target_layer is not None:
        check_layer_name(build_model(config.arch, 2, 1), config.arch, config.target_layer)


def pick_target_layer(model: nn.Module, config: TrainConfig, image_shape: tuple[int, ...],
                      log: Callable[[str], None]) -> LayerChoice:
    """``config.target_layer`` with its map at ``image_shape`` (C, H, W) (volumes: (C, D, H, W)), or when None the deepest
    candidate of the arch whose map is at least MIN_TARGET_MAP on both sides (a shape probe of
    ``model``: :func:`~xal_engine.core.models.choose_target_layer`). A warning line to ``log`` when no
    candidate reaches the minimum, or a given layer's map is 1x1 (the choice itself is in the
    checkpoint and the summary)."""
    shape = "x".join(map(str, image_shape))
    spatial = len(image_shape) - 1
    kind = "volumes" if spatial == 3 else "images"
    if config.target_layer is not None:
        check_layer_name(model, config.arch, config.target_layer)
        choice = layer_choice(model, config.target_layer, image_shape)
        if tuple(choice.size) == (1,) * spatial:
            log(f"warning: target layer {choice.name} gives a {'x'.join('1' * spatial)} map at {shape} {kind}: "
                "its Grad-CAM is constant and every hard Dice 0; choose a shallower layer")
        return choice
    choice = choose_target_layer(model, config.arch, image_shape)
    if not choice.reaches_min:
        least = "x".join([str(MIN_TARGET_MAP)] * spatial)
        log(f"warning: no {config.arch} stage gives a map of at least {least} at "
            f"{shape} {kind}; target layer {choice.describe()}, the largest")
    return choice


def resolve_target_layer(pool: Pool, config: TrainConfig, log: Callable[[str], None]) -> LayerChoice:
    """:func:`pick_target_layer` for ``pool``'s image size on a throwaway model (layer shapes do not
    depend on the weights or the class count), before any training."""
    model = build_model(config.arch, 2, pool.channels, image_size=(pool.height, pool.width))
    return pick_target_layer(model, config, (pool.channels, *pool.spatial), log)


def _check_labelled(pool: Pool, experiment: str, labels: np.ndarray, split: np.ndarray) -> None:
    """An experiment may only have labelled train-split images whose label is known."""
    marked = pool.read_labelled_round(experiment) >= 0  # (N,)
    for bad, what in ((marked & (split != SPLIT_TRAIN), "outside the train split"),
                      (marked & (labels < 0), "whose label is -1")):
        if bad.any():
            raise XalError(f"pool {pool.path}: al/{experiment}/labelled_round marks {int(bad.sum())} "
                           f"image(s) {what}")


def training_indices(pool: Pool, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val) sorted pool positions and the (N,) int64 labels. Only splits 0 and 1 are selected."""
    labels = pool.column("labels").astype(np.int64)  # (N,)
    if config.labelled_only is not None:
        _check_labelled(pool, config.labelled_only, labels, pool.column("split"))
    train = select_indices(pool, SPLIT_TRAIN, labelled_only=config.labelled_only)
    val = select_indices(pool, SPLIT_VAL)
    k = len(pool.classes)
    if np.any(labels[train] >= k) or np.any(labels[val] >= k):
        raise XalError(f"pool {pool.path}: train/val labels must be < {k} (number of classes)")
    if not len(train):
        what = f"labelled by experiment {config.labelled_only!r}" if config.labelled_only else "with a label"
        raise XalError(f"pool {pool.path} has no training images (split 0, {what})")
    return train, val, labels


def class_weights(train_labels: np.ndarray, k: int) -> torch.Tensor:
    """Inverse frequency n / (K · n_k), so a balanced set weighs 1 per class; absent classes get 1."""
    counts = np.bincount(train_labels, minlength=k).astype(np.float64)
    weights = np.where(counts > 0, len(train_labels) / (k * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def pool_fingerprint(pool: Pool, train: np.ndarray, val: np.ndarray) -> str:
    """sha256 of the pool's shape, classes, labels, splits and the selected index sets."""
    h = hashlib.sha256()
    meta = [pool.n, pool.channels, *pool.spatial, str(pool.image_dtype), list(pool.classes)]
    h.update(json.dumps(meta).encode())
    for name in ("labels", "split"):
        h.update(np.ascontiguousarray(pool.column(name)).tobytes())
    h.update(train.astype(np.int64).tobytes())
    h.update(val.astype(np.int64).tobytes())
    return h.hexdigest()


def confusion_metrics(confusion: torch.Tensor) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of a (K, K) confusion matrix [true, pred]; balanced accuracy is
    the mean recall over the classes present."""
    c = confusion.to(torch.float64)
    support = c.sum(dim=1)  # (K,)
    present = support > 0
    accuracy = float(c.trace() / support.sum())
    balanced = float((c.diagonal()[present] / support[present]).mean())
    return accuracy, balanced


class _Trainer:
    """One training run: the device-side loop, kept apart from index selection and bookkeeping."""

    def __init__(self, pool: Pool, config: TrainConfig, model: nn.Module, device: torch.device,
                 weights: torch.Tensor | None, show_progress: bool | None, target_layer: str) -> None:
        self.pool, self.config, self.device = pool, config, device
        self.k = len(pool.classes)
        cuda = device.type == "cuda"
        self.memory_format = channels_last(len(pool.spatial) + 2) if cuda else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        amp = config.amp and cuda
        self.amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = (lambda: torch.autocast("cuda", dtype=self.amp_dtype)) if amp else nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and self.amp_dtype == torch.float16)
        self.pin = cuda
        # Explanation loss: a hook keeps the target layer's output of each training forward.
        self.explanation = (ExplanationTerm(resolve_layer(self.model, target_layer), config.explanation_weight,
                                            config.cam_method, layer_reshape(self.model, target_layer))
                            if config.explanation_weight > 0 else None)
        self.show_progress = show_progress
        # Three seeded streams: block order (sampler), row shuffling, augmentation draws.
        self.shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
        self.augment_gen = torch.Generator().manual_seed(config.seed + 2)

    def _inputs(self, batch: Block) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        x = to_unit_float(images, self.config.normalize_mean, self.config.normalize_std)
        y = batch["labels"].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format), y

    def batches(self, loader: Any, shuffle: bool) -> Iterator[Block]:
        return rebatch(loader, self.config.batch_size, self.shuffle_gen if shuffle else None,
                       self.config.shuffle_buffer if shuffle else 0, min_last=2 if shuffle else 1)

    @worker_errors()  # a worker's decode error as its one line, not a traceback
    def train_epoch(self, loader: Any, n_images: int, desc: str, epoch: int = 1) -> float:
        """One pass over the training set; the mean (weighted) training loss. An XalError naming the
        first batch whose loss is not finite (NaN or inf pixels, or a diverging run): its weights are
        spoilt, so the run stops rather than keep an epoch of them."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        finite: list[torch.Tensor] = []  # one flag per batch, on the device: read once per epoch
        seen = 0
        with progress(n_images, desc, enabled=self.show_progress) as bar:
            for batch in self.batches(loader, shuffle=True):
                x, y = self._inputs(batch)
                rois = batch["rois"].to(self.device, non_blocking=True) if self.explanation is not None else None
                if self.config.augment:  # the ROI moves with its image
                    x, rois = augment_batch(x, rois, self.augment_gen, self.config.augmentation)
                explaining = self.explanation.forward_context() if self.explanation is not None else nullcontext()
                with self.autocast(), explaining:
                    logits = self.model(x).float()  # (B, K)
                    loss = self.loss_fn(logits, y)
                if self.explanation is not None:
                    has_roi = batch["has_roi"].to(self.device, non_blocking=True)
                    loss = loss + self.explanation(logits, y, rois, has_roi)
                finite.append(torch.isfinite(loss.detach()))
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += loss.detach() * len(y)
                seen += len(y)
                bar.update(len(y))
        if finite and not bool(torch.stack(finite).all()):  # one synchronisation per epoch
            batch = int(torch.stack(finite).logical_not().nonzero()[0]) + 1
            raise XalError(f"epoch {epoch}, batch {batch}: the training loss is not finite (NaN or inf); "
                           f"check the pool's images for non-finite pixels with `xal-engine pool validate "
                           f"{self.pool.path}`, or lower --lr; no checkpoint written")
        return float(total) / max(seen, 1)

    @worker_errors()
    @torch.no_grad()
    def recalibrate_batch_norm(self, loader: Any) -> None:
        """Batch-norm running statistics recomputed over the (unaugmented) training set with the
        epoch's final weights: the average of its batches' statistics (momentum None). The default running average (momentum 0.1) trails weights
        that moved a lot in the few steps a small labelled set gives, which made validation swing
        between chance and 0.9 from one epoch to the next. One forward pass, no gradients."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        self.model.train()
        for batch in rebatch(loader, self.config.batch_size, None, 0, min_last=2):  # BN needs >= 2
            x, _ = self._inputs(batch)
            with self.autocast():
                self.model(x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    @worker_errors()
    @torch.no_grad()
    def evaluate(self, loader: Any) -> tuple[float, float, float]:
        """(mean unweighted loss, accuracy, balanced accuracy) over the validation set."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        confusion = torch.zeros(self.k * self.k, dtype=torch.int64, device=self.device)
        for batch in self.batches(loader, shuffle=False):
            x, y = self._inputs(batch)
            with self.autocast():
                logits = self.model(x).float()  # (B, K)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
            confusion += torch.bincount(y * self.k + logits.argmax(dim=1), minlength=self.k * self.k)
        confusion = confusion.view(self.k, self.k).cpu()  # one host copy per evaluation
        accuracy, balanced = confusion_metrics(confusion)
        return float(loss_sum) / int(confusion.sum()), accuracy, balanced


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train(pool: Pool, config: TrainConfig = TrainConfig(), *, pretrained: str | Path | None = None,
          show_progress: bool | None = None, log: Callable[[str], None] = _stderr,
          initial_state: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    """Train ``config.arch`` on ``pool`` and return the selected epoch's model and metrics.

    ``pretrained``: see :func:`~xal_engine.core.models.build_model`. ``initial_state``: a state dict of
    the same model to start from (fine-tuning an earlier round) instead of a fresh initialisation.
    ``log`` receives one metrics line per epoch (and warnings); a progress bar shows images/s on an
    interactive stderr. ``config.explanation_weight`` W > 0 adds W·(1 − soft Dice(Grad-CAM, ROI)) of
    the true class on training images with an ROI (:mod:`xal_engine.core.explanation`).
    ``config.threads``: torch's intra-op threads while training (None: the process's setting).
    """
    pool.require_settled("before training")
    with torch_threads(config.threads):
        return _train(pool, config, pretrained=pretrained, show_progress=show_progress, log=log,
                      initial_state=initial_state)


def _train(pool: Pool, config: TrainConfig = TrainConfig(), *, pretrained: str | Path | None = None,
           show_progress: bool | None = None, log: Callable[[str], None] = _stderr,
           initial_state: Mapping[str, torch.Tensor] | None = None) -> TrainResult:
    """The body of :func:`train`, under its thread setting."""
    config, device = check_inputs(pool, config)
    k = len(pool.classes)
    train_idx, val_idx, labels = training_indices(pool, config)
    weights = class_weights(labels[train_idx], k) if config.class_weighting else None
    selected_by = "val_balanced_accuracy" if len(val_idx) else "train_loss"
    if not len(val_idx):
        log(f"warning: pool {pool.path} has no labelled validation images (split 1); "
            "keeping the epoch with the lowest training loss")

    torch.manual_seed(config.seed)  # model initialisation
    model = build_model(config.arch, k, pool.channels, pretrained, head_dropout=config.head_dropout,
                        image_size=(pool.height, pool.width))
    if initial_state is not None:
        try:
            model.load_state_dict(initial_state)
        except RuntimeError as err:
            raise XalError(f"initial weights do not fit {config.arch} with {k} classes and {pool.channels} "
                           f"channel(s): {str(err).splitlines()[0]}") from None
    # The Grad-CAM layer (explanation loss, checkpoint): a shape probe at the pool's (C, H, W) / (C, D, H, W).
    layer = pick_target_layer(model, config, (pool.channels, *pool.spatial), log)
    target_layer = layer.name
    trainer = _Trainer(pool, config, model, device, weights, show_progress, target_layer)

    train_ds = BlockDataset(pool, train_idx)
    sampler = EpochPermutation(len(train_ds), seed=config.seed)
    train_loader = block_loader(train_ds, sampler, config.num_workers, trainer.pin)
    val_loader = None
    if len(val_idx):
        val_ds = BlockDataset(pool, val_idx)
        val_loader = block_loader(val_ds, EpochPermutation(len(val_ds), None), config.num_workers, trainer.pin)

    history: list[dict[str, float]] = []
    best_key: tuple[float, float] | None = None
    best_row: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        row: dict[str, float] = {"epoch": epoch, "train_loss": trainer.train_epoch(
            train_loader, len(train_idx), f"epoch {epoch}/{config.epochs}", epoch)}
        if config.recalibrate_bn:
            trainer.recalibrate_batch_norm(train_loader)
        if val_loader is not None:
            row["val_loss"], row["val_accuracy"], row["val_balanced_accuracy"] = trainer.evaluate(val_loader)
            if not math.isfinite(row["val_loss"]):  # NaN would make every later epoch's comparison false
                raise XalError(f"epoch {epoch}: the validation loss is not finite (NaN or inf); check the "
                               f"pool's images for non-finite pixels with `xal-engine pool validate "
                               f"{pool.path}`; no checkpoint written")
            key = (row["val_balanced_accuracy"], -row["val_loss"])
        else:
            key = (-row["train_loss"], 0.0)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_row = key, row
            best_state = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}
        log(_epoch_line(row, config.epochs, improved))

    if trainer.explanation is not None:
        trainer.explanation.close()  # the returned model carries no hook
    trainer.model.load_state_dict(best_state)
    trainer.model.eval()
    metrics: dict[str, Any] = {
        "selected_by": selected_by, "best_epoch": int(best_row["epoch"]),
        **{name: best_row[name] for name in ("train_loss", "val_loss", "val_accuracy",
                                             "val_balanced_accuracy") if name in best_row},
        "n_train": len(train_idx), "n_val": len(val_idx),
        "train_class_counts": np.bincount(labels[train_idx], minlength=k).tolist(),
        "history": history,
    }
    config_dict = asdict(config)
    info = Checkpoint(
        arch=config.arch, num_classes=k, in_channels=pool.channels, classes=tuple(pool.classes),
        target_layer=target_layer, target_map=layer.size, config=config_dict,
        head_dropout=head_dropout_p(trainer.model, config.arch),
        pool={"path": str(pool.path), "fingerprint": pool_fingerprint(pool, train_idx, val_idx),
              "height": pool.height, "width": pool.width, "image_dtype": str(pool.image_dtype),
              **({"depth": pool.depth} if pool.is_volume else {})},
        metrics=metrics)
    return TrainResult(model=trainer.model, checkpoint=info, metrics=metrics, history=history)


def _epoch_line(row: dict[str, float], epochs: int, best: bool) -> str:
    parts = [f"epoch {int(row['epoch'])}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"val acc {row['val_accuracy']:.3f}",
                  f"val bal acc {row['val_balanced_accuracy']:.3f}"]
    parts.append(f"{row['seconds']:.1f} s" + (" *" if best else ""))
    return "  ".join(parts)
