"""Batch diversity at pool scale: time and extra memory of k-center greedy and weighted k-means++.

    python benchmarks/scripts/bench_diversity.py [--device cpu|cuda] [--sizes 100000 1000000]
                                                 [--repeats 3] [--max-seconds 180] [--threads 1]

n random fp16 embeddings (d = 512; 1 GB at n = 10⁶), budget 100 (and 1000 at n <= 100k). Each
configuration runs in a fresh subprocess, so that its peak RSS is its own: the data are generated in
chunks, the peak is reset (/proc/self/clear_refs), and the extra memory is VmHWM - VmRSS at that point
(the peak of everything the algorithm allocated, in one warm-up and `--repeats` timed calls); on CUDA
also torch.cuda.max_memory_allocated minus the data. Times: median of the repeats (perf_counter,
synchronised). A configuration whose first call projects past `--max-seconds` (all repeats) is timed
once, or, past that too, only by a short probe (budget 10): its row reports ms per pick and a note.
Appends rows to benchmarks/results/diversity.csv. On a shared 2-core machine use ``--threads 1``: two
OpenMP threads contending with other processes ran the distance pass ~5x slower (measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diversity.csv"
COLUMNS = ["algorithm", "n", "d", "budget", "dtype", "device", "repeats", "median_s", "min_s", "max_s",
           "ms_per_pick", "data_mb", "extra_rss_mb", "extra_gpu_mb", "note", "threads", "torch", "cores", "cpu",
           "date"]
D = 512


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    return float("nan")


def _data(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, D, dtype=torch.float16, device=device)
    for i in range(0, n, 65536):
        x[i : i + 65536] = torch.randn(min(65536, n - i), D, generator=g, device=device)
    return x, torch.rand(n, generator=g, device=device)


def worker(algorithm: str, n: int, budget: int, device_name: str, repeats: int, max_s: float) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    from xal_engine.core.diversity import kcenter_greedy, weighted_kmeanspp

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    x, w = _data(n, device)

    def call(b: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if algorithm == "kcenter_greedy":
            out = kcenter_greedy(x, b)
        else:
            out = weighted_kmeanspp(x, w, b, seed=0)
        if cuda:
            torch.cuda.synchronize(device)
        assert out.shape == (b,) and out.unique().numel() == b
        return time.perf_counter() - t0

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base_rss = _status_mb("VmRSS")
    base_gpu = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    call(2)  # warm-up (allocator, kernels)
    probe = call(10)  # per-pick estimate: decides how much to run
    per_pick = probe / 10
    note = ""
    if per_pick * budget * repeats <= max_s:
        times = [call(budget) for _ in range(repeats)]
    elif per_pick * budget <= max_s:
        times, note = [call(budget)], f"1 repeat: {repeats} projected past {max_s:.0f} s"
    else:
        times, note = [], f"probe only (budget 10): budget {budget} projected {per_pick * budget:.0f} s"
    return {"times": times, "ms_per_pick": 1e3 * (statistics.median(times) / budget if times else per_pick),
            "data_mb": x.numel() * x.element_size() / 2**20,
            "extra_rss_mb": _status_mb("VmHWM") - base_rss,
            "extra_gpu_mb": (torch.cuda.max_memory_allocated(device) - base_gpu) / 2**20 if cuda else 0.0,
            "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=180.0, help="per configuration, all repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--worker", nargs=3, metavar=("ALGORITHM", "N", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        algorithm, n, budget = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(worker(algorithm, n, budget, args.device, args.repeats, args.max_seconds)))
        return
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    rows = []
    print(f"{'algorithm':<18}{'n':>9}{'budget':>7}{'median_s':>10}{'ms/pick':>9}{'+RSS MB':>9}{'+GPU MB':>9}  note")
    for n in args.sizes:
        for budget in ([100, 1000] if n <= 100_000 else [100]):
            for algorithm in ("kcenter_greedy", "weighted_kmeanspp"):
                cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                       "--max-seconds", str(args.max_seconds), "--threads", str(args.threads), "--worker", algorithm, str(n), str(budget)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                t = r["times"]
                row = {"algorithm": algorithm, "n": n, "d": D, "budget": budget, "dtype": "float16",
                       "repeats": len(t), "median_s": f"{statistics.median(t):.3f}" if t else "",
                       "min_s": f"{min(t):.3f}" if t else "", "max_s": f"{max(t):.3f}" if t else "",
                       "ms_per_pick": f"{r['ms_per_pick']:.2f}", "data_mb": f"{r['data_mb']:.0f}",
                       "extra_rss_mb": f"{r['extra_rss_mb']:.0f}", "extra_gpu_mb": f"{r['extra_gpu_mb']:.0f}",
                       "note": r["note"], **meta}
                rows.append(row)
                print(f"{algorithm:<18}{n:>9}{budget:>7}{row['median_s'] or '-':>10}{row['ms_per_pick']:>9}"
                      f"{row['extra_rss_mb']:>9}{row['extra_gpu_mb']:>9}  {row['note']}", flush=True)
    from xal_engine.bench.timing import append_rows

    append_rows(RESULTS, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
