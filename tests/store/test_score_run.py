"""Score run creation: a killed creation is created again, concurrent creation happens once, a shard
cleans only its own half-written chunks, a label change makes a run stale; a unit whose write fails
stays pending; a killed pool swap is finished by the next writer."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xal_engine.core.fields import PerImage
from xal_engine.errors import PoolError, XalError
from xal_engine.store import Pool, PoolWriter
from xal_engine.store.al_state import GENERATION_ATTR, bump_generation, pool_generation
from xal_engine.store.score_run import GENERATION_KEY, ScoreRun, UnitResult

N, CHUNK = 20, 4  # 5 work units
FINGERPRINT = {"model_sha256": "ab", "threshold": 0.5}


def write_pool(path: Path, n: int = N, overwrite: bool = False) -> Path:
    with PoolWriter(path, channels=1, height=8, width=8, dtype=np.uint8, classes=["a", "b"],
                    chunk_size=CHUNK, overwrite=overwrite) as w:
        w.append(np.zeros((n, 1, 8, 8), np.uint8), np.zeros((n, 8, 8), bool), np.zeros(n, bool),
                 np.full(n, -1, np.int16), [f"i{k}" for k in range(n)], np.zeros(n, np.uint8))
    return path


def create(pool: Path, fingerprint: dict = FINGERPRINT, overwrite: bool = False) -> ScoreRun:
    return ScoreRun.create_or_resume(Pool.open(pool, mode="r+").group, "r", n=N, n_classes=2, unit_size=CHUNK,
                                     fingerprint=fingerprint, attrs={"model": "m"}, overwrite=overwrite)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return write_pool(tmp_path / "pool.zarr")


KILL_BEFORE_PUBLISHING = """
    import os, pathlib, sys
    from xal_engine.store import Pool
    from xal_engine.store.score_run import ScoreRun

    target = pathlib.Path(sys.argv[2]).absolute()
    replace = pathlib.Path.replace

    def dying(self, dst):
        if pathlib.Path(dst).absolute() == target:  # killed with the file written, not yet in place
            os.kill(os.getpid(), 9)
        return replace(self, dst)

    pathlib.Path.replace = dying
    ScoreRun.create_or_resume(Pool.open(sys.argv[1], mode="r+").group, "r", n=20, n_classes=2, unit_size=4,
                              fingerprint={"model_sha256": "ab", "threshold": 0.5}, attrs={"model": "m"})
"""


@pytest.mark.parametrize("key", ["zarr.json", "probs/zarr.json", "dice/zarr.json", "done/zarr.json"])
def test_a_run_killed_while_created_is_created_again_by_the_same_rerun(pool: Path, key: str) -> None:
    run_dir = pool / "scores" / "r"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_BEFORE_PUBLISHING), str(pool),
                           str(run_dir / key)], check=False, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert list(run_dir.rglob("*.partial"))  # the metadata file the kill left half-published
    run = create(pool)
    assert not run.done_mask().any() and run.group.attrs["fingerprint"] == FINGERPRINT
    assert {"probs", "pred", "dice", "done"} <= set(run.group.array_keys())
    assert not list(run_dir.rglob("*.partial"))
    assert create(pool).group.attrs["fingerprint"] == FINGERPRINT  # and it resumes from now on


def test_a_kill_while_scores_itself_is_first_created_leaves_nothing_after_the_rerun(pool: Path) -> None:
    scores = pool / "scores"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_BEFORE_PUBLISHING), str(pool),
                           str(scores / "zarr.json")], check=False, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in scores.iterdir()] and all(p.name.startswith("zarr.") for p in scores.iterdir())
    assert list(scores.glob("*.partial"))
    run = create(pool)
    assert not run.done_mask().any() and run.group.attrs["fingerprint"] == FINGERPRINT
    assert not list(scores.rglob("*.partial")) and (scores / "zarr.json").is_file()
    assert Pool.open(pool).validate() == []


def test_a_created_run_resumes_and_keeps_its_done_units(pool: Path) -> None:
    run = create(pool)
    run.group["done"][1] = True
    assert create(pool).pending_units() == [0, 2, 3, 4]
    with pytest.raises(XalError, match=r"^run 'r' exists in this pool with a different configuration "
                                       r"\(threshold\); choose another --run or pass --overwrite$"):
        create(pool, {**FINGERPRINT, "threshold": 0.6})
    assert create(pool, {**FINGERPRINT, "threshold": 0.6}, overwrite=True).pending_units() == [0, 1, 2, 3, 4]


def unit_rows(run: ScoreRun, unit: int, value: float) -> UnitResult:
    """Unit ``unit``'s results, every field ``value`` (pred the value as an int), in stored dtypes."""
    start, stop = run.unit_range(unit)
    tails = {"probs": (2,)}
    return PerImage(**{f.name: np.full((stop - start, *tails.get(f.name, ())), value, dtype=f.dtype)
                       for f in run.fields})


