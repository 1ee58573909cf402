"""What every benchmark level shares around its measurements: the common flags, interleaved timing,
one aligned text table for every level, and the command line's run, print and CSV append.

Time is the median per call at the kernel and batch levels, and the whole pass at the pool level
(``seconds``); ``vs grad-cam`` and ``vs plain`` are the ratios of :mod:`xal_engine.bench.compare`
(> 1: faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import torch

from xal_engine.bench.checkout import level_csv
from xal_engine.bench.timing import append_rows, synchronize

HEADER = ("level", "case", "provider", "dtype", "ms", "img/s", "vs grad-cam", "vs plain", "check", "note")


def add_run_args(parser: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    """--device, --threshold, timing, --threads, --out and --no-write, the same in every script."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threshold", type=float, default=0.5, help="CAM threshold tau of the hard Dice")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls (median, p20, p80)")
    parser.add_argument("--budget-s", type=float, default=10.0, help="time budget per provider and case")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default; 1: numpy/cv2 are single-threaded too, "
                             "and a shared CPU makes multi-threaded timings erratic)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV the rows are appended to (default: the checkout's benchmarks/results/)")
    parser.add_argument("--no-write", action="store_true", help="print only, append nothing")


def interleaved_times(fns: Mapping[Hashable, Callable[[], object]], device: torch.device, warmup: int,
                      repeats: int, budget_s: float) -> dict[Hashable, list[float]]:
    """Seconds per call of every provider, timed in rounds of one call each (synchronised on CUDA).

    Rounds rather than one provider after another: on a shared machine the load drifts, and a drift
    then slows every provider alike instead of biasing their ratios. Stops after ``repeats`` rounds,
    or after 3 once ``budget_s`` per provider is spent.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Hashable, list[float]] = {key: [] for key in fns}
    start = time.perf_counter()
    for done in range(1, repeats + 1):
        for key, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[key].append(time.perf_counter() - t0)
        if done >= 3 and time.perf_counter() - start > budget_s * len(fns):
            break
    return times


def _ms(row: dict) -> str:
    if row.get("median_ms") not in (None, ""):
        return f"{float(row['median_ms']):.2f}"
    if row.get("seconds") not in (None, ""):
        return f"{1e3 * float(row['seconds']):.0f}"
    return "-"


def _ratio(value: object) -> str:
    return f"x{float(value):.2f}" if value not in (None, "") else "-"


def table_cells(level: str, row: dict) -> tuple[str, ...]:
    """One row of the table, in HEADER order."""
    ips = row.get("images_per_s")
    return (level, str(row["benchmark"]), str(row["provider"]), str(row["dtype"]), _ms(row),
            f"{float(ips):.1f}" if ips not in (None, "") else "-", _ratio(row.get("speedup_vs_grad_cam")),
            _ratio(row.get("ratio_vs_plain")), str(row.get("check", "-")), str(row.get("note", "")))


def format_table(sections: list[tuple[str, list[dict]]]) -> str:
    """Aligned text of (level, rows) sections under one header; numbers right-aligned."""
    cells = [HEADER] + [table_cells(level, row) for level, rows in sections for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    right = {"ms", "img/s", "vs grad-cam", "vs plain"}
    lines = ["  ".join(c.rjust(w) if HEADER[i] in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(cell, widths))).rstrip() for cell in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def run_and_finish(level: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], list[dict]],
                   columns: list[str]) -> list[dict]:
    """A level's command line after parsing: ``run(args)``, print the table, append the rows to --out.

    The default --out (the checkout's ``benchmarks/results/<level>.csv``) is found before the run, so
    that outside a checkout the level fails at once rather than after its measurements.
    """
    out = None if args.no_write else level_csv(args.out, level)
    rows = run(args)
    print(format_table([(level, rows)]))
    if out is not None:
        append_rows(out, rows, columns)
        print(f"appended {len(rows)} rows to {out}")
    return rows
