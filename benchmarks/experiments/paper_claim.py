"""Does the dual criterion pick better batches than random and entropy sampling? (the paper's claim)

    python benchmarks/experiments/paper_claim.py [--protocol engine|paper] [--quick] [--jobs 2] [--work DIR]

Two protocols, the same pools, strategies and budgets:
  engine   the engine's defaults: hard Dice (CAM >= 0.5) in the dual score, training on labels only
  paper    as the authors' code: soft Dice in the dual score, and every round's training adds the
           explanation loss 0.1 * (1 - soft Dice(Grad-CAM, ROI)) on labelled images (every strategy,
           so that the strategies differ only in what they select)

Two pools, both written by the engine's generators (no real data can be downloaded here):
  phantom  xal_engine.ingest.synthetic phantoms with a class-coded corner marker in SHORTCUT of the train and
           validation images (never test): a model can learn the marker instead of the lesion, so the
           attention Dice with the lesion ROI means something
  brain    xal_engine.ingest.brain_phantom: MNI152 T1 slices with an inserted tumour of three BraTS-like
           classes (edema, necrotic core, enhancing), T1ce/FLAIR/T2 analogues, no shortcut
On each pool ``xal_engine.jobs.loop.run_loop`` runs every strategy (random, entropy, margin,
least-confidence, misalignment, dual with λ = 0.3 as the paper) for the same seeds at equal label
budgets: the initial set of a seed is the same for every strategy, training keeps the epoch with the
best validation balanced accuracy, the test split is only evaluated. Nothing is tuned on the test
split: the sizes below were fixed by the time one round takes on the machine, before any result.

Writes to --out (default benchmarks/results/paper_claim/, with --protocol paper its paper_protocol/):
  <pool>/metrics.csv, <pool>/config.json      the loop's run folder files
  <pool>/report/                              ``xal_engine.jobs.report``: learning curves PNG, tables,
                                              contact sheets of the last batches
  summary.md                                  the reproduce command, device, versions, date, commit;
                                              per pool a table per strategy (final-round accuracy,
                                              balanced accuracy, test Dice: mean ± std over seeds;
                                              area under the learning curve) and the verdicts
Verdict of "dual vs X on metric m": per seed the difference dual − X at the final round (the same
seed shares the initial set, so the pairs are matched); mean ± sample std of these differences.
|mean| <= std: "within one std: no evidence"; otherwise "dual higher/lower by more than one std"
(with 5 seeds this is weak evidence, not a significance test).

Pools, checkpoints and scores live under --work (default /tmp/xal-paper-claim; about 45 MB per round
checkpoint); a rerun with the same settings resumes each loop after its last complete round. The
pools run in parallel (--jobs processes, one torch thread each: on 2 cores this beats one process
with two threads for models this small).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from xal_engine.bench.timing import provenance
from xal_engine.core.acquisition import STRATEGIES
from xal_engine.errors import PoolError, XalError
from xal_engine.ingest.brain_phantom import BrainPhantomConfig, create_brain_phantom_pool
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.jobs.loop import LoopConfig, run_loop
from xal_engine.jobs.report import RunData, Stat, format_stat, load_run, make_report, stat, summarise
from xal_engine.jobs.train import TrainConfig
from xal_engine.store import Pool
from xal_engine.store.run_folder import RunFolder, read_metrics_csv, read_selected, write_metrics_csv

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


# resnet18 with Grad-CAM on layer2: at 40 px a 5 x 5 map (the paper: 7 x 7, DenseNet-121 at 224 px);
# layer3 at 48 px (3 x 3) gave test Dice near 0 for every model. Batches of 8: from scratch on 60-140
# images, batches of 16 left the phantom model at chance after 10 epochs. Sizes: at 48 px, 10 epochs,
# 600 images and 3 rounds one experiment took 92 s on the quiet machine but 190 s with the machine
# shared (load 4-5), i.e. ~57 min for the 36 experiments; cut to 40 px, 6 epochs, 450 images, 2 rounds
# (about 55 s per experiment shared) so that 3 seeds of every strategy fit in ~20 min; 5 seeds (~30 min on
# the quiet machine) since training recomputes batch-norm statistics, for a tighter spread.
# Every registered strategy is a row (bald, coreset, badge, dual-diverse and typiclust since the committed
# run, which had the first six); every model trains with dropout 0.2 before its classifier, so that bald's
# MC-dropout passes and every other row share one model family.
_TRAIN = TrainConfig(arch="resnet18", epochs=6, batch_size=8, target_layer="layer2", num_workers=0,
                     device="cpu", head_dropout=0.2)
FULL = ExperimentConfig(
    pools=(PoolSpec("phantom", SyntheticConfig(n=450, size=40, classes=3, channels=1, seed=0, shortcut=0.7)),
           PoolSpec("brain", BrainPhantomConfig(n=450, size=40, seed=0))),
    loop=LoopConfig(strategies=STRATEGIES, seeds=5, initial=60, per_round=40, rounds=2, lam=0.3,
                    train=_TRAIN))
# --quick: every strategy and two seeds (a std needs two) at a smoke-test size
QUICK = ExperimentConfig(
    pools=(PoolSpec("phantom", replace(FULL.pools[0].config, n=160, size=32)),
           PoolSpec("brain", replace(FULL.pools[1].config, n=160, size=32))),
    loop=replace(FULL.loop, seeds=2, initial=16, per_round=8, rounds=1, train=replace(_TRAIN, epochs=1)))
PROTOCOLS = {  # name -> what it is; the sizes above stay as they are
    "engine": "the engine's defaults: hard Dice (CAM >= 0.5) in the dual score, training on labels only",
    "paper": ("the authors' code: soft Dice in the dual score, explanation loss 0.1 · (1 − soft Dice) on "
              "labelled images in every round's training, for every strategy"),
}


def experiment(quick: bool, protocol: str) -> ExperimentConfig:
    config = QUICK if quick else FULL
    if protocol == "paper":
        loop = config.loop
        config = replace(config, loop=replace(loop, dice="soft",
                                              train=replace(loop.train, explanation_weight=0.1)))
    return config


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


class StopExperiment(Exception):
    """Raised from the loop's log after a completed round once the --stop-at time has passed."""


