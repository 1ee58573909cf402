"""Does the dual criterion pick better batches than random and entropy sampling? (the paper's claim)

    python benchmarks/experiments/paper_claim.py [--quick] [--jobs 2] [--work DIR] [--out DIR]

Two pools, both written by the engine's generators (no real data can be downloaded here):
  phantom  xal_engine.synthetic phantoms with a class-coded corner marker in SHORTCUT of the train and
           validation images (never test): a model can learn the marker instead of the lesion, so the
           attention Dice with the lesion ROI means something
  brain    xal_engine.brain_phantom: MNI152 T1 slices with an inserted tumour of three BraTS-like
           classes (edema, necrotic core, enhancing), T1ce/FLAIR/T2 analogues, no shortcut
On each pool ``xal_engine.loop.run_loop`` runs every strategy (random, entropy, margin,
least-confidence, misalignment, dual with λ = 0.3 as the paper) for the same seeds at equal label
budgets: the initial set of a seed is the same for every strategy, training keeps the epoch with the
best validation balanced accuracy, the test split is only evaluated. Nothing is tuned on the test
split: the sizes below were fixed by the time one round takes on the machine, before any result.

Writes to --out (default benchmarks/results/paper_claim/):
  <pool>/metrics.csv, <pool>/config.json      the loop's run folder files
  <pool>/report/                              ``xal_engine.report``: learning curves PNG, tables,
                                              contact sheets of the last batches
  summary.md                                  the reproduce command, device, versions, date, commit;
                                              per pool a table per strategy (final-round accuracy,
                                              balanced accuracy, test Dice: mean ± std over seeds;
                                              area under the learning curve) and the verdicts
Verdict of "dual vs X on metric m": per seed the difference dual − X at the final round (the same
seed shares the initial set, so the pairs are matched); mean ± sample std of these differences.
|mean| <= std: "within one std: no evidence"; otherwise "dual higher/lower by more than one std"
(with 3 seeds this is weak evidence, not a significance test).

Pools, checkpoints and scores live under --work (default /tmp/xal-paper-claim; about 45 MB per round
checkpoint); a rerun with the same settings resumes each loop after its last complete round. The
pools run in parallel (--jobs processes, one torch thread each: on 2 cores this beats one process
with two threads for models this small).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from xal_engine.acquisition import STRATEGIES
from xal_engine.benchmarking import provenance
from xal_engine.brain_phantom import BrainPhantomConfig, create_brain_phantom_pool
from xal_engine.errors import PoolError, XalError
from xal_engine.loop import LoopConfig, run_loop
from xal_engine.pool import Pool
from xal_engine.report import RunData, Stat, format_stat, load_run, make_report, summarise
from xal_engine.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.training import TrainConfig

RESULTS = Path(__file__).resolve().parents[1] / "results" / "paper_claim"
BASELINES = ("random", "entropy")
CLAIM_METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "test_dice": "test Dice"}


@dataclass(frozen=True)
class PoolSpec:
    name: str
    config: SyntheticConfig | BrainPhantomConfig


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that fixes the numbers: the pools and one loop configuration for both."""

    pools: tuple[PoolSpec, ...]
    loop: LoopConfig
    threads: int = 1  # torch threads per pool process


# resnet18 at 48 px: layer3 is 3 x 3 (layer4 would be 2 x 2). Batches of 16: enough optimiser steps
# per epoch on ~100 images for batch-norm statistics to settle; no loader workers on a small pool.
_TRAIN = TrainConfig(arch="resnet18", epochs=12, batch_size=16, target_layer="layer3", num_workers=0,
                     device="cpu")
FULL = ExperimentConfig(
    pools=(PoolSpec("phantom", SyntheticConfig(n=700, size=48, classes=3, channels=1, seed=0, shortcut=0.7)),
           PoolSpec("brain", BrainPhantomConfig(n=700, size=48, seed=0))),
    loop=LoopConfig(strategies=STRATEGIES, seeds=3, initial=40, per_round=40, rounds=4, lam=0.3,
                    train=_TRAIN))
# --quick: every strategy and two seeds (a std needs two) at a smoke-test size
QUICK = ExperimentConfig(
    pools=(PoolSpec("phantom", replace(FULL.pools[0].config, n=160, size=32)),
           PoolSpec("brain", replace(FULL.pools[1].config, n=160, size=32))),
    loop=replace(FULL.loop, seeds=2, initial=16, per_round=8, rounds=1,
                 train=replace(_TRAIN, epochs=1, batch_size=8, target_layer="layer2")))


