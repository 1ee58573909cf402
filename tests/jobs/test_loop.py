"""The active-learning driver (xal_engine.jobs.loop, `xal-engine loop`): files, split hygiene, resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from xal_engine import cli
from xal_engine.core.inputs import to_unit_float
from xal_engine.core.models import load_checkpoint
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.jobs import loop
from xal_engine.jobs import train as training
from xal_engine.jobs.loop import (
    LoopConfig,
    binary_auroc,
    classification_metrics,
    config_record,
    initial_set,
    run_loop,
)
from xal_engine.jobs.train import TrainConfig
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool
from xal_engine.store.run_folder import METRIC_FIELDS, read_metrics_csv
from xal_engine.store.run_folder import RunWriter as RunDir
from xal_engine.store.score_run import ScoreRun

# 120 phantoms of 32x32: 84 train, 12 val, 24 test. layer2 gives a 4x4 CAM at this size.
POOL = SyntheticConfig(n=120, size=32, classes=3, shortcut=0.9, seed=0)
TINY = LoopConfig(strategies=("random", "dual"), seeds=1, initial=20, per_round=10, rounds=2,
                  train=TrainConfig(epochs=1, batch_size=16, num_workers=0, device="cpu", target_layer="layer2"))
TIMING = ("train_seconds", "score_seconds")


pytestmark = pytest.mark.usefixtures("one_thread")


def arrays(pool_path: Path) -> dict[str, np.ndarray]:
    g = Pool.open(pool_path).group
    return {k: np.asarray(g[k][:]) for k in ("split", "labels", "has_roi")}


def labelled_round(pool_path: Path, experiment: str) -> np.ndarray:
    return np.asarray(Pool.open(pool_path).group[f"al/{experiment}/labelled_round"][:])


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted tiny loop, recording every index set training reads."""
    root = tmp_path_factory.mktemp("loop")
    create_synthetic_pool(POOL, root / "pool.zarr")
    reads: list[np.ndarray] = []
    original = training.BlockDataset

    def spy(pool: Pool, indices: np.ndarray) -> Any:
        reads.append(np.asarray(indices).copy())
        return original(pool, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "BlockDataset", spy)
        rows = run_loop(root / "pool.zarr", root / "run", TINY, log=lambda line: None)
    return {"pool": root / "pool.zarr", "run": root / "run", "rows": rows, "reads": reads}


