"""The scoring pipeline's layout and feed: work units of many pool chunks (sizes, resume after SIGKILL,
shards, old one-chunk runs), loader items, the arrays the loader reads, the asynchronous result
copies and the per-run scorer set-up."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_score import UNIT, make_model, make_pool, read_run, wait_for_done_units

from xal_engine.core import fields
from xal_engine.core.fields import REQUIRED_NAMES, BatchScores
from xal_engine.core.inputs import ModelInputs, model_input, normalization_tensors, to_unit_float
from xal_engine.core.models import load_checkpoint
from xal_engine.core.scoring import score_batch
from xal_engine.errors import PoolError, XalError
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.jobs.streaming import (
    ResultCopies,
    Scorer,
    UnitAssembler,
    all_items,
    unit_items,
)
from xal_engine.store import Pool
from xal_engine.store.dataset import UnitRanges, read_ahead
from xal_engine.store.score_run import DEFAULT_UNIT_IMAGES, ScoreRun, unit_size_for


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 60-image pool in 8-image chunks, its reference run with one chunk per unit (``ref``), and a run
    with the default layout (``default``)."""
    root = tmp_path_factory.mktemp("units")
    pool, model = make_pool(root / "pool.zarr", n=60), make_model(root / "model.pt")
    score_pool(pool, model, ScoreConfig(run="ref", unit_size=UNIT, batch_size=UNIT, num_workers=0))
    score_pool(pool, model, ScoreConfig(run="default", batch_size=UNIT, num_workers=0))
    return pool, model


def assert_equal_runs(pool: Path, a: str, b: str) -> None:
    want, got = read_run(pool, a), read_run(pool, b)
    for name in REQUIRED_NAMES:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)


@pytest.mark.parametrize(("chunk", "n", "requested", "want"), [
    (16, 1_000_000, None, 4096),   # 256 chunks of 16
    (1024, 1_000_000, None, 4096),  # 4 chunks of 1024
    (1000, 1_000_000, None, 5000),  # whole chunks: 5 of 1000 hold 4096
    (8, 60, None, 64),              # never more than the pool, rounded up to a chunk
    (8, 60, 20, 24),                # --unit-size 20: 3 chunks
    (8, 60, 1, 8),                  # at least one chunk
])
def test_unit_size_is_whole_chunks_holding_the_request(chunk, n, requested, want):
    assert unit_size_for(chunk, n, requested) == want
    assert DEFAULT_UNIT_IMAGES == 4096


def test_unit_size_below_one_is_refused():
    with pytest.raises(XalError, match="--unit-size must be at least 1"):
        unit_size_for(8, 60, 0)
    with pytest.raises(XalError, match="--unit-size must be at least 1"):
        ScoreConfig(unit_size=0)


def test_a_default_run_is_one_unit_chunked_to_match_and_equals_one_chunk_units(scored):
    pool, _ = scored
    run = ScoreRun.open(Pool.open(pool).group, "default")
    assert (run.unit_size, run.n_units) == (64, 1)
    assert run.group["dice"].chunks == (64,) and run.group["probs"].chunks == (64, 3)
    assert run.group.attrs["unit_size"] == 64
    assert_equal_runs(pool, "ref", "default")


def test_items_are_chunk_aligned_about_a_batch_and_never_cross_a_unit(scored):
    pool, _ = scored
    run = ScoreRun(Pool.open(pool).group["scores"]["default"], "x", 60, 24)  # units [0,24) [24,48) [48,60)
    assert unit_items(run, [0, 1, 2], chunk_size=8, batch_size=20) == [
        (0, 0, 16), (0, 16, 24), (1, 24, 40), (1, 40, 48), (2, 48, 60)]
    assert unit_items(run, [2], chunk_size=8, batch_size=3) == [(2, 48, 56), (2, 56, 60)]  # one chunk at least
    assert all_items(Pool.open(pool), batch_size=32) == [(0, 0, 32), (0, 32, 60)]


def test_multi_chunk_units_in_small_batches_equal_one_chunk_units(scored):
    pool, model = scored
    summary = score_pool(pool, model, ScoreConfig(run="u3", unit_size=20, batch_size=5, num_workers=1))
    assert summary.units == 3 and summary.images == 60 and summary.complete
    assert ScoreRun.open(Pool.open(pool).group, "u3").unit_size == 24
    assert_equal_runs(pool, "ref", "u3")