# ------------------------------------------------------------------------------------ running
def make_pool(spec: PoolSpec, path: Path) -> None:
    """Write the pool unless ``path`` already holds one with this generator config."""
    kind = "synthetic" if isinstance(spec.config, SyntheticConfig) else "brain_phantom"
    try:
        if Pool.open(path).attrs.get(kind) == asdict(spec.config):
            return
    except PoolError:
        pass
    create = create_synthetic_pool if kind == "synthetic" else create_brain_phantom_pool
    create(spec.config, path, overwrite=True, show_progress=False)  # type: ignore[arg-type]


def run_pool(spec: PoolSpec, config: ExperimentConfig, work: Path, overwrite: bool) -> float:
    """Pool, then every (seed, strategy) loop into work/<name>-run; the wall seconds. Runs in a child."""
    torch.set_num_threads(config.threads)
    began = time.perf_counter()
    pool = work / f"{spec.name}-pool.zarr"
    make_pool(spec, pool)
    log_file = (work / f"{spec.name}.log").open("a")

    def log(line: str) -> None:
        print(f"[{spec.name} {time.strftime('%H:%M:%S')}] {line}", file=log_file, flush=True)
        if " round " in line:
            print(f"[{spec.name}] {line}", file=sys.stderr, flush=True)

    run_loop(pool, work / f"{spec.name}-run", config.loop, overwrite=overwrite, log=log, show_progress=False)
    log_file.close()
    return time.perf_counter() - began


# ------------------------------------------------------------------------------------ summary
def final_values(run: RunData, strategy: str, metric: str, final_round: int) -> dict[int, float]:
    """seed -> the metric at ``final_round`` for one strategy."""
    rows = np.flatnonzero((run.strategy == strategy) & (run.round == final_round))
    return {int(run.seed[i]): float(run.metrics[metric][i]) for i in rows}


def paired_verdict(dual: dict[int, float], other: dict[int, float]) -> tuple[Stat, int, str]:
    """Per-seed differences dual − other: their mean ± std, the seeds where dual is higher, a verdict."""
    seeds = sorted(set(dual) & set(other))
    diff = np.asarray([dual[s] - other[s] for s in seeds])
    diff = diff[np.isfinite(diff)]
    s = Stat(float(diff.mean()) if diff.size else math.nan,
             float(diff.std(ddof=1)) if diff.size > 1 else math.nan, int(diff.size))
    if s.count < 2:
        verdict = "fewer than two seeds: no verdict"
    elif abs(s.mean) <= s.std or s.mean == 0.0:
        verdict = "within one std: no evidence"
    else:
        verdict = f"dual {'higher' if s.mean > 0 else 'lower'} by more than one std (weak, {s.count} seeds)"
    return s, int((diff > 0).sum()), verdict


