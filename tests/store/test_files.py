"""store/files.py: strict JSON (non-finite numbers as null) and atomic writes with a plain open's mode."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from xal_engine.store import files
from xal_engine.store.files import atomic_write_text, current_umask, dumps_json, finite_or_none, jsonable


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN and Infinity (Python's json accepts them by default)."""
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth() -> None:
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": np.float32("nan")},
             "e": np.float64(0.25), "f": "nan", "g": None, "h": 3}
    text = dumps_json(value)
    assert strict_loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None}, "e": 0.25,
                                  "f": "nan", "g": None, "h": 3}
    assert finite_or_none(math.nan) is None and finite_or_none(1.0) == 1.0
    assert jsonable({"x": math.inf, "p": Path("/a")}) == {"x": None, "p": "/a"}


def test_dumps_json_passes_json_dumps_options() -> None:
    assert dumps_json({"b": 1, "a": math.nan}, indent=1, sort_keys=True) == '{\n "a": null,\n "b": 1\n}'
    assert dumps_json({"p": Path("/x")}, default=str) == '{"p": "/x"}'


@pytest.fixture
def umask() -> Iterator[None]:
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "out.csv", "a\n")
    with open(tmp_path / "plain.csv", "w") as f:
        f.write("a\n")
    assert stat.S_IMODE(os.stat(tmp_path / "out.csv").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "plain.csv").st_mode) == mode
    assert sorted(os.listdir(tmp_path)) == ["out.csv", "plain.csv"]  # no temporary file left


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_the_umask_is_read_without_proc(tmp_path: Path, umask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    os.umask(0o027)
    real_open = open

    def no_proc(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == "/proc/self/status":
            raise OSError(2, "No such file or directory")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", no_proc)
    assert files.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # and left as it was
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def _dev_null_link(path: Path) -> Path:
    path.symlink_to("/dev/null")
    return path


@pytest.mark.parametrize(("make", "kind"), [
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (_fifo, "is a FIFO"),
    (_socket, "is a socket"),
    (_dev_null_link, "(-> /dev/null) is a character device"),
])
def test_what_is_not_a_regular_file_is_refused_and_left_alone(tmp_path: Path, make, kind: str) -> None:
    from xal_engine.errors import XalError

    path = make(tmp_path / "out.csv")
    before = os.lstat(path)
    with pytest.raises(XalError) as err:
        atomic_write_text(path, "a\n")
    assert str(err.value).startswith(str(path)) and kind in str(err.value) and "\n" not in str(err.value)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]  # no temporary file left


def test_a_symlink_is_kept_and_its_target_replaced(tmp_path: Path, umask: None) -> None:
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "batch.csv"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    (tmp_path / "hop").symlink_to(target)
    link = tmp_path / "batch.csv"
    link.symlink_to("hop")  # a chain of links is followed to its end
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == "hop" and (tmp_path / "hop").is_symlink()
    assert target.read_text() == "new\n" and stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path / "shared")) == ["batch.csv"]


def test_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "out.csv"
    link.symlink_to("real.csv")
    atomic_write_text(link, "a\n")
    assert link.is_symlink() and (tmp_path / "real.csv").read_text() == "a\n"


def test_a_symlink_loop_is_one_error(tmp_path: Path) -> None:
    from xal_engine.errors import XalError

    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(XalError, match="cannot write there"):
        atomic_write_text(tmp_path / "a", "x\n")
