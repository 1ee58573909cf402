"""Grad-CAM panels of a batch of pool images, for ``report`` (a loop round's batch) and ``select
--overlays`` (the batch just selected).

A panel shows the image, its Grad-CAM S at image resolution (the low-resolution map N through
``upsample_normalise``, exactly as the scorer derives S) and the ROI contour, captioned with the id,
the predicted class, the entropy and the Dice. N comes from a score run's ``cam`` array (``score
--save-cams``) or is recomputed for just the batch's images with a checkpoint, through the scorer's own
per-batch path (``streaming.device_scores``), so that both give the map the run would have stored.

``select --overlays DIR`` writes ``DIR/contact_sheet.png`` (the first ``max_images`` images in rank
order) and one ``DIR/<rank>_<id>.png`` per selected image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xal_engine.core.inputs import resolve_device
from xal_engine.core.models import Checkpoint, load_checkpoint
from xal_engine.errors import XalError
from xal_engine.jobs.overlay import OverlayStyle, Panel, contact_sheet, save_figure
from xal_engine.jobs.select import BatchSelection
from xal_engine.jobs.streaming import ScoreConfig, device_scores, file_sha256
from xal_engine.ops.reference import upsample_normalise
from xal_engine.progress import plural
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

SHEET_PNG = "contact_sheet.png"


@dataclass(frozen=True)
class BatchImages:
    """The pool rows a sheet shows, in rank order."""

    index: np.ndarray  # (n,) int64 pool positions
    ids: list[str]
    images: np.ndarray  # (n, C, H, W) pool dtype
    rois: np.ndarray  # (n, H, W) bool
    has_roi: np.ndarray  # (n,) bool
    labels: np.ndarray  # (n,) int, -1 where unknown (Grad-CAM targets of `--targets label` runs)


@dataclass(frozen=True)
class BatchCams:
    """Per image of a batch: the low-resolution CAM and the numbers its caption shows."""

    cam: np.ndarray  # (n, h, w) float32, normalised map N (NaN where the scores were not finite)
    pred: np.ndarray  # (n,) int class index
    entropy: np.ndarray  # (n,) float32, nats
    dice: np.ndarray  # (n,) float32, NaN without an ROI


def read_images(pool: Pool, index: np.ndarray) -> BatchImages:
    """Rows ``index`` of the pool, decoding only the chunks that hold them."""
    index = np.asarray(index, dtype=np.int64)
    return BatchImages(index=index, ids=[str(i) for i in pool.take("ids", index)],
                       images=pool.take("images", index), rois=pool.take("rois", index),
                       has_roi=pool.take("has_roi", index), labels=pool.take("labels", index))


def recompute_cams(model_path: Path, pool: Pool, batch: BatchImages, config: ScoreConfig,
                   target_layer: str | None = None) -> tuple[BatchCams, Checkpoint]:
    """Score the batch's images with the checkpoint (``config``'s targets, threshold, precision,
    device; Grad-CAM at ``target_layer``, default the checkpoint's), ``config.batch_size`` at a time,
    keeping each image's low-resolution CAM in fp32."""
    device = resolve_device(config.device)
    model, ckpt = load_checkpoint(model_path, device=device)
    if target_layer is not None:
        ckpt = replace(ckpt, target_layer=target_layer)
    if ckpt.in_channels != pool.channels:
        raise XalError(f"checkpoint {model_path} reads {ckpt.in_channels} channel(s); pool {pool.path} "
                       f"has {pool.channels}")
    config = replace(config, save_cams=True)
    parts: list[dict[str, np.ndarray]] = []
    for a in range(0, len(batch.index), config.batch_size):  # the few batches of one sheet
        rows = slice(a, a + config.batch_size)
        s = device_scores(model, ckpt, {
            "images": torch.from_numpy(batch.images[rows]).to(device),
            "rois": torch.from_numpy(batch.rois[rows]), "has_roi": torch.from_numpy(batch.has_roi[rows]),
            "labels": torch.from_numpy(np.asarray(batch.labels[rows], dtype=np.int64)),
        }, config, device)
        assert s.cam is not None
        parts.append({"cam": s.cam.cpu().numpy(), "pred": s.pred.cpu().numpy(),
                      "entropy": s.entropy.cpu().numpy(), "dice": s.dice.cpu().numpy()})
    return BatchCams(**{f.name: np.concatenate([p[f.name] for p in parts]) for f in fields(BatchCams)}), ckpt


