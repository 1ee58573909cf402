"""`xal-engine pretrain`: a backbone learnt from the pool's own unlabelled images, for a modality that
has no published weights (`train --pretrained backbone.pt`, `loop --pretrained backbone.pt`).

Method ``rotation`` (Gidaris et al., ICLR 2018, RotNet): every training image is shown at 0°, 90°,
180° and 270° and the network, with a 4-way head, predicts which; to tell the rotations apart it must
learn where the anatomy and the lesions are, without a label. Images: the train split (0) of the pool,
labelled or not (the validation and test splits are never read: a supervised model selected later on
the validation split must not have seen it). The rotation accuracy on the validation split is
reported per epoch, and the epoch with the best one is kept (its pretext task, not its classes).
The backbone file holds the trunk without the pretext head; :func:`xal_engine.core.models.build_model`
loads it for the same arch and channel count and gives the model a fresh head.

Method ``supervised``: the stand-in for ImageNet weights, learnt offline on a separate, labelled SOURCE
pool of other lesion types (disjoint from the target pool's classes, e.g. a phantom pool made with
``--first-class 3``). A classifier is trained by :func:`xal_engine.jobs.train.train` on the source's
train split, selected on its validation split (best balanced accuracy), optionally with the
explanation loss W·(1 − soft Dice(CAM, ROI)) on its images with an ROI; its trunk is the backbone
(the source-class head is dropped).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xal_engine.core.inputs import resolve_device, to_unit_float
from xal_engine.core.models import build_model, check_arch_fits, save_backbone
from xal_engine.errors import XalError
from xal_engine.jobs.runtime import torch_threads
from xal_engine.jobs.streaming import worker_errors
from xal_engine.jobs.train import TrainConfig, TrainResult, train
from xal_engine.progress import progress
from xal_engine.store import SPLIT_TRAIN, SPLIT_VAL, Pool
from xal_engine.store.dataset import BlockDataset, EpochPermutation, block_loader, rebatch, select_indices

METHODS = ("rotation", "supervised")
ROTATIONS = 4  # 0, 90, 180, 270 degrees


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "resnet18"
    method: str = "rotation"
    epochs: int = 10
    batch_size: int = 32  # images per step; each is shown at all four rotations
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    explanation_weight: float = 0.0  # supervised only: W of the explanation loss on the source pool
    target_layer: str | None = None  # supervised only: the Grad-CAM layer (None: train's choice)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise XalError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "supervised":
            for flag, given in (("--explanation-loss", self.explanation_weight != 0.0),
                                ("--target-layer", self.target_layer is not None)):
                if given:
                    raise XalError(f"{flag} applies only to --method supervised, not {self.method}")
        if not (self.explanation_weight >= 0 and math.isfinite(self.explanation_weight)):
            raise XalError(f"--explanation-loss must be a number >= 0, got {self.explanation_weight}")
        if self.method == "supervised" and self.batch_size < 2:
            raise XalError(f"--batch-size must be at least 2 for --method supervised (batch norm needs two "
                           f"images), got {self.batch_size}")
        if self.epochs < 1:
            raise XalError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise XalError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise XalError(f"--lr must be a positive number, got {self.lr}")
        if self.num_workers < 0:
            raise XalError(f"--num-workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class PretrainResult:
    out: str
    arch: str
    method: str
    n_train: int
    n_val: int
    best_epoch: int
    train_loss: float
    val_rotation_accuracy: float  # NaN without validation images (and for supervised)
    seconds: float
    # supervised: the kept epoch's validation balanced accuracy (NaN without labelled validation images)
    val_balanced_accuracy: float = math.nan
    classes: tuple[str, ...] = ()  # supervised: the source pool's classes (their head is not kept)

    def line(self) -> str:
        if self.method == "supervised":
            kept = ("validation balanced accuracy n/a (no labelled validation images: lowest training loss)"
                    if math.isnan(self.val_balanced_accuracy)
                    else f"validation balanced accuracy {self.val_balanced_accuracy:.3f}")
            return (f"pretrained {self.arch} by supervised training on {self.n_train} labelled images of "
                    f"{len(self.classes)} source classes in {self.seconds:.1f} s: epoch {self.best_epoch} kept, "
                    f"{kept}; backbone {self.out} (source head dropped)")
        acc = "n/a" if math.isnan(self.val_rotation_accuracy) else f"{self.val_rotation_accuracy:.3f}"
        return (f"pretrained {self.arch} by {self.method} on {self.n_train} images in {self.seconds:.1f} s: "
                f"epoch {self.best_epoch} kept, validation rotation accuracy {acc} (chance 0.25); "
                f"backbone {self.out}")


def rotation_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4B, C, H, W) images: ``x`` (B, C, H, W, square) rotated by k·90° for k = 0..3 (k-major), and
    their (4B,) int64 rotation labels k. Volumes (B, C, D, H, W) turn in their axial (H, W) plane."""
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pretrain(pool: Pool, out: str | Path, config: PretrainConfig = PretrainConfig(), *,
             show_progress: bool | None = None, log: Callable[[str], None] = _stderr) -> PretrainResult:
    """Pretrain ``config.arch`` on ``pool``'s train split by ``config.method``; write the backbone to
    ``out`` (atomically: a failure leaves no file) and return the summary."""
    out = Path(out)
    if config.method == "supervised":
        check_arch_fits(config.arch, len(pool.spatial), pool.path)
        if not out.parent.is_dir():
            raise XalError(f"output directory {out.parent} does not exist")
        with torch_threads(config.threads):
            return _pretrain_supervised(pool, out, config, show_progress, log)
    if pool.height != pool.width:
        raise XalError(f"pool {pool.path} has {pool.height}x{pool.width} {pool.kind}s; rotation pretraining "
                       "needs square images (volumes: a square H x W plane)")
    check_arch_fits(config.arch, len(pool.spatial), pool.path)
    if not out.parent.is_dir():
        raise XalError(f"output directory {out.parent} does not exist")
    with torch_threads(config.threads):
        return _pretrain(pool, out, config, show_progress, log)


