"""Loader images/s from a pool in an S3 bucket vs the same pool on local disk, in one run.

    python benchmarks/scripts/bench_object_store.py [--n 1024] [--size 128] [--channels 3] [--repeats 3]

Starts moto's S3 server (``moto[server]``, the dev extra) on 127.0.0.1 in a subprocess, writes one
synthetic pool twice (local disk, ``s3://bench/pool.zarr``) with the same content, then times the
scorer's in-process loader over every chunk-aligned item (``UnitRanges`` with ``read_ahead``: images,
rois and has_roi decoded, as ``score --num-workers 0`` reads them) for:

    local              local disk, one read-ahead thread (the default there)
    s3                 the bucket, the default read-ahead over an object store (4 threads, 8 items ahead)
    s3_one_thread      the bucket, one read-ahead thread (what a local pool's loader would do)

median of --repeats passes (the first, untimed pass warms nothing on the server: moto keeps objects in
memory). moto is a Python server sharing the same cores, so the s3 rows are a floor, not what S3 or
MinIO give. Rows go to benchmarks/results/object_store.csv (--out) with the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import zarr

from xal_engine.bench.timing import append_rows, git_commit
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, class_names, generate_block
from xal_engine.store import Pool, PoolWriter
from xal_engine.store.dataset import UnitRanges, read_ahead

RESULTS = Path(__file__).resolve().parents[1] / "results" / "object_store.csv"
COLUMNS = ["case", "n_images", "image_shape", "images_per_chunk", "mb_raw", "seconds", "p20_s", "p80_s",
           "images_per_s", "mb_per_s", "vs_local", "read_threads", "async_concurrency", "load_avg_1m",
           "cpus", "server", "zarr", "date", "git_commit"]


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.05)


def write_pool(path: str | Path, n: int, size: int, channels: int) -> Pool:
    cfg = SyntheticConfig(n=n, size=size, classes=3, channels=channels, seed=0)
    split = assign_splits(n, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    with PoolWriter(path, channels=channels, height=size, width=size, dtype=np.uint8,
                    classes=class_names(3)) as w:
        for start in range(0, n, 256):
            g = generate_block(cfg, start, split[start:start + 256])
            w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
    return Pool.open(path)


def one_pass(pool: Pool, threads: int | None) -> float:
    items = [(0, a, b) for a, b in pool.chunk_ranges()]
    dataset = UnitRanges(pool, items, with_labels=False)
    t0 = time.perf_counter()
    seen = sum(int(item["images"].shape[0]) for item in read_ahead(dataset, threads=threads))
    seconds = time.perf_counter() - t0
    assert seen == pool.n
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    proc, endpoint = start_moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    rows = []
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="xal-bench-os-") as tmp:
            local = write_pool(Path(tmp) / "pool.zarr", args.n, args.size, args.channels)
            remote = write_pool("s3://bench/pool.zarr", args.n, args.size, args.channels)
            np.testing.assert_array_equal(remote.read(0, 8).images, local.read(0, 8).images)
            cases = [("local", local, None, 1), ("s3", remote, None, 4), ("s3_one_thread", remote, 1, 1)]
            times: dict[str, list[float]] = {}
            for name, pool, threads, _ in cases:
                one_pass(pool, threads)  # untimed: imports, first connections
            for _ in range(args.repeats):  # interleaved, so that load changes hit every case alike
                for name, pool, threads, _ in cases:
                    times.setdefault(name, []).append(one_pass(pool, threads))
        mb = args.n * args.channels * args.size * args.size / 1e6
        local_median = statistics.median(times["local"])
        meta = {"n_images": args.n, "image_shape": f"{args.channels}x{args.size}x{args.size}",
                "images_per_chunk": local.chunk_size, "mb_raw": round(mb, 1),
                "async_concurrency": zarr.config.get("async.concurrency"),
                "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                "server": "moto (python, same machine)", "zarr": zarr.__version__,
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "git_commit": git_commit()}
        for name, _, _, read_threads in cases:
            values = sorted(times[name])
            median = statistics.median(values)
            q = statistics.quantiles(values, n=5) if len(values) > 1 else [median] * 4
            rows.append({"case": name, "seconds": round(median, 4), "p20_s": round(q[0], 4),
                         "p80_s": round(q[3], 4), "images_per_s": round(args.n / median, 1),
                         "mb_per_s": round(mb / median, 1), "vs_local": round(local_median / median, 3),
                         "read_threads": read_threads, **meta})
            print(f"{name:14s} {args.n / median:8.1f} img/s  {mb / median:7.1f} MB/s  "
                  f"({local_median / median:.2f}x local; median of {args.repeats})", flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    append_rows(args.out, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