def caption(image_id: str, pred_class: str, true_class: str | None, entropy: float, dice: float) -> str:
    """A panel's three lines: id; predicted class and the true one where known; entropy and Dice
    (n/a without an ROI)."""
    d = "n/a (no ROI)" if math.isnan(dice) else f"{dice:.2f}"
    true = f", true {true_class}" if true_class is not None else ""
    return f"{image_id}\npred {pred_class}{true}\nH {entropy:.2f}  Dice {d}"


def cam_panels(batch: BatchImages, cams: BatchCams, pred_classes: Sequence[str],
               pool_classes: Sequence[str]) -> list[Panel]:
    """One captioned panel per image; N (n, h, w) upsampled to the image size (H, W) as S. Class names:
    predictions by the model's list, true labels by the pool's (-1: the pool does not know the class)."""
    size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
    maps = upsample_normalise(torch.from_numpy(np.asarray(cams.cam, dtype=np.float32)), size).numpy()
    panels = []
    for i in range(len(batch.index)):  # captions: a few dozen strings
        label = int(batch.labels[i])
        true = pool_classes[label] if 0 <= label < len(pool_classes) else None
        text = caption(batch.ids[i], pred_classes[int(cams.pred[i])], true, float(cams.entropy[i]),
                       float(cams.dice[i]))
        panels.append(Panel(image=batch.images[i], cam=maps[i],
                            roi=batch.rois[i] if batch.has_roi[i] else None, caption=text))
    return panels


# ------------------------------------------------------------------------------ select --overlays
@dataclass(frozen=True)
class CamSource:
    """Where a score run's CAMs come from: its own ``cam`` array, or its model recomputing them."""

    run: str
    stored: bool  # the run has a `cam` array (score --save-cams)
    model: Path | None  # the checkpoint that scored the run, when CAMs are recomputed
    config: ScoreConfig  # the run's scoring settings (targets, threshold, precision) for recomputing
    target_layer: str | None  # the layer the run scored at (its fingerprint's), for recomputing


@dataclass(frozen=True)
class OverlayConfig:
    """Defaults of ``select --overlays``."""

    device: str = "auto"  # where CAMs are recomputed (runs without stored CAMs)
    batch_size: int = 16  # images per recomputing forward/backward
    max_images: int = 36  # panels on the contact sheet (the batch's top ranks); every image gets a PNG
    style: OverlayStyle = field(default_factory=OverlayStyle)


@dataclass(frozen=True)
class OverlayFiles:
    sheet: Path  # DIR/contact_sheet.png
    images: list[Path]  # DIR/<rank>_<id>.png, rank order
    cams: str  # "stored" or "recomputed"

    def line(self) -> str:
        return (f"drew {plural(len(self.images), 'overlay')} ({self.cams} Grad-CAM) and the contact sheet "
                f"-> {self.sheet.parent}")


# ScoreConfig fields that belong to one scoring invocation, not to the run's CAMs
_INVOCATION_KEYS = {"run", "device", "num_workers", "shard_id", "num_shards", "overwrite", "save_cams",
                    "batch_size", "kernel"}


