"""Loader worker processes die with their parent: a SIGKILLed `xal-engine score` leaves none behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.synthetic import class_names
from xal_engine.store import PoolWriter

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

N, SIZE, CHUNK = 2048, 32, 8  # 256 work units: scoring on a CPU outlasts the test by far


# `xal-engine score`, with the loader's own parent check (a poll every 5 s between items) slowed to one a
# minute: workers must go with their parent, not when that check next runs.
SCORE = ("import sys, torch.utils.data._utils.worker as w; w.MP_STATUS_CHECK_INTERVAL = 60.0; "
         "from xal_engine.cli import main; sys.exit(main(sys.argv[1:]))")


def make_pool(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with PoolWriter(path, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=class_names(3),
                    chunk_size=CHUNK) as w:
        w.append(rng.integers(0, 256, (N, 1, SIZE, SIZE), dtype=np.uint8), rng.random((N, SIZE, SIZE)) < 0.2,
                 np.ones(N, dtype=bool), rng.integers(0, 3, N).astype(np.int16),
                 np.array([f"img_{i:05d}" for i in range(N)]), np.zeros(N, dtype=np.uint8))
    return path


def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of process ``pid``; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # an unreaped zombie has exited


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = stat(int(entry))
            if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def poll(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_killed_score_leaves_no_loader_worker(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool.zarr")
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_checkpoint(model, build_model("resnet18", 3, 1),
                    Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=tuple(class_names(3)),
                               target_layer="layer4"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["score", "--pool", str(pool), "--model", str(model), "--run", "k", "--num-workers", "2",
            "--batch-size", str(CHUNK), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", SCORE, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    workers: list[int] = []
    command = b""
    try:
        def started() -> bool:  # forked workers run the parent's command line
            nonlocal command
            command = cmdline(proc.pid)
            workers[:] = [c for c in children(proc.pid) if command and cmdline(c) == command]
            return len(workers) == 2 or proc.poll() is not None
        assert poll(started, 60) and proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert poll(lambda: not any(alive(w) for w in workers), 10), [w for w in workers if alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # still the worker (same command line, not a reused pid): stop it
            if alive(w) and cmdline(w) == command:
                os.kill(w, signal.SIGKILL)
        if proc.stderr:
            proc.stderr.close()
