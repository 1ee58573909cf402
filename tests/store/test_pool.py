"""Pool format v1: round trip, chunk layout and codecs, atomic writes, resume, open errors, validate, info."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from xal_engine.errors import PoolError
from xal_engine.store import (
    FORMAT_VERSION,
    PER_IMAGE_ARRAYS,
    SPLIT_TEST,
    SPLIT_VAL,
    Pool,
    PoolWriter,
    images_per_chunk,
    partial_path,
)

CLASSES = ["a", "b", "c"]


def make_arrays(n: int, dtype: str = "uint8", c: int = 2, h: int = 6, w: int = 5,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Random but consistent per-image arrays: has_roi True exactly where the ROI is non-empty."""
    rng = np.random.default_rng(seed)
    if dtype == "float16":
        images = rng.standard_normal((n, c, h, w)).astype(np.float16)
    else:
        images = rng.integers(0, np.iinfo(dtype).max, (n, c, h, w), endpoint=True).astype(dtype)
    rois = rng.random((n, h, w)) < 0.3
    rois[::4] = False
    return {"images": images, "rois": rois, "has_roi": rois.any(axis=(1, 2)),
            "labels": rng.integers(-1, len(CLASSES), n).astype(np.int16),
            "ids": np.array([f"img_{i:04d}" for i in range(n)]),
            "split": rng.integers(0, 3, n).astype(np.uint8)}


def write_pool(path: Path, data: dict[str, np.ndarray], chunk_size: int = 16,
               pieces: tuple[int, ...] = (1, 5, 30), **kwargs) -> Pool:
    """Append ``data`` in pieces of the given sizes (cycled) so appends straddle chunk edges."""
    n = len(data["images"])
    _, c, h, w = data["images"].shape
    with PoolWriter(path, channels=c, height=h, width=w, dtype=data["images"].dtype, classes=CLASSES,
                    modality="test", source="unit", chunk_size=chunk_size, **kwargs) as writer:
        start, i = 0, 0
        while start < n:
            stop = min(n, start + pieces[i % len(pieces)])
            writer.append(*(data[k][start:stop] for k in PER_IMAGE_ARRAYS))
            start, i = stop, i + 1
        return writer.close()


@pytest.fixture
def pool_path(tmp_path: Path) -> Path:
    path = tmp_path / "p.zarr"
    write_pool(path, make_arrays(70))
    return path


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float16"])
def test_round_trip_every_array(tmp_path: Path, dtype: str) -> None:
    data = make_arrays(70, dtype)
    pool = write_pool(tmp_path / "p.zarr", data, attrs={"spacing": [1.0, 1.0]})
    assert (pool.n, pool.channels, pool.height, pool.width) == (70, 2, 6, 5)
    assert pool.image_dtype == np.dtype(dtype) and pool.chunk_size == 16
    assert pool.classes == CLASSES and pool.attrs["spacing"] == [1.0, 1.0]
    assert pool.attrs["xal_pool"] == FORMAT_VERSION and pool.attrs["source"] == "unit"
    whole = pool.read(0, 70)
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(whole, name), data[name], err_msg=name)
    assert whole.ids.dtype.kind == "U" and whole.labels.dtype == np.int16
    assert whole.split.dtype == np.uint8 and whole.rois.dtype == bool
    part = pool.read(20, 37)  # crosses a chunk edge
    assert (part.start, part.stop) == (20, 37)
    np.testing.assert_array_equal(part.images, data["images"][20:37])
    np.testing.assert_array_equal(part.ids, data["ids"][20:37])


def test_images_per_chunk_hand_cases() -> None:
    assert images_per_chunk(1, 256, 256, "uint8") == 64      # 4 MiB
    assert images_per_chunk(1, 64, 64, "uint8") == 1024      # 4 MiB
    assert images_per_chunk(3, 256, 256, "uint8") == 16      # 21 fit -> 16, 3 MiB
    assert images_per_chunk(1, 512, 512, "uint16") == 8      # 4 MiB
    assert images_per_chunk(1, 4096, 4096, "uint16") == 1    # one 32 MiB image: cannot do better
    for c, h, dtype in [(1, 32, "uint8"), (3, 224, "uint8"), (1, 300, "float16"), (4, 1000, "uint16")]:
        chunk_bytes = images_per_chunk(c, h, h, dtype) * c * h * h * np.dtype(dtype).itemsize
        assert 1 << 20 <= chunk_bytes <= 8 << 20


