"""Set-up cost of a 1M-image score run: create, resume and read its done state (no images scored).

    python benchmarks/scripts/bench_run_state.py [--n 1000000] [--chunk 16] [--repeats 5] [--no-old]

A run's arrays and done flags are created over a pool group of ``--n`` images in ``--chunk``-image
chunks (224x224x3 uint8 gets 16 per chunk from the pool writer), then, timed separately:
    create     ScoreRun.create_or_resume on a new run (group, attributes, every result array, done)
    mark       half of the units' done flags written (one assignment: each flag is its own chunk)
    resume     create_or_resume again (fingerprint check) + clean_partial_files + pending_units
    done_read  done_mask() alone
    items      the pending units cut into loader items (streaming.unit_items, batch 256)
for the layout ``score`` makes today (units of unit_size_for(chunk, n) images, >= 4096) and, unless
--no-old, for the layout of runs made before it (one unit per pool chunk: 62.5k units at 1M images),
median of --repeats fresh runs. Rows are appended to benchmarks/results/run_state.csv (--out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from xal_engine.bench.timing import append_rows, git_commit
from xal_engine.jobs.streaming import unit_items
from xal_engine.store.score_run import ScoreRun, unit_size_for

RESULTS = Path(__file__).resolve().parents[1] / "results" / "run_state.csv"
STEPS = ("create", "mark", "resume", "done_read", "items")
COLUMNS = ["layout", "n_images", "unit_size", "units", "step", "seconds", "min_s", "max_s",
           "total_create_resume_done_s", "zarr", "date", "git_commit"]


def one_run(root: Path, n: int, unit_size: int, chunk: int, k: int) -> dict[str, float]:
    group = zarr.open_group(root / f"pool-{unit_size}-{k}.zarr", mode="a")  # a fresh group per run
    fingerprint = {"model_sha256": "0" * 64, "n_images": n}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    run = ScoreRun.create_or_resume(group, "r", n=n, n_classes=3, unit_size=unit_size,
                                    fingerprint=fingerprint, attrs={})
    times["create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    half = run.n_units // 2
    run.group["done"][:half] = np.ones(half, dtype=bool)
    times["mark"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ScoreRun.create_or_resume(group, "r", n=n, n_classes=3, unit_size=unit_size,
                                      fingerprint=fingerprint, attrs={})
    again.clean_partial_files()
    pending = again.pending_units()
    times["resume"] = time.perf_counter() - t0
    assert len(pending) == run.n_units - half, (len(pending), run.n_units, half)
    t0 = time.perf_counter()
    done = again.done_mask()
    times["done_read"] = time.perf_counter() - t0
    assert int(done.sum()) == half
    t0 = time.perf_counter()
    items = unit_items(again, pending, chunk, 256)
    times["items"] = time.perf_counter() - t0
    assert sum(b - a for _, a, b in items) == n - half * unit_size
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=16, help="images per pool chunk (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-old", action="store_true", help="skip the one-unit-per-chunk layout (slow)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for flag, value in (("--n", args.n), ("--chunk", args.chunk), ("--repeats", args.repeats)):
        if value < 1:
            ap.error(f"{flag}: expected at least 1, got {value}")
    layouts = [("units", unit_size_for(args.chunk, args.n))]
    if not args.no_old:
        layouts.append(("one_chunk_per_unit", args.chunk))
    meta = {"zarr": zarr.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": git_commit()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="xal-run-state-") as tmp:
        for name, unit_size in layouts:
            repeats = args.repeats if name == "units" else 1  # the old layout takes tens of seconds
            runs = [one_run(Path(tmp), args.n, unit_size, args.chunk, k) for k in range(repeats)]
            median = {s: statistics.median(r[s] for r in runs) for s in STEPS}
            total = median["create"] + median["resume"] + median["done_read"]
            units = -(-args.n // unit_size)
            for step in STEPS:
                values = [r[step] for r in runs]
                rows.append({"layout": name, "n_images": args.n, "unit_size": unit_size, "units": units,
                             "step": step, "seconds": round(median[step], 4), "min_s": round(min(values), 4),
                             "max_s": round(max(values), 4), "total_create_resume_done_s": round(total, 4),
                             **meta})
            print(f"{name}: {units} units of {unit_size}: " +
                  ", ".join(f"{s} {median[s] * 1e3:.1f} ms" for s in STEPS) +
                  f"; create + resume + done read {total:.3f} s (median of {repeats})", flush=True)
    append_rows(args.out, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