def run_pool(spec: PoolSpec, config: ExperimentConfig, work: Path, overwrite: bool,
             stop_at: float | None = None) -> float:
    """Pool, then every (seed, strategy) loop into work/<name>-run; the wall seconds. Runs in a child.

    ``stop_at`` (epoch seconds): stop after the first round that completes later; a rerun resumes."""
    torch.set_num_threads(config.threads)
    began = time.perf_counter()
    pool = work / f"{spec.name}-pool.zarr"
    make_pool(spec, pool)
    with (work / f"{spec.name}.log").open("a") as log_file:
        def log(line: str) -> None:
            print(f"[{spec.name} {time.strftime('%H:%M:%S')}] {line}", file=log_file, flush=True)
            if " round " in line:  # a round's metrics row is written: a clean place to stop
                print(f"[{spec.name}] {line}", file=sys.stderr, flush=True)
                if stop_at is not None and time.time() > stop_at:
                    raise StopExperiment(line)

        try:
            run_loop(pool, work / f"{spec.name}-run", config.loop, overwrite=overwrite, log=log,
                     show_progress=False)
        except StopExperiment:
            log("stopped at --stop-at; rerun to resume")
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


def batch_overlap(run: RunData, a: str, b: str) -> Stat:
    """Jaccard overlap of the batches strategies ``a`` and ``b`` selected, over seeds and rounds >= 1
    (each round's candidates depend on earlier picks, so this describes, it does not pair rounds)."""
    folder = RunFolder(run.path)
    values = []
    for seed in sorted(set(run.seed.tolist())):
        batches = [dict(folder.batches(s, seed)) for s in (a, b)]  # round -> selected.csv, per strategy
        for r in sorted(set(run.round.tolist()) - {0}):
            if r in batches[0] and r in batches[1]:
                picked = [set(read_selected(batch[r])[0].tolist()) for batch in batches]
                values.append(len(picked[0] & picked[1]) / max(1, len(picked[0] | picked[1])))
    return stat(np.asarray(values))