def test_every_file_is_written(done: dict[str, Any]) -> None:
    run: Path = done["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["pool"] == str(done["pool"].resolve())
    assert (config["strategies"], config["seeds"], config["rounds"], config["arch"]) == (["random", "dual"], [0], 2,
                                                                                         "resnet18")
    assert config["loop"]["initial"] == 20 and config["loop"]["train"]["target_layer"] == "layer2"
    rows = read_metrics_csv(run / "metrics.csv")
    assert list(rows[0]) == list(METRIC_FIELDS)
    assert [(r["strategy"], r["round"], r["n_labelled"]) for r in rows] == [
        (s, str(k), str(20 + 10 * k)) for s in ("random", "dual") for k in range(3)]
    assert json.loads((run / "metrics.json").read_text()) == done["rows"]
    for strategy in ("random", "dual"):
        for r, size in enumerate((20, 10, 10)):
            folder = run / strategy / "seed0" / f"round{r}"
            assert (folder / "model.pt").is_file()
            selected = (folder / "selected.csv").read_text().splitlines()
            assert len(selected) == 1 + size
            assert (folder / "selected.csv.json").is_file()


def test_metrics_equal_a_direct_evaluation_of_the_checkpoint(done: dict[str, Any]) -> None:
    """Round 2 of dual: accuracy and balanced accuracy recomputed from model.pt on the test images."""
    a = arrays(done["pool"])
    test = np.flatnonzero(a["split"] == SPLIT_TEST)
    model, _ = load_checkpoint(done["run"] / "dual" / "seed0" / "round2" / "model.pt")
    images = torch.from_numpy(np.asarray(Pool.open(done["pool"]).group["images"][:])[test])
    with torch.no_grad():
        pred = model(to_unit_float(images)).argmax(1).numpy()
    row = next(r for r in done["rows"] if (r["strategy"], r["round"]) == ("dual", 2))
    truth = a["labels"][test]
    assert row["accuracy"] == pytest.approx(float(np.mean(pred == truth)))
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert 0.0 <= row["test_dice"] <= 1.0 and not math.isnan(row["test_soft_dice"])


def test_the_stopping_signal_is_the_kappa_of_consecutive_rounds_predictions(done: dict[str, Any]) -> None:
    from xal_engine.core.stopping import cohen_kappa

    pool = Pool.open(done["pool"])
    train = np.flatnonzero(pool.column("split") == SPLIT_TRAIN)
    for row in done["rows"]:
        if row["round"] == 0:
            assert row["pred_kappa"] is None and row["stop_suggested"] == 0.0  # NaN recorded as null
            continue
        preds = [ScoreRun.open(pool.group, f"{row['strategy']}-seed0-r{r}").read(("pred",))["pred"][train]
                 for r in (row["round"] - 1, row["round"])]
        assert row["pred_kappa"] == pytest.approx(cohen_kappa(*preds), abs=1e-12)
        assert row["stop_suggested"] == 0.0  # 2 rounds: the 3-round window is never full


def test_labelled_sets_lie_in_the_train_split_and_grow_by_the_selected_batches(done: dict[str, Any]) -> None:
    a = arrays(done["pool"])
    for strategy in ("random", "dual"):
        rounds = labelled_round(done["pool"], f"{strategy}-seed0")
        assert np.all(a["split"][rounds >= 0] == SPLIT_TRAIN)
        assert [int((rounds == r).sum()) for r in range(3)] == [20, 10, 10]
        for r in range(3):
            csv = (done["run"] / strategy / "seed0" / f"round{r}" / "selected.csv").read_text().splitlines()
            index = sorted(int(line.split(",")[1]) for line in csv[1:])
            assert index == np.flatnonzero(rounds == r).tolist()


def test_training_reads_only_the_labelled_set_and_the_validation_split(done: dict[str, Any]) -> None:
    a = arrays(done["pool"])
    val = np.flatnonzero(a["split"] == SPLIT_VAL)
    reads = done["reads"]
    assert len(reads) == 2 * 6  # (train, val) per round, 3 rounds x 2 strategies
    for i, (strategy, r) in enumerate((s, k) for s in ("random", "dual") for k in range(3)):
        rounds = labelled_round(done["pool"], f"{strategy}-seed0")
        train_read, val_read = reads[2 * i], reads[2 * i + 1]
        assert train_read.tolist() == np.flatnonzero((rounds >= 0) & (rounds <= r)).tolist()
        assert val_read.tolist() == val.tolist()  # model selection: the validation split only
        assert not np.any(a["split"][np.concatenate([train_read, val_read])] == SPLIT_TEST)


def test_same_seed_gives_the_same_initial_set_for_every_strategy(done: dict[str, Any]) -> None:
    random0 = labelled_round(done["pool"], "random-seed0") == 0
    dual0 = labelled_round(done["pool"], "dual-seed0") == 0
    assert np.array_equal(random0, dual0)
    # round 0 is the same experiment for both: identical metrics (timings aside)
    first = [{k: v for k, v in r.items() if k not in TIMING + ("strategy",)} for r in done["rows"] if r["round"] == 0]
    assert first[0] == first[1]


def test_initial_set_is_stratified_by_label_and_seeded() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 3 + [0, 1])
    split = np.array([SPLIT_TRAIN] * 12 + [SPLIT_TEST, SPLIT_VAL], dtype=np.uint8)
    chosen = initial_set(labels, split, 4, seed=3)  # quotas 4*6/12 = 2, 1, 1
    assert np.bincount(labels[chosen], minlength=3).tolist() == [2, 1, 1]
    assert np.all(split[chosen] == SPLIT_TRAIN)
    assert np.array_equal(chosen, initial_set(labels, split, 4, seed=3))
    # 5 images: exact quotas 2.5, 1.25, 1.25 -> 2, 1, 1 plus the largest remainder (class 0)
    assert np.bincount(labels[initial_set(labels, split, 5, seed=0)], minlength=3).tolist() == [3, 1, 1]
    assert len(initial_set(labels, split, 50, seed=0)) == 12  # capped at the train split
    draws = {tuple(initial_set(labels, split, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1


def test_resume_after_a_kill_equals_the_uninterrupted_run(done: dict[str, Any], tmp_path: Path) -> None:
    pool = tmp_path / "pool.zarr"
    create_synthetic_pool(POOL, pool)
    calls = {"n": 0}
    original = loop.score_pool

    def dies_in_dual_round_1(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # random r0, r1, r2, dual r0, then dual r1: after labelling and training
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "score_pool", dies_in_dual_round_1)
        with pytest.raises(KeyboardInterrupt):
            run_loop(pool, tmp_path / "run", TINY, log=lambda line: None)
    assert len(read_metrics_csv(tmp_path / "run" / "metrics.csv")) == 4
    assert int((labelled_round(pool, "dual-seed0") == 1).sum()) == 10  # the half-done round's labels

    lines: list[str] = []
    run_loop(pool, tmp_path / "run", TINY, log=lines.append)
    assert "dual-seed0: resuming at round 1 (1 complete)" in lines
    resumed = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    reference = read_metrics_csv(done["run"] / "metrics.csv")
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows] for rows in (resumed, reference)]
    assert strip[0] == strip[1]
    for experiment in ("random-seed0", "dual-seed0"):
        assert np.array_equal(labelled_round(pool, experiment), labelled_round(done["pool"], experiment))


def test_another_config_in_the_run_folder_is_refused_unless_overwrite(done: dict[str, Any], tmp_path: Path) -> None:
    record = config_record(done["pool"], TINY)
    RunDir.prepare(tmp_path / "run", record, overwrite=False).add_row(
        {f: 0 for f in METRIC_FIELDS} | {"strategy": "random"})
    other = config_record(done["pool"], replace(TINY, per_round=11))
    with pytest.raises(XalError, match=r"config.json holds another configuration \(differs in: loop\.per_round\)"):
        RunDir.prepare(tmp_path / "run", other, overwrite=False)
    # num_workers does not change results: resuming with another value is allowed
    workers = config_record(done["pool"], replace(TINY, train=replace(TINY.train, num_workers=2)))
    assert len(RunDir.prepare(tmp_path / "run", workers, overwrite=False).rows) == 1
    fresh = RunDir.prepare(tmp_path / "run", other, overwrite=True)
    assert fresh.rows == [] and json.loads((tmp_path / "run" / "config.json").read_text()) == other
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("x")
    with pytest.raises(XalError, match="holds no config.json"):
        RunDir.prepare(tmp_path / "stranger", record, overwrite=True)


def test_resuming_an_experiment_another_run_folder_rewrote_is_refused(done: dict[str, Any], tmp_path: Path) -> None:
    """Round 0 of this folder is complete, but al/dual-seed0 in the pool belongs to the fixture's run."""
    run_dir = RunDir.prepare(tmp_path / "run", config_record(done["pool"], TINY), overwrite=False)
    run_dir.add_row({f: 0 for f in METRIC_FIELDS} | {"strategy": "dual"})
    step = loop.ALLoop(done["pool"], run_dir, TINY, "dual", 0, log=lambda line: None)
    assert step.round == 1
    with pytest.raises(XalError, match=r"AL experiment 'dual-seed0' now belongs to run folder .*pass --overwrite"):
        step.step()


def test_loop_stops_when_no_candidate_is_left(tmp_path: Path) -> None:
    pool = tmp_path / "pool.zarr"
    create_synthetic_pool(replace(POOL, n=48, roi_fraction=0.0), pool)  # no ROI anywhere
    n_train = int((arrays(pool)["split"] == SPLIT_TRAIN).sum())
    config = replace(TINY, strategies=("entropy",), initial=n_train - 4, per_round=10, rounds=3)
    lines: list[str] = []
    rows = run_loop(pool, tmp_path / "run", config, log=lines.append)
    assert [(r["round"], r["n_labelled"]) for r in rows] == [(0, n_train - 4), (1, n_train)]
    assert "entropy-seed0: no unlabelled train images left; stopping after round 1" in lines
    # no test image has an ROI: attention metrics are null in JSON (strict JSON), nan in CSV
    assert all(r[f] is None for r in rows for f in ("test_dice", "test_soft_dice", "test_energy", "test_hit_rate"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == rows
    assert {r["test_dice"] for r in read_metrics_csv(tmp_path / "run" / "metrics.csv")} == {"nan"}


def test_finetune_starts_each_round_from_the_previous_checkpoint(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool.zarr"
    create_synthetic_pool(replace(POOL, n=48), pool)
    starts: list[dict[str, torch.Tensor] | None] = []
    original = loop.train

    def spy(*args: Any, initial_state: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        starts.append(initial_state)
        return original(*args, initial_state=initial_state, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    config = replace(TINY, strategies=("margin",), initial=10, per_round=6, rounds=1, retrain="finetune")
    run_loop(pool, tmp_path / "run", config, log=lambda line: None)
    assert len(starts) == 2 and starts[0] is None
    round0, _ = load_checkpoint(tmp_path / "run" / "margin" / "seed0" / "round0" / "model.pt")
    previous = round0.state_dict()
    assert starts[1] is not None and all(torch.equal(starts[1][k], previous[k]) for k in previous)


def test_cli_maps_the_explanation_loss_and_retrain_flags() -> None:
    from xal_engine.cli import build_parser
    from xal_engine.cli.loop import config_from_args

    args = build_parser().parse_args(["loop", "--pool", "p", "--strategy", "dual", "--initial", "5", "--per-round",
                                      "2", "--rounds", "1", "--out", "o", "--explanation-loss", "0.1",
                                      "--retrain", "finetune", "--balance", "oracle", "--dice", "soft"])
    config = config_from_args(args)
    assert (config.train.explanation_weight, config.retrain, config.balance, config.dice) == (
        0.1, "finetune", "oracle", "soft")
    assert config.train.target_layer is None and config.strategies == ("dual",)


def test_classification_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200).astype(np.float32)
    probs[np.arange(200), labels] += rng.random(200) * 0.5 * (rng.random(200) < 0.6)  # some skill
    probs /= probs.sum(1, keepdims=True)
    probs = probs.astype(np.float16).astype(np.float32)  # stored precision: ties appear
    pred = probs.argmax(1)
    got = classification_metrics(labels, pred, probs)
    assert got["accuracy"] == pytest.approx(float(np.mean(pred == labels)))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    expected_auc = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(4)])
    assert got["auroc"] == pytest.approx(expected_auc)


def test_binary_auroc_hand_cases() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 -> 1/2, 0.4>0.1) = 3.5/4
    assert binary_auroc(np.array([0.8, 0.4, 0.4, 0.1]), np.array([True, True, False, False])) == 0.875
    assert math.isnan(binary_auroc(np.array([0.3, 0.2]), np.array([True, True])))
    # a class absent from the test labels: AUROC averages the classes present; F1 counts predicted ones
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]),
                               np.array([[0.6, 0.1, 0.3], [0.3, 0.2, 0.5], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]))
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert m["auroc"] == pytest.approx(1.0)


