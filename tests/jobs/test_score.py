"""Pool scoring: equals score_batch, resumes after SIGKILL, shards, refuses mismatches; then select."""

import csv
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine.cli import main
from xal_engine.core.inputs import to_unit_float
from xal_engine.core.models import Checkpoint, build_model, load_checkpoint, save_checkpoint
from xal_engine.core.scoring import score_batch
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, class_names, generate_block
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import SPLIT_TRAIN, Pool, PoolWriter
from xal_engine.store.score_run import ScoreRun

UNIT = 8  # images per pool chunk; the tests score most runs with one chunk per work unit (unit_size=UNIT)
THREE_CLASSES = tuple(class_names(3))


def make_pool(path: Path, n: int, size: int = 32, roi_fraction: float = 0.7) -> Path:
    """A synthetic phantom pool with small chunks, so that it has many work units."""
    cfg = SyntheticConfig(n=n, size=size, classes=3, channels=1, seed=1, roi_fraction=roi_fraction)
    split = assign_splits(n, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    with PoolWriter(path, channels=1, height=size, width=size, dtype=np.uint8,
                    classes=class_names(3), chunk_size=UNIT) as w:
        g = generate_block(cfg, 0, split)
        w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
        w.close()
    return path


def wait_for_done_units(proc: subprocess.Popen, run_dir: Path, units: int = 2, timeout: float = 120,
                        poll: float = 0.005) -> None:
    """Return once ``run_dir/done`` holds ``units`` stored flags (a scorer mid-run), or ``proc`` ended."""
    done_dir = run_dir / "done" / "c"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= units:
            return
        time.sleep(poll)


def make_model(path: Path, classes: tuple[str, ...] = THREE_CLASSES, in_channels: int = 1) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes), in_channels)
    info = Checkpoint(arch="resnet18", num_classes=len(classes), in_channels=in_channels,
                      classes=tuple(classes), target_layer="layer4")
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    pool = make_pool(root / "pool.zarr", n=60)
    model = make_model(root / "model.pt")
    summary = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="ref", batch_size=UNIT, num_workers=0))
    return root, pool, model, summary


def read_run(pool: Path, run: str) -> dict[str, np.ndarray]:
    return ScoreRun.open(Pool.open(pool).group, run).read()


def assert_scores_match_reference(pool: Path, run: str) -> None:
    """``run`` scored the same images as run "ref" batched differently: same predictions, metrics within
    float reassociation (batch composition changes the reduction order)."""
    a, b = read_run(pool, "ref"), read_run(pool, run)
    np.testing.assert_array_equal(a["pred"], b["pred"])
    for f in ("entropy", "dice", "soft_dice", "energy"):
        np.testing.assert_allclose(a[f], b[f], rtol=1e-5, atol=1e-6, err_msg=f)


def assert_runs_equal(a: dict, b: dict) -> None:
    for field, value in a.items():
        np.testing.assert_array_equal(value, b[field], err_msg=field)


def test_scores_equal_score_batch_on_the_same_images(setup):
    _, pool_path, model_path, summary = setup
    assert summary.images == 60 and summary.complete and summary.units == 60 // UNIT + 1
    got = read_run(pool_path, "ref")
    pool = Pool.open(pool_path)
    batch = pool.read(0, pool.n)
    model, ckpt = load_checkpoint(model_path)
    want = score_batch(model, ckpt.target_layer, to_unit_float(torch.from_numpy(batch.images)),
                       rois=torch.from_numpy(batch.rois), has_roi=torch.from_numpy(batch.has_roi))
    np.testing.assert_allclose(got["probs"], want.probs.numpy().astype(np.float16), atol=1e-3)
    np.testing.assert_array_equal(got["pred"], want.pred.numpy())
    for f in ("entropy", "margin", "least_confidence", "dice", "soft_dice", "energy"):
        np.testing.assert_allclose(got[f], getattr(want, f).numpy(), rtol=1e-5, atol=1e-6, err_msg=f)
    np.testing.assert_array_equal(got["hit"], want.hit.numpy())
    # images without an ROI: NaN ROI metrics, uncertainty still present
    no_roi = ~batch.has_roi
    assert no_roi.any() and np.isnan(got["dice"][no_roi]).all() and not got["hit"][no_roi].any()
    assert np.isfinite(got["entropy"]).all() and np.isfinite(got["dice"][~no_roi]).all()