def pool_section(spec: PoolSpec, run: RunData, seconds: float | None) -> list[str]:
    summaries = {s.strategy: s for s in summarise(run)}
    cfg = run.config.get("loop", {})
    seconds_per_round = RunFolder(run.path).read_metrics(("train_seconds", "score_seconds")).values  # (n,) each
    lines = [f"## {spec.name}", "",
             f"pool: `{type(spec.config).__name__}({', '.join(f'{k}={v}' for k, v in asdict(spec.config).items())})`",
             (f"loop: initial {cfg.get('initial')}, +{cfg.get('per_round')} per round for {cfg.get('rounds')} "
              f"rounds, λ = {cfg.get('lam')}, Dice {cfg.get('dice')}, balance {cfg.get('balance')}; "
              f"{run.config.get('arch')} {cfg.get('train', {}).get('epochs')} epochs, batch "
              f"{cfg.get('train', {}).get('batch_size')}, Grad-CAM layer {cfg.get('train', {}).get('target_layer')}, "
              f"explanation loss weight {cfg.get('train', {}).get('explanation_weight', 0.0)}"),
             (f"seeds in the tables: {', '.join(str(k) for k in sorted(set(run.seed.tolist())))} (a seed counts "
              "when every strategy completed every round)"),
             f"wall time: {seconds / 60:.1f} min" if seconds is not None else "wall time: (collected only)",
             (f"mean seconds per round: train {np.nanmean(seconds_per_round['train_seconds']):.1f}, "
              f"score {np.nanmean(seconds_per_round['score_seconds']):.1f}"), "",
             ("Final round (mean ± std over seeds) and area under the learning curve (ALC, mean over the "
              "label range):"), "",
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
    overlaps = [(other, batch_overlap(run, "dual", other)) for other in ("entropy", "misalignment", "random")
                if other in summaries and "dual" in summaries]
    if overlaps:
        lines += ["", "Overlap of the batches dual selected with those of other strategies (Jaccard, mean ± std "
                  "over seeds and rounds): " + "; ".join(f"{o} {format_stat(v, 2)}" for o, v in overlaps)]
    return lines + [""]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_summary(out: Path, config: ExperimentConfig, runs: dict[str, RunData], seconds: dict[str, float],
                  command: str, prov: dict[str, str], jobs: int, protocol: str) -> Path:
    """summary.md; ``prov`` (device, versions, date, commit) as taken when the runs started."""
    try:
        import nilearn

        nilearn_version = nilearn.__version__
    except ImportError:
        nilearn_version = "-"
    header = ["# The paper's claim: dual (λ·entropy + (1−λ)·(1−Dice)) vs random and entropy sampling", "",
              f"- reproduce (from the repository root, with the project and nilearn installed): `{command}`",
              f"- started: {prov['date']} (UTC) at commit {prov['git_commit']}",
              f"- protocol: {protocol}, {PROTOCOLS[protocol]}",
              (f"- device: {cpu_name()}, {os.cpu_count()} logical cores; {config.threads} torch thread(s) per "
               f"pool process, {min(jobs, len(config.pools))} pool process(es) in parallel; {platform.platform()}"),
              (f"- versions: xal_engine {prov['xal_engine']}, torch {prov['torch']}, numpy {np.__version__}, "
               f"nilearn {nilearn_version}, python {platform.python_version()}"),
              (f"- strategies: {', '.join(config.loop.strategies)}; seeds: {config.loop.seeds}; "
               "model selection on the validation split; the test split is only evaluated"), ""]
    body: list[str] = []
    for spec in config.pools:
        if spec.name in runs:
            body += pool_section(spec, runs[spec.name], seconds.get(spec.name))
            body += [(f"Learning curves: [{spec.name}/report/learning_curves.png]"
                      f"({spec.name}/report/learning_curves.png)"), ""]
    path = out / "summary.md"
    path.write_text("\n".join(header + body))
    return path


def complete_seeds(run: RunData, config: ExperimentConfig) -> list[int]:
    """Seeds whose every strategy completed every round (a stopped run compares like with like)."""
    done = []
    for seed in range(config.loop.seeds):
        rounds = [set(run.round[(run.strategy == s) & (run.seed == seed)].tolist()) for s in config.loop.strategies]
        if all(r >= set(range(config.loop.rounds + 1)) for r in rounds):
            done.append(seed)
    return done


def collect(spec: PoolSpec, config: ExperimentConfig, work: Path, out: Path) -> RunData:
    """Copy the run's config and the metrics of its complete seeds to out/<pool>/, and write the
    report (curves, tables, contact sheets) of those seeds to out/<pool>/report/."""
    run = RunFolder(work / f"{spec.name}-run")
    seeds = complete_seeds(load_run(run.path), config)
    view = RunFolder(work / f"{spec.name}-complete")  # the run folder restricted to complete seeds
    shutil.rmtree(view.path, ignore_errors=True)
    view.path.mkdir()
    shutil.copyfile(run.config_json, view.config_json)
    write_metrics_csv(view.metrics_csv, [row for row in read_metrics_csv(run.metrics_csv)
                                         if int(row["seed"]) in seeds])
    for strategy in config.loop.strategies:
        if run.strategy_dir(strategy).is_dir():  # the reports' contact sheets read the rounds
            view.strategy_dir(strategy).symlink_to(run.strategy_dir(strategy))
    dest = RunFolder(out / spec.name)
    dest.path.mkdir(parents=True, exist_ok=True)
    for src, dst in ((view.metrics_csv, dest.metrics_csv), (view.config_json, dest.config_json)):
        shutil.copyfile(src, dst)
    make_report(view.path, dest.report_dir, pool=work / f"{spec.name}-pool.zarr")
    return load_run(view.path)


# ------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="engine",
                   help="engine: hard Dice, no explanation loss (default); paper: as the authors' code, soft "
                        "Dice and the explanation loss 0.1 in training")
    p.add_argument("--quick", action="store_true", help="smoke run at a tiny size (about minutes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default: {RESULTS}; with --quick: WORK/quick/results)")
    p.add_argument("--work", type=Path, default=Path("/tmp/xal-paper-claim"),
                   help="pools, checkpoints and run folders (default: %(default)s)")
    p.add_argument("--pools", nargs="+", choices=("phantom", "brain"), default=["phantom", "brain"])
    p.add_argument("--jobs", type=int, default=2, help="pools run in parallel processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="restart the loops instead of resuming them")
    p.add_argument("--stop-at", metavar="HH:MM", help="UTC time after which each pool stops at the end of "
                   "its current round; the summary then covers the seeds that every strategy completed")
    p.add_argument("--collect-only", action="store_true", help="only write the results of the runs in --work")
    return p.parse_args(argv)


def parse_stop_at(text: str) -> float:
    """Epoch seconds of the next HH:MM (UTC)."""
    try:
        hour, minute = (int(v) for v in text.split(":"))
        now = time.time()
        today = now - now % 86400 + hour * 3600 + minute * 60
    except ValueError:
        raise XalError(f"--stop-at must be HH:MM (UTC), got {text!r}") from None
    return today if today > now else today + 86400


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = experiment(args.quick, args.protocol)
    config = replace(base, pools=tuple(p for p in base.pools if p.name in args.pools))
    work = args.work / (("quick" if args.quick else "full") + ("" if args.protocol == "engine" else "-paper"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "results" if args.quick else
                       RESULTS if args.protocol == "engine" else RESULTS / "paper_protocol")
    out.mkdir(parents=True, exist_ok=True)
    (work / "experiment.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    command = shlex.join(["python", "benchmarks/experiments/paper_claim.py", *(argv or sys.argv[1:])])
    seconds: dict[str, float] = {}
    prov = provenance(torch.device("cpu"))  # the commit and date the runs start from
    if not args.collect_only:
        stop_at = parse_stop_at(args.stop_at) if args.stop_at else None
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as ex:
            futures = {spec.name: ex.submit(run_pool, spec, config, work, args.overwrite, stop_at)
                       for spec in config.pools}
            for name, future in futures.items():
                seconds[name] = future.result()
    runs = {spec.name: collect(spec, config, work, out) for spec in config.pools}
    path = write_summary(out, config, runs, seconds, command, prov, max(1, args.jobs), args.protocol)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except XalError as err:
        print(f"paper_claim: {err}", file=sys.stderr)
        sys.exit(2)
