"""Lock files: the holder named in the refusal, stale locks taken over, released on exit and on error."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xal_engine.store.locks import LockFile, LockHeld, pid_alive, read_holder, score_lock_path
from xal_engine.store.run_folder import RunFolder, RunWriter


def dead_pid() -> int:
    """A pid that no process on this host has."""
    pid = 2**22 - 1
    while pid_alive(pid):
        pid -= 1
    return pid


def test_lock_names_its_holder_and_is_deleted_on_release(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with LockFile(path, "thing") as lock:
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        assert lock.took_over is None
        with pytest.raises(LockHeld) as refused:  # a second holder, even in this process
            LockFile(path, "thing").acquire()
        message = str(refused.value)
        assert message.startswith(f"thing is in use by pid {os.getpid()} on {socket.gethostname()}")
        assert str(path) in message and "\n" not in message
    assert not path.exists()


def test_lock_is_released_on_error(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with pytest.raises(RuntimeError), LockFile(path, "thing"):
        raise RuntimeError("boom")
    assert not path.exists()
    LockFile(path, "thing").acquire().release()  # free again


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    pid = dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2020-01-01T00:00:00Z"}))
    with LockFile(path, "thing") as lock:
        assert lock.took_over is not None and lock.took_over.pid == pid
        assert read_holder(path).pid == os.getpid()


def test_a_killed_holder_leaves_a_lock_the_next_process_takes_over(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = textwrap.dedent(f"""
        import sys, time
        from xal_engine.store.locks import LockFile
        LockFile({str(path)!r}, "thing").acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"in use by pid {proc.pid} on "):
            LockFile(path, "thing").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_holder(path).pid == proc.pid  # the file is still there, naming the dead process
    with LockFile(path, "thing") as lock:
        assert lock.took_over.pid == proc.pid


def test_lock_paths() -> None:
    assert score_lock_path("/data/p.zarr", "r1", 0, 2) == Path("/data/p.zarr.score-r1.shard0of2.lock")
    assert RunFolder("/runs/e1").lock_file == Path("/runs/e1/.lock")


def test_run_folder_lock_creates_the_folder_and_prepare_keeps_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {"format": 1, "loop": {"train": {"num_workers": 0}}}
    with RunFolder(run).lock():
        assert (run / ".lock").is_file()
        RunWriter.prepare(run, config, overwrite=False)  # a folder holding only its lock is a new run
        (run / "metrics.csv").write_text("x\n")
        RunWriter.prepare(run, config, overwrite=True)  # clears the run, not the lock it holds
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]
        with pytest.raises(LockHeld, match=r"run folder .* is in use by pid"):
            RunFolder(run).lock()
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match=r"exists and is not a folder"):
        RunFolder(tmp_path / "file").lock()


def test_holder_waits_are_short(tmp_path: Path) -> None:
    """A refusal of an empty lock file (a holder that has not written its name yet) takes <= 1 s."""
    path = tmp_path / "x.lock"
    with LockFile(path, "thing"):
        path.write_text("")
        t0 = time.monotonic()
        with pytest.raises(LockHeld, match=r"in use by another process"):
            LockFile(path, "thing").acquire()
        assert time.monotonic() - t0 < 1.0