def test_rerun_after_completion_does_no_work(setup):
    _, pool, model, _ = setup
    again = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="ref", batch_size=UNIT, num_workers=0))
    assert again.images == 0 and again.units_already_done == -(-60 // UNIT)  # every 8-image unit of the 60
    assert again.complete


def test_batches_of_several_chunks_in_multi_chunk_units_give_the_same_scores(setup):
    """Units of 3 chunks (24 images, the last 12), batches of 16 (two chunks; 8 at each unit's end)."""
    _, pool, model, _ = setup
    score_pool(pool, model, ScoreConfig(unit_size=3 * UNIT, run="wide", batch_size=2 * UNIT, num_workers=1))
    assert ScoreRun.open(Pool.open(pool).group, "wide").n_units == 3
    assert_scores_match_reference(pool, "wide")


def test_batches_smaller_than_a_unit_split_it(setup):
    _, pool, model, _ = setup
    summary = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="narrow", batch_size=3, num_workers=0))
    assert summary.images == 60  # each 8-image unit scored as batches of 3, 3 and 2
    assert_scores_match_reference(pool, "narrow")


def test_two_shards_together_equal_one_run(setup):
    _, pool, model, _ = setup
    first = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="sharded", batch_size=UNIT, num_workers=0,
                                                shard_id=0, num_shards=2))
    assert not first.complete
    done = ScoreRun.open(Pool.open(pool).group, "sharded").done_mask()
    half = done.size // 2
    assert done[:half].all() and not done[half:].any()  # shard 0 wrote only its own units
    second = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="sharded", batch_size=UNIT, num_workers=0,
                                                 shard_id=1, num_shards=2))
    assert second.complete and first.images + second.images == 60
    assert_runs_equal(read_run(pool, "ref"), read_run(pool, "sharded"))


def test_run_killed_midway_resumes_to_the_uninterrupted_result(tmp_path):
    pool = make_pool(tmp_path / "big.zarr", n=160, size=48)
    model = make_model(tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "xal_engine", "score", "--pool", str(pool), "--model", str(model),
           "--run", "r", "--batch-size", str(UNIT), "--unit-size", str(UNIT), "--num-workers", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_done_units(proc, pool / "scores" / "r")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = ScoreRun.open(Pool.open(pool).group, "r")
    n_done = int(run.done_mask().sum())
    assert 0 < n_done < run.n_units, f"the kill was not mid-way ({n_done} of {run.n_units} units done)"
    (pool / "scores" / "r" / "dice" / "c" / "3.abc.partial").write_bytes(b"torn")  # a crash leftover
    resumed = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout)
    assert summary["complete"] and summary["units_already_done"] == n_done
    assert summary["images"] == 160 - n_done * UNIT
    assert not list((pool / "scores" / "r").rglob("*.partial"))
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="whole", batch_size=UNIT, num_workers=0))
    assert_runs_equal(read_run(pool, "whole"), read_run(pool, "r"))


def test_existing_run_with_another_config_is_refused_unless_overwrite(setup):
    _, pool, model, _ = setup
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="cfg", batch_size=UNIT, num_workers=0))
    with pytest.raises(XalError, match=r"different configuration \(threshold\)"):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="cfg", threshold=0.6, num_workers=0))
    redo = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="cfg", threshold=0.6, num_workers=0, overwrite=True))
    assert redo.images == 60
    assert ScoreRun.open(Pool.open(pool).group, "cfg").group.attrs["fingerprint"]["threshold"] == 0.6


def test_model_pool_mismatches_are_refused(setup, tmp_path):
    _, pool, _, _ = setup
    two = make_model(tmp_path / "two.pt", classes=("a", "b"))
    with pytest.raises(XalError, match="2 classes"):
        score_pool(pool, two, ScoreConfig(unit_size=UNIT, run="x", num_workers=0))
    rgb = make_model(tmp_path / "rgb.pt", in_channels=3)
    with pytest.raises(XalError, match="3-channel"):
        score_pool(pool, rgb, ScoreConfig(unit_size=UNIT, run="x", num_workers=0))
    renamed = make_model(tmp_path / "renamed.pt", classes=("x", "y", "z"))
    with pytest.raises(XalError, match="differ from the pool"):
        score_pool(pool, renamed, ScoreConfig(unit_size=UNIT, run="x", num_workers=0))


