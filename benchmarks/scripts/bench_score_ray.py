"""Scoring throughput: the local scorer vs Ray actor pools of 1 and 2 workers, on a synthetic pool (CPU).

    python benchmarks/scripts/bench_score_ray.py [--images 256] [--size 128] [--repeats 2]

Appends one row per (provider, workers) to benchmarks/results/score_ray.csv: median, p20 and p80 of
the wall time of one whole scoring pass (Ray: actor start-up and model loading included; ray.init
not), images/s at the median, the actors' busy throughput (images / time inside actor calls, summed
over workers: the rate once actors are up), the speed-up over one worker, the machine's load average
and versions. Every repeat rescores the whole pool (--overwrite). Ray actors take one CPU and run
torch with one thread; the local scorer uses torch's default thread count and one loader process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
import zarr

from xal_engine.bench.timing import append_rows
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, class_names, generate_block
from xal_engine.jobs.score import ScoreConfig, ScoreSummary, score_pool
from xal_engine.jobs.score_ray import RayConfig, score_pool_ray
from xal_engine.store import PoolWriter

RESULTS = Path(__file__).resolve().parents[1] / "results" / "score_ray.csv"
CHUNK = 16  # images per pool chunk = per work unit
BATCH = 32


def make_inputs(root: Path, n: int, size: int) -> tuple[Path, Path]:
    cfg = SyntheticConfig(n=n, size=size, classes=3, channels=1, seed=0)
    split = assign_splits(n, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    with PoolWriter(root / "pool.zarr", channels=1, height=size, width=size, dtype=np.uint8,
                    classes=class_names(3), chunk_size=CHUNK) as w:
        g = generate_block(cfg, 0, split)
        w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
        w.close()
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1)
    save_checkpoint(root / "model.pt", model, Checkpoint(arch="resnet18", num_classes=3, in_channels=1,
                                                         classes=tuple(class_names(3)), target_layer="layer4"))
    return root / "pool.zarr", root / "model.pt"


def measure(run: Callable[[], ScoreSummary], repeats: int) -> tuple[list[float], list[ScoreSummary]]:
    times, summaries = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        summaries.append(run())
        times.append(time.perf_counter() - t0)
    return times, summaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "zarr": zarr.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    config = ScoreConfig(run="bench", batch_size=BATCH, device="cpu", num_workers=1, overwrite=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool, model = make_inputs(Path(tmp), args.images, args.size)
        score_pool(pool, model, config, show_progress=False)  # warm-up: page cache, lazy imports
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        providers: list[tuple[str, int, Callable[[], ScoreSummary]]] = [
            ("local", 1, lambda: score_pool(pool, model, config, show_progress=False)),
            *[("ray", k, lambda k=k: score_pool_ray(pool, model, config, RayConfig(workers=k),
                                                     show_progress=False)) for k in (1, 2)],
        ]
        base: dict[str, tuple[float, float]] = {}
        for provider, workers, run in providers:
            times, summaries = measure(run, args.repeats)
            med, p20, p80 = np.median(times), np.percentile(times, 20), np.percentile(times, 80)
            busy = float(np.median([sum(w.images_per_s for w in getattr(s, "workers", ()))
                                    or s.images_per_s for s in summaries]))
            base.setdefault(provider, (med, busy))
            rows.append({"provider": provider, "workers": workers, "images": args.images, "size": args.size,
                         "batch": BATCH, "median_s": f"{med:.3f}", "p20_s": f"{p20:.3f}", "p80_s": f"{p80:.3f}",
                         "images_per_s": f"{args.images / med:.1f}", "busy_images_per_s": f"{busy:.1f}",
                         "speedup_vs_1": f"{base[provider][0] / med:.2f}",
                         "busy_speedup_vs_1": f"{busy / base[provider][1]:.2f}",
                         "load_avg_1min": f"{os.getloadavg()[0]:.1f}", **meta})
            print(f"{provider:5s} workers={workers}: median {med:.2f} s, {args.images / med:.1f} images/s "
                  f"end to end, {busy:.1f} images/s busy, x{base[provider][0] / med:.2f} vs 1 worker",
                  file=sys.stderr)
        ray.shutdown()
    append_rows(RESULTS, rows, list(rows[0]))


if __name__ == "__main__":
    main()