def test_shards_of_multi_chunk_units_together_equal_one_run(scored):
    pool, model = scored
    config = {"run": "sh", "unit_size": 16, "batch_size": UNIT, "num_workers": 0, "num_shards": 2}
    first = score_pool(pool, model, ScoreConfig(shard_id=0, **config))
    assert (first.units, first.images, first.complete) == (2, 32, False)  # units 0, 1 of 4
    second = score_pool(pool, model, ScoreConfig(shard_id=1, **config))
    assert (second.units, second.images, second.complete) == (2, 28, True)
    assert_equal_runs(pool, "ref", "sh")


@pytest.mark.parametrize(("shard_id", "num_shards", "message"), [
    (0, 0, "--num-shards must be at least 1, got 0"),
    (2, 2, r"--shard-id must lie in \[0, --num-shards\), got 2 of 2"),
    (-1, 3, r"--shard-id must lie in \[0, --num-shards\), got -1 of 3"),
])
def test_a_bad_shard_is_one_line_naming_the_flag(shard_id, num_shards, message):
    with pytest.raises(XalError, match=f"^{message}$"):
        ScoreConfig(shard_id=shard_id, num_shards=num_shards)


def test_a_shard_that_owns_no_unit_says_so_and_names_the_fix(scored, capsys):
    """60 images in one default unit (64), two shards: shard 0 owns none and notes why; shard 1 scores
    everything, with nothing to note."""
    pool, model = scored
    config = {"run": "few-units", "batch_size": UNIT, "num_workers": 0, "num_shards": 2}
    idle = score_pool(pool, model, ScoreConfig(shard_id=0, **config))
    assert (idle.units, idle.images, idle.complete) == (0, 0, False)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [("note: run 'few-units' has 1 work unit of 64 images, fewer than 2 shards: shard 0 has "
                      "nothing to score; a new run with a smaller --unit-size (whole pool chunks of 8 images) "
                      "gives every shard work")]
    busy = score_pool(pool, model, ScoreConfig(shard_id=1, **config))
    assert (busy.units, busy.images, busy.complete) == (1, 60, True)
    assert "note:" not in capsys.readouterr().err
    assert_equal_runs(pool, "ref", "few-units")


def test_another_unit_size_for_an_existing_run_is_noted_and_the_run_keeps_its_own(scored, capsys):
    pool, model = scored
    again = score_pool(pool, model, ScoreConfig(run="ref", unit_size=32, batch_size=UNIT, num_workers=0))
    assert (again.units_already_done, again.images) == (8, 0)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [(f"note: run 'ref' keeps its {UNIT}-image work units; --unit-size 32 applies to a new "
                      "run (another --run, or --overwrite)")]
    score_pool(pool, model, ScoreConfig(run="ref", unit_size=UNIT, batch_size=UNIT, num_workers=0))
    assert "note:" not in capsys.readouterr().err  # the same size (or none): nothing to note


def test_an_old_run_of_one_chunk_units_resumes_in_its_own_layout(scored):
    """A run made when a unit was one pool chunk (and, older still, without a ``unit_size`` attribute)
    resumes with its units, whatever the unit size a new run would get."""
    pool, model = scored
    old = {"run": "old", "batch_size": UNIT, "num_workers": 0}
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, shard_id=0, num_shards=2, **old))  # half of it
    group = Pool.open(pool, mode="r+").group["scores"]["old"]
    del group.attrs["unit_size"]  # the oldest runs: unit size = the arrays' chunk length
    resumed = score_pool(pool, model, ScoreConfig(**old))  # default unit size: 64
    assert (resumed.units_already_done, resumed.units, resumed.complete) == (4, 4, True)
    assert ScoreRun.open(Pool.open(pool).group, "old").unit_size == UNIT
    assert_equal_runs(pool, "ref", "old")


