"""Host overhead of `xal-engine score`: a near-zero-cost model (``tiny``) over a 224x224x3 uint8 pool.

    python benchmarks/scripts/bench_host_overhead.py [--n 4096] [--repeats 3] [--workers 0,2]

With ``tiny`` (one strided conv, global pooling, a linear head: 7.4M MACs an image) the model costs
next to nothing, so what remains is the host side. Measured in one run, per ``--num-workers`` W:
    loader  the unit loader ``score`` uses (jobs.score.unit_loader over the run's pending units, through
            streaming.to_device: on CPU there is no transfer, so this is the decode of every array
            the scorer reads)
    plain   the same loader + uint8 -> float input + model forward (inference mode), no Grad-CAM,
            no writing; one argmax host copy per batch, as a real pipeline makes
    compute the same loader + the scorer's per-batch work (streaming.Scorer: forward, backward to the
            target layer, Grad-CAM -> Dice; results through streaming.ResultCopies to the host), no
            run, no writing: the ceiling of `score`, so that score / compute is the host overhead
            left and compute / plain the cost of the Grad-CAM -> Dice compute itself
    score   score_pool end to end (model load, run creation, forward, backward to the target layer,
            fused Grad-CAM -> Dice, Zarr writes), a fresh run name each repeat
    writer  ScoreRun.write_unit alone: precomputed results (the last score run's) written unit by
            unit into a fresh run
One warm-up pass of each, outside the timing; then ``--repeats`` rounds, each running every case
for every W in turn (interleaved, so drift hits all cases alike); the median round is reported.
Besides the ratio of medians, each row has the ratios of one round (plain's time over the case's in
the same round: a shared machine's slow spells hit both alike), their median, minimum and maximum.
The pool is built fast: a few chunks generated, then repeated (ids kept unique). Torch threads
follow the CLI's rule (threads + loader workers <= cores) for every case. Rows are appended to
benchmarks/results/host_overhead.csv (--out) and printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import zarr

from xal_engine.bench.pools import repeated_pool
from xal_engine.bench.timing import append_rows, device_name, git_commit, synchronize
from xal_engine.core.fields import REQUIRED_NAMES, PerImage
from xal_engine.core.inputs import ModelInputs, resolve_device
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import class_names
from xal_engine.jobs.runtime import available_cores, resolve_threads, torch_threads
from xal_engine.jobs.score import score_pool, unit_loader
from xal_engine.jobs.streaming import (
    BATCH_KEYS,
    ResultCopies,
    ScoreConfig,
    Scorer,
    fit_target_layer,
    load_scoring_model,
    open_run,
    plan_run,
    to_device,
)
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

RESULTS = Path(__file__).resolve().parents[1] / "results" / "host_overhead.csv"
SIZE, CHANNELS, CLASSES = 224, 3, 3
CASES = ("loader", "plain", "compute", "score", "writer")
COLUMNS = ["case", "num_workers", "threads", "n_images", "unit_size", "batch_size", "seconds", "min_s",
           "max_s", "images_per_s", "images_per_s_per_loader_core", "ms_per_unit", "ratio_vs_plain",
           "ratio_vs_compute", "round_ratio_vs_plain", "round_ratio_min", "round_ratio_max",
           "device", "cores", "torch", "zarr", "date", "load_avg_start", "load_avg_end", "git_commit"]


def make_model(path: Path) -> Path:
    torch.manual_seed(0)
    info = Checkpoint(arch="tiny", num_classes=CLASSES, in_channels=CHANNELS, classes=tuple(class_names(CLASSES)),
                      target_layer="features", pool={"height": SIZE, "width": SIZE}, target_map=(56, 56))
    return save_checkpoint(path, build_model("tiny", CLASSES, CHANNELS), info)


class Bench:
    """The four cases over one pool and checkpoint; each method returns (seconds, images, units)."""

    def __init__(self, pool_path: Path, model_path: Path, device: torch.device, batch_size: int) -> None:
        self.pool_path, self.model_path, self.device = pool_path, model_path, device
        self.base = ScoreConfig(run="bench-loader", batch_size=batch_size, device=str(device), overwrite=True)
        self.pool = Pool.open(pool_path, mode="r+")
        model, ckpt = load_scoring_model(model_path, device)
        self.model, self.ckpt = model, fit_target_layer(model, ckpt, self.pool, model_path, self.base)
        # the scorer's own items (its unit layout), from a throwaway run that is never marked done
        plan = plan_run(self.pool, model_path, self.ckpt, self.base)
        self.items, self.n, self.units, self.unit_size = plan.items, plan.n_images, len(plan.pending), \
            plan.run.unit_size
        self.count = 0
        self.results: PerImage | None = None  # the last score run's, for the writer

    def _loader(self, workers: int):
        return to_device(unit_loader(self.pool, self.items, self.base.targets == "label", workers, self.device),
                         self.device)

    def loader(self, workers: int) -> float:
        t0 = time.perf_counter()
        for _ in self._loader(workers):
            pass
        synchronize(self.device)
        return time.perf_counter() - t0

    def plain(self, workers: int) -> float:
        inputs = ModelInputs(self.ckpt.config.get("normalize_mean"), self.ckpt.config.get("normalize_std"),
                             self.device)  # the scorer's input conversion: constants once, one buffer
        b = self.base.batch_size
        t0 = time.perf_counter()
        with torch.inference_mode():
            for item in self._loader(workers):
                for a in range(0, item["images"].shape[0], b):
                    self.model(inputs(item["images"][a:a + b])).argmax(dim=1).cpu()  # (B,): the one host copy a real pipeline makes
        synchronize(self.device)
        return time.perf_counter() - t0

    def compute(self, workers: int) -> float:
        b = self.base.batch_size
        t0 = time.perf_counter()
        with Scorer(self.model, self.ckpt, self.base, self.device) as scorer:
            copies = ResultCopies(self.device)
            for item in self._loader(workers):
                for a in range(0, item["images"].shape[0], b):
                    batch = {k: item[k][a:a + b] for k in BATCH_KEYS if k in item}
                    copies.put(scorer(batch), item["unit"])
            copies.drain()
        synchronize(self.device)
        return time.perf_counter() - t0

    def score(self, workers: int, threads: int) -> float:
        self.count += 1
        run = f"bench-score-{self.count}"
        t0 = time.perf_counter()
        summary = score_pool(self.pool_path, self.model_path,
                             replace(self.base, run=run, num_workers=workers, threads=threads),
                             show_progress=False)
        seconds = time.perf_counter() - t0
        assert summary.complete and summary.images == self.n, summary
        self.results = PerImage(**ScoreRun.open(Pool.open(self.pool_path).group, run).read(REQUIRED_NAMES))
        return seconds

    def writer(self) -> float:
        assert self.results is not None, "the writer writes a score run's results: run score first"
        self.count += 1
        run = open_run(self.pool, self.model_path, self.ckpt, replace(self.base, run=f"bench-writer-{self.count}"))
        rows = [(u, self.results.rows(*run.unit_range(u))) for u in range(run.n_units)]  # precomputed
        t0 = time.perf_counter()
        for unit, result in rows:
            run.write_unit(unit, result)
        seconds = time.perf_counter() - t0
        assert run.is_complete()
        return seconds

    def one(self, case: str, workers: int) -> float:
        threads = resolve_threads(None, workers)
        with torch_threads(threads):
            if case == "loader":
                return self.loader(workers)
            if case == "plain":
                return self.plain(workers)
            if case == "compute":
                return self.compute(workers)
            if case == "score":
                return self.score(workers, threads)
            return self.writer()


def load_avg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="images in the pool (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    ap.add_argument("--workers", default="0,2", help="--num-workers values, comma-separated")
    ap.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        ap.error(f"--workers: expected comma-separated counts such as 0,2, got {args.workers!r}")
    for flag, value, least in (("--n", args.n, 1), ("--repeats", args.repeats, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", min(workers), 0)):
        if value < least:
            ap.error(f"{flag}: expected at least {least}, got {value}")
    try:
        device = resolve_device(args.device)
    except XalError as err:
        ap.error(str(err))
    start_load = load_avg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xal-host-overhead-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pool = repeated_pool(root / "pool.zarr", args.n, size=SIZE, channels=CHANNELS, classes=CLASSES)
        model = make_model(root / "tiny.pt")
        print(f"pool: {pool.n} images {CHANNELS}x{SIZE}x{SIZE} uint8, {pool.chunk_size} per chunk "
              f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
        bench = Bench(root / "pool.zarr", model, device, args.batch_size)
        for w in workers:  # warm-up: one pass of each case, untimed (the writer needs a score run first)
            for case in CASES:
                bench.one(case, w)
        times: dict[tuple[str, int], list[float]] = {(c, w): [] for c in CASES for w in workers}
        for r in range(args.repeats):
            for w in workers:
                for case in CASES:
                    times[case, w].append(bench.one(case, w))
            print(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        n, units, unit_size = bench.n, bench.units, bench.unit_size
    end_load = load_avg()
    meta = {"device": device_name(device), "cores": available_cores(), "torch": torch.__version__,
            "zarr": zarr.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_avg_start": start_load, "load_avg_end": end_load, "git_commit": git_commit()}
    rows = []
    for w in workers:
        plain_ips = n / statistics.median(times["plain", w])
        compute_ips = n / statistics.median(times["compute", w])
        for case in CASES:
            s = statistics.median(times[case, w])
            paired = [p / c for p, c in zip(times["plain", w], times[case, w], strict=True)]
            ips = n / s
            rows.append({"case": case, "num_workers": w, "threads": resolve_threads(None, w), "n_images": n,
                         "unit_size": unit_size, "batch_size": args.batch_size, "seconds": round(s, 4),
                         "min_s": round(min(times[case, w]), 4), "max_s": round(max(times[case, w]), 4),
                         "images_per_s": round(ips, 1),
                         # the writer runs in the main process: no loader core
                         "images_per_s_per_loader_core": round(ips / max(1, w), 1) if case != "writer" else "",
                         "ms_per_unit": round(1e3 * s / units, 3), "ratio_vs_plain": round(ips / plain_ips, 3),
                         "ratio_vs_compute": round(ips / compute_ips, 3),
                         "round_ratio_vs_plain": round(statistics.median(paired), 3),
                         "round_ratio_min": round(min(paired), 3), "round_ratio_max": round(max(paired), 3),
                         **meta})
    append_rows(args.out, rows, COLUMNS)
    print(f"\n{meta['device']}, {meta['cores']} cores, torch {meta['torch']}, zarr {meta['zarr']}, "
          f"load {start_load} -> {end_load}; {n} images, {units} units of {unit_size}, "
          f"median of {args.repeats} ({time.perf_counter() - t_start:.0f} s in all)")
    print(f"{'case':<8}{'workers':>8}{'threads':>8}{'s':>9}{'img/s':>10}{'img/s/core':>12}{'ms/unit':>10}"
          f"{'vs plain':>10}{'vs compute':>12}{'per round vs plain':>24}")
    for row in rows:
        per_core = row["images_per_s_per_loader_core"]
        print(f"{row['case']:<8}{row['num_workers']:>8}{row['threads']:>8}{row['seconds']:>9.3f}"
              f"{row['images_per_s']:>10.1f}{per_core if per_core == '' else f'{per_core:.1f}':>12}"
              f"{row['ms_per_unit']:>10.2f}{row['ratio_vs_plain']:>10.3f}{row['ratio_vs_compute']:>12.3f}"
              f"{row['round_ratio_vs_plain']:>10.3f} ({row['round_ratio_min']:.3f}-{row['round_ratio_max']:.3f})")
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
