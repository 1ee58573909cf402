"""`xal-engine score` with tiny batches: loader worker processes against the in-process loader.

    python benchmarks/scripts/bench_small_batches.py [--repeats 3] [--n 512]

Scores a fresh synthetic pool (64x64, one channel, resnet18 with random weights) with
``--batch-size 1`` and ``--batch-size 32``, each with ``--num-workers 0`` and ``2``, through the CLI
in a fresh process (so that the default thread rule applies: torch threads + loader workers <=
cores). Each repeat is a new run name, so nothing is resumed. Appends one row per configuration to
benchmarks/results/small_batches.csv: median, p20 and p80 of the wall time, images/s at the median,
the ratio to ``--num-workers 0`` at the same batch size, CPU, versions and date.

Why: with torch's default threads, two loader workers on two cores made ``--batch-size 1`` about
25 times slower than without workers (oversubscription); the thread rule of
:mod:`xal_engine.jobs.runtime` is what this watches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from xal_engine.bench.timing import append_rows
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, class_names, generate_block
from xal_engine.store import PoolWriter

RESULTS = Path(__file__).resolve().parents[1] / "results" / "small_batches.csv"
SIZE, CHUNK = 64, 64
CLI = "import sys; from xal_engine.cli import main; sys.exit(main(sys.argv[1:]))"


def make_inputs(root: Path, n: int) -> tuple[Path, Path]:
    g = generate_block(SyntheticConfig(n=n, size=SIZE, classes=3, seed=0), 0, np.zeros(n, dtype=np.uint8))
    pool = root / "pool.zarr"
    with PoolWriter(pool, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=class_names(3),
                    chunk_size=CHUNK) as w:
        w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
    torch.manual_seed(0)
    model = root / "model.pt"
    save_checkpoint(model, build_model("resnet18", 3, 1),
                    Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=tuple(class_names(3)),
                               target_layer="layer4"))
    return pool, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=512, help="images in the pool")
    args = ap.parse_args()
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1m": f"{os.getloadavg()[0]:.1f}", "python": platform.python_version(),
            "torch": torch.__version__, "zarr": zarr.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default thread rule
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool, model = make_inputs(Path(tmp), args.n)
        run = 0
        for batch in (1, 32):
            base = None
            for workers in (0, 2):
                times = []
                for _ in range(args.repeats):
                    run += 1
                    argv = ["score", "--pool", str(pool), "--model", str(model), "--run", f"b{run}",
                            "--batch-size", str(batch), "--num-workers", str(workers), "--device", "cpu"]
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-c", CLI, *argv], check=True, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    times.append(time.perf_counter() - t0)
                med, p20, p80 = np.median(times), np.percentile(times, 20), np.percentile(times, 80)
                base = base or med
                rows.append({"images": args.n, "size": SIZE, "batch_size": batch, "num_workers": workers,
                             "median_s": f"{med:.3f}", "p20_s": f"{p20:.3f}", "p80_s": f"{p80:.3f}",
                             "images_per_s": f"{args.n / med:.1f}", "time_vs_0_workers": f"{med / base:.2f}",
                             **meta})
                print(f"batch {batch:2d} workers {workers}: median {med:.2f} s, {args.n / med:.1f} images/s, "
                      f"x{med / base:.2f} the time of 0 workers", flush=True)
    append_rows(RESULTS, rows, list(rows[0]))


if __name__ == "__main__":
    main()
