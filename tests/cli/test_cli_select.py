"""`xal-engine select --out`: only a regular file (or a symlink to one) is written; the rest is refused
before any work, as one line, and left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.core.acquisition import SelectConfig
from xal_engine.errors import XalError
from xal_engine.jobs.select import BatchSelection, write_batch


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dir(path: Path) -> None:
    path.mkdir()


def _dev_null(path: Path) -> None:
    path.symlink_to("/dev/null")


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a FIFO"), (_dir, "a directory"),
                                            (_dev_null, "a character device")])
@pytest.mark.parametrize("sidecar", [False, True])
def test_select_refuses_an_out_that_is_not_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  make, kind: str, sidecar: bool) -> None:
    out = tmp_path / "batch.csv"
    make(out.with_name("batch.csv.json") if sidecar else out)
    before = sorted(os.listdir(tmp_path))
    # refused before the pool is even opened
    code = main(["select", "--pool", str(tmp_path / "no.zarr"), "--budget", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"is {kind}" in err[0] and "--out" in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


def test_write_batch_refuses_a_fifo_sidecar_before_writing_the_csv(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "b.csv.json")
    selection = BatchSelection(indices=np.arange(0), rows=[], config=SelectConfig(), run="r", experiment=None,
                               n_candidates=0)
    with pytest.raises(XalError, match="is a FIFO"):
        write_batch(selection, tmp_path / "b.csv", "p.zarr")
    assert sorted(os.listdir(tmp_path)) == ["b.csv.json"]


def test_write_batch_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "b.csv").symlink_to(tmp_path / "shared" / "batch.csv")
    selection = BatchSelection(indices=np.arange(0), rows=[], config=SelectConfig(), run="r", experiment=None,
                               n_candidates=0)
    write_batch(selection, tmp_path / "b.csv", "p.zarr")
    assert (tmp_path / "b.csv").is_symlink()
    assert (tmp_path / "shared" / "batch.csv").read_text().startswith("rank,")
    assert (tmp_path / "b.csv.json").is_file()
