"""Processes end with their parent: the reaper kills what a SIGKILLed driver started, and an actor's
watchdog exits when its driver is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from xal_engine.jobs.reaper import descendants, reap, start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A driver: starts two grandchildren of its own (a shell and its sleep), lists them with the reaper,
# prints their pids, then waits to be killed.
DRIVER = """
import subprocess, sys, time
from xal_engine.jobs.reaper import Reaper
reaper = Reaper()
shell = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
time.sleep(0.3)
reaper.watch()
from xal_engine.jobs.reaper import descendants
import os
print(" ".join(str(p) for p in descendants(os.getpid()) if p != reaper.proc.pid), flush=True)
time.sleep(300)
"""

# An actor: watches the driver named on its command line, then outlives it unless the watch fires.
ACTOR = """
import sys, time
from xal_engine.jobs.reaper import exit_with_driver
exit_with_driver(int(sys.argv[1]), sys.argv[2])
print("watching", flush=True)
time.sleep(300)
"""


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(start_time(p) is None for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_driver_leaves_none_of_the_processes_it_listed() -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    listed: list[int] = []
    try:
        assert driver.stdout is not None
        listed = [int(p) for p in driver.stdout.readline().split()]
        assert len(listed) == 2 and all(start_time(p) is not None for p in listed)  # sh and its sleep
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        # without the reaper the sleep would run on for 300 s, reparented to init
        assert gone_within(listed, 10), [p for p in listed if start_time(p) is not None]
    finally:
        driver.kill()
        driver.wait()
        for p in listed:
            if start_time(p) is not None:
                os.kill(p, signal.SIGKILL)


def test_reap_spares_a_pid_that_now_names_another_process() -> None:
    child = subprocess.Popen(["sleep", "300"])
    try:
        started = start_time(child.pid)
        assert started is not None and descendants(os.getpid())[child.pid] == started
        assert reap([f'{{"{child.pid}": {started + 1}}}']) == 0  # another start time: not ours
        assert child.poll() is None
        assert reap([f'{{"{child.pid}": {started}}}']) == 1
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def test_an_actor_exits_when_its_driver_is_gone() -> None:
    import socket

    driver = subprocess.Popen(["sleep", "300"])
    actor = subprocess.Popen([sys.executable, "-c", ACTOR, str(driver.pid), socket.gethostname()],
                             stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", ACTOR, str(driver.pid), "another-host"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert actor.stdout is not None and other.stdout is not None
        assert actor.stdout.readline().strip() == "watching" == other.stdout.readline().strip()
        time.sleep(0.5)
        assert actor.poll() is None  # the driver still runs
        driver.kill()
        driver.wait()
        assert actor.wait(timeout=10) == 1
        assert other.poll() is None  # a driver on another host is not watched (Ray ends those actors)
    finally:
        for p in (driver, actor, other):
            p.kill()
            p.wait()
