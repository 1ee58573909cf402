"""Lock files: one process at a time writes a loop run folder, or one shard of a score run.

    RUN_DIR/.lock                                    held by ``xal-engine loop`` (and ``demo``)
    POOL.score-<run>.shard<I>of<S>.lock              held by ``xal-engine score`` for shard I of S; beside
                                                     the pool, since Zarr warns about foreign files inside it
    POOL.score-create.lock                           held while a score run is created or opened for
                                                     writing (:func:`waiting_lock`: others wait, not fail)

A lock file holds its holder's ``{"pid", "host", "since"}`` as JSON, and the holder keeps an exclusive
``flock`` on it. The kernel drops a flock when its process ends, however it ends, so a lock file left
by a killed process is stale and the next process takes it over; the holder deletes the file when it
releases it, also on an error. Where ``flock`` is unavailable (some network filesystems), the content
decides: a pid that no longer runs on this host is stale, a holder on another host is respected.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from xal_engine.errors import XalError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

RUN_DIR_LOCK = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock impossible here


@dataclass(frozen=True)
class Holder:
    """The process a lock file names."""

    pid: int
    host: str
    since: str  # UTC, ISO 8601

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def running(self) -> bool:
        """Whether the holder still runs: checked on this host; a holder on another host is assumed to."""
        if self.host != socket.gethostname():
            return True
        return pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.since})"


class LockHeld(XalError):
    """Another process holds the lock."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as ended)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def score_lock_path(pool_path: str | Path, run: str, shard_id: int, num_shards: int) -> Path:
    """Where shard ``shard_id`` of ``num_shards`` of score run ``run`` keeps its lock file."""
    pool_path = Path(pool_path).absolute()
    return pool_path.with_name(f"{pool_path.name}.score-{run}.shard{shard_id}of{num_shards}.lock")


def score_create_lock_path(pool_path: str | Path) -> Path:
    """Where the lock that serialises the creation of the pool's score runs lives."""
    pool_path = Path(pool_path).absolute()
    return pool_path.with_name(f"{pool_path.name}.score-create.lock")


@contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting for the holder; the file is deleted on release.
    Where ``flock`` is unavailable, nothing is locked."""
    path = Path(path)
    fd = _wait_for(path)
    try:
        yield
    finally:
        if fd is not None:
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)


def _wait_for(path: Path) -> int | None:
    """The descriptor of ``path``, flocked once the holder releases it; None where flock is unavailable."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise XalError(f"cannot create lock file {path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise XalError(f"cannot lock {path}: {err.strerror}") from None
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # released and deleted after our open: try again


class LockFile:
    """An exclusive lock on ``path`` naming this process; a context manager (``with LockFile(...):``).

    ``what`` names the locked thing in the refusal: "run folder runs/exp1", "score run 'r1' shard 0/1".
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None
        self.took_over: Holder | None = None  # the stale holder this lock replaced, if any

    def acquire(self) -> Self:
        """Take the lock, taking over a stale one; :class:`LockHeld` (one line naming the holder) when
        another running process has it."""
        if self.fd is not None:
            return self
        for _ in range(100):  # the holder may release (and delete) the file between our open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise XalError(f"cannot create lock file {self.path}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, wait=True)
                os.close(fd)
                raise LockHeld(self._refusal(holder)) from None
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise XalError(f"cannot lock {self.path}: {err.strerror}") from None
                holder = _read_holder(fd)
                if holder is not None and holder.running():  # no flock here: the content decides
                    os.close(fd)
                    raise LockHeld(self._refusal(holder)) from None
            if not _same_file(fd, self.path):  # released and deleted after our open: try again
                os.close(fd)
                continue
            self.took_over = _read_holder(fd)
            _write_holder(fd, Holder.me())
            self.fd = fd
            return self
        raise XalError(f"cannot lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Delete the lock file (while still holding it, so that no waiter locks a deleted file) and
        drop the lock. Does nothing when not held."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _refusal(self, holder: Holder | None) -> str:
        if holder is None:
            return (f"{self.what} is in use by another process (lock file {self.path}); "
                    "wait for it to finish")
        ended = ("; that process has ended, but a child process of it still holds the lock: retry in "
                 "a few seconds" if holder.host == socket.gethostname() and not pid_alive(holder.pid) else "")
        return (f"{self.what} is in use by {holder.describe()} (lock file {self.path}); "
                f"wait for it to finish{ended}")

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@contextmanager
def score_shard_lock(pool_path: str | Path, run: str, shard_id: int, num_shards: int) -> Iterator[LockFile]:
    """Hold shard ``shard_id`` of ``num_shards`` of score run ``run``; :class:`LockHeld` (one line)
    when another process holds that shard, or any shard of the run under another ``--num-shards``:
    their unit ranges overlap, and a shard cleaning its own units' half-written chunks must know that
    no live writer owns them. The check and the taking happen under the pool's creation lock, so two
    starters with different counts cannot both pass."""
    what = f"score run {run!r} shard {shard_id}/{num_shards} of pool {Path(pool_path).absolute()}"
    lock = LockFile(score_lock_path(pool_path, run, shard_id, num_shards), what)
    with waiting_lock(score_create_lock_path(pool_path)):
        prefix = score_lock_path(pool_path, run, 0, num_shards).name.rsplit(".shard", 1)[0]  # POOL.score-RUN
        for other in sorted(lock.path.parent.glob(glob.escape(prefix) + ".shard*of*.lock")):
            shard = other.name[len(prefix) + len(".shard"):-len(".lock")]  # "IofS"
            if not re.fullmatch(r"\d+of\d+", shard) or shard.rpartition("of")[2] == str(num_shards):
                continue  # another run's lock ("RUN.shard1" is a run name too), or a shard of our count
            holder = held_by(other)
            if holder is not False:
                by = holder.describe() if holder is not None else "another process"
                raise LockHeld(f"score run {run!r} of pool {Path(pool_path).absolute()} is being scored as "
                               f"shard {shard.replace('of', '/')} by {by} (lock file {other}); every shard of "
                               f"a run must use the same --num-shards (this one: {num_shards})")
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def held_by(path: str | Path) -> Holder | None | bool:
    """Whether lock file ``path`` is held now: False when not (or gone), else its holder (None when
    it names none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd, wait=True)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise XalError(f"cannot lock {path}: {err.strerror}") from None
            holder = _read_holder(fd)  # no flock here: the content decides
            return holder if holder is not None and holder.running() else False
        return False  # we could lock it: nobody holds it (our shared lock goes with the close)
    finally:
        os.close(fd)


def read_holder(path: str | Path) -> Holder | None:
    """The holder a lock file names (None: no file, or no readable holder in it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int, wait: bool = False) -> Holder | None:
    """The holder in an open lock file; with ``wait``, up to 0.5 s for a holder that has just taken
    the lock and not yet written its name."""
    for attempt in range(11 if wait else 1):
        if attempt:
            time.sleep(0.05)
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
            return Holder(int(data["pid"]), str(data["host"]), str(data.get("since", "?")))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def _write_holder(fd: int, holder: Holder) -> None:
    data = json.dumps({"pid": holder.pid, "host": holder.host, "since": holder.since}).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