def test_run_killed_inside_a_multi_chunk_unit_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL while a unit of 3 chunks is half scored (its earlier batches computed, nothing written):
    the rerun scores the pending units again and equals one uninterrupted run bit for bit."""
    pool = make_pool(tmp_path / "big.zarr", n=160, size=48)
    model = make_model(tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "xal_engine", "score", "--pool", str(pool), "--model", str(model),
           "--run", "r", "--batch-size", "4", "--unit-size", str(3 * UNIT), "--num-workers", "0",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_done_units(proc, pool / "scores" / "r")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = ScoreRun.open(Pool.open(pool).group, "r")
    n_done = int(run.done_mask().sum())
    assert run.n_units == 7 and 0 < n_done < run.n_units, f"the kill was not mid-way ({n_done} done)"
    resumed = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert resumed["complete"] and resumed["units_already_done"] == n_done
    assert resumed["images"] == 160 - 24 * n_done
    score_pool(pool, model, ScoreConfig(run="whole", unit_size=UNIT, batch_size=UNIT, num_workers=0))
    want, got = read_run(pool, "whole"), read_run(pool, "r")
    for name in REQUIRED_NAMES:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)


def test_the_scoring_loader_decodes_only_the_arrays_scoring_reads(tmp_path):
    """A lost ids or split chunk stops a full read but not the scorer's, which never decodes them;
    labels are read only when asked for (``--targets label``)."""
    pool_path = make_pool(tmp_path / "p.zarr", n=24)
    for name in ("ids", "split"):
        (pool_path / name / "c" / "1").unlink()
    pool = Pool.open(pool_path)
    with pytest.raises(PoolError, match="'ids' chunk 1"):
        pool.read(8, 16)
    full = Pool.open(make_pool(tmp_path / "q.zarr", n=24)).read(8, 16)
    item = UnitRanges(pool, [(0, 8, 16)], with_labels=False)[0]
    assert set(item) == {"unit", "start", "images", "rois", "has_roi"} and (item["unit"], item["start"]) == (0, 8)
    np.testing.assert_array_equal(item["images"].numpy(), full.images)
    np.testing.assert_array_equal(item["rois"].numpy(), full.rois)
    labelled = UnitRanges(pool, [(0, 8, 16)], with_labels=True)[0]
    np.testing.assert_array_equal(labelled["labels"].numpy(), full.labels.astype(np.int64))
    with pytest.raises(PoolError, match="'idz' is not a per-image array"):
        pool.read_arrays(0, 8, ("images", "idz"))


def test_read_ahead_yields_every_item_in_order():
    assert list(read_ahead(list(range(7)), depth=2)) == list(range(7))
    assert list(read_ahead([], depth=2)) == []


def batch_scores(b: int, k: int, seed: int) -> BatchScores:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(b, k, generator=g), dim=1)
    values = {"probs": probs, "pred": probs.argmax(1), "hit": torch.rand(b, generator=g) > 0.5}
    for name in REQUIRED_NAMES:
        values.setdefault(name, torch.randn(b, generator=g))
    return BatchScores(**values)


def test_result_copies_return_every_batch_in_order_with_its_values():
    """Eight batches (the last short) through a ring of three slots with a lag of two: each comes back
    once, in order, tagged, equal to a direct host copy, though its slot was reused since."""
    copies = ResultCopies(torch.device("cpu"), lag=2)
    sent = [(i, batch_scores(5 if i < 7 else 2, 3, seed=i)) for i in range(8)]
    got = []
    for i, scores in sent:
        ready = copies.put(scores, tag=i)
        assert len(copies.pending) <= 2 and [t for t, _ in ready] == ([i - 2] if i >= 2 else [])
        got += ready
    got += copies.drain()
    assert [t for t, _ in got] == list(range(8)) and not copies.pending
    for (i, scores), (_, host) in zip(sent, got):
        want = fields.unpack(fields.pack(scores).numpy(), fields.Layout.of(scores))
        for name in REQUIRED_NAMES:
            np.testing.assert_array_equal(host[name], want[name], err_msg=f"batch {i} {name}")


def test_unit_assembler_returns_a_unit_once_all_its_rows_arrived(scored):
    pool, _ = scored
    run = ScoreRun(Pool.open(pool).group["scores"]["default"], "x", 60, 24)
    asm = UnitAssembler(run)
    rows = fields.unpack(fields.pack(batch_scores(24, 3, seed=0)).numpy())
    assert asm.add(0, rows.rows(0, 10)) is None and asm.add(0, rows.rows(10, 20)) is None
    whole = asm.add(0, rows.rows(20, 24))
    assert whole is not None and not asm.parts
    np.testing.assert_array_equal(whole.dice, rows.dice)
    tail = fields.unpack(fields.pack(batch_scores(12, 3, seed=1)).numpy())
    assert asm.add(2, tail) is not None  # the last unit holds 12 images


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_the_reused_input_buffer_gives_the_same_input_bit_for_bit(dtype):
    """ModelInputs (constants made once, one buffer) equals the old per-batch path for every pool
    dtype, with and without normalisation, for a full batch and then a shorter one."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for norm in ((mean, std), (None, None)):
        inputs = ModelInputs(*norm, "cpu")
        for n in (4, 3):
            images = (torch.randint(0, 256, (n, 3, 9, 7)) if dtype != torch.float32 else torch.rand(n, 3, 9, 7)).to(dtype)
            want = to_unit_float(images, *norm).contiguous(memory_format=torch.channels_last)
            got = inputs(images)
            assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
        assert inputs.buffer is not None and inputs.buffer.shape[0] == 4  # allocated once
    with pytest.raises(XalError, match="dtype torch.int32"):
        ModelInputs(None, None, "cpu")(torch.zeros(2, 1, 3, 3, dtype=torch.int32))


