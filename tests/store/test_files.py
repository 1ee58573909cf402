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
