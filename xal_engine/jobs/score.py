"""`xal-engine score`: one streaming, resumable pass over a pool on this machine.

The pass itself (``xal_engine.jobs.streaming``) is shared with ``--backend ray``; here a DataLoader
decodes the pending work units in ``--num-workers`` forked processes and feeds it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from xal_engine.core.inputs import resolve_device
from xal_engine.jobs.streaming import (
    ScoreConfig,
    UnitWriter,
    load_scoring_model,
    open_run,
    plan_run,
    score_and_store,
)
from xal_engine.progress import progress
from xal_engine.store import Pool
from xal_engine.store.dataset import UnitRanges

__all__ = ["ScoreConfig", "ScoreSummary", "open_run", "score_pool", "unit_loader"]


@dataclass(frozen=True)
class ScoreSummary:
    pool: str
    run: str
    images: int  # scored by this invocation
    units: int
    units_already_done: int
    seconds: float
    images_per_s: float
    mean_dice: float  # over the images this invocation scored that have an ROI (NaN if none)
    complete: bool  # every unit of the run is done (all shards)
    device: str

    def line(self) -> str:
        state = "complete" if self.complete else "incomplete (other shards pending)"
        return (
            f"scored {self.images} images in {self.seconds:.1f} s ({self.images_per_s:.1f} img/s), "
            f"mean Dice {self.mean_dice:.4f}; {self.units_already_done} units were already done; "
            f"run {self.run!r} {state}"
        )


def loader_context() -> str | None:
    """Fork loader workers on Linux even where the default start method is spawn (a spawned parent,
    Ray): a spawned worker re-imports torch, seconds per worker. Forked workers reopen the pool."""
    return "fork" if sys.platform.startswith("linux") else None


def unit_loader(pool: Pool, items: list[list[tuple[int, int, int]]], with_labels: bool, num_workers: int,
                device: torch.device) -> DataLoader:
    """The scorer's loader: ``UnitRanges`` items in order, decoded in ``num_workers`` forked processes
    (in-process with 0), pinned for CUDA, two items prefetched per worker."""
    return DataLoader(
        UnitRanges(pool, items, with_labels=with_labels),
        batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if num_workers else None,
        multiprocessing_context=loader_context() if num_workers else None,
    )


def score_pool(pool_path: str | Path, model_path: str | Path, config: ScoreConfig,
               show_progress: bool | None = None) -> ScoreSummary:
    """Score every pending work unit of this shard of run `config.run`; returns the summary."""
    device = resolve_device(config.device)
    model_path = Path(model_path)
    pool = Pool.open(pool_path, mode="r+")
    model, ckpt = load_scoring_model(model_path, device)
    plan = plan_run(pool, model_path, ckpt, config)
    run, n_images = plan.run, plan.n_images
    loader = unit_loader(pool, plan.items, config.targets == "label", config.num_workers, device)
    dice_sum, dice_count = 0.0, 0
    writer = UnitWriter(run)
    t0 = time.perf_counter()
    bar = progress(n_images, desc=f"score {config.run}", enabled=show_progress)
    try:
        for _, _, host in score_and_store(model, ckpt, loader, config, device, writer):
            finite = np.isfinite(host.dice)
            dice_sum += float(host.dice[finite].sum())
            dice_count += int(finite.sum())
            bar.update(host.pred.shape[0])
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    return ScoreSummary(
        pool=str(pool.path), run=config.run, images=n_images, units=len(plan.pending),
        units_already_done=plan.already_done, seconds=seconds,
        images_per_s=n_images / seconds if seconds > 0 else math.inf,
        mean_dice=dice_sum / dice_count if dice_count else math.nan,
        complete=run.is_complete(), device=str(device),
    )