@pytest.mark.parametrize("argv, needle", [
    (["--pool", "{root}/missing.zarr", "--model", "{model}"], "missing.zarr"),
    (["--pool", "{pool}", "--model", "{root}/missing.pt"], "missing.pt"),
    (["--pool", "{pool}", "--model", "{model}", "--batch-size", "0"], "--batch-size"),
    (["--pool", "{pool}", "--model", "{model}", "--threshold", "2"], "--threshold"),
    (["--pool", "{pool}", "--model", "{model}", "--shard-id", "2", "--num-shards", "2"], "--shard-id"),
    (["--pool", "{pool}", "--model", "{model}", "--run", "a/b"], "--run"),
    (["--pool", "{pool}", "--model", "{model}", "--device", "cuda:0"], "cuda"),
    (["--pool", "{pool}", "--model", "{model}", "--precision", "fp8"], "--precision"),
    (["--pool", "{pool}", "--model", "{model}", "--mc-samples", "1"], "--mc-samples must be 0 (off) or at least 2"),
    (["--pool", "{pool}", "--model", "{model}", "--mc-samples", "4", "--mc-dropout", "1"], "--mc-dropout must lie"),
    (["--pool", "{pool}", "--model", "{model}", "--mc-samples", "4", "--mc-dropout", "-0.1"], "--mc-dropout must"),
    (["--pool", "{pool}", "--model", "{model}", "--mc-dropout", "0.5"], "--mc-dropout needs --mc-samples"),
    # the checkpoint has no head dropout: both ways out are named
    (["--pool", "{pool}", "--model", "{model}", "--mc-samples", "4"],
     "--mc-samples needs dropout: model {model} has no head dropout (head_dropout 0); pass --mc-dropout P"),
])
def test_score_cli_errors_are_one_line_exit_2(setup, capsys, argv, needle):
    root, pool, model, _ = setup
    if needle == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [a.format(root=root, pool=pool, model=model) for a in argv]
    needle = needle.format(model=model)
    assert main(["score", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_select_writes_a_batch_of_unlabelled_train_images(setup, tmp_path, capsys):
    _, pool, _, _ = setup
    out = tmp_path / "batch.csv"
    rc = main(["select", "--pool", str(pool), "--run", "ref", "--strategy", "dual", "--budget", "6",
               "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    p = Pool.open(pool)
    split = np.asarray(p.group["split"][:])
    assert summary["selected"] == len(rows) == 6
    assert summary["candidates"] == int((split == SPLIT_TRAIN).sum())
    indices = [int(r["index"]) for r in rows]
    assert all(split[i] == SPLIT_TRAIN for i in indices) and len(set(indices)) == 6
    ids = np.asarray(p.group["ids"][:])
    assert [r["id"] for r in rows] == [str(ids[i]) for i in indices]
    run = read_run(pool, "ref")
    for r in rows:  # the written score is the dual criterion of that image (missing ROI: mean rule)
        i = int(r["index"])
        if np.isfinite(run["dice"][i]):
            expected = 0.3 * run["entropy"][i] + 0.7 * (1 - run["dice"][i])
            assert float(r["score"]) == pytest.approx(float(expected), rel=1e-5)
    meta = json.loads((tmp_path / "batch.csv.json").read_text())
    assert meta["config"]["strategy"] == "dual" and meta["oracle_balance"] is False


def test_select_with_a_batch_aware_strategy_reads_the_runs_embeddings(setup, tmp_path, capsys):
    """coreset on a run without embeddings is one line naming the flag; on one with them, the batch is
    the k-center order of the unlabelled train images' embeddings (labelled ones as centres)."""
    import torch

    from xal_engine.core.diversity import kcenter_greedy

    _, pool, model, _ = setup
    out = tmp_path / "b.csv"
    argv = ["select", "--pool", str(pool), "--strategy", "coreset", "--budget", "5", "--out", str(out),
            "--device", "cpu"]
    assert main([*argv, "--run", "ref"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("strategy 'coreset' needs the run's embedding, which score run 'ref' does not store; "
                        "score the run with --embeddings") and not out.exists()
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="emb", batch_size=UNIT, num_workers=0, device="cpu", embeddings=True))
    assert main([*argv, "--run", "emb"]) == 0
    p = Pool.open(pool)
    train = np.flatnonzero(np.asarray(p.group["split"][:]) == SPLIT_TRAIN)
    assert capsys.readouterr().out.strip() == (f"selected 5 of {train.size} candidates by coreset "
                                               f"(batch-aware) -> {out}")
    emb = ScoreRun.open(p.group, "emb").read(("embedding",))["embedding"][train]
    want = train[kcenter_greedy(torch.from_numpy(emb), 5).numpy()]
    assert [int(r["index"]) for r in csv.DictReader(out.open())] == want.tolist()


def test_select_refuses_an_incomplete_run_and_an_unknown_run(setup, tmp_path, capsys):
    _, pool, model, _ = setup
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="half", batch_size=UNIT, num_workers=0, shard_id=0,
                                        num_shards=2))
    assert main(["select", "--pool", str(pool), "--run", "half", "--budget", "3",
                 "--out", str(tmp_path / "b.csv")]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert main(["select", "--pool", str(pool), "--run", "nope", "--budget", "3",
                 "--out", str(tmp_path / "b.csv")]) == 2
    assert "no score run 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


def strict_json(text: str) -> dict:
    """json.loads refusing NaN and Infinity, which Python's json accepts but JSON does not."""
    def refuse(name: str) -> None:
        raise AssertionError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_score_json_on_a_complete_run_is_strict_json(setup, capsys):
    _, pool, model, _ = setup
    argv = ["score", "--pool", str(pool), "--model", str(model), "--run", "ref", "--batch-size", str(UNIT), "--unit-size", str(UNIT),
            "--num-workers", "0"]
    assert main([*argv, "--json"]) == 0
    summary = strict_json(capsys.readouterr().out)
    assert (summary["images"], summary["mean_dice"], summary["complete"]) == (0, None, True)
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("scored 0 images in ") and line.endswith(
        "mean Dice n/a; 8 units were already done; run 'ref' complete")


@pytest.mark.parametrize(("images", "done", "words"), [
    (1, 1, "scored 1 image in 1.0 s (1.0 img/s), mean Dice 0.5000; 1 unit was already done"),
    (2, 2, "scored 2 images in 1.0 s (2.0 img/s), mean Dice 0.5000; 2 units were already done"),
    (0, 0, "scored 0 images in 1.0 s (0.0 img/s), mean Dice 0.5000; 0 units were already done")])
def test_the_score_summary_counts_in_the_right_number(images, done, words):
    from xal_engine.jobs.score import ScoreSummary
    from xal_engine.jobs.score_ray import RayScoreSummary, WorkerStats

    s = ScoreSummary(pool="p", run="r", images=images, units=3, units_already_done=done, seconds=1.0,
                     images_per_s=float(images), mean_dice=0.5, complete=True, device="cpu")
    assert s.line() == f"{words}; run 'r' complete"
    one = WorkerStats(worker="h:1", units=1, images=images, busy_seconds=1.0, images_per_s=3.0)
    ray = RayScoreSummary(**{**s.__dict__, "workers": (one,)})
    assert ray.line() == f"{words}; run 'r' complete; 1 worker at 3.0 img/s"
    assert RayScoreSummary(**{**s.__dict__, "workers": (one, one)}).line().endswith("; 2 workers at 3.0, 3.0 img/s")


def test_select_says_when_the_budget_exceeds_the_candidates(setup, tmp_path, capsys):
    _, pool, _, _ = setup
    out = tmp_path / "batch.csv"
    n = int((np.asarray(Pool.open(pool).group["split"][:]) == SPLIT_TRAIN).sum())
    argv = ["select", "--pool", str(pool), "--run", "ref", "--strategy", "dual", "--out", str(out)]
    assert main([*argv, "--budget", "1000"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"budget 1000 > {n} candidates: selected {n} by dual (balance predicted) -> {out}")
    assert main([*argv, "--budget", "5"]) == 0
    assert capsys.readouterr().out.strip() == f"selected 5 of {n} candidates by dual (balance predicted) -> {out}"
    assert main([*argv, "--budget", "1000", "--json"]) == 0
    summary = strict_json(capsys.readouterr().out)
    assert (summary["selected"], summary["candidates"], summary["budget"]) == (n, n, 1000)


def test_select_line_counts_eligible_images_and_one_candidate():
    from xal_engine.core.acquisition import SelectConfig
    from xal_engine.jobs.select import BatchSelection

    def selection(rows: int, candidates: int, budget: int) -> BatchSelection:
        return BatchSelection(indices=np.arange(rows), rows=[{}] * rows, config=SelectConfig(budget=budget),
                              run="r", experiment=None, n_candidates=candidates)

    assert selection(1, 1, 3).line("b.csv") == "budget 3 > 1 candidate: selected 1 by dual (balance predicted) -> b.csv"
    assert selection(4, 6, 9).line("b.csv") == (
        "budget 9 > 4 eligible of 6 candidates: selected 4 by dual (balance predicted) -> b.csv")


def test_the_batch_sidecar_is_strict_json(tmp_path):
    import math

    from xal_engine.core.acquisition import SelectConfig
    from xal_engine.jobs.select import BatchSelection, write_batch

    config = SelectConfig()
    object.__setattr__(config, "lam", math.nan)  # no flag makes one; the writer must still write JSON
    selection = BatchSelection(indices=np.arange(0), rows=[], config=config, run="r", experiment=None,
                               n_candidates=0)
    _, sidecar = write_batch(selection, tmp_path / "b.csv", "p.zarr")
    meta = strict_json(sidecar.read_text())
    assert meta["config"]["lam"] is None and meta["n_selected"] == 0


def test_target_layer_override_is_another_run_and_no_flag_keeps_the_fingerprint(setup, capsys, monkeypatch):
    _, pool, model, _ = setup
    from xal_engine.jobs import streaming
    from xal_engine.jobs.streaming import file_sha256

    layers: list[str] = []  # the layer each batch is scored at

    def recording(net, layer, *args, **kwargs):
        layers.append(layer)
        return score_batch(net, layer, *args, **kwargs)

    monkeypatch.setattr(streaming, "score_batch", recording)

    # Without --target-layer the fingerprint is what it always was (existing runs resume).
    assert ScoreRun.open(Pool.open(pool).group, "ref").group.attrs["fingerprint"] == {
        "model_sha256": file_sha256(model), "arch": "resnet18", "target_layer": "layer4", "threshold": 0.5,
        "precision": "fp32", "targets": "pred", "n_images": 60}
    capsys.readouterr()
    # Naming the checkpoint's own layer is the same run: nothing left to do.
    same = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="ref", batch_size=UNIT, num_workers=0, target_layer="layer4"))
    assert same.images == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["target layer layer4 (1x1 map) at 1x32x32 images (--target-layer; the checkpoint's is layer4)",
                   ("warning: target layer layer4 gives a 1x1 map at 1x32x32 images: its Grad-CAM is constant "
                    "and every hard Dice 0; pass --target-layer with a shallower layer")]
    with pytest.raises(XalError, match=r"different configuration \(target_layer\)"):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="ref", num_workers=0, target_layer="layer1"))
    layer1 = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="layer1", batch_size=UNIT, num_workers=0,
                                                 target_layer="layer1"))
    assert layer1.images == 60
    assert ScoreRun.open(Pool.open(pool).group, "layer1").group.attrs["fingerprint"]["target_layer"] == "layer1"
    got = read_run(pool, "layer1")
    batch = Pool.open(pool).read(0, 60)
    net, _ = load_checkpoint(model)
    want = score_batch(net, "layer1", to_unit_float(torch.from_numpy(batch.images)),
                       rois=torch.from_numpy(batch.rois), has_roi=torch.from_numpy(batch.has_roi))
    for f in ("dice", "soft_dice", "energy"):
        np.testing.assert_allclose(got[f], getattr(want, f).numpy(), rtol=1e-5, atol=1e-6, err_msg=f)
    assert layers and set(layers) == {"layer1"}


