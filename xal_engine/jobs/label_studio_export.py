"""``select --format label-studio --out DIR``: the selected batch as a Label Studio project's files.

DIR (created; refused when it exists and is not empty) receives ``tasks.json``, ``config.xml`` and
``images/<rank>_<id>.png`` (:func:`xal_engine.exchange.label_studio.export_tasks`), and the batch CSV
and its sidecar as ``batch.csv`` / ``batch.csv.json`` (:func:`xal_engine.jobs.select.write_batch`).

The pre-annotated ROI is the run's thresholded Grad-CAM at image size, exactly the set the run's Dice
measured: the low-resolution map N (stored by ``score --save-cams``, else recomputed for the batch with
the run's model, as ``select --overlays`` does, :func:`xal_engine.jobs.batch_sheet.cam_source`), upsampled
bilinearly with half-pixel centres and min-max normalised to S (``upsample_normalise``), then
``S >= threshold`` (the run's ``--threshold``); a map that is not finite gives no ROI.
Images are written as 8-bit PNGs: a uint8 pool's pixels as they are (1 channel grey, 3 channels RGB,
other counts averaged), other dtypes min-max scaled per image (the overlays' display rule).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xal_engine.errors import XalError
from xal_engine.exchange.label_studio import TASKS_JSON, BatchTasks, export_tasks
from xal_engine.jobs.batch_sheet import (
    CamSource,
    OverlayConfig,
    cam_source,
    file_stem,
    read_images,
    recompute_cams,
)
from xal_engine.jobs.overlay import display_image
from xal_engine.jobs.select import BatchSelection, write_batch
from xal_engine.ops.reference import upsample_normalise
from xal_engine.progress import plural
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

BATCH_CSV = "batch.csv"


@dataclass(frozen=True)
class LabelStudioFiles:
    tasks: Path  # DIR/tasks.json
    csv: Path  # DIR/batch.csv (its sidecar DIR/batch.csv.json)
    n_tasks: int
    n_rois: int  # tasks pre-annotated with a CAM ROI (the thresholded CAM is not empty)
    cams: str  # "stored" or "recomputed"

    def line(self) -> str:
        return (f"wrote {plural(self.n_tasks, 'Label Studio task')} ({self.n_rois} with a {self.cams} Grad-CAM "
                f"ROI) -> {self.tasks}; labelling config {self.tasks.parent / 'config.xml'}")


def check_out_dir(out: str | Path) -> Path:
    """``--out`` of ``--format label-studio``: a folder to create, or an empty one; checked before any work."""
    out = Path(out)
    if not out.parent.is_dir():
        raise XalError(f"--out {out}: its parent folder does not exist")
    if out.exists() and not out.is_dir():
        raise XalError(f"--out {out}: with --format label-studio --out is a folder; found a file")
    if out.is_dir() and any(out.iterdir()):
        raise XalError(f"--out {out}: the folder is not empty (the Label Studio files go into a new or "
                       "empty folder)")
    return out


def check_export(pool_path: str | Path, run_name: str, out: str | Path, device: str = "auto") -> CamSource:
    """Everything ``select --format label-studio`` needs, before the ranking: the folder and the CAMs."""
    check_out_dir(out)
    pool = Pool.open(pool_path)
    pool.require_images("select --format label-studio (2-D image tasks)")
    return cam_source(ScoreRun.open(pool.group, run_name), OverlayConfig(device=device))


def png_images(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) pool images -> (n, H, W) or (n, H, W, 3) uint8 for PNGs (the rule of the module doc)."""
    if images.dtype == np.uint8:
        if images.shape[1] == 1:
            return images[:, 0]
        return np.moveaxis(images, 1, -1) if images.shape[1] == 3 else \
            np.round(images.mean(axis=1)).astype(np.uint8)
    return np.stack([np.round(display_image(x) * 255).astype(np.uint8) for x in images])


def cam_masks(low: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """(n, h, w) normalised low-resolution CAMs N -> (n, H, W) bool {S >= threshold}; False where N
    is not finite."""
    s = upsample_normalise(torch.from_numpy(np.asarray(low, dtype=np.float32)), size).numpy()  # (n, H, W)
    return np.isfinite(s) & (s >= threshold)


def write_label_studio(pool_path: str | Path, selection: BatchSelection, source: CamSource, out: str | Path,
                       image_url_prefix: str | None = None) -> LabelStudioFiles:
    """Create ``out`` and write the batch CSV, the tasks with pre-annotations, the config and PNGs."""
    out = check_out_dir(out)
    pool = Pool.open(pool_path)
    ranked = selection.rows
    batch = read_images(pool, np.asarray([r["index"] for r in ranked], dtype=np.int64))
    run = ScoreRun.open(pool.group, selection.run)
    if source.stored:
        low = run.take("cam", batch.index).astype(np.float32)  # (n, h, w)
    else:
        assert source.model is not None
        low = recompute_cams(source.model, pool, batch, source.config, source.target_layer)[0].cam
    masks = cam_masks(low, (pool.height, pool.width), source.config.threshold)  # (n, H, W)
    pred = np.asarray([r["pred"] for r in ranked], dtype=np.int64)  # (n,)
    if run.has("probs"):
        prob = run.take("probs", batch.index).astype(np.float32)[np.arange(len(pred)), pred]  # (n,)
    else:  # the top-1 probability is the predicted class's
        prob = np.asarray([1.0 - r.get("least_confidence", np.nan) for r in ranked], dtype=np.float32)
    tasks = BatchTasks(
        ids=batch.ids, indices=batch.index, files=[f"{r['rank']}_{file_stem(r['id'])}.png" for r in ranked],
        images=png_images(batch.images), pred_class=[r["pred_class"] for r in ranked], pred_prob=prob,
        score=np.asarray([r["score"] for r in ranked], dtype=np.float64),
        entropy=np.asarray([r["entropy"] for r in ranked], dtype=np.float64),
        dice=np.asarray([r["dice"] for r in ranked], dtype=np.float64), cam_masks=masks)
    fingerprint = run.group.attrs.get("fingerprint") or {}
    sha = fingerprint.get("model_sha256")
    version = f"xal-engine run {selection.run}" + (f" model {sha[:12]}" if sha else "")
    # Written into a hidden sibling, then renamed onto `out`: a failure or a kill leaves no half folder
    # (a stale staging folder of a killed run is ignored and replaced by the next one of that pid).
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_batch(selection, staging / BATCH_CSV, pool_path)
        export_tasks(staging, tasks, pool.classes, version, image_url_prefix)
        if out.is_dir():
            out.rmdir()  # empty (checked): os.replace needs the name free or an empty folder
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LabelStudioFiles(tasks=out / TASKS_JSON, csv=out / BATCH_CSV, n_tasks=len(ranked),
                            n_rois=int(masks.any(axis=(1, 2)).sum()),
                            cams="stored" if source.stored else "recomputed")
