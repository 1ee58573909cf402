"""File writing shared by the stored formats: all-or-nothing file replacement, values made JSON-safe."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def atomic_write(path: Path, write: Callable[[TextIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path`` (all or
    nothing)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (all or nothing)."""
    atomic_write(path, lambda f: f.write(text))


def jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back: plain dicts, lists, numbers and strings (anything else as its str)."""
    return json.loads(json.dumps(value, default=str))