def test_cli_score_target_layer(setup, capsys):
    _, pool, model, _ = setup
    argv = ["score", "--pool", str(pool), "--model", str(model), "--num-workers", "0", "--batch-size", "8"]
    assert main([*argv, "--run", "cli-l2", "--target-layer", "layer2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["images"] == 60
    assert err.strip() == ("target layer layer2 (4x4 map) at 1x32x32 images (--target-layer; the checkpoint's "
                           "is layer4)")
    assert ScoreRun.open(Pool.open(pool).group, "cli-l2").group.attrs["fingerprint"]["target_layer"] == "layer2"
    assert main([*argv, "--run", "cli-l9", "--target-layer", "layer9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target-layer: model has no layer 'layer9'" in err


def _model_trained_at(path: Path, side: int, layer: str, target_map: tuple[int, int]) -> Path:
    torch.manual_seed(0)
    info = Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=THREE_CLASSES, target_layer=layer,
                      pool={"height": side, "width": side}, target_map=target_map)
    return save_checkpoint(path, build_model("resnet18", 3, 1), info)


def test_another_image_size_warns_and_a_1x1_map_is_refused(setup, tmp_path, capsys):
    _, pool, _, _ = setup
    pool_path = Pool.open(pool).path
    capsys.readouterr()
    at64 = _model_trained_at(tmp_path / "l2.pt", 64, "layer2", (8, 8))
    score_pool(pool, at64, ScoreConfig(unit_size=UNIT, run="at64", batch_size=UNIT, num_workers=0))
    assert capsys.readouterr().err.splitlines() == [
        (f"warning: model {at64} was trained on 1x64x64 images (layer2, 8x8 map); pool {pool_path} has "
         "1x32x32 images: target layer layer2 (4x4 map)")]
    # layer4 at 64 is 2x2, at 32 1x1: refused, with the layer that fits this size
    l4 = _model_trained_at(tmp_path / "l4.pt", 64, "layer4", (2, 2))
    argv = ["score", "--pool", str(pool), "--model", str(l4), "--run", "l4", "--num-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"xal-engine score: error: model {l4} was trained on 1x64x64 images; at pool {pool_path}'s "
                   "1x32x32 images its target layer layer4 gives a 1x1 map (a constant Grad-CAM, every hard "
                   "Dice 0); pass --target-layer layer1 (8x8 map here)")
    assert "l4" not in Pool.open(pool).group["scores"]  # refused before the run is created
    assert main([*argv, "--target-layer", "layer1"]) == 0  # the suggested layer scores
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: model {l4} was trained on 1x64x64 images (layer4); pool {pool_path} has 1x32x32 images: "
        "target layer layer1 (8x8 map)")


@pytest.fixture(scope="module")
def nan_setup(tmp_path_factory):
    """A float16 copy of the phantom pool with NaN pixels in two train-split images, scored."""
    root = tmp_path_factory.mktemp("nan")
    src = Pool.open(make_pool(root / "src.zarr", n=24)).group
    images = np.asarray(src["images"][:]).astype(np.float16) / np.float16(255)
    train = np.flatnonzero(np.asarray(src["split"][:]) == SPLIT_TRAIN)
    bad = train[[1, 4]]
    images[bad[0], 0, 3, 3] = images[bad[1], 0, 0, 7] = np.nan
    with PoolWriter(root / "pool.zarr", channels=1, height=32, width=32, dtype=np.float16,
                    classes=class_names(3), chunk_size=UNIT) as w:
        w.append(images, *(np.asarray(src[k][:]) for k in ("rois", "has_roi", "labels", "ids", "split")))
    model = make_model(root / "model.pt")
    score_pool(root / "pool.zarr", model, ScoreConfig(unit_size=UNIT, run="ref", batch_size=UNIT, num_workers=0,
                                                      target_layer="layer1"))
    return root, root / "pool.zarr", bad


def test_an_image_with_nan_pixels_scores_nan_with_pred_minus_one(nan_setup):
    _, pool, bad = nan_setup
    run = read_run(pool, "ref")
    assert run["pred"][bad].tolist() == [-1, -1]
    assert np.isnan(run["entropy"][bad]).all() and np.isnan(run["probs"][bad]).all()
    others = np.setdiff1d(np.arange(run["pred"].size), bad)
    assert (run["pred"][others] >= 0).all() and np.isfinite(run["entropy"][others]).all()


@pytest.mark.parametrize("normalise", ["none", "minmax", "rank"])
@pytest.mark.parametrize("strategy", ["entropy", "dual"])
def test_select_never_picks_an_image_with_nan_pixels(nan_setup, tmp_path, capsys, strategy, normalise):
    _, pool, bad = nan_setup
    out = tmp_path / "batch.csv"
    assert main(["select", "--pool", str(pool), "--run", "ref", "--strategy", strategy, "--budget", "100",
                 "--normalise", normalise, "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    picked = [int(r["index"]) for r in rows]
    assert not set(picked) & set(bad.tolist())
    assert len(picked) == int((np.asarray(Pool.open(pool).group["split"][:]) == SPLIT_TRAIN).sum()) - 2
    assert all(np.isfinite(float(r["score"])) for r in rows)
    scores = [float(r["score"]) for r in rows]
    if normalise == "minmax" and strategy == "entropy":  # the range is the finite scores', not all 0
        assert max(scores) == pytest.approx(1.0) and min(scores) < 0.5


def test_score_a_corrupt_chunk_in_a_loader_worker_is_one_line(setup, tmp_path, capsys):
    _, _, model, _ = setup
    pool = make_pool(tmp_path / "pool.zarr", n=24)
    chunks = sorted(p for p in (pool / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunks[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # the chunk's CRC32C no longer matches
    chunks[1].write_bytes(bytes(data))
    assert main(["score", "--pool", str(pool), "--model", str(model), "--run", "w2", "--num-workers", "2",
                 "--batch-size", str(UNIT), "--unit-size", str(UNIT)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning:")]
    assert len(err) == 1 and "array 'images' images 8..15 cannot be decoded" in err[0], err


def test_score_a_checkpoint_with_a_flipped_weight_byte_is_one_line(setup, tmp_path, capsys):
    import zipfile
    _, pool, model, _ = setup
    flipped = tmp_path / "model.pt"
    data = bytearray(model.read_bytes())
    with zipfile.ZipFile(model) as zf:
        record = max(zf.infolist(), key=lambda i: i.file_size)  # a weight tensor, not the pickle
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data[start + record.file_size // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert main(["score", "--pool", str(pool), "--model", str(flipped), "--run", "flip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"xal-engine score: error: checkpoint {flipped} is corrupt: checksum mismatch "
                    "(its weights differ from those saved; copy or train it again)")]


def test_a_resuming_shard_leaves_the_other_shards_half_written_chunks(setup):
    _, pool, model, _ = setup
    shard0 = ScoreConfig(unit_size=UNIT, run="own-partials", batch_size=UNIT, num_workers=0, shard_id=0, num_shards=2)
    score_pool(pool, model, shard0)
    root = pool / "scores" / "own-partials"
    mine = root / "dice" / "c" / "0.aa.partial"  # unit 0: shard 0 has units 0..3
    theirs = root / "dice" / "c" / "7.bb.partial"  # unit 7: shard 1's
    for path in (mine, theirs):
        path.write_bytes(b"in flight")
    assert score_pool(pool, model, shard0).images == 0
    assert not mine.exists() and theirs.exists()  # shard 1's file may be a live writer's


def test_a_run_scored_before_a_label_import_is_refused_as_stale(tmp_path):
    from xal_engine.jobs.label import ImportConfig, UndoConfig, import_labels, undo_import

    pool = make_pool(tmp_path / "pool.zarr", n=16)
    model = make_model(tmp_path / "model.pt")
    config = ScoreConfig(unit_size=UNIT, run="r", batch_size=UNIT, num_workers=0)
    score_pool(pool, model, config)
    opened = Pool.open(pool)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"id,class\n{opened.take('ids', np.array([0]))[0]},{opened.classes[1]}\n")
    import_labels(pool, csv_path, ImportConfig(allow_any_split=True))
    with pytest.raises(XalError, match=r"^pool changed since run 'r' was scored \(generation 0 -> \d+\); "
                                       r"rescore with --overwrite or another --run$"):
        score_pool(pool, model, config)
    assert score_pool(pool, model, replace(config, overwrite=True)).images == 16
    assert score_pool(pool, model, config).images == 0  # the same generation resumes
    undo_import(pool, UndoConfig())
    with pytest.raises(XalError, match=r"^pool changed since run 'r' was scored"):
        score_pool(pool, model, config)


def _score_shard_at_the_barrier(pool: str, model: str, shard_id: int, rounds: int, barrier, results) -> None:
    """Score shard ``shard_id`` of 2 of a new run per round, started together with the other shard."""
    for i in range(rounds):
        barrier.wait(timeout=300)
        try:
            summary = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run=f"together{i}", batch_size=UNIT, num_workers=0,
                                                          shard_id=shard_id, num_shards=2, threads=1))
            results.put((i, shard_id, summary.images, None))
        except Exception as err:  # noqa: BLE001  (reported to the test)
            results.put((i, shard_id, 0, f"{type(err).__name__}: {err}"))


@pytest.mark.slow
def test_two_shards_of_a_new_run_started_together_equal_one_run(tmp_path):
    import multiprocessing

    pool = make_pool(tmp_path / "pool.zarr", n=2 * UNIT)
    model = make_model(tmp_path / "model.pt")
    score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="single", batch_size=UNIT, num_workers=0, threads=1))
    rounds = 20
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_score_shard_at_the_barrier, args=(str(pool), str(model), k, rounds,
                                                                  barrier, results)) for k in range(2)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=300) for _ in range(2 * rounds)]
    for proc in procs:
        proc.join()
    assert [g for g in got if g[3] is not None] == []
    assert all(proc.exitcode == 0 for proc in procs)
    single = read_run(pool, "single")
    for i in range(rounds):
        assert sum(g[2] for g in got if g[0] == i) == 2 * UNIT  # each shard scored its own unit once
        run = ScoreRun.open(Pool.open(pool).group, f"together{i}")
        assert run.is_complete()
        assert_runs_equal(single, run.read())


