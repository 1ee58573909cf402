"""`xal-engine ingest folder` SIGKILLed once a chunk is durable, then `--resume`: the uninterrupted pool."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.ingest import report_path
from xal_engine.ingest.samples import make_folder
from xal_engine.store import Pool, partial_path
from xal_engine.store.format import PER_IMAGE_ARRAYS, WRITING_ATTR

N, CHUNK = 80, 2


def written(out: Path) -> int:
    """Images `<out>.partial` records as durable (0 while its metadata is absent or being replaced)."""
    try:
        attrs = json.loads((partial_path(out) / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(attrs.get(WRITING_ATTR) or 0)


def command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "xal_engine", "ingest", "folder", str(src / "images"), "--out", str(out),
            "--size", "32", "--chunk-size", str(CHUNK), "--masks", str(src / "masks"),
            "--labels", str(src / "labels.csv")]


@pytest.mark.slow
def test_ingest_killed_after_a_durable_chunk_resumes_to_the_uninterrupted_pool(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", N, shape=(32, 32))
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean_dir.mkdir()
    killed_dir.mkdir()
    clean, out = clean_dir / "p.zarr", killed_dir / "p.zarr"
    assert main(command(src, clean)[3:]) in (0, None)  # the uninterrupted ingest, in this process

    proc = subprocess.Popen(command(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and written(out) < CHUNK:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_written = written(out)
    assert not out.exists() and 0 < n_written < N, f"the kill was not mid-way ({n_written} of {N} written)"

    resumed = subprocess.run(command(src, out) + ["--resume", "--json"], capture_output=True, text=True,
                             check=True)
    report = json.loads(resumed.stdout)
    assert report["images"] == N and report["resumed_from"] == n_written
    a, b = Pool.open(clean).group, Pool.open(out).group
    assert set(a.array_keys()) == set(b.array_keys()) >= set(PER_IMAGE_ARRAYS)
    for name in a.array_keys():
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=name)
    assert int(np.asarray(b["has_roi"][:]).sum()) == N
    assert sorted(p.name for p in killed_dir.iterdir()) == sorted([out.name, report_path(out).name])