def cam_source(run: ScoreRun, config: OverlayConfig = OverlayConfig()) -> CamSource:
    """The run's stored CAMs, else its recorded model (only while it is the file that scored the run);
    a one-line XalError naming ``score --save-cams`` when neither exists."""
    saved: dict[str, Any] = dict(run.group.attrs.get("config") or {})
    known = {f.name for f in fields(ScoreConfig)}
    score_config = ScoreConfig(**{k: v for k, v in saved.items() if k in known and k not in _INVOCATION_KEYS},
                               device=config.device, batch_size=config.batch_size, num_workers=0)
    fingerprint = run.group.attrs.get("fingerprint") or {}
    layer = fingerprint.get("target_layer")
    if run.has("cam"):
        return CamSource(run=run.name, stored=True, model=None, config=score_config, target_layer=layer)
    recorded = run.group.attrs.get("model")
    sha = fingerprint.get("model_sha256")
    model = Path(recorded) if recorded else None
    if model is None or not model.is_file():
        where = f"its model {model} is not found" if model else "it records no model"
        raise XalError(f"--overlays: score run {run.name!r} stored no CAMs and {where}; rescore with "
                       "`xal-engine score --save-cams`")
    if sha is not None and file_sha256(model) != sha:
        raise XalError(f"--overlays: score run {run.name!r} stored no CAMs and {model} is no longer the "
                       "model that scored it; rescore with `xal-engine score --save-cams`")
    return CamSource(run=run.name, stored=False, model=model, config=score_config, target_layer=layer)


def file_stem(image_id: str) -> str:
    """An id as a file-name part: characters other than letters, digits, '-', '_' and '.' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", image_id).lstrip(".") or "_"


def check_overlay_dir(out: str | Path) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise XalError(f"--overlays {out}: its parent folder does not exist")
    if out.exists() and not out.is_dir():
        raise XalError(f"--overlays {out}: expected a folder, found a file")
    return out


def check_overlays(pool_path: str | Path, run_name: str, out: str | Path,
                   config: OverlayConfig = OverlayConfig()) -> CamSource:
    """Everything ``select --overlays`` needs, checked before the batch is written."""
    check_overlay_dir(out)
    pool = Pool.open(pool_path)
    pool.require_images("select --overlays (2-D overlay PNGs; `xal-engine report` draws volumes)")
    return cam_source(ScoreRun.open(pool.group, run_name), config)


def write_overlays(pool_path: str | Path, selection: BatchSelection, source: CamSource, out: str | Path,
                   config: OverlayConfig = OverlayConfig()) -> OverlayFiles:
    """Draw the selected batch in rank order. Captions show the run's numbers (the batch CSV's), the
    ones the selection used."""
    ranked = selection.rows
    title = f"{selection.config.strategy} batch of score run {selection.run!r}"
    out = check_overlay_dir(out)
    pool = Pool.open(pool_path)
    batch = read_images(pool, np.asarray([r["index"] for r in ranked], dtype=np.int64))
    if source.stored:
        low = ScoreRun.open(pool.group, selection.run).take("cam", batch.index).astype(np.float32)  # (n, h, w)
    else:
        assert source.model is not None
        low = recompute_cams(source.model, pool, batch, source.config, source.target_layer)[0].cam
    cams = BatchCams(cam=low, pred=np.asarray([r["pred"] for r in ranked]),
                     entropy=np.asarray([r["entropy"] for r in ranked], dtype=np.float32),
                     dice=np.asarray([r["dice"] for r in ranked], dtype=np.float32))
    panels = cam_panels(batch, cams, pool.classes, pool.classes)
    out.mkdir(exist_ok=True)
    images = [save_figure(contact_sheet([p], style=config.style), out / f"{r['rank']}_{file_stem(r['id'])}.png")
              for r, p in zip(ranked, panels)]
    shown = panels[:config.max_images]
    what = plural(len(shown), "image") if len(shown) == len(panels) else \
        f"the first {len(shown)} of {len(panels)} images in rank order"
    cams_from = "stored by score --save-cams" if source.stored else f"recomputed with {source.model}"
    sheet = save_figure(contact_sheet(shown, f"{title} ({what}), Grad-CAM {cams_from}", config.style),
                        out / SHEET_PNG)
    return OverlayFiles(sheet=sheet, images=images, cams="stored" if source.stored else "recomputed")