def _pretrain(pool: Pool, out: Path, config: PretrainConfig, show_progress: bool | None,
              log: Callable[[str], None]) -> PretrainResult:
    device = resolve_device(config.device)
    train_idx = select_indices(pool, split=SPLIT_TRAIN, known_labels=False)
    val_idx = select_indices(pool, split=SPLIT_VAL, known_labels=False)
    if len(train_idx) < 2:
        raise XalError(f"pool {pool.path} has {len(train_idx)} train-split image(s); pretraining needs at least 2")
    torch.manual_seed(config.seed)
    model = build_model(config.arch, ROTATIONS, pool.channels, image_size=(pool.height, pool.width)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(config.seed)
    train_ds = BlockDataset(pool, train_idx)
    sampler = EpochPermutation(len(train_ds), seed=config.seed)
    loader = block_loader(train_ds, sampler, config.num_workers)
    val_loader = None
    if len(val_idx):
        val_ds = BlockDataset(pool, val_idx)
        val_loader = block_loader(val_ds, EpochPermutation(len(val_ds), None), config.num_workers)

    def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation_batch(to_unit_float(batch["images"].to(device, non_blocking=True)))

    best: tuple[float, float, int, dict[str, torch.Tensor]] | None = None  # (accuracy, -loss, epoch, state)
    t_start = time.perf_counter()
    with worker_errors():
        for epoch in range(1, config.epochs + 1):
            sampler.set_epoch(epoch)
            model.train()
            total, seen = torch.zeros((), device=device), 0
            with progress(len(train_idx), f"pretrain {epoch}/{config.epochs}", enabled=show_progress) as bar:
                for batch in _batches(loader, config.batch_size, shuffle):
                    x, y = inputs(batch)
                    loss = loss_fn(model(x).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(y)
                    seen += len(y)
                    bar.update(len(batch["index"]))
            train_loss = float(total) / max(seen, 1)  # one synchronisation per epoch
            if not math.isfinite(train_loss):
                raise XalError(f"epoch {epoch}: the pretraining loss is not finite (NaN or inf); check the "
                               f"pool's images with `xal-engine pool validate {pool.path}`; no backbone written")
            accuracy = _rotation_accuracy(model, val_loader, inputs, config.batch_size) if val_loader else math.nan
            key = (0.0 if math.isnan(accuracy) else accuracy, -train_loss)
            kept = best is None or key > best[:2]
            if kept:
                best = (*key, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            acc = "n/a" if math.isnan(accuracy) else f"{accuracy:.3f}"
            log(f"pretrain epoch {epoch}/{config.epochs}  loss {train_loss:.4f}  val rotation acc {acc}"
                + ("  *" if kept else ""))
    assert best is not None
    model.load_state_dict(best[3])
    meta: dict[str, Any] = {"method": config.method, "pool": str(pool.path), "n_train": len(train_idx),
                            "best_epoch": best[2], "config": asdict(config)}
    save_backbone(out, model, config.arch, pool.channels, meta)
    val_acc = best[0] if val_loader is not None else math.nan
    return PretrainResult(out=str(out), arch=config.arch, method=config.method, n_train=len(train_idx),
                          n_val=len(val_idx), best_epoch=best[2], train_loss=-best[1],
                          val_rotation_accuracy=val_acc, seconds=time.perf_counter() - t_start)


def supervised_train_config(config: PretrainConfig) -> TrainConfig:
    """The :class:`TrainConfig` of ``--method supervised`` (train's defaults for the rest: class
    weighting, augmentation, batch-norm recalibration, AMP on CUDA). Threads are set by the caller."""
    return TrainConfig(arch=config.arch, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, seed=config.seed, device=config.device,
                       num_workers=config.num_workers, explanation_weight=config.explanation_weight,
                       target_layer=config.target_layer)


def _pretrain_supervised(pool: Pool, out: Path, config: PretrainConfig, show_progress: bool | None,
                         log: Callable[[str], None]) -> PretrainResult:
    """Train a classifier on the labelled source ``pool`` and write its trunk (the selected epoch's)."""
    n_labelled = len(select_indices(pool, split=SPLIT_TRAIN))
    if n_labelled == 0:
        raise XalError(f"source pool {pool.path} has no labelled train-split images; --method supervised needs "
                       "a labelled source pool (for an unlabelled one use --method rotation)")
    t_start = time.perf_counter()
    result: TrainResult = train(pool, supervised_train_config(config), show_progress=show_progress, log=log)
    metrics = result.metrics
    val_metrics = {name: metrics[name] for name in ("val_loss", "val_accuracy", "val_balanced_accuracy")
                   if name in metrics}
    meta: dict[str, Any] = {
        "method": config.method, "pool": str(pool.path), "classes": list(pool.classes),
        "epochs": config.epochs, "explanation_weight": config.explanation_weight,
        "target_layer": result.checkpoint.target_layer, "n_train": metrics["n_train"],
        "n_val": metrics["n_val"], "best_epoch": metrics["best_epoch"], "selected_by": metrics["selected_by"],
        "val_metrics": val_metrics, "config": asdict(config)}
    save_backbone(out, result.model, config.arch, pool.channels, meta)
    return PretrainResult(out=str(out), arch=config.arch, method=config.method, n_train=metrics["n_train"],
                          n_val=metrics["n_val"], best_epoch=metrics["best_epoch"],
                          train_loss=metrics["train_loss"], val_rotation_accuracy=math.nan,
                          seconds=time.perf_counter() - t_start,
                          val_balanced_accuracy=val_metrics.get("val_balanced_accuracy", math.nan),
                          classes=tuple(pool.classes))


def _batches(loader: Any, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    return rebatch(loader, batch_size, generator, buffer_images=4 * batch_size, min_last=1)


@torch.no_grad()
def _rotation_accuracy(model: nn.Module, loader: Any, inputs: Callable, batch_size: int) -> float:
    """Share of the validation images' four rotations the model names correctly."""
    model.eval()
    right, seen = None, 0
    for batch in rebatch(loader, batch_size):
        x, y = inputs(batch)
        hits = (model(x).argmax(1) == y).sum()  # on the device: read once, below
        right = hits if right is None else right + hits
        seen += len(y)
    return float(right) / seen if seen else math.nan
