"""Missing and damaged chunks of the pool, of score runs and of AL arrays raise instead of reading as
fill values; `pool validate` checks score runs and AL arrays too."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from xal_engine.cli import main
from xal_engine.core.fields import FIELDS
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.errors import PoolError
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import Pool, PoolWriter
from xal_engine.store.score_run import ScoreRun

UNIT, N, CLASSES = 8, 24, ("a", "b", "c")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 3-chunk pool (all splits, some ROIs) with a complete score run "r", and a model."""
    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(0)
    pool = root / "pool.zarr"
    with PoolWriter(pool, channels=1, height=16, width=16, dtype=np.uint8, classes=list(CLASSES),
                    chunk_size=UNIT) as w:
        has_roi = np.arange(N) % 3 != 0
        rois = np.zeros((N, 16, 16), dtype=bool)
        rois[has_roi, 4:12, 4:12] = True
        w.append(rng.integers(0, 255, (N, 1, 16, 16), dtype=np.uint8), rois, has_roi,
                 np.full(N, -1, dtype=np.int16), [f"i{i}" for i in range(N)],
                 (np.arange(N) % 3).astype(np.uint8))
        w.close()
    torch.manual_seed(0)
    model = root / "model.pt"
    save_checkpoint(model, build_model("resnet18", 3, 1),
                    Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=CLASSES,
                               target_layer="layer2"))
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="r", batch_size=UNIT, num_workers=0))
    return root, pool, model


@pytest.fixture
def pool_copy(scored, tmp_path):
    _, pool, model = scored
    shutil.copytree(pool, tmp_path / "pool.zarr")
    return tmp_path / "pool.zarr", model


def select(pool: Path, out: Path) -> int:
    return main(["select", "--pool", str(pool), "--run", "r", "--budget", "2", "--out", str(out)])


def one_line_error(capsys, *parts: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(p in err for p in parts), err


def test_a_deleted_split_chunk_raises_on_read_and_select_refuses(pool_copy, tmp_path, capsys):
    pool, _ = pool_copy
    (pool / "split" / "c" / "1").unlink()
    p = Pool.open(pool)
    for read in (lambda: p.column("split"), lambda: p.read(8, 16), lambda: p.take("split", np.array([9]))):
        with pytest.raises(PoolError, match=r"array 'split' chunk 1 \(images 8\.\.15\).*pool validate"):
            read()
    assert p.read(0, 8).split.shape == (8,) and p.take("split", np.array([0, 17])).shape == (2,)
    assert select(pool, tmp_path / "b.csv") == 2
    one_line_error(capsys, "'split'", "chunk 1", "xal-engine pool validate")
    assert not (tmp_path / "b.csv").exists()


def test_open_lists_no_chunks_and_a_chunk_lost_after_open_is_still_caught(pool_copy, monkeypatch):
    """Opening a pool reads no chunk listing (a 1M-image pool has 375k chunk files); each read checks
    the chunks it needs, so a chunk deleted after open is refused too, not read as fill values."""
    pool, _ = pool_copy
    monkeypatch.setattr("xal_engine.store.pool.missing_chunks", lambda *a, **k: pytest.fail("listed"))
    p = Pool.open(pool)
    assert p.read(0, 8).split.shape == (8,)  # chunk 0 checked (a stat) and remembered
    (pool / "split" / "c" / "1").unlink()
    (pool / "images" / "c" / "2" / "0" / "0" / "0").unlink()
    assert p.missing_chunks("split") == [1] and p.missing_chunks("split", [0, 2, 1]) == [1]
    assert p.missing_chunks("images", range(1, 3)) == [2] and p.missing_chunks("labels") == []
    with pytest.raises(PoolError, match=r"array 'split' chunk 1 \(images 8\.\.15\)"):
        p.read(8, 16)
    with pytest.raises(PoolError, match=r"array 'images' chunk 2 "):
        p.read_arrays(8, 24, ["images"])


def test_a_deleted_images_chunk_stops_scoring(pool_copy, capsys):
    pool, model = pool_copy
    (pool / "images" / "c" / "2" / "0" / "0" / "0").unlink()
    rc = main(["score", "--pool", str(pool), "--model", str(model), "--run", "new", "--batch-size",
               str(UNIT), "--unit-size", str(UNIT), "--num-workers", "0", "--device", "cpu"])
    assert rc == 2
    one_line_error(capsys, "'images'", "chunk 2", "xal-engine pool validate")
    assert not ScoreRun.open(Pool.open(pool).group, "new").done_mask()[2]


def test_a_deleted_chunk_of_a_done_unit_is_refused(pool_copy, tmp_path, capsys):
    pool, _ = pool_copy
    (pool / "scores" / "r" / "entropy" / "c" / "1").unlink()
    with pytest.raises(PoolError, match=r"array 'entropy' chunk 1 .*pool validate"):
        ScoreRun.open(Pool.open(pool).group, "r").read()
    assert select(pool, tmp_path / "b.csv") == 2
    one_line_error(capsys, "'entropy'", "chunk 1", "xal-engine pool validate")
    problems = Pool.open(pool).validate(show_progress=False)
    assert any("scores/r/entropy" in p and "missing" in p and "chunk 1" in p for p in problems), problems


def test_a_flipped_byte_in_a_score_chunk_raises(pool_copy):
    pool, _ = pool_copy
    chunk = pool / "scores" / "r" / "entropy" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=r"array 'entropy' cannot be decoded"):
        ScoreRun.open(Pool.open(pool).group, "r").read()
    problems = Pool.open(pool).validate(show_progress=False)
    assert any("scores/r/entropy" in p and "chunk 0" in p for p in problems), problems


