"""`select`'s ranking at pool scale: time and peak host memory per strategy, 100k and 1M candidates.

    python benchmarks/scripts/bench_select.py [--sizes 100000 1000000] [--budget 100] [--device cpu]
                                              [--strategies coreset dual-diverse ...] [--repeats 3]

Every (strategy, size) runs in a fresh process: synthetic run fields for n candidates (3 classes,
512-d fp16 embeddings from 64 Gaussian clusters, BALD values), then ``acquisition.select`` timed
(median of --repeats, CUDA synchronised) and the process's peak resident memory (VmHWM, the inputs
included: 1M x 512 fp16 embeddings alone are 1 GB) and, on CUDA, the peak allocated GPU memory.
Appends one row per configuration to benchmarks/results/select.csv with device, versions and date.
The goal for coreset and dual-diverse: <= 10 s and <= 4 GB host memory at 1M candidates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results" / "select.csv"
DIM, CLASSES = 512, 3


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(strategy: str, n: int, budget: int, device: str, repeats: int) -> dict:
    import torch

    from xal_engine.core.acquisition import RunScores, SelectConfig, select

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, DIM)).astype(np.float32)
    embedding = np.empty((n, DIM), np.float16)
    for a in range(0, n, 65536):  # generated in blocks: no fp32 (n, D) copy
        b = min(a + 65536, n)
        embedding[a:b] = centres[rng.integers(0, 64, b - a)] + 0.3 * rng.normal(size=(b - a, DIM))
    probs = rng.dirichlet(np.ones(CLASSES), size=n).astype(np.float32)
    entropy = -(probs * np.log(probs)).sum(1).astype(np.float32)
    dice = rng.random(n).astype(np.float32)
    scores = RunScores(probs=probs, pred=probs.argmax(1).astype(np.int16), entropy=entropy,
                       margin=np.diff(np.sort(probs, 1)[:, -2:], axis=1)[:, 0], least_confidence=1 - probs.max(1),
                       dice=dice,
                       soft_dice=dice, bald=(entropy * rng.random(n)).astype(np.float32), embedding=embedding)
    labelled = embedding[:: max(n // 1000, 1)][:1000]  # 1000 labelled images' embeddings
    config = SelectConfig(strategy=strategy, budget=budget, balance="none", device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        select(scores, config, labelled_embedding=labelled)
        sync()
        times.append(time.perf_counter() - t0)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return {"median_s": float(np.median(times)), "min_s": float(min(times)), "peak_rss_mb": peak_rss_mb(),
            "inputs_mb": (embedding.nbytes + probs.nbytes + 6 * n * 4) / 2**20, "peak_gpu_mb": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=None)
    ap.add_argument("--one", nargs=2, metavar=("STRATEGY", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.budget, args.device, args.repeats)))
        return

    import torch

    from xal_engine.bench.timing import append_rows
    from xal_engine.core.strategies import STRATEGIES

    meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cores": os.cpu_count(), "load_avg_1m": f"{os.getloadavg()[0]:.1f}",
            "python": platform.python_version(), "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for n in args.sizes:
        for strategy in args.strategies or STRATEGIES:
            out = subprocess.run([sys.executable, __file__, "--one", strategy, str(n), "--budget", str(args.budget),
                                  "--device", args.device, "--repeats", str(args.repeats)],
                                 check=False, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{strategy} n={n}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"strategy": strategy, "candidates": n, "dim": DIM, "budget": args.budget,
                         "median_s": f"{r['median_s']:.3f}", "min_s": f"{r['min_s']:.3f}",
                         "peak_rss_mb": f"{r['peak_rss_mb']:.0f}", "inputs_mb": f"{r['inputs_mb']:.0f}",
                         "peak_gpu_mb": f"{r['peak_gpu_mb']:.0f}", **meta})
            print(f"{strategy:17s} n={n:>8}: median {r['median_s']:8.3f} s, peak RSS {r['peak_rss_mb']:6.0f} MB "
                  f"(inputs {r['inputs_mb']:.0f} MB)", flush=True)
    if rows:
        append_rows(RESULTS, rows, list(rows[0]))


if __name__ == "__main__":
    main()
