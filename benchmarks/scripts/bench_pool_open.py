"""Opening a pool of 1M images and checking one work unit's chunks, against listing every chunk.

    python benchmarks/scripts/bench_pool_open.py [--n 1000000] [--chunk 16] [--repeats 5]

A pool's per-image arrays are chunked along N (224x224x3 uint8 gets 16 images per chunk from the
pool writer: 62.5k chunks per array, 375k chunk files in all at 1M images). The pixels do not matter
here, only the chunk count, so the pool holds 1x8x8 images written in ``--chunk``-image chunks.
Timed, median of ``--repeats``:
    open        Pool.open (no chunk listing: reads check their own chunks)
    unit_check  the stored-chunk check of one 4096-image unit of the arrays scoring reads (images,
                rois, has_roi: 256 chunks each), on a freshly opened pool
    list_all    format.missing_chunks of every per-image array, what Pool.open did before (one
                listing per array); once, it takes seconds
Rows are appended to benchmarks/results/pool_open.csv (--out).
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
from xal_engine.store import PER_IMAGE_ARRAYS, Pool, PoolWriter
from xal_engine.store.format import missing_chunks

RESULTS = Path(__file__).resolve().parents[1] / "results" / "pool_open.csv"
COLUMNS = ["step", "n_images", "chunk", "chunk_files", "seconds", "min_s", "max_s", "repeats", "zarr", "date",
           "git_commit"]
UNIT = 4096
SCORED = ("images", "rois", "has_roi")


def build(path: Path, n: int, chunk: int) -> None:
    block = 64 * chunk
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (block, 1, 8, 8), dtype=np.uint8)
    rois = images[:, 0] > 127
    with PoolWriter(path, channels=1, height=8, width=8, dtype=np.uint8, classes=["a", "b"],
                    chunk_size=chunk) as w:
        for start in range(0, n, block):
            k = min(block, n - start)
            w.append(images[:k], rois[:k], rois[:k].any(axis=(1, 2)), np.zeros(k, np.int16),
                     [f"i{i}" for i in range(start, start + k)], np.zeros(k, np.uint8))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=16, help="images per pool chunk (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {"open": [], "unit_check": [], "list_all": []}
    with tempfile.TemporaryDirectory(prefix="xal-pool-open-") as tmp:
        path = Path(tmp) / "pool.zarr"
        t0 = time.perf_counter()
        build(path, args.n, args.chunk)
        print(f"pool: {args.n} images in {args.chunk}-image chunks, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
        chunks = range(min(UNIT, args.n) // args.chunk)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pool = Pool.open(path)
            times["open"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert all(pool.missing_chunks(name, chunks) == [] for name in SCORED)
            times["unit_check"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert all(missing_chunks(pool.arrays[name]) == [] for name in PER_IMAGE_ARRAYS)
        times["list_all"].append(time.perf_counter() - t0)
    n_chunks = -(-args.n // args.chunk)
    meta = {"n_images": args.n, "chunk": args.chunk, "chunk_files": n_chunks * len(PER_IMAGE_ARRAYS),
            "zarr": zarr.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": git_commit()}
    rows = [{"step": step, "seconds": round(statistics.median(v), 4), "min_s": round(min(v), 4),
             "max_s": round(max(v), 4), "repeats": len(v), **meta} for step, v in times.items()]
    for row in rows:
        print(f"{row['step']:<11} {row['seconds'] * 1e3:10.1f} ms  (median of {row['repeats']})")
    append_rows(args.out, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