def test_only_a_run_just_created_counts_as_created_and_completeness_reads_other_shards_flags(pool: Path) -> None:
    """A run made by this call is `created` (its plan skips reading `done`); a resumed one is not. It
    is complete once every unit is done, whoever marked it: this object's writes, or another
    shard's, read from the stored flags."""
    mine = create(pool)
    assert mine.created and not create(pool).created
    other = create(pool)
    for unit in mine.shard_units(0, 2):
        mine.write_unit(unit, unit_rows(mine, unit, 0.25))
    assert not mine.is_complete() and mine.pending_units(1, 2) == [2, 3, 4]
    for unit in other.shard_units(1, 2):
        other.write_unit(unit, unit_rows(other, unit, 0.5))
    assert mine.is_complete() and other.is_complete()
    dice = create(pool).read(("dice",))["dice"]
    np.testing.assert_array_equal(dice, np.repeat(np.float32([0.25, 0.5]), [8, 12]))


def test_a_unit_whose_write_fails_stays_pending_and_its_rerun_stores_it(pool: Path) -> None:
    """write_unit stores a unit's arrays concurrently: one array's failure (its chunk's path is a
    folder) is raised once the others ended, the unit is not marked done, and writing it again stores
    every array. A result of the wrong shape is refused before anything is written."""
    run = create(pool)
    rows = unit_rows(run, 1, 0.75)
    wrong = type(rows)(**{**{f.name: rows[f.name] for f in run.fields}, "probs": np.zeros((CHUNK, 3), np.float16)})
    with pytest.raises(ValueError, match=r"^unit 1: field 'probs' has shape \(4, 3\), expected \(4, 2\)$"):
        run.write_unit(1, wrong)
    blocked = pool / "scores" / "r" / "dice" / "c" / "1"
    blocked.mkdir(parents=True)
    with pytest.raises(OSError):
        run.write_unit(1, rows)
    assert create(pool).pending_units() == [0, 1, 2, 3, 4] and not run.done_mask()[1]
    blocked.rmdir()
    run.write_unit(1, rows)
    again = create(pool)
    assert again.pending_units() == [0, 2, 3, 4]
    np.testing.assert_array_equal(again.take("probs", np.arange(4, 8)), np.full((4, 2), 0.75, np.float16))
    np.testing.assert_array_equal(again.take("dice", np.arange(4, 8)), np.full(4, 0.75, np.float32))


def test_a_shard_cleans_only_the_half_written_chunks_of_its_own_units(pool: Path) -> None:
    run = create(pool)
    root = pool / "scores" / "r"
    mine = [root / "dice" / "c" / "1.aa.partial", root / "probs" / "c" / "0" / "0.bb.partial"]
    theirs = [root / "dice" / "c" / "3.cc.partial", root / "probs" / "c" / "4" / "0.dd.partial",
              root / "done" / "c" / "2.ee.partial"]
    for path in mine + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"in flight")
    assert run.clean_partial_files(run.shard_units(0, 2)) == 2  # units 0 and 1 of 0..4
    assert not any(p.exists() for p in mine) and all(p.exists() for p in theirs)
    assert run.clean_partial_files() == 3


def test_a_run_of_an_older_pool_generation_is_refused_as_stale(pool: Path) -> None:
    create(pool)  # scored at generation 0: no generation in the fingerprint
    assert pool_generation(Pool.open(pool)) == 0 and "labels_history" not in Pool.open(pool).group
    assert bump_generation(Pool.open(pool, mode="r+")) == 1 and pool_generation(Pool.open(pool)) == 1
    assert Pool.open(pool).group["labels_history"].attrs[GENERATION_ATTR] == 1
    with pytest.raises(XalError, match=r"^pool changed since run 'r' was scored \(generation 0 -> 1\); "
                                       r"rescore with --overwrite or another --run$"):
        create(pool, {**FINGERPRINT, GENERATION_KEY: 1})
    run = create(pool, {**FINGERPRINT, GENERATION_KEY: 1}, overwrite=True)
    assert run.group.attrs["fingerprint"][GENERATION_KEY] == 1
    assert create(pool, {**FINGERPRINT, GENERATION_KEY: 1}).n_units == 5  # same generation: resumes
    with pytest.raises(XalError, match=r"generation 1 -> 0"):
        create(pool, FINGERPRINT)


