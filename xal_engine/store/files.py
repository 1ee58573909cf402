"""File writing shared by the stored formats: all-or-nothing file replacement, values made JSON-safe."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from xal_engine.errors import XalError


def current_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it can only be read by setting
    it, and os.umask(0) then restoring it is not thread-safe (a file another thread creates meanwhile gets
    mode 0666), so that is the fallback only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def write_target(path: str | Path) -> Path:
    """The file an atomic write of ``path`` replaces: ``path`` itself, or the file a symlink at ``path``
    points to (resolved through every link, so the link stays a link and its target gets the new
    contents). Raises XalError, naming the path, when that is a directory, device, FIFO or socket:
    renaming a file over one of those would silently swap it for a regular file."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise XalError(f"{path}: directory {target.parent} does not exist") from None
        return target
    except OSError as err:  # a symlink loop, a path through a file, no permission
        raise XalError(f"{path}: cannot write there ({err.strerror})") from None
    kind = _kind(mode)
    if kind is not None:
        shown = path if target == path else f"{path} (-> {target})"
        raise XalError(f"{shown} is {kind}; expected a regular file to write")
    return target


def atomic_write(path: Path, write: Callable[[TextIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path`` (all or
    nothing). A symlink is followed: its final target is the file replaced, the link is kept. A
    directory, device, FIFO or socket at ``path`` is refused (XalError) and left as it is. The file
    gets the mode a plain ``open(path, "w")`` would give it: an existing file's mode, else 0666 less
    the umask (mkstemp alone would make it 0600)."""
    path = write_target(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (all or nothing)."""
    atomic_write(path, lambda f: f.write(text))


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or ±inf float (numpy's too), at any depth of dicts, lists and tuples,
    replaced by None: strict JSON has no non-finite numbers."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` as strict JSON (non-finite numbers as null); ``kwargs`` as json.dumps'."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back: plain dicts, lists, numbers and strings (anything else as its
    str, non-finite numbers as None)."""
    return json.loads(dumps_json(value, default=str))