MC = {"embeddings": True, "mc_samples": 4, "mc_dropout": 0.5, "mc_seed": 3}
MC_FIELDS = ("bald", "mc_entropy", "variation_ratio", "embedding")


def read_mc(pool: Path, run: str) -> dict[str, np.ndarray]:
    return ScoreRun.open(Pool.open(pool).group, run).read((*ScoreRun.open(Pool.open(pool).group, "ref").read(),
                                                           *MC_FIELDS))


def test_embeddings_and_mc_fields_sharded_or_resumed_equal_one_run_bit_for_bit(setup):
    _, pool, model, _ = setup
    whole = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mc", batch_size=UNIT, num_workers=0, **MC))
    assert whole.complete and whole.images == 60
    one = read_mc(pool, "mc")
    assert_runs_equal(read_run(pool, "ref"), read_run(pool, "mc"))  # the deterministic fields are unchanged
    # two shards
    for shard in (0, 1):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mc2", batch_size=UNIT, num_workers=0, shard_id=shard,
                                            num_shards=2, **MC))
    assert_runs_equal(one, read_mc(pool, "mc2"))
    # interrupted after its first third of the units (shard 0 of 3 done), then resumed as one process
    first = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mcr", batch_size=UNIT, num_workers=0, shard_id=0,
                                                num_shards=3, **MC))
    resumed = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="mcr", batch_size=UNIT, num_workers=2, **MC))
    assert resumed.units_already_done == first.units > 0 and resumed.complete
    assert_runs_equal(one, read_mc(pool, "mcr"))
    # other batches (3 images, or 3 units): the masks follow the image, not its batch
    for name, size in (("mcnarrow", 3), ("mcwide", 3 * UNIT)):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run=name, batch_size=size, num_workers=0, **MC))
        other = read_mc(pool, name)
        for f in ("bald", "mc_entropy"):
            np.testing.assert_allclose(other[f], one[f], rtol=1e-5, atol=1e-6, err_msg=f)
        np.testing.assert_array_equal(other["variation_ratio"], one["variation_ratio"])
        np.testing.assert_allclose(other["embedding"], one["embedding"], rtol=2e-3, atol=1e-4)