def test_normalisation_constants_made_once_give_the_same_input_bit_for_bit():
    images = torch.randint(0, 256, (3, 3, 9, 7), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    before = to_unit_float(images, mean, std).contiguous(memory_format=torch.channels_last)  # the old path
    m, s = normalization_tensors(mean, std, "cpu")
    after = model_input(images, m, s)
    assert after.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(before, after)
    assert normalization_tensors(None, None, "cpu") == (None, None)
    assert torch.equal(model_input(images), to_unit_float(images))


def test_the_scorer_freezes_the_model_once_and_restores_it(scored):
    _, model_path = scored
    model, ckpt = load_checkpoint(model_path)
    model.train()
    config = ScoreConfig(run="x", num_workers=0)
    with Scorer(model, ckpt, config, torch.device("cpu")) as scorer:
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        for _ in range(2):  # batches reuse the hooks: no parameter flips between them
            out = scorer({"images": torch.zeros(2, 1, 32, 32, dtype=torch.uint8),
                          "rois": torch.zeros(2, 32, 32, dtype=torch.bool), "has_roi": torch.zeros(2, dtype=torch.bool)})
            assert out.pred.shape == (2,) and not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("workers", [0, 1])
def test_units_scored_before_an_unreadable_chunk_are_stored(tmp_path, workers):
    """Reads run ahead of the compute and results reach the host two batches late: when chunk 3 cannot
    be read, the three units before it are still written and marked done, the rest stay pending."""
    pool = make_pool(tmp_path / "p.zarr", n=40)
    model = make_model(tmp_path / "m.pt")
    (pool / "images" / "c" / "3" / "0" / "0" / "0").unlink()
    with pytest.raises(XalError, match="'images' chunk 3"):
        score_pool(pool, model, ScoreConfig(run="r", unit_size=UNIT, batch_size=4, num_workers=workers))
    assert ScoreRun.open(Pool.open(pool).group, "r").done_mask().tolist() == [True, True, True, False, False]


def test_a_run_with_another_cam_method_stores_that_methods_scores_and_is_another_run(scored):
    """``cam_method`` reaches score_batch (the stored ROI metrics are the method's) and the fingerprint:
    the same run name with Grad-CAM is refused, naming the difference."""
    pool_path, model_path = scored
    config = ScoreConfig(run="lc", batch_size=UNIT, num_workers=0, target_layer="layer1", cam_method="layercam")
    score_pool(pool_path, model_path, config)
    got = read_run(pool_path, "lc")
    pool = Pool.open(pool_path)
    batch = pool.read(0, pool.n)
    model, _ = load_checkpoint(model_path)
    for method, close in (("layercam", True), ("gradcam", False)):
        want = score_batch(model, "layer1", to_unit_float(torch.from_numpy(batch.images)),
                           rois=torch.from_numpy(batch.rois), has_roi=torch.from_numpy(batch.has_roi),
                           cam_method=method)
        roi = batch.has_roi
        agree = np.allclose(got["soft_dice"][roi], want.soft_dice.numpy()[roi], rtol=1e-5, atol=1e-6)
        assert agree == close, method  # layercam's numbers, not Grad-CAM's
    assert ScoreRun.open(pool.group, "lc").group.attrs["fingerprint"]["cam_method"] == "layercam"
    with pytest.raises(XalError, match=r"different configuration \(cam_method\)"):
        score_pool(pool_path, model_path, ScoreConfig(run="lc", batch_size=UNIT, num_workers=0, target_layer="layer1"))
    with pytest.raises(XalError, match="cam method: expected one of gradcam, gradcam\\+\\+"):
        ScoreConfig(cam_method="gradcam+")
