"""Ingest driver: resume after a crash equals an uninterrupted ingest; workers; reports; splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xal_engine.errors import XalError
from xal_engine.ingest import IngestConfig, Item, ItemResult, Skip, ingest, report_path
from xal_engine.ingest.brats import BratsSource
from xal_engine.ingest.common import IngestSource, assign_splits
from xal_engine.ingest.driver import progress_log_path
from xal_engine.ingest.samples import write_brats_case
from xal_engine.store import Pool, PoolWriter, partial_path

SHAPE = (16, 16, 6)
SIZE = 16


def seg_with(slices: list[int]) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    for k in slices:
        seg[2:14, 2:14, k] = 2          # 144 voxels: kept
        seg[3:6, 3:6, k] = 1
    return seg


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 cases, 15 images: case 1 has a NaN slice (an item skip), case 3 lacks FLAIR (a listing skip)."""
    root = tmp_path_factory.mktemp("brats")
    for i, slices in enumerate([[0, 1, 2, 3], [1, 2, 3, 4], [0, 5], [1, 2], [0, 1, 2, 3, 4]]):
        case = f"BraTS20_Training_{i:03d}"
        images = None
        if i == 1:
            t1ce = np.ones(SHAPE, np.float32)
            t1ce[0, 0, 2] = np.nan
            images = {"t1ce": t1ce}
        write_brats_case(root, case, seg_with(slices), images=images)
    (root / "BraTS20_Training_003" / "BraTS20_Training_003_flair.nii.gz").unlink()
    return root


def run(src: Path, out: Path, **kw) -> dict:
    return ingest(BratsSource(src, SIZE), out, IngestConfig(chunk_size=3, test_fraction=0.2,
                                                             val_fraction=0.2, **kw))


def arrays(path: Path) -> dict[str, np.ndarray]:
    pool = Pool.open(path)
    return {name: pool.group[name][:] for name in ("images", "rois", "has_roi", "labels", "ids", "split")}


def assert_same_pool(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def crash_after(monkeypatch: pytest.MonkeyPatch, appends: int) -> None:
    calls = {"n": 0}
    original = PoolWriter.append

    def append(self: PoolWriter, *args: object) -> None:
        if calls["n"] == appends:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        original(self, *args)

    monkeypatch.setattr(PoolWriter, "append", append)


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []
    original = BratsSource.load
    monkeypatch.setattr(BratsSource, "load", lambda self, item: loaded.append(item.key) or original(self, item))
    return loaded


@pytest.mark.parametrize("drop_log", [False, True])
def test_resume_after_a_crash_gives_the_uninterrupted_pool(src: Path, tmp_path: Path, drop_log: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clean = run(src, tmp_path / "clean.zarr")
    out = tmp_path / "p.zarr"
    with monkeypatch.context() as m:
        crash_after(m, 2)                   # appends 4 + 3 images -> chunks of 3: 6 durable
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(src, out)
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(Exception, match="exists|unfinished|partial"):
        Pool.open(partial_path(out))
    if drop_log:
        progress_log_path(out).unlink()
    loaded = count_loads(monkeypatch)
    resumed = run(src, out, resume=True)
    assert resumed["resumed_from"] == 6
    # case 1 (images 4..6) straddles the chunk boundary: decoded again; case 0 only without the log
    assert loaded == ["BraTS20_Training_000"] * drop_log + ["BraTS20_Training_001", "BraTS20_Training_002",
                                                            "BraTS20_Training_004"]
    assert_same_pool(tmp_path / "clean.zarr", out)
    assert resumed["skipped"] == clean["skipped"] and resumed["per_split"] == clean["per_split"]
    assert [s["item"] for s in clean["skipped"]] == ["BraTS20_Training_003", "BraTS20_Training_001_slice_2"]
    assert not progress_log_path(out).exists() and json.loads(report_path(out).read_text())["images"] == 14


def test_resume_with_other_settings_is_refused(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p.zarr"
    with monkeypatch.context() as m:
        crash_after(m, 2)
        with pytest.raises(RuntimeError):
            run(src, out)
    with pytest.raises(XalError, match="--resume: .* other settings"):
        ingest(BratsSource(src, SIZE), out, IngestConfig(chunk_size=3, seed=1, resume=True))


def test_two_workers_give_the_same_pool(src: Path, tmp_path: Path) -> None:
    one = run(src, tmp_path / "one.zarr", workers=1)
    two = run(src, tmp_path / "two.zarr", workers=2)
    assert_same_pool(tmp_path / "one.zarr", tmp_path / "two.zarr")
    assert one["skipped"] == two["skipped"]


class Flaky(IngestSource):
    """Items 'a'..'d'; 'b' raises an unexpected error while decoding."""

    name, modality = "flaky", ""

    def __init__(self, root: Path) -> None:
        super().__init__(root, 4)
        self.classes, self.channels, self.dtype = ["x"], 1, np.dtype(np.uint8)

    def scan(self) -> tuple[list[Item], list[Skip]]:
        return [Item(k, k) for k in "abcd"], [Skip("z", "listed but unusable")]

    def load(self, item: Item) -> ItemResult:
        if item.key == "b":
            raise KeyError("no such tag\n  (multi-line message)")
        return ItemResult(np.full((1, 1, 4, 4), ord(item.key), np.uint8), np.zeros((1, 4, 4), bool),
                          np.zeros(1, bool), np.zeros(1, np.int16), (item.key,))

    def settings(self) -> dict:
        return {}


def test_unexpected_errors_become_one_line_skips(tmp_path: Path) -> None:
    report = ingest(Flaky(tmp_path), tmp_path / "p.zarr", IngestConfig(test_fraction=0, val_fraction=0))
    assert report["skipped"] == [{"item": "z", "reason": "listed but unusable"},
                                 {"item": "b", "reason": "KeyError: 'no such tag\\n (multi-line message)'"}]
    b = Pool.open(tmp_path / "p.zarr").read(0, 3)
    assert list(b.ids) == ["a", "c", "d"] and b.images[:, 0, 0, 0].tolist() == [97, 99, 100]
    assert report["per_class"] == {"x": 3} and report["per_split"] == {"train": 3, "val": 0, "test": 0}


class NanSettings(Flaky):
    """Flaky with a setting no finite number describes (a window left open)."""

    def settings(self) -> dict:
        return {"window": [float("nan"), float("inf")]}


def test_the_report_and_the_pool_attributes_are_strict_json(tmp_path: Path) -> None:
    def refuse(name: str) -> None:
        raise AssertionError(f"not JSON: {name}")

    out = tmp_path / "p.zarr"
    ingest(NanSettings(tmp_path), out, IngestConfig(test_fraction=0, val_fraction=0))
    report = json.loads(report_path(out).read_text(), parse_constant=refuse)
    assert report["settings"]["window"] == [None, None]
    attrs = json.loads((out / "zarr.json").read_text(), parse_constant=refuse)["attributes"]
    assert attrs["ingest"]["window"] == [None, None]


def test_assign_splits_counts_and_seed() -> None:
    groups = [f"p{i}" for i in range(10)] * 3
    s = assign_splits(groups, 0.2, 0.1, seed=0)
    assert sorted(s.values()) == [0] * 7 + [1] + [2] * 2
    assert s == assign_splits(list(reversed(groups)), 0.2, 0.1, seed=0)      # order does not matter
    assert any(assign_splits(groups, 0.2, 0.1, seed=k) != s for k in range(1, 5))
    with pytest.raises(XalError, match="--test-fraction"):
        IngestConfig(test_fraction=1.5)