def test_score_and_al_arrays_are_checksummed_and_chunked_as_before(scored):
    _, pool, _ = scored
    group = Pool.open(pool).group
    run = group["scores"]["r"]
    for name in [f.name for f in FIELDS if not f.optional] + ["done"]:
        assert any(type(c).__name__ == "Crc32cCodec" for c in run[name].compressors), name
        assert run[name].chunks[0] == (1 if name == "done" else UNIT)
        keys = sorted(p.name for p in (pool / "scores" / "r" / name / "c").iterdir())
        assert keys == [str(i) for i in range(math.ceil(N / UNIT))], name
    assert Pool.open(pool).validate(show_progress=False) == []


def old_style_run(pool: Path, name: str, values: dict[str, np.ndarray], done: int) -> None:
    """A run as written before checksums: zarr's default codecs, chunks equal to fill skipped."""
    group = zarr.open_group(str(pool / "scores"), mode="a").require_group(name)
    for field in (f for f in FIELDS if not f.optional):
        value = values[field.name]
        array = group.create_array(field.name, shape=value.shape, chunks=(UNIT, *value.shape[1:]),
                                   dtype=field.dtype, fill_value=field.fill)
        array[:done * UNIT] = value[:done * UNIT]
    flags = group.create_array("done", shape=(3,), chunks=(1,), dtype="bool", fill_value=False)
    flags[:done] = True
    group.attrs["unit_size"] = UNIT


def test_an_old_run_without_checksums_still_reads(pool_copy):
    pool, _ = pool_copy
    values = ScoreRun.open(Pool.open(pool).group, "r").read()
    values["dice"][:UNIT] = np.nan  # a unit without ROIs: its dice chunk equals the fill, never stored
    old_style_run(pool, "old", values, done=2)
    assert not (pool / "scores" / "old" / "dice" / "c" / "0").exists()
    got = ScoreRun.open(Pool.open(pool).group, "old").read()
    np.testing.assert_array_equal(got["entropy"][:16], values["entropy"][:16])
    assert np.isnan(got["entropy"][16:]).all()  # unit 2 is not done
    problems = Pool.open(pool).validate(show_progress=False)
    assert not any("scores/old" in p and ("missing" in p or "decoded" in p) for p in problems), problems


def test_validate_reports_out_of_range_scores_and_rounds(pool_copy):
    pool, _ = pool_copy
    p = Pool.open(pool, "r+")
    run = p.group["scores"]["r"]
    run["entropy"][3] = 62.18
    run["probs"][5] = np.array([0.9, 0.9, 0.9], dtype=np.float16)
    run["pred"][6] = 7
    has_roi = p.column("has_roi")
    run["dice"][int(np.flatnonzero(~has_roi)[0])] = 0.5
    run["margin"][7] = -0.5
    p.experiment("e").mark_labelled(np.array([1, 2]), np.array([0, -3], dtype=np.int16))
    problems = "\n".join(Pool.open(pool).validate(show_progress=False))
    for expected in ("scores/r/entropy: outside [0, ln 3]: 1 image(s) (index 3)",
                     "scores/r/probs: outside [0, 1] or not summing to 1: 1 image(s) (index 5)",
                     "scores/r/pred: outside 0..2: 1 image(s) (index 6)",
                     "scores/r/margin: outside [0, 1]: 1 image(s) (index 7)",
                     "scores/r/dice: not NaN where has_roi is False: 1 image(s)",
                     "al/e/labelled_round: below -1: 1 image(s) (index 2)"):
        assert expected in problems, problems