def test_cli_resumes_a_complete_run_without_work(done: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["loop", "--pool", str(done["pool"]), "--strategy", "random", "--strategy", "dual", "--initial", "20",
            "--per-round", "10", "--rounds", "2", "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
            "--device", "cpu", "--target-layer", "layer2", "--out", str(done["run"]), "--json"]
    assert cli.main(argv) == 0  # the flags map to TINY exactly: every round is complete, nothing runs
    captured = capsys.readouterr()
    assert json.loads(captured.out) == done["rows"]
    assert captured.err.splitlines() == [f"{e}-seed0: already complete (rounds 0..2 recorded); nothing to run"
                                         for e in ("random", "dual")]
    assert cli.main([*argv, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "(differs in: loop.train.epochs);" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--retrain", "sideways"]) == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_cli_a_truncated_metrics_json_is_one_line(done: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    run = shutil.copytree(done["run"], tmp_path / "run")
    metrics = run / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[: metrics.stat().st_size // 2])  # a copy cut short
    argv = ["loop", "--pool", str(done["pool"]), "--strategy", "random", "--strategy", "dual", "--initial", "20",
            "--per-round", "10", "--rounds", "2", "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
            "--device", "cpu", "--target-layer", "layer2", "--out", str(run)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{metrics} cannot be read as JSON" in err[0], err
    assert "pass --overwrite" in err[0]


@pytest.mark.parametrize("argv,needle", [
    (["--strategy", "dual", "--initial", "0"], "--initial must be >= 1"),
    (["--strategy", "dual", "--arch", "resnet7"], "unknown architecture 'resnet7'"),
    (["--strategy", "dual", "--seeds", "0"], "--seeds must be >= 1"),
    # training settings and the pool's size are checked before the run folder is written, so that the
    # corrected command does not meet a half-written folder with another configuration
    (["--strategy", "dual", "--initial", "500"], "--initial 500 is more than the"),
    (["--strategy", "dual", "--target-layer", "layer9"], "model has no layer 'layer9'"),
    (["--strategy", "dual", "--explanation-loss", "-1"], "explanation_weight must be >= 0, got -1.0"),
    (["--strategy", "dual", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--strategy", "dual", "--device", "tpu"], "device 'tpu' is not"),
])
def test_cli_errors_are_one_line_exit_2(done: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        argv: list[str], needle: str) -> None:
    base = ["loop", "--pool", str(done["pool"]), "--initial", "5", "--per-round", "2", "--rounds", "1",
            "--out", str(tmp_path / "run")]
    assert cli.main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_default_target_layer_is_chosen_once_and_recorded(done: dict[str, Any], tmp_path: Path) -> None:
    # 32x32 pool: without a layer the loop takes resnet18's layer1 (8x8), recorded in config.json, so a
    # run made with layer2 is another configuration (refused before the pool is touched).
    default = replace(TINY, train=replace(TINY.train, target_layer=None))
    with pytest.raises(XalError, match=r"differs in: loop\.train\.target_layer"):
        run_loop(done["pool"], done["run"], default, log=lambda line: None)
    create_synthetic_pool(POOL, tmp_path / "pool.zarr")
    one = replace(default, strategies=("random",), rounds=0)
    run_loop(tmp_path / "pool.zarr", tmp_path / "run", one, log=lambda line: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["loop"]["train"]["target_layer"] == "layer1"
    info = load_checkpoint(tmp_path / "run" / "random" / "seed0" / "round0" / "model.pt")[1]
    assert (info.target_layer, info.target_map) == ("layer1", (8, 8))


def test_a_run_folder_begun_before_layers_were_recorded_resumes_with_the_last_stage(tmp_path: Path) -> None:
    # config.json of an older run folder: target_layer null, meaning the architecture's last stage
    create_synthetic_pool(POOL, tmp_path / "pool.zarr")
    one = replace(TINY, strategies=("random",), rounds=0, train=replace(TINY.train, target_layer=None))
    (tmp_path / "run").mkdir()
    record = loop.config_record(tmp_path / "pool.zarr", one)
    assert record["loop"]["train"]["target_layer"] is None
    (tmp_path / "run" / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    before = (tmp_path / "run" / "config.json").read_bytes()
    run_loop(tmp_path / "pool.zarr", tmp_path / "run", one, log=lambda line: None)
    assert (tmp_path / "run" / "config.json").read_bytes() == before  # resumed, not refused or rewritten
    info = load_checkpoint(tmp_path / "run" / "random" / "seed0" / "round0" / "model.pt")[1]
    assert info.target_layer == "layer4"


def test_an_experiment_label_made_is_refused_unless_taken_over(tmp_path: Path) -> None:
    from xal_engine.jobs.label import ImportConfig, import_labels, undo_import

    pool_path = tmp_path / "pool.zarr"
    create_synthetic_pool(replace(POOL, n=60), pool_path)
    pool = Pool.open(pool_path)
    train_rows = np.flatnonzero(pool.column("split") == SPLIT_TRAIN)[:30]
    ids, labels = pool.take("ids", train_rows), pool.take("labels", train_rows)
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text("id,class\n" + "".join(f"{i},{k}\n" for i, k in zip(ids, labels)))
    import_labels(pool_path, csv_path, ImportConfig(experiment="random-seed0"))
    imported = labelled_round(pool_path, "random-seed0")
    config = replace(TINY, strategies=("random",), rounds=0)

    with pytest.raises(XalError, match=r"AL experiment 'random-seed0' holds 1 label import\(s\); pass "
                                       r"--take-over-experiments") as err:
        run_loop(pool_path, tmp_path / "run", config, log=lambda line: None)
    assert "\n" not in str(err.value)
    np.testing.assert_array_equal(labelled_round(pool_path, "random-seed0"), imported)

    lines: list[str] = []
    run_loop(pool_path, tmp_path / "run", config, log=lines.append, take_over_experiments=True)
    rounds = labelled_round(pool_path, "random-seed0")
    assert int((rounds >= 0).sum()) == TINY.initial and (rounds >= 0).sum() != (imported >= 0).sum()
    assert "random-seed0: took over AL experiment 'random-seed0' (1 label import(s) detached)" in lines
    experiment = Pool.open(pool_path).experiment("random-seed0")
    assert experiment.imports() == [] and len(experiment.attrs()["replaced_imports"]) == 1
    assert Pool.open(pool_path).labels_history().records()[0]["rounds_replaced"]
    undone = undo_import(pool_path)  # the labels go back; the loop's rounds are not the import's
    assert (undone.n_labels, undone.n_rounds) == (30, 0)
    np.testing.assert_array_equal(labelled_round(pool_path, "random-seed0"), rounds)
    run_loop(pool_path, tmp_path / "run", config, log=lambda line: None)  # its own experiment: resumes


def test_cli_names_the_take_over_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["loop", "--help"]) == 0
    assert "--take-over-experiments" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_loop_killed_after_two_rounds_resumes_to_the_uninterrupted_run(done: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    """SIGKILL `xal-engine loop` once metrics.csv holds 2 rows; the same command again equals `done`."""
    import signal
    import subprocess
    import sys
    import time

    pool, run_dir = tmp_path / "pool.zarr", tmp_path / "run"
    create_synthetic_pool(POOL, pool)
    cmd = [sys.executable, "-m", "xal_engine", "loop", "--pool", str(pool), "--strategy", "random",
           "--strategy", "dual", "--initial", "20", "--per-round", "10", "--rounds", "2", "--epochs", "1",
           "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--target-layer", "layer2",
           "--threads", "1", "--quiet", "--out", str(run_dir)]
    metrics = run_dir / "metrics.csv"

    def rows_written() -> int:
        try:
            return max(0, len(metrics.read_text().splitlines()) - 1)
        except OSError:
            return 0

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and rows_written() < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = rows_written()
    assert 2 <= n < 6, f"the kill was not mid-way ({n} of 6 rows)"
    subprocess.run(cmd, capture_output=True, check=True)
    resumed, reference = read_metrics_csv(metrics), read_metrics_csv(done["run"] / "metrics.csv")
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows] for rows in (resumed, reference)]
    assert strip[0] == strip[1]
    for experiment in ("random-seed0", "dual-seed0"):
        assert np.array_equal(labelled_round(pool, experiment), labelled_round(done["pool"], experiment))


@pytest.mark.slow
def test_a_quick_loop_runs_every_registered_strategy_from_a_typiclust_start(tmp_path: Path) -> None:
    """Every strategy of the registry through two rounds (round 0 chosen label-free by TypiClust on a
    random model's embeddings): the runs store what each strategy needs, every batch is new train
    images, and every experiment of the seed starts from the same initial set."""
    from xal_engine.core import strategies
    from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
    from xal_engine.ingest.synthetic import class_names

    pool = tmp_path / "pool.zarr"
    create_synthetic_pool(POOL, pool)
    torch.manual_seed(0)
    embedder = save_checkpoint(tmp_path / "embedder.pt", build_model("resnet18", 3, 1),
                               Checkpoint(arch="resnet18", num_classes=3, in_channels=1,
                                          classes=tuple(class_names(3)), target_layer="layer2"))
    config = replace(TINY, strategies=strategies.STRATEGIES, rounds=1, mc_samples=4,
                     initial_strategy="typiclust", initial_model=str(embedder),
                     train=replace(TINY.train, head_dropout=0.3))
    rows = run_loop(pool, tmp_path / "run", config, log=lambda line: None)
    assert sorted({r["strategy"] for r in rows}) == sorted(strategies.STRATEGIES) and len(rows) == 2 * len(
        strategies.STRATEGIES)
    p = Pool.open(pool)
    split = p.column("split")
    starts = set()
    for name in strategies.STRATEGIES:
        rounds = labelled_round(pool, f"{name}-seed0")
        assert (split[rounds >= 0] == SPLIT_TRAIN).all()
        assert (rounds == 0).sum() == 20 and (rounds == 1).sum() == 10, name
        starts.add(tuple(np.flatnonzero(rounds == 0)))
        stored = set(ScoreRun.open(p.group, f"{name}-seed0-r0").group.array_keys())
        for needed in strategies.get(name).needs:
            assert needed in stored, (name, needed)
    assert len(starts) == 1  # one TypiClust initial set for the seed


def test_cli_maps_the_cam_method_to_scoring_and_the_explanation_loss() -> None:
    from xal_engine.cli import build_parser
    from xal_engine.cli.loop import config_from_args

    base = ["loop", "--pool", "p", "--strategy", "dual", "--initial", "5", "--per-round", "2", "--rounds", "1",
            "--out", "o"]
    config = config_from_args(build_parser().parse_args([*base, "--cam-method", "layercam"]))
    assert config.cam_method == config.train.cam_method == "layercam"
    default = config_from_args(build_parser().parse_args(base))
    assert default.cam_method == default.train.cam_method == "gradcam"
    with pytest.raises(XalError, match="--cam-method: expected one of gradcam, gradcam\\+\\+, .*got 'scorecam'"):
        LoopConfig(cam_method="scorecam")


def test_config_json_records_the_cam_method_only_when_not_the_default(tmp_path: Path) -> None:
    """A default run's config.json is as before (run folders begun before --cam-method resume);
    another method is recorded, so a folder of one method refuses a run of the other."""
    plain = config_record(tmp_path / "p.zarr", TINY)
    assert "cam_method" not in plain["loop"] and "cam_method" not in plain["loop"]["train"]
    other = replace(TINY, cam_method="hirescam", train=replace(TINY.train, cam_method="hirescam"))
    record = config_record(tmp_path / "p.zarr", other)
    assert record["loop"]["cam_method"] == record["loop"]["train"]["cam_method"] == "hirescam"
    RunDir.prepare(tmp_path / "run", plain, overwrite=False)
    with pytest.raises(XalError, match="differs in: .*loop.cam_method"):
        RunDir.prepare(tmp_path / "run", record, overwrite=False)


def test_scoring_gets_the_cam_method_keyword_only_for_another_method() -> None:
    from dataclasses import fields

    from xal_engine.jobs.score import ScoreConfig

    assert loop.cam_method_field("gradcam") == {}
    if "cam_method" in {f.name for f in fields(ScoreConfig)}:
        assert loop.cam_method_field("eigencam") == {"cam_method": "eigencam"}
        assert ScoreConfig(**loop.cam_method_field("eigencam")).cam_method == "eigencam"
    else:  # the scoring side has not added the field yet: a clear line, not a TypeError
        with pytest.raises(XalError, match="--cam-method eigencam: this build's scoring takes no CAM method yet"):
            loop.cam_method_field("eigencam")
