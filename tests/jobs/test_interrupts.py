"""score and loop under SIGTERM and a second process: one line, workers stopped, resumable, locks held."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_score import UNIT, make_model, make_pool, read_run

from xal_engine.cli import main
from xal_engine.jobs import score as score_job
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import Pool
from xal_engine.store.locks import LockFile, pid_alive, score_lock_path
from xal_engine.store.run_folder import RunFolder
from xal_engine.store.score_run import ScoreRun


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def dead_pid() -> int:
    pid = 2**22 - 1
    while pid_alive(pid):
        pid -= 1
    return pid


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    return make_pool(root / "pool.zarr", n=40), make_model(root / "model.pt")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_during_score_is_one_line_stops_workers_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "big.zarr", n=160, size=48)
    model = make_model(tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "xal_engine", "score", "--pool", str(pool), "--model", str(model),
           "--run", "r", "--batch-size", str(UNIT), "--unit-size", str(UNIT), "--num-workers", "1", "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done_dir = pool / "scores" / "r" / "done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and any(done_dir.iterdir()):
            break
        time.sleep(0.005)
    workers = children(proc.pid)
    assert workers, "the loader worker was not running"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines() == ["xal-engine score: interrupted (SIGTERM)"]
    time.sleep(0.2)
    assert not [w for w in workers if pid_alive(w)], "a loader worker outlived the interrupted score"
    assert not score_lock_path(pool, "r", 0, 1).exists()  # released on the interrupt
    run = ScoreRun.open(Pool.open(pool).group, "r")
    n_done = int(run.done_mask().sum())
    assert 0 < n_done < run.n_units, f"SIGTERM was not mid-way ({n_done} of {run.n_units} units done)"
    resumed = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True, timeout=120)
    summary = json.loads(resumed.stdout)
    assert summary["complete"] and summary["units_already_done"] == n_done
    assert summary["images"] == 160 - n_done * UNIT
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="whole", batch_size=UNIT, num_workers=0))
    whole, resumed_run = read_run(pool, "whole"), read_run(pool, "r")
    for field, value in whole.items():
        np.testing.assert_array_equal(value, resumed_run[field], err_msg=field)


def test_score_progress_advances_per_batch_not_per_chunk(small, monkeypatch) -> None:
    """Five 8-image units scored in batches of 3: the bar moves 3, 3, 2 per unit (15 updates), not 8
    per unit; a 500-image pool in one chunk no longer jumps from 0 to 100 %."""
    updates: list[int] = []

    class Bar:
        def update(self, n: int) -> None:
            updates.append(n)

        def close(self) -> None:
            pass

    monkeypatch.setattr(score_job, "progress", lambda total, desc, enabled=None: Bar())
    summary = score_pool(small[0], small[1], ScoreConfig(unit_size=UNIT, run="bar", batch_size=3, num_workers=0))
    assert summary.units == 5 and updates == [3, 3, 2] * 5


def test_score_refuses_a_shard_another_process_holds_and_takes_over_a_stale_lock(small, capsys) -> None:
    pool, model = small
    argv = ["score", "--pool", str(pool), "--model", str(model), "--run", "locked", "--num-workers", "0",
            "--device", "cpu", "--quiet"]
    path = score_lock_path(pool, "locked", 0, 1)
    with LockFile(path, "held by the test"):
        assert Pool.open(pool).validate() == []  # a held lock disturbs neither validation nor reading
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"xal-engine score: error: score run 'locked' shard 0/1 of pool {pool} is in use by pid "
            f"{os.getpid()} on {socket.gethostname()}")
    assert "locked" not in Pool.open(pool).group.get("scores", {})  # refused before the run was created
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "2020"}))
    assert main(argv) == 0
    assert not path.exists() and ScoreRun.open(Pool.open(pool).group, "locked").is_complete()


def test_a_shard_count_other_than_a_live_shards_is_refused(small, capsys) -> None:
    """Shards of 2 and of 3 overlap (unit 2 belongs to 0/2 and 1/3): while shard 1/2 runs, shard 0/3
    is refused in one line; once it has ended, any count resumes the run, and the joint result equals
    one process's."""
    pool, model = small
    config = {"batch_size": 3, "num_workers": 0, "device": "cpu"}
    with LockFile(score_lock_path(pool, "mixed", 1, 2), "held by the test"):
        argv = ["score", "--pool", str(pool), "--model", str(model), "--run", "mixed", "--num-workers", "0",
                "--device", "cpu", "--quiet", "--shard-id", "0", "--num-shards", "3"]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and (f"is being scored as shard 1/2 by pid {os.getpid()}" in err[0]
                                  and "must use the same --num-shards (this one: 3)" in err[0]), err
        # the same count is no conflict, and another run's locks are not this run's
        assert score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mixed", shard_id=0, num_shards=2, **config)).units > 0
        assert score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mixed.shard1", num_shards=3, **config)).units > 0
    assert not score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mixed", shard_id=2, num_shards=3, **config)).complete
    assert score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mixed", **config)).complete
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="whole", **config))
    group = Pool.open(pool).group
    got, want = ScoreRun.open(group, "mixed").read(), ScoreRun.open(group, "whole").read()
    for field, value in want.items():
        np.testing.assert_array_equal(got[field], value, err_msg=field)


def test_loop_refuses_a_run_folder_another_process_holds(small, tmp_path, capsys) -> None:
    pool, _ = small
    out = tmp_path / "run"
    argv = ["loop", "--pool", str(pool), "--strategy", "random", "--initial", "6", "--per-round", "2",
            "--rounds", "0", "--epochs", "1", "--num-workers", "0", "--out", str(out), "--quiet"]
    with RunFolder(out).lock():
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"xal-engine loop: error: run folder {out} is in use by pid {os.getpid()} on {socket.gethostname()}")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written; the lock file is gone