def pool_section(spec: PoolSpec, run: RunData, seconds: float | None) -> list[str]:
    summaries = {s.strategy: s for s in summarise(run)}
    cfg = run.config.get("loop", {})
    lines = [f"## {spec.name}", "",
             f"pool: `{type(spec.config).__name__}({', '.join(f'{k}={v}' for k, v in asdict(spec.config).items())})`",
             f"loop: initial {cfg.get('initial')}, +{cfg.get('per_round')} per round for {cfg.get('rounds')} "
             f"rounds, λ = {cfg.get('lam')}, Dice {cfg.get('dice')}, balance {cfg.get('balance')}; "
             f"{run.config.get('arch')} {cfg.get('train', {}).get('epochs')} epochs, batch "
             f"{cfg.get('train', {}).get('batch_size')}, Grad-CAM layer {cfg.get('train', {}).get('target_layer')}",
             f"wall time: {seconds / 60:.1f} min" if seconds is not None else "wall time: (resumed run)",
             f"mean seconds per round: train {np.nanmean(_column(run, 'train_seconds')):.1f}, "
             f"score {np.nanmean(_column(run, 'score_seconds')):.1f}", "",
             "Final round (mean ± std over seeds) and area under the learning curve (ALC, mean over the "
             "label range):", "",
             "| strategy | seeds | labels | accuracy | balanced acc. | test Dice | ALC accuracy | ALC test Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for name in run.strategies:
        s = summaries.get(name)
        if s is None:
            continue
        lines.append(f"| {name} | {len(s.seeds)} | {s.n_labelled:.0f} | {format_stat(s.final['accuracy'])} | "
                     f"{format_stat(s.final['balanced_accuracy'])} | {format_stat(s.final['test_dice'])} | "
                     f"{format_stat(s.alc['accuracy'])} | {format_stat(s.alc['test_dice'])} |")
    lines += ["", "Dual vs baselines, paired by seed at the final round (difference dual − baseline):", "",
              "| comparison | metric | mean ± std of differences | seeds dual higher | verdict |",
              "|---|---|---|---|---|"]
    if "dual" in summaries:
        final = summaries["dual"].final_round
        for base in BASELINES:
            if base not in summaries:
                continue
            at = min(final, summaries[base].final_round)
            for metric, title in CLAIM_METRICS.items():
                s, wins, verdict = paired_verdict(final_values(run, "dual", metric, at),
                                                  final_values(run, base, metric, at))
                lines.append(f"| dual vs {base} | {title} | {format_stat(s)} | {wins}/{s.count} | {verdict} |")
    return lines + [""]


def _column(run: RunData, name: str) -> np.ndarray:
    """A metrics.csv column that RunData does not keep (timings)."""
    import csv

    with open(run.path / "metrics.csv", newline="") as f:
        return np.asarray([float(r[name]) for r in csv.DictReader(f)], dtype=np.float64)


def write_summary(out: Path, config: ExperimentConfig, runs: dict[str, RunData], seconds: dict[str, float],
                  command: str) -> Path:
    prov = provenance(torch.device("cpu"))
    try:
        import nilearn

        nilearn_version = nilearn.__version__
    except ImportError:
        nilearn_version = "-"
    header = ["# The paper's claim: dual (λ·entropy + (1−λ)·(1−Dice)) vs random and entropy sampling", "",
              f"- reproduce: `{command}`",
              f"- date: {prov['date']}; commit: {prov['git_commit']}",
              f"- device: {prov['device']} x {config.threads} thread(s) per pool process, "
              f"{len(config.pools)} pool process(es) in parallel; machine: {platform.platform()}",
              f"- versions: xal_engine {prov['xal_engine']}, torch {prov['torch']}, numpy {np.__version__}, "
              f"nilearn {nilearn_version}, python {platform.python_version()}",
              f"- strategies: {', '.join(config.loop.strategies)}; seeds: {config.loop.seeds}; "
              "model selection on the validation split; the test split is only evaluated", ""]
    body: list[str] = []
    for spec in config.pools:
        if spec.name in runs:
            body += pool_section(spec, runs[spec.name], seconds.get(spec.name))
            body += [f"Learning curves: [{spec.name}/report/learning_curves.png]"
                     f"({spec.name}/report/learning_curves.png)", ""]
    path = out / "summary.md"
    path.write_text("\n".join(header + body))
    return path


def collect(spec: PoolSpec, work: Path, out: Path) -> RunData:
    """Copy the run's metrics and config to out/<pool>/ and write the report there."""
    run_dir = work / f"{spec.name}-run"
    dest = out / spec.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "config.json"):
        shutil.copyfile(run_dir / name, dest / name)
    make_report(run_dir, dest / "report", pool=work / f"{spec.name}-pool.zarr")
    return load_run(run_dir)


# ------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run at a tiny size (about minutes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default: {RESULTS}; with --quick: WORK/quick/results)")
    p.add_argument("--work", type=Path, default=Path("/tmp/xal-paper-claim"),
                   help="pools, checkpoints and run folders (default: %(default)s)")
    p.add_argument("--pools", nargs="+", choices=("phantom", "brain"), default=["phantom", "brain"])
    p.add_argument("--jobs", type=int, default=2, help="pools run in parallel processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="restart the loops instead of resuming them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    config = replace(base, pools=tuple(p for p in base.pools if p.name in args.pools))
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "results" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (work / "experiment.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    command = shlex.join(["python", "benchmarks/experiments/paper_claim.py", *(argv or sys.argv[1:])])
    seconds: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as ex:
        futures = {spec.name: ex.submit(run_pool, spec, config, work, args.overwrite) for spec in config.pools}
        for name, future in futures.items():
            seconds[name] = future.result()
    runs = {spec.name: collect(spec, work, out) for spec in config.pools}
    path = write_summary(out, config, runs, seconds, command)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except XalError as err:
        print(f"paper_claim: {err}", file=sys.stderr)
        sys.exit(2)
