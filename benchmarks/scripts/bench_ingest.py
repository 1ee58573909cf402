"""Ingest throughput (images/s) per format with 1 and 2 worker processes, on generated data.

    python benchmarks/scripts/bench_ingest.py [--repeats 3] [--scale 1.0]

Appends one row per (format, workers) to benchmarks/results/ingest.csv: median, p20 and p80 of the
wall time over the repeats, images/s at the median, CPU, versions and date. Data generation is not
timed; every repeat writes a fresh pool (--overwrite), so compression and the rename are included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import torch
import zarr

from xal_engine.bench.timing import append_rows
from xal_engine.ingest import IngestConfig, IngestSource, ingest
from xal_engine.ingest.brats import BratsSource
from xal_engine.ingest.folder import FolderSettings, FolderSource
from xal_engine.ingest.samples import make_brats, make_folder, make_siim, make_vindr
from xal_engine.ingest.siim import SiimSource
from xal_engine.ingest.vindr import VindrSource

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ingest.csv"
SIZE = 224


def formats(root: Path, scale: float) -> dict[str, Callable[[], IngestSource]]:
    """Generate each dataset once; return a factory of its source."""
    n = lambda k: max(2, int(k * scale))
    make_brats(root / "brats", n(6), shape=(160, 160, 60))          # ~25 tumour slices a case
    make_vindr(root / "vindr", n(40), shape=(1024, 1024))           # 12-bit radiographs, 2 MiB each
    make_siim(root / "siim", n(40), shape=(1024, 1024))
    make_folder(root / "folder", n(150), shape=(512, 512))
    return {
        "brats": lambda: BratsSource(root / "brats", SIZE),
        "vindr": lambda: VindrSource(root / "vindr", SIZE),
        "siim": lambda: SiimSource(root / "siim", SIZE),
        "folder": lambda: FolderSource(root / "folder" / "images", SIZE, FolderSettings(
            masks=root / "folder" / "masks", labels=root / "folder" / "labels.csv")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the number of items")
    args = ap.parse_args()
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
            "nibabel": nibabel.__version__, "pydicom": pydicom.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, make in formats(root, args.scale).items():
            base = None
            for workers in (1, 2):
                config = IngestConfig(workers=workers, overwrite=True)
                ingest(make(), root / "warm.zarr", config)                         # warm-up: page cache
                times, images = [], 0
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    images = ingest(make(), root / f"{name}.zarr", config)["images"]
                    times.append(time.perf_counter() - t0)
                med, p20, p80 = np.median(times), np.percentile(times, 20), np.percentile(times, 80)
                base = base or med
                rows.append({"format": name, "workers": workers, "images": images, "size": SIZE,
                             "median_s": f"{med:.4f}", "p20_s": f"{p20:.4f}", "p80_s": f"{p80:.4f}",
                             "images_per_s": f"{images / med:.1f}", "speedup_vs_1": f"{base / med:.2f}", **meta})
                print(f"{name:7s} workers={workers}: {images} images, median {med:.3f} s, "
                      f"{images / med:.1f} images/s, x{base / med:.2f} vs 1 worker")
    append_rows(RESULTS, rows, list(rows[0]))


if __name__ == "__main__":
    main()