def test_chunk_layout_and_codecs(pool_path: Path) -> None:
    for name in PER_IMAGE_ARRAYS:
        meta = json.loads((pool_path / name / "zarr.json").read_text())
        shape = meta["shape"]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [16, *shape[1:]], name
        codecs = [codec["name"] for codec in meta["codecs"]]
        assert codecs[-1] == "crc32c" and "blosc" in codecs, name
    images = json.loads((pool_path / "images" / "zarr.json").read_text())
    blosc = next(c for c in images["codecs"] if c["name"] == "blosc")["configuration"]
    assert blosc["shuffle"] == "bitshuffle" and blosc["cname"] in ("lz4", "zstd")


def test_chunk_ranges(pool_path: Path) -> None:
    pool = Pool.open(pool_path)
    assert pool.chunk_ranges() == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
    assert pool.chunk_ranges(5, 40) == [(5, 16), (16, 32), (32, 40)]
    assert pool.chunk_ranges(16, 32) == [(16, 32)]
    assert pool.chunk_ranges(30, 30) == []
    with pytest.raises(PoolError, match="outside a pool of 70"):
        pool.chunk_ranges(0, 71)
    with pytest.raises(PoolError, match="cannot read images 60..80"):
        pool.read(60, 80)


def test_exception_inside_with_leaves_no_pool(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    data = make_arrays(40)
    with pytest.raises(RuntimeError, match="stop"), \
            PoolWriter(path, channels=2, height=6, width=5, dtype="uint8", classes=CLASSES,
                       chunk_size=16) as writer:
        writer.append(*(data[k] for k in PER_IMAGE_ARRAYS))
        assert writer.n_written == 32  # two whole chunks durable, 8 images buffered
        raise RuntimeError("stop")
    assert not path.exists() and partial_path(path).is_dir()
    with pytest.raises(PoolError, match="unfinished"):
        Pool.open(path)
    with pytest.raises(PoolError, match=r"unfinished pool \(.partial\)"):
        Pool.open(partial_path(path))


def test_resume_continues_after_last_whole_chunk(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    data = make_arrays(70)
    with pytest.raises(RuntimeError), \
            PoolWriter(path, channels=2, height=6, width=5, dtype="uint8", classes=CLASSES,
                       chunk_size=16) as writer:
        writer.append(*(data[k][:40] for k in PER_IMAGE_ARRAYS))
        raise RuntimeError("killed")
    group = zarr.open_group(str(partial_path(path)), mode="r+")
    for name in ("images", "rois"):  # killed inside the third flush: some arrays already longer
        group[name].resize((48, *group[name].shape[1:]))
    group["images"][32:48] = 9
    stray = partial_path(path) / "images" / "c" / "2" / "0" / "0" / "0.deadbeef.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"torn")  # what a SIGKILL during a chunk write leaves behind
    with PoolWriter(path, channels=2, height=6, width=5, dtype="uint8", classes=CLASSES,
                    chunk_size=16, resume=True) as writer:
        assert writer.n_written == 32
        writer.append(*(data[k][32:] for k in PER_IMAGE_ARRAYS))
    pool = Pool.open(path)
    assert not stray.exists() and pool.validate() == []
    batch = pool.read(0, 70)
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(batch, name), data[name], err_msg=name)


def test_resume_refuses_a_different_layout(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    with pytest.raises(RuntimeError), \
            PoolWriter(path, channels=2, height=6, width=5, dtype="uint8", classes=CLASSES):
        raise RuntimeError("killed")
    with pytest.raises(PoolError, match="cannot be resumed"):
        PoolWriter(path, channels=1, height=6, width=5, dtype="uint8", classes=CLASSES, resume=True)


def test_existing_out_refused_then_overwritten(tmp_path: Path, pool_path: Path) -> None:
    data = make_arrays(20, seed=1)
    with pytest.raises(PoolError, match="already exists"):
        write_pool(pool_path, data)
    pool = write_pool(pool_path, data, overwrite=True)
    assert pool.n == 20
    np.testing.assert_array_equal(pool.read(0, 20).images, data["images"])
    assert sorted(p.name for p in pool_path.parent.iterdir()) == ["p.zarr"]  # old pool deleted
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(PoolError, match="not a Zarr group: refusing"):
        write_pool(folder, data, overwrite=True)
    assert (folder / "keep.txt").exists()


def test_append_checks_shapes_and_dtypes(tmp_path: Path) -> None:
    data = make_arrays(4)
    with PoolWriter(tmp_path / "p.zarr", channels=2, height=6, width=5, dtype="uint8",
                    classes=CLASSES) as writer:
        bad = dict(data, rois=data["rois"][:, :5])
        with pytest.raises(PoolError, match=r"'rois' has shape \(4, 5, 5\), expected \(4, 6, 5\)"):
            writer.append(*(bad[k] for k in PER_IMAGE_ARRAYS))
        bad = dict(data, images=data["images"].astype(np.float32))
        with pytest.raises(PoolError, match="'images' has dtype float32, expected uint8"):
            writer.append(*(bad[k] for k in PER_IMAGE_ARRAYS))
        writer.append(*(data[k] for k in PER_IMAGE_ARRAYS))
    with pytest.raises(PoolError, match="dtype int32 is not supported"):
        PoolWriter(tmp_path / "q.zarr", channels=1, height=2, width=2, dtype="int32", classes=CLASSES)
    with pytest.raises(PoolError, match="reserved keys"):
        PoolWriter(tmp_path / "q.zarr", channels=1, height=2, width=2, dtype="uint8", classes=CLASSES,
                   attrs={"xal_pool": 2})


def test_open_errors_name_the_problem(tmp_path: Path, pool_path: Path) -> None:
    with pytest.raises(PoolError, match="does not exist"):
        Pool.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PoolError, match="no zarr.json"):
        Pool.open(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w", zarr_format=3)
    with pytest.raises(PoolError, match="no 'xal_pool' attribute"):
        Pool.open(tmp_path / "group.zarr")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(PoolError, match="cannot open it as a Zarr v3 group"):
        Pool.open(tmp_path / "broken.zarr")
    with pytest.raises(PoolError, match="mode must be 'r' or 'r\\+'"):
        Pool.open(pool_path, mode="w")
    zarr.open_group(str(pool_path), mode="r+").attrs["xal_pool"] = 7
    with pytest.raises(PoolError, match="format version 7 is not supported"):
        Pool.open(pool_path)


def test_open_rejects_inconsistent_arrays(pool_path: Path) -> None:
    group = zarr.open_group(str(pool_path), mode="r+")
    group["labels"].resize((69,))
    del group["rois"]
    group.create_array("rois", shape=(70, 6, 4), chunks=(16, 6, 4), dtype=bool)
    with pytest.raises(PoolError) as err:
        Pool.open(pool_path)
    message = str(err.value)
    assert "'labels' has shape (69,), expected (70,)" in message
    assert "'rois' has shape (70, 6, 4), expected (70, 6, 5)" in message
    assert "\n" not in message
    del group["ids"]
    with pytest.raises(PoolError, match="missing array 'ids'"):
        Pool.open(pool_path)


def test_open_rejects_different_chunk_lengths(tmp_path: Path, pool_path: Path) -> None:
    group = zarr.open_group(str(pool_path), mode="r+")
    split = group["split"][:]
    del group["split"]
    group.create_array("split", shape=(70,), chunks=(10,), dtype=np.uint8)[:] = split
    with pytest.raises(PoolError, match="'split' has 10 images per chunk, 'images' 16"):
        Pool.open(pool_path)


def test_validate_detects_corrupted_chunk(pool_path: Path) -> None:
    chunk = pool_path / "images" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    pool = Pool.open(pool_path)
    problems = pool.validate()
    assert len(problems) == 1
    assert problems[0].startswith("array 'images' chunk 1 (images 16..31) cannot be decoded")
    with pytest.raises(PoolError, match="array 'images' images 16..31 cannot be decoded .*checksum"):
        pool.read(16, 32)
    np.testing.assert_array_equal(pool.read(0, 16).images, make_arrays(70)["images"][:16])


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    data = make_arrays(40, "float16")
    data["images"][3, 0, 0, 0] = np.nan
    data["images"][30, 1, 2, 2] = np.inf
    data["labels"][[5, 6]] = [3, -2]
    data["split"][7] = 5
    data["has_roi"][0] = True          # image 0 has an empty ROI (rois[::4] are empty)
    data["has_roi"][1] = False         # image 1 has a non-empty ROI
    data["ids"][9] = data["ids"][2]
    data["ids"][11] = ""
    pool = write_pool(tmp_path / "p.zarr", data)
    (tmp_path / "p.zarr" / "split" / "c" / "2").unlink()  # a lost chunk reads as fill values (0)
    problems = pool.validate()
    assert problems == [
        "array 'split': 1 of 3 chunk(s) missing (they would read as fill values)",
        "images: non-finite pixels: 2 image(s) (index 3, 30)",
        "labels: outside -1..2: 2 image(s) (index 5, 6)",
        "split: value not in {0, 1, 2}: 1 image(s) (index 7)",
        "rois: has_roi is False but the ROI is not empty: 1 image(s) (index 1)",
        "rois: has_roi is True but the ROI is empty: 1 image(s) (index 0)",
        "ids: empty id: 1 image(s) (index 11)",
        "ids: 1 id(s) used more than once ('img_0002')",
    ]


def test_info_counts_and_subgroups(pool_path: Path) -> None:
    data = make_arrays(70)
    pool = Pool.open(pool_path, mode="r+")
    pool.group.create_group("scores").create_group("run1").create_array("dice", shape=(70,),
                                                                        dtype=np.float32)
    pool.group.create_group("al").create_group("exp_b")
    pool.group["al"].create_group("exp_a")
    reopened = Pool.open(pool_path)
    not_a_run = ("scores/run1: missing array(s) 'pred', 'entropy', 'margin', 'least_confidence', "
                 "'soft_dice', 'energy', 'hit', 'probs', 'done'; expected a score run's result arrays and "
                 "done flags")
    assert reopened.validate() == [not_a_run]
    info = reopened.info()
    assert info["n"] == 70 and info["shape"] == [2, 6, 5] and info["dtype"] == "uint8"
    assert info["score_runs"] == ["run1"] and info["al_experiments"] == ["exp_a", "exp_b"]
    assert info["other_members"] == []
    for code, name in enumerate(("train", "val", "test")):
        sel = data["split"] == code
        split = info["splits"][name]
        assert split["n"] == sel.sum()
        assert split["has_roi"] == data["has_roi"][sel].sum()
        assert split["unknown"] == (data["labels"][sel] == -1).sum()
        assert split["per_class"] == {c: int((data["labels"][sel] == k).sum()) for k, c in enumerate(CLASSES)}
    assert info["roi_coverage"]["has_roi"] == data["has_roi"].sum()
    assert info["chunking"] == {"images_per_chunk": 16, "chunks": 5, "chunk_bytes": 16 * 60}
    images = info["storage"]["images"]
    assert images["raw_bytes"] == 70 * 60 and images["ratio"] == images["stored_bytes"] / (70 * 60)
    assert json.loads(json.dumps(info)) == info  # what --json prints
    assert SPLIT_VAL == 1 and SPLIT_TEST == 2


def test_labelled_round_arrays(pool_path: Path) -> None:
    pool = Pool.open(pool_path, mode="r+")
    assert pool.labelled_round_array("e1") is None
    with pytest.raises(PoolError, match=r"no AL experiment 'e1' \(array al/e1/labelled_round missing; "
                                        r"experiments: none\); `xal-engine label"):
        pool.read_labelled_round("e1")
    rounds = pool.create_labelled_round("e1")
    assert rounds.chunks == (pool.chunk_size,)
    assert [type(c).__name__ for c in rounds.compressors] == ["BloscCodec", "Crc32cCodec"]
    rounds[[2, 5]] = [0, 1]
    got = Pool.open(pool_path).read_labelled_round("e1")
    assert got.dtype == np.int16 and got.shape == (pool.n,)
    assert np.flatnonzero(got >= 0).tolist() == [2, 5] and got[5] == 1 and got[0] == -1
    with pytest.raises(PoolError, match="experiments: e1"):
        pool.read_labelled_round("e2")
    pool.group["al/e1"].create_array("labelled_round", shape=(pool.n,), dtype=np.int32, overwrite=True)
    with pytest.raises(PoolError, match=r"al/e1/labelled_round is not an \(N,\) int16 array"):
        pool.read_labelled_round("e1")


def test_rows_are_found_taken_and_rewritten_chunk_by_chunk(pool_path: Path) -> None:
    data = make_arrays(70)  # what the fixture wrote: chunks of 16, so rows 64..69 are chunk 4
    pool = Pool.open(pool_path, mode="r+")
    assert pool.find_ids(["img_0069", "nope", "img_0003"]).tolist() == [69, -1, 3]
    assert pool.take("ids", np.array([5, 0])).tolist() == ["img_0005", "img_0000"]
    before = {str(p.relative_to(pool_path)): p.read_bytes() for p in pool_path.rglob("*") if p.is_file()}
    index = np.array([3, 17, 20, 69])  # chunks 0, 1, 1, 4
    values = ((data["labels"][index] + 2) % 3).astype(np.int16)  # each differs from the stored label
    assert pool.write_rows("labels", index, values) == 3
    # has_roi of chunk 4 all False: the fill value, still written as a chunk
    assert pool.write_rows("has_roi", np.arange(64, 70), np.zeros(6, dtype=bool)) == 1
    assert pool.write_rows("labels", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int16)) == 0
    after = {str(p.relative_to(pool_path)): p.read_bytes() for p in pool_path.rglob("*") if p.is_file()}
    assert sorted(k for k in after if after[k] != before.get(k)) == ["has_roi/c/4", "labels/c/0", "labels/c/1",
                                                                     "labels/c/4"]
    assert after.keys() == before.keys()
    labels = data["labels"].copy()
    labels[index] = values
    reopened = Pool.open(pool_path)
    assert np.array_equal(reopened.column("labels"), labels)
    assert np.array_equal(reopened.column("has_roi"), np.r_[data["has_roi"][:64], np.zeros(6, dtype=bool)])
    assert np.array_equal(pool.take("labels", index), values)
    with pytest.raises(PoolError, match=r"is open read-only; open it with mode 'r\+' to write 'labels'"):
        reopened.write_rows("labels", index, np.zeros(4, dtype=np.int16))
    with pytest.raises(PoolError, match="'scores' is not a per-image array"):
        pool.write_rows("scores", index, np.zeros(4))


def test_mark_labelled_creates_then_updates_the_rounds(pool_path: Path) -> None:
    experiment = Pool.open(pool_path, mode="r+").experiment("e1")
    new = experiment.read_labelled_round(missing_ok=True)  # a new experiment: nothing labelled
    assert new.dtype == np.int16 and new.tolist() == [-1] * 70 and experiment.labelled_round_array() is None
    assert experiment.mark_labelled(np.array([1, 40]), np.array([0, 2], dtype=np.int16)) == 2  # chunks 0, 2
    assert experiment.mark_labelled(np.array([2]), np.array([3], dtype=np.int16)) == 1
    rounds = Pool.open(pool_path).read_labelled_round("e1")
    assert np.flatnonzero(rounds >= 0).tolist() == [1, 2, 40] and rounds[[1, 2, 40]].tolist() == [0, 3, 2]