def test_an_mc_run_stores_what_the_model_gives_and_validates(setup):
    _, pool_path, model_path, _ = setup
    score_pool(pool_path, model_path, ScoreConfig(unit_size=UNIT, run="mc", batch_size=UNIT, num_workers=0, **MC))
    run = ScoreRun.open(Pool.open(pool_path, mode="r+").group, "mc")
    got = read_mc(pool_path, "mc")
    fp = run.group.attrs["fingerprint"]
    assert (fp["embeddings"], fp["mc_samples"], fp["mc_dropout"], fp["mc_seed"]) == (True, 4, 0.5, 3)
    assert got["embedding"].dtype == np.float16 and got["embedding"].shape == (60, 512)
    assert got["bald"].dtype == np.float32 and got["bald"].shape == (60,)
    # the stored embedding is the model's avgpool output (the fc input), to fp16 rounding
    index = np.array([0, 17, 59])
    pool = Pool.open(pool_path)
    net, _ = load_checkpoint(model_path)
    pooled: list[torch.Tensor] = []
    handle = net.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.detach().flatten(1)))
    with torch.no_grad():
        net(to_unit_float(torch.from_numpy(pool.take("images", index))))
    handle.remove()
    np.testing.assert_allclose(got["embedding"][index].astype(np.float32), pooled[0].numpy(), rtol=2e-3, atol=1e-4)
    # ranges: bald and mc_entropy in [0, ln 3], BALD <= MC entropy; T = 4 votes: ratios in {0, 1/4, 1/2}
    # (3 classes: the modal class has at least 2 of 4 votes)
    assert (got["bald"] >= 0).all() and (got["mc_entropy"] <= np.log(3) + 1e-6).all()
    assert (got["bald"] <= got["mc_entropy"] + 1e-6).all() and got["bald"].max() > 0
    assert set(got["variation_ratio"].tolist()) <= {0.0, 0.25, 0.5}
    # another seed: other masks, other values
    score_pool(pool_path, model_path, ScoreConfig(unit_size=UNIT, run="mcseed", batch_size=UNIT, num_workers=0,
                                                  **{**MC, "mc_seed": 4}))
    assert not np.array_equal(read_mc(pool_path, "mcseed")["bald"], got["bald"])
    with pytest.raises(XalError, match=r"different configuration \(mc_seed\)"):
        score_pool(pool_path, model_path, ScoreConfig(unit_size=UNIT, run="mc", num_workers=0, **{**MC, "mc_seed": 4}))
    assert Pool.open(pool_path).validate() == []
    # an out-of-range value is reported by validate, naming the array
    run.group["bald"][5] = 2.0  # > ln 3
    run.group["variation_ratio"][6] = 0.8  # > 1 - 1/4
    problems = Pool.open(pool_path).validate()
    assert problems == ["scores/mc/bald: outside [0, ln 3]: 1 image(s) (index 5)",
                        "scores/mc/variation_ratio: outside [0, 0.75]: 1 image(s) (index 6)"]
    run.group["bald"][5] = got["bald"][5]
    run.group["variation_ratio"][6] = got["variation_ratio"][6]


