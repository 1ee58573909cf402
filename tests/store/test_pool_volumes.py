"""Pool format version 2 (volumes): written, read, checked, resumed and summarised like images;
version-1 pools are unchanged, and a version that disagrees with the images' rank is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from xal_engine.cli import main
from xal_engine.errors import PoolError
from xal_engine.store import (
    FORMAT_VERSION,
    PER_IMAGE_ARRAYS,
    VOLUME_FORMAT_VERSION,
    Pool,
    PoolWriter,
    images_per_chunk,
    partial_path,
)

CLASSES = ["a", "b"]
SHAPE = (2, 5, 6, 7)  # C, D, H, W: odd, non-cubic


def volumes(n: int, seed: int = 0, dtype: str = "uint8") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rois = rng.random((n, *SHAPE[1:])) < 0.2
    has_roi = rng.random(n) < 0.7
    rois[~has_roi] = False
    rois[has_roi, 0, 0, 0] = True  # has_roi <=> a non-empty ROI
    images = rng.integers(0, 255, (n, *SHAPE)).astype(dtype)
    return {"images": images, "rois": rois, "has_roi": has_roi,
            "labels": rng.integers(-1, 2, n).astype(np.int16), "ids": np.array([f"v{i:03d}" for i in range(n)]),
            "split": rng.integers(0, 3, n).astype(np.uint8)}


def writer(path: Path, **kw) -> PoolWriter:
    c, d, h, w = SHAPE
    return PoolWriter(path, channels=c, depth=d, height=h, width=w, dtype=kw.pop("dtype", "uint8"),
                      classes=CLASSES, **kw)


def test_round_trip_and_layout(tmp_path: Path) -> None:
    data = volumes(21)
    with writer(tmp_path / "v.zarr", chunk_size=4) as w:
        w.append(*(data[k][:10] for k in PER_IMAGE_ARRAYS))
        w.append(*(data[k][10:] for k in PER_IMAGE_ARRAYS))
    pool = Pool.open(tmp_path / "v.zarr")
    assert pool.attrs["xal_pool"] == VOLUME_FORMAT_VERSION == 2
    assert (pool.n, pool.channels, pool.spatial, pool.depth, pool.height, pool.width) == (21, 2, (5, 6, 7), 5, 6, 7)
    assert pool.is_volume and pool.kind == "volume"
    assert pool.arrays["images"].chunks == (4, *SHAPE) and pool.arrays["rois"].chunks == (4, *SHAPE[1:])
    batch = pool.read(3, 18)  # across chunk boundaries
    for name in PER_IMAGE_ARRAYS:
        np.testing.assert_array_equal(getattr(batch, name), data[name][3:18], err_msg=name)
    np.testing.assert_array_equal(pool.take("rois", np.array([20, 1])), data["rois"][[20, 1]])
    assert pool.validate() == []


def test_volume_chunk_sizes() -> None:
    assert images_per_chunk(1, 32, 32, 32, "uint8") == 128    # 32 KiB each: 4 MiB
    assert images_per_chunk(3, 64, 64, 64, "uint8") == 4      # 768 KiB each: 5 fit -> 4 (3 MiB)
    assert images_per_chunk(3, 96, 96, 96, "uint8") == 1      # 2.6 MiB: one per chunk
    assert images_per_chunk(3, 128, 128, 128, "float16") == 1  # 12 MiB: still whole, one per chunk
    assert images_per_chunk(1, 64, 64, "uint8") == 1024       # 2-D unchanged


def test_info_and_cli_say_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = volumes(9)
    with writer(tmp_path / "v.zarr", chunk_size=4) as w:
        w.append(*(data[k] for k in PER_IMAGE_ARRAYS))
    info = Pool.open(tmp_path / "v.zarr").info()
    assert info["format_version"] == 2 and info["kind"] == "volume" and info["shape"] == list(SHAPE)
    assert info["chunking"] == {"images_per_chunk": 4, "chunks": 3, "chunk_bytes": 4 * 2 * 5 * 6 * 7}
    assert main(["pool", "info", str(tmp_path / "v.zarr")]) == 0
    out = capsys.readouterr().out
    assert "pool format v2" in out and "volumes: 9 x 2x5x6x7 uint8" in out


def test_validate_checks_volume_values(tmp_path: Path) -> None:
    data = volumes(8, dtype="float16")
    data["images"][5, 1, 4, 5, 6] = np.nan  # one voxel in the last corner
    data["has_roi"][2] = True
    data["rois"][2] = False  # has_roi without an ROI
    with writer(tmp_path / "v.zarr", dtype="float16", chunk_size=4) as w:
        w.append(*(data[k] for k in PER_IMAGE_ARRAYS))
    problems = Pool.open(tmp_path / "v.zarr").validate()
    assert "images: non-finite pixels: 1 image(s) (index 5)" in problems
    assert "rois: has_roi is True but the ROI is empty: 1 image(s) (index 2)" in problems


def test_appends_of_the_wrong_rank_are_refused(tmp_path: Path) -> None:
    data = volumes(3)
    with pytest.raises(PoolError, match=r"appended 'images' has shape \(3, 2, 6, 7\), expected \(3, 2, 5, 6, 7\)"), \
            writer(tmp_path / "v.zarr") as w:
        w.append(data["images"][:, :, 0], *(data[k] for k in PER_IMAGE_ARRAYS[1:]))


def test_resume_continues_a_volume_write(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    data = volumes(11)
    with pytest.raises(RuntimeError), writer(path, chunk_size=4) as w:
        w.append(*(data[k][:9] for k in PER_IMAGE_ARRAYS))
        raise RuntimeError("killed")
    with writer(path, chunk_size=4, resume=True) as w:
        assert w.n_written == 8
        w.append(*(data[k][8:] for k in PER_IMAGE_ARRAYS))
    batch = Pool.open(path).read(0, 11)
    np.testing.assert_array_equal(batch.images, data["images"])
    with pytest.raises(RuntimeError), writer(tmp_path / "w.zarr") as w:
        raise RuntimeError("killed")
    with pytest.raises(PoolError, match="cannot be resumed"):  # a 2-D write cannot continue a volume one
        PoolWriter(tmp_path / "w.zarr", channels=2, height=6, width=7, dtype="uint8", classes=CLASSES, resume=True)
    assert partial_path(tmp_path / "w.zarr").exists()


def _set_version(path: Path, version: int) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["xal_pool"] = version
    (path / "zarr.json").write_text(json.dumps(meta))


def test_a_version_that_disagrees_with_the_rank_is_refused(tmp_path: Path) -> None:
    data = volumes(4)
    with writer(tmp_path / "v.zarr") as w:
        w.append(*(data[k] for k in PER_IMAGE_ARRAYS))
    _set_version(tmp_path / "v.zarr", FORMAT_VERSION)
    with pytest.raises(PoolError, match=r"version 1 stores images \(N, C, H, W\), but array 'images' has shape "
                                        r"\(4, 2, 5, 6, 7\)"):
        Pool.open(tmp_path / "v.zarr")
    with PoolWriter(tmp_path / "i.zarr", channels=1, height=4, width=4, dtype="uint8", classes=CLASSES) as w:
        w.append(np.zeros((2, 1, 4, 4), np.uint8), np.zeros((2, 4, 4), bool), np.zeros(2, bool),
                 np.zeros(2, np.int16), ["x", "y"], np.zeros(2, np.uint8))
    assert Pool.open(tmp_path / "i.zarr").attrs["xal_pool"] == 1 and not Pool.open(tmp_path / "i.zarr").is_volume
    _set_version(tmp_path / "i.zarr", VOLUME_FORMAT_VERSION)
    with pytest.raises(PoolError, match=r"version 2 stores volumes"):
        Pool.open(tmp_path / "i.zarr")
    _set_version(tmp_path / "i.zarr", 3)
    with pytest.raises(PoolError, match=r"version 3 is not supported \(this xal-engine reads versions 1, 2\)"):
        Pool.open(tmp_path / "i.zarr")


def test_a_six_dimensional_images_array_is_refused(tmp_path: Path) -> None:
    data = volumes(2)
    with writer(tmp_path / "v.zarr") as w:
        w.append(*(data[k] for k in PER_IMAGE_ARRAYS))
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="r+")
    del group["images"]
    group.create_array("images", shape=(2, 1, 2, 5, 6, 7), chunks=(2, 1, 2, 5, 6, 7), dtype="uint8")
    with pytest.raises(PoolError, match=r"expected \(N, C, H, W\) or \(N, C, D, H, W\)"):
        Pool.open(tmp_path / "v.zarr")
