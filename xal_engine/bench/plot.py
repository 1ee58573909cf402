"""Speedup charts from the benchmark CSVs: one PNG per level, providers relative to pytorch-grad-cam.

    python -m xal_engine.bench.plot                # benchmarks/results/{kernel,batch,pool}_speedup.png

Each chart shows the latest run in ``<level>.csv`` (the rows sharing its newest date; one device):
one group of bars per case, one bar per provider and dtype, height = ``speedup_vs_grad_cam`` on a log
axis, with pytorch-grad-cam at 1 as a dashed line. Rows without a number (a dtype the reference does
not support) are left out.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from xal_engine.bench.checkout import results_dir

LEVELS = ("kernel", "batch", "pool")
# One colour per provider and dtype across the charts (others take matplotlib's cycle).
COLOURS = {"xal-engine fp32": "tab:blue", "xal-engine bf16": "tab:cyan", "triton fp32": "tab:blue",
           "torch fp32": "tab:purple", "grad-cam fp32": "tab:red", "plain fp32": "tab:green",
           "plain bf16": "tab:olive", "loader fp32": "tab:gray"}


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run (same ``date`` and ``device`` as the last row with the newest date)."""
    dated = [r for r in rows if r.get("date")]
    if not dated:
        return []
    newest = max(r["date"] for r in dated)
    device = next(r["device"] for r in reversed(dated) if r["date"] == newest)
    return [r for r in dated if r["date"] == newest and r["device"] == device]


def plot_level(level: str, rows: list[dict], out: Path) -> Path | None:
    """Bar chart of the speedups of ``rows`` (one run) into ``out``; None when no row has a speedup."""
    rows = [r for r in rows if r.get("speedup_vs_grad_cam") not in (None, "")]
    if not rows:
        return None
    cases = list(dict.fromkeys(r["benchmark"] for r in rows))
    series = list(dict.fromkeys(f"{r['provider']} {r['dtype']}" for r in rows))
    speedup = {(r["benchmark"], f"{r['provider']} {r['dtype']}"): float(r["speedup_vs_grad_cam"]) for r in rows}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * max(1, len(series) / 3)), 5.0))
    for i, name in enumerate(series):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(cases))]
        ys = [speedup.get((case, name), float("nan")) for case in cases]
        bars = ax.bar(xs, ys, width, label=name, color=COLOURS.get(name))
        ax.bar_label(bars, labels=[f"{y:.2g}x" if math.isfinite(y) else "" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    plain_numbers = FuncFormatter(lambda y, _: f"{y:g}")  # 0.5, 1, 10 rather than 5x10^-1
    ax.yaxis.set_major_formatter(plain_numbers)
    ax.yaxis.set_minor_formatter(plain_numbers)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(cases)), cases, rotation=15, fontsize=8)
    ax.set_ylabel("speed relative to pytorch-grad-cam (x)")
    ax.set_title(f"{level} level: {rows[0]['device']}, {rows[0]['date']}", fontsize=9)
    ax.legend(fontsize=7, ncols=min(3, len(series)), loc="upper left", bbox_to_anchor=(0.0, -0.18))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_results(results: Path, levels: tuple[str, ...] = LEVELS) -> list[Path]:
    """``<level>_speedup.png`` for every level whose CSV exists under ``results``; the paths written."""
    written = []
    for level in levels:
        path = results / f"{level}.csv"
        if path.exists():
            with path.open(newline="") as f:
                chart = plot_level(level, latest_run(list(csv.DictReader(f))), results / f"{level}_speedup.png")
            written += [chart] if chart else []
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None,
                        help="folder of the CSVs and charts (default: the checkout's benchmarks/results/)")
    args = parser.parse_args(argv)
    paths = plot_results(args.results or results_dir("pass --results DIR"))
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
