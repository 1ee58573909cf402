"""Optional per-image arrays (the DICOM UIDs): written only when asked, all or none, checked on open and
by validate; pools without them open unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from xal_engine.errors import PoolError
from xal_engine.store import Pool, PoolWriter
from xal_engine.store.format import DICOM_ARRAYS

S = 8


def write(path: Path, n: int = 5, uids: bool = True, chunk: int = 2) -> Path:
    extra = {"sop_instance_uid": np.array([f"1.2.{i}" for i in range(n)], object),
             "series_instance_uid": np.array(["1.3"] * n, object),
             "study_instance_uid": np.array(["1.4"] * n, object),
             "source_shape": np.tile([[100, 80]], (n, 1))} if uids else None
    with PoolWriter(path, channels=1, height=S, width=S, dtype=np.uint8, classes=["a"], chunk_size=chunk,
                    extra_arrays=DICOM_ARRAYS if uids else ()) as w:
        w.append(np.zeros((n, 1, S, S), np.uint8), np.zeros((n, S, S), bool), np.zeros(n, bool),
                 np.zeros(n, np.int16), [f"i{k}" for k in range(n)], np.zeros(n, np.uint8), extra)
    return path


def test_written_and_read_back(tmp_path: Path) -> None:
    pool = Pool.open(write(tmp_path / "p.zarr"))
    assert pool.column("sop_instance_uid").tolist() == [f"1.2.{i}" for i in range(5)]
    assert pool.take("source_shape", np.array([4, 0])).tolist() == [[100, 80], [100, 80]]
    assert pool.validate() == [] and pool.info()["optional_arrays"] == sorted(DICOM_ARRAYS)
    assert pool.read(0, 2).ids.tolist() == ["i0", "i1"]  # PoolBatch unchanged


def test_absent_without_them(tmp_path: Path) -> None:
    pool = Pool.open(write(tmp_path / "p.zarr", uids=False))
    assert pool.optional == {} and pool.validate() == []
    with pytest.raises(PoolError, match="has no 'sop_instance_uid' array"):
        pool.column("sop_instance_uid")


def test_all_or_none(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="written all or none"):
        PoolWriter(tmp_path / "q.zarr", channels=1, height=S, width=S, dtype=np.uint8, classes=["a"],
                   extra_arrays=("sop_instance_uid",))
    path = write(tmp_path / "p.zarr")
    zarr.open_group(str(path), mode="r+").__delitem__("source_shape")
    with pytest.raises(PoolError, match=r"missing array\(s\) 'source_shape': the dicom arrays are stored all or none"):
        Pool.open(path)


def test_append_must_give_them(tmp_path: Path) -> None:
    w = PoolWriter(tmp_path / "p.zarr", channels=1, height=S, width=S, dtype=np.uint8, classes=["a"],
                   extra_arrays=DICOM_ARRAYS)
    with pytest.raises(PoolError, match="appended optional arrays none"):
        w.append(np.zeros((1, 1, S, S), np.uint8), np.zeros((1, S, S), bool), np.zeros(1, bool),
                 np.zeros(1, np.int16), ["x"], np.zeros(1, np.uint8))


def test_validate_reports_empty_uids(tmp_path: Path) -> None:
    path = write(tmp_path / "p.zarr")
    array = zarr.open_group(str(path), mode="r+")["sop_instance_uid"]
    array[3] = ""
    assert Pool.open(path).validate() == ["sop_instance_uid: empty UID: 1 image(s) (index 3)"]
