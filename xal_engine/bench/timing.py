"""Measuring: timed repeats with synchronisation, peak memory, and result rows with their provenance.

Every benchmark row carries the device, versions, date and git commit, so that a figure can always be
traced to what produced it. Rows are appended to CSV files under ``benchmarks/results/``.
"""

from __future__ import annotations

import csv
import datetime as dt
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from xal_engine import __version__


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"xal_engine": __version__, "torch": torch.__version__, "triton": triton_version}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5, check=False)
        return out.stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def provenance(device: torch.device) -> dict[str, str]:
    return {"device": device_name(device), **versions(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": git_commit()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5,
           budget_s: float = 30.0) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` (stops early past `budget_s`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return times


def summarise(times: list[float]) -> dict[str, float]:
    """Median, 20th and 80th percentile, in milliseconds."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return {"median_ms": 1e3 * statistics.median(ordered), "p20_ms": 1e3 * pick(0.2),
            "p80_ms": 1e3 * pick(0.8)}


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children), MiB (Linux: KiB units)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def append_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Append rows to a CSV (header written when the file is new); unknown keys are an error. A file
    whose header lacks some of ``columns`` (a benchmark that gained a column) is rewritten first with
    the new header, its earlier rows blank in the new columns, so that no row is misaligned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_columns, old_rows = reader.fieldnames or [], list(reader)
        if old_columns != columns and set(old_columns) <= set(columns):
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(path)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full-fp32 CUDA matmuls and convolutions inside the block (TF32 off), the previous flags after.

    Wherever CUDA results are compared with a CPU or fp32 reference, or fp32 rows are timed against
    each other, TF32 (cuDNN's default for convolutions) would change the numbers by ~1e-3. On a CPU
    the flags are read by nothing: the same code runs there.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def device_times_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100.0,
                    warmup_ms: float = 25.0, cpu_repeats: int = 5) -> tuple[list[float], str]:
    """Milliseconds per call of ``fn`` and the timer used.

    On CUDA: device time between CUDA events, ``triton.testing.do_bench`` (the L2 cache flushed before
    each call, ``warmup_ms`` then ``rep_ms`` of calls), so host launch overhead and synchronisation do
    not count. Elsewhere: host ``perf_counter`` over ``cpu_repeats`` calls after one warm-up call.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return [float(t) for t in times], "cuda-events (triton.testing.do_bench)"
    seconds = timeit(fn, device, warmup=1, repeats=cpu_repeats, budget_s=rep_ms / 1e3 * cpu_repeats)
    return [1e3 * t for t in seconds], "host perf_counter"
