"""Processes that end with their parent, however it ends: a reaper for a local Ray instance and a
watchdog for actors.

A local Ray instance (``ray.init()`` without an address) runs a dozen processes beside the driver.
When the driver is SIGKILLed, the raylet and GCS die with it, but Ray's agents wait on a GCS call
with a 60 s timeout before they exit, and an actor notices the lost raylet after about 2 s, possibly
still writing a unit. So:

- :class:`Reaper`: the driver starts a small process (``python -m xal_engine.jobs.reaper``, its own
  session, no inherited pipes) and sends it, as JSON lines on its stdin, the processes it started
  (pid and start time, read from /proc). The pipe's write end lives only in the driver, so the reaper
  reads end-of-file the moment the driver ends, by ``close`` or by death, and SIGKILLs every listed
  process that still runs with the same start time (a reused pid is left alone).
- :func:`exit_with_driver`: an actor on the driver's host polls the driver's pid every 0.2 s and
  exits when it is gone, so that no actor writes for a driver that has died.

Linux only (/proc); elsewhere both do nothing and Ray's own clean-up remains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_PROC = Path("/proc")
WATCH_INTERVAL_S = 0.2


def start_time(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks since boot, /proc/PID/stat field 22); None once gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 on: state, ppid, ...
    return None if fields[0] in ("Z", "X") else int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every running process below ``pid`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir(_PROC):
        if not entry.isdigit():
            continue
        try:
            text = (_PROC / entry / "stat").read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(entry))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            started = start_time(child)
            if started is not None and child not in found:
                found[child] = started
                todo.append(child)
    return found


class Reaper:
    """Kills the processes this one started (as :meth:`watch` lists them) when this process ends."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if not _PROC.is_dir():
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xal_engine.jobs.reaper"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)

    def watch(self) -> None:
        """Add every process now below this one (but the reaper) to the reaper's list."""
        if self.proc is None or self.proc.stdin is None:
            return
        listed = {str(p): t for p, t in descendants(os.getpid()).items() if p != self.proc.pid}
        self.proc.stdin.write((json.dumps(listed) + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        """End the reaper (it kills what is left of the listed processes) and wait for it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait()


def reap(lines: list[str]) -> int:
    """SIGKILL each process the JSON ``lines`` list ({pid: start time}) that still runs as that
    process; returns how many were killed."""
    listed: dict[int, int] = {}
    for line in lines:
        listed.update({int(p): int(t) for p, t in json.loads(line).items()})
    killed = 0
    for pid, started in listed.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def exit_with_driver(pid: int, host: str) -> None:
    """In an actor: exit (status 1) as soon as driver ``pid`` on ``host`` has ended; a driver on
    another host cannot be watched from here (Ray ends a lost driver's actors itself)."""
    if host != socket.gethostname() or start_time(pid) is None:
        return

    def watch() -> None:
        while start_time(pid) is not None:
            time.sleep(WATCH_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="xal-driver-watch", daemon=True).start()


def _main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the driver is not for the reaper
    lines = [line for line in sys.stdin if line.strip()]  # until the driver's end closes the pipe
    reap(lines)


if __name__ == "__main__":
    _main()