def test_runs_without_the_new_fields_read_as_before(setup):
    _, pool, _, _ = setup
    ref = ScoreRun.open(Pool.open(pool).group, "ref")
    assert not any(ref.has(f) for f in MC_FIELDS) and "fingerprint" in ref.group.attrs
    assert not set(MC_FIELDS) & set(ref.group.array_keys())
    with pytest.raises(XalError, match="stores no 'bald'"):
        ref.take("bald", np.arange(3))


def test_mc_dropout_from_the_checkpoint(setup, tmp_path):
    _, pool, _, _ = setup
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, head_dropout=0.3)
    path = save_checkpoint(tmp_path / "drop.pt", model, Checkpoint(
        arch="resnet18", num_classes=3, in_channels=1, classes=THREE_CLASSES, target_layer="layer4"))
    score_pool(pool, path, ScoreConfig(unit_size=UNIT, run="mcckpt", batch_size=UNIT, num_workers=0, mc_samples=3))
    run = ScoreRun.open(Pool.open(pool).group, "mcckpt")
    assert run.group.attrs["fingerprint"]["mc_dropout"] == 0.3 and run.has("bald") and not run.has("embedding")
    got = run.read(("bald", "variation_ratio"))
    assert np.isfinite(got["bald"]).all() and np.isclose(got["variation_ratio"][:, None], [0, 1 / 3, 2 / 3], atol=1e-6).any(axis=1).all()
    # --mc-dropout overrides it: another run
    with pytest.raises(XalError, match=r"different configuration \(mc_dropout\)"):
        score_pool(pool, path, ScoreConfig(unit_size=UNIT, run="mcckpt", num_workers=0, mc_samples=3, mc_dropout=0.6))
