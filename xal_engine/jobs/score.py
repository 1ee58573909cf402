"""`xal-engine score`: one streaming, resumable pass over a pool on this machine.

The pass itself (``xal_engine.jobs.streaming``) is shared with ``--backend ray``; here a DataLoader
decodes the pending work units' items in ``--num-workers`` forked processes and feeds it (with 0, a
read-ahead thread decodes them in-process).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from xal_engine.core.inputs import resolve_device
from xal_engine.jobs.runtime import torch_threads
from xal_engine.jobs.streaming import (
    Item,
    ScoreConfig,
    Scorer,
    UnitWriter,
    fit_target_layer,
    load_scoring_model,
    open_run,
    plan_run,
    score_and_store,
    worker_errors,
)
from xal_engine.progress import plural, progress
from xal_engine.store import Pool
from xal_engine.store.dataset import UnitRanges, read_ahead, worker_exit_with_parent
from xal_engine.store.location import is_remote, local_path
from xal_engine.store.locks import LockFile, score_shard_lock

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
        dice = "n/a" if math.isnan(self.mean_dice) else f"{self.mean_dice:.4f}"  # NaN: no image with an ROI
        return (
            f"scored {plural(self.images, 'image')} in {self.seconds:.1f} s ({self.images_per_s:.1f} img/s), "
            f"mean Dice {dice}; {plural(self.units_already_done, 'unit')} "
            f"{'was' if self.units_already_done == 1 else 'were'} already done; "
            f"run {self.run!r} {state}"
        )


def loader_context() -> str | None:
    """Fork loader workers on Linux even where the default start method is spawn (a spawned parent,
    Ray): a spawned worker re-imports torch, seconds per worker. Forked workers reopen the pool."""
    return "fork" if sys.platform.startswith("linux") else None


def unit_loader(pool: Pool, items: list[Item], with_labels: bool, num_workers: int,
                device: torch.device) -> Iterable[dict[str, Any]]:
    """The scorer's loader: ``UnitRanges`` items in order, decoded in ``num_workers`` forked processes
    that die with this one, two items prefetched per worker; with 0 workers, by one read-ahead thread
    of this process (always for a pool in an object store: several reader threads, see
    ``read_ahead``). For CUDA the items arrive pinned (the DataLoader's pin thread, or the read-ahead
    thread), in blocks torch's caching host allocator reuses."""
    dataset = UnitRanges(pool, items, with_labels=with_labels)
    pin = device.type == "cuda"
    if not num_workers or is_remote(pool.path):  # an object store: reads wait on round trips, not on
        return read_ahead(dataset, pin=pin)  # the CPU, and its client does not survive a fork
    return DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=2,
        pin_memory=pin, multiprocessing_context=loader_context(), worker_init_fn=worker_exit_with_parent(),
    )


def stop_workers(items: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's worker processes now: after an interrupt the iterator lives on in
    the traceback, and its workers would linger until their parent-death check fires."""
    shutdown = getattr(items, "_shutdown_workers", None)  # multiprocess iterators only
    if shutdown is not None:
        shutdown()
    close = getattr(items, "close", None)  # the read-ahead generator: cancels its queued reads
    if close is not None:
        close()


def shard_lock(pool: Pool, config: ScoreConfig) -> AbstractContextManager[LockFile | None]:
    """The lock of this shard of run ``config.run``, to hold while scoring (see
    :func:`~xal_engine.store.locks.score_shard_lock`): one process per shard, one shard count per run.
    Lock files exist only beside a local pool; on an object store nothing is locked (README)."""
    root = local_path(pool.path)
    if root is None:
        return nullcontext()
    return score_shard_lock(root, config.run, config.shard_id, config.num_shards)


def score_pool(pool_path: str | Path, model_path: str | Path, config: ScoreConfig,
               show_progress: bool | None = None) -> ScoreSummary:
    """Score every pending work unit of this shard of run `config.run`; returns the summary.

    The shard's lock file (:func:`~xal_engine.store.locks.score_lock_path`) is held throughout: a
    second process scoring the same shard is refused. An interrupt (KeyboardInterrupt; the CLI turns
    SIGTERM into one) stops the loader workers, stores the units already scored and marks them done.
    """
    device = resolve_device(config.device)
    model_path = Path(model_path)
    pool = Pool.open(pool_path, mode="r+")
    pool.require_settled("before scoring")
    with shard_lock(pool, config), torch_threads(config.threads):
        return _score_locked(pool, model_path, config, device, show_progress)


def _score_locked(pool: Pool, model_path: Path, config: ScoreConfig, device: torch.device,
                  show_progress: bool | None) -> ScoreSummary:
    model, ckpt = load_scoring_model(model_path, device)
    ckpt = fit_target_layer(model, ckpt, pool, model_path, config)  # --target-layer, size checks
    plan = plan_run(pool, model_path, ckpt, config)
    run, n_images = plan.run, plan.n_images
    loader = unit_loader(pool, plan.items, config.targets == "label", config.num_workers, device)
    dice_sum, dice_count = 0.0, 0
    writer = UnitWriter(run)
    t0 = time.perf_counter()
    bar = progress(n_images, desc=f"score {config.run}", enabled=show_progress)
    items = iter(loader)
    try:
        with worker_errors(), Scorer(model, ckpt, config, device) as scorer:
            for _, host in score_and_store(scorer, items, writer, on_batch=bar.update):
                finite = np.isfinite(host.dice)
                dice_sum += float(host.dice[finite].sum())
                dice_count += int(finite.sum())
    finally:
        stop_workers(items)
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
