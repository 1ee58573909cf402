"""The embedded default, end to end: a phantom pool with a shortcut cue, random vs dual AL rounds, a report.

The pool's train and validation images carry a class marker in a corner 90 % of the time (never the
test images), so a model can score well in training while looking at the marker instead of the
lesion. The dual criterion prefers images the model is unsure about AND attends to the wrong place;
the report compares its learning curve and test attention (Dice with the lesion ROI) with random
sampling. Everything lives under one folder; a rerun resumes (the pool is kept when its synthetic
config matches, the loop continues after its last complete round).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from xal_engine.errors import PoolError, XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.jobs.loop import LoopConfig, run_loop
from xal_engine.jobs.train import TrainConfig
from xal_engine.store import Pool

# resnet18 at 48x48: layer4 is 2x2, layer3 gives a 3x3 Grad-CAM (lesion centre vs marker corners). The
# layer is given, not the size-based default (layer1, 12x12), so that the demo's results stay as recorded.
# Batches of 16 and 6 epochs: enough optimiser steps for batch-norm statistics to settle on ~100
# images. Loader workers cost more than they save on a pool this small.
_TRAIN = TrainConfig(arch="resnet18", epochs=6, batch_size=16, target_layer="layer3", num_workers=0)


@dataclass(frozen=True)
class DemoConfig:
    """1200 phantoms (840 train, 120 val, 240 test); 120 labels, then 3 rounds of 120."""

    pool: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(
        n=1200, size=48, classes=3, channels=1, seed=0, shortcut=0.9, roi_fraction=1.0))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        strategies=("random", "dual"), seeds=1, initial=120, per_round=120, rounds=3, train=_TRAIN))
    name: str = "demo"  # folder names: <name>-pool.zarr, <name>-run


DEFAULT = DemoConfig()
# --quick: the same story at a smoke-test size (about 15 s on a 2-core CPU)
QUICK = DemoConfig(pool=replace(DEFAULT.pool, n=300), name="quick",
                   loop=replace(DEFAULT.loop, initial=60, per_round=60, rounds=1,
                                train=replace(_TRAIN, epochs=3)))


def with_threads(config: DemoConfig, threads: int | None) -> DemoConfig:
    """``config`` training and scoring with ``threads`` torch threads (None: the process's setting)."""
    return replace(config, loop=replace(config.loop, train=replace(config.loop.train, threads=threads)))


def with_run(config: DemoConfig, device: str = "auto", seeds: int | None = None) -> DemoConfig:
    """``config`` on ``device`` with ``seeds`` seeds per strategy (None: as configured)."""
    loop = replace(config.loop, train=replace(config.loop.train, device=device))
    return replace(config, loop=loop if seeds is None else replace(loop, seeds=seeds))


@dataclass(frozen=True)
class DemoResult:
    pool: Path
    run_dir: Path
    report: Path | None  # None when no report module is installed
    rows: list[dict[str, Any]]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def demo_pool(path: Path, config: SyntheticConfig, show_progress: bool | None) -> bool:
    """Reuse ``path`` when it holds this synthetic config (with its AL state), else write it afresh;
    True when written."""
    try:
        if Pool.open(path).attrs.get("synthetic") == asdict(config):
            return False
    except PoolError:
        pass
    create_synthetic_pool(config, path, overwrite=True, show_progress=show_progress)
    return True


def write_report(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """``xal_engine.jobs.report.write_report(run_dir)`` when that module exists; None (and a line) if not."""
    try:
        report = importlib.import_module("xal_engine.jobs.report")
    except ModuleNotFoundError as err:
        if err.name != "xal_engine.jobs.report":
            raise
        log(f"report: xal_engine.jobs.report is not installed; the metrics are in {run_dir / 'metrics.csv'}")
        return None
    return Path(report.write_report(run_dir))


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (strategy, seed): the last round's labelled count, test accuracy and attention."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["strategy"], int(row["seed"]))
        if key not in last or row["round"] > last[key]["round"]:
            last[key] = row
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"  # None: not measurable (e.g. no test ROI)

    return [f"{s:>16} seed {k}: round {r['round']}, {r['n_labelled']} labelled, test acc {num(r['accuracy'])}, "
            f"bal acc {num(r['balanced_accuracy'])}, Dice {num(r['test_dice'])}, hit {num(r['test_hit_rate'])}"
            for (s, k), r in last.items()]


def run_demo(out: str | Path, config: DemoConfig = DEFAULT, log: Callable[[str], None] = _stderr,
             show_progress: bool | None = None) -> DemoResult:
    """Pool, loop and report under ``out``; progress and per-round lines go to ``log``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise XalError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    pool = out / f"{config.name}-pool.zarr"
    run_dir = out / f"{config.name}-run"
    log(f"demo: phantom pool {pool} ({config.pool.n} images {config.pool.size}x{config.pool.size}, "
        f"{config.pool.classes} classes, shortcut marker in {config.pool.shortcut:.0%} of train/val images)")
    fresh_pool = demo_pool(pool, config.pool, show_progress)  # a new pool voids an earlier run
    loop = config.loop
    log(f"demo: {' vs '.join(loop.strategies)}, {loop.initial} initial + {loop.rounds} x {loop.per_round} "
        f"labels, {loop.train.arch} {loop.train.epochs} epochs per round -> {run_dir}")
    rows = run_loop(pool, run_dir, loop, overwrite=fresh_pool, log=log, show_progress=show_progress)
    for line in summary_lines(rows):
        log(line)
    return DemoResult(pool=pool, run_dir=run_dir, report=write_report(run_dir, log), rows=rows)