KILL_IN_SWAP = """
    import os, pathlib, shutil, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from test_score_run import write_pool
    from xal_engine.store import writer

    where = sys.argv[2]
    if where == "rename":  # killed with the old pool moved away, the new one not yet in place
        rename = pathlib.Path.rename
        def dying(self, dst):
            if self.name.endswith(".partial"):
                os.kill(os.getpid(), 9)
            return rename(self, dst)
        pathlib.Path.rename = dying
    else:  # killed with the new pool in place, the old one not yet deleted
        writer.shutil.rmtree = lambda path, *a, **k: os.kill(os.getpid(), 9)
    write_pool(pathlib.Path(sys.argv[1]), n=12, overwrite=True)
"""


@pytest.mark.parametrize("where", ["rename", "rmtree"])
def test_a_writer_finishes_an_overwrite_killed_in_its_swap(pool: Path, where: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_IN_SWAP), str(pool), where,
                           str(Path(__file__).parent)], check=False, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert list(pool.parent.glob("pool.zarr.replaced-*"))
    with pytest.raises(PoolError, match="already exists"):
        write_pool(pool)  # a writer of the same path, refused, still finishes the swap first
    assert not list(pool.parent.glob("pool.zarr.replaced-*")) and not (pool.parent / "pool.zarr.partial").exists()
    assert Pool.open(pool).n == 12  # the new pool


def test_the_creation_lock_is_held_by_one_at_a_time_and_deleted_on_release(tmp_path: Path) -> None:
    import threading

    from xal_engine.store.locks import waiting_lock

    path, order, entered = tmp_path / "pool.zarr.score-create.lock", [], threading.Event()

    def second() -> None:
        entered.set()
        with waiting_lock(path):
            order.append("second holds")

    with waiting_lock(path):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait()
        order.append("first releases")
    thread.join()
    assert order == ["first releases", "second holds"] and not path.exists()


@pytest.mark.parametrize("optional", [{}, {"cam_shape": (3, 5), "embedding_dim": 7, "mc": True}],
                         ids=["required", "every-optional-field"])
def test_a_run_is_created_with_the_metadata_one_create_array_per_field_gives(pool: Path, optional: dict) -> None:
    """The field arrays are created together (create_hierarchy from zarr.json documents drawn up by
    hand): each zarr.json equals the one a create_array of that field writes (float16, int16, float32,
    bool; 1-D to 3-D), and the group and done are as before."""
    import json
    import math

    import zarr

    from xal_engine.core.fields import Layout
    from xal_engine.store.format import compressors

    ScoreRun.create_or_resume(Pool.open(pool, mode="r+").group, "r", n=N, n_classes=2, unit_size=CHUNK,
                              fingerprint=FINGERPRINT, attrs={"model": "m"}, **optional)
    group = Pool.open(pool, mode="r+").group["scores"].create_group("by-hand", attributes={"model": "m"})
    layout = Layout(n_classes=2, **optional)
    for field in layout.fields:
        tail, dtype = layout.tail(field), np.dtype(field.dtype)
        group.create_array(field.name, shape=(N, *tail), chunks=(CHUNK, *tail), dtype=dtype, fill_value=field.fill,
                           compressors=compressors(dtype, "lz4", 5))
    group.create_array("done", shape=(math.ceil(N / CHUNK),), chunks=(1,), dtype="bool", fill_value=False,
                       compressors=compressors(np.dtype(bool), "lz4", 5))
    made, by_hand = pool / "scores" / "r", pool / "scores" / "by-hand"
    names = sorted(p.relative_to(made) for p in made.rglob("zarr.json") if p.parent != made)
    assert names == sorted(p.relative_to(by_hand) for p in by_hand.rglob("zarr.json") if p.parent != by_hand)
    assert len(names) == len(layout.fields) + 1
    for name in names:
        assert json.loads((made / name).read_text()) == json.loads((by_hand / name).read_text()), name
    assert isinstance(zarr.open_group(made, mode="r")["dice"], zarr.Array)
