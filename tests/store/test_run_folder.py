"""The loop's run folder (store/run_folder.py) on hand-made folders: its layout, RunWriter's atomic
metrics files and resume rules, the checked readers' errors (file, line, column) and the batch CSVs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xal_engine.errors import XalError
from xal_engine.store.run_folder import (
    METRIC_FIELDS,
    RUN_FORMAT,
    RunFolder,
    RunWriter,
    count_selected,
    read_metrics_csv,
    read_selected,
    run_config,
    write_metrics_csv,
)

CONFIG: dict[str, Any] = {
    "format": RUN_FORMAT, "pool": "/data/p.zarr", "strategies": ["random", "dual"], "seeds": [0, 1],
    "rounds": 2, "arch": "resnet18", "loop": {"initial": 10, "train": {"epochs": 3, "num_workers": 0}}}


def row(strategy: str, seed: int, round_: int, **values: float) -> dict[str, Any]:
    """One metrics row: every metric 0.5 unless given, 10 + 5 * round labels."""
    return ({f: 0.5 for f in METRIC_FIELDS[4:]} | {"strategy": strategy, "seed": seed, "round": round_,
                                                   "n_labelled": 10 + 5 * round_} | values)


def with_train(**train: Any) -> dict[str, Any]:
    """CONFIG with other loop.train fields."""
    return CONFIG | {"loop": CONFIG["loop"] | {"train": train}}


def message(excinfo: pytest.ExceptionInfo[XalError]) -> str:
    return str(excinfo.value)


def test_layout_paths(tmp_path: Path) -> None:
    run = RunFolder("/runs/a")
    assert (run.config_json, run.metrics_csv, run.metrics_json, run.report_dir) == (
        Path("/runs/a/config.json"), Path("/runs/a/metrics.csv"), Path("/runs/a/metrics.json"),
        Path("/runs/a/report"))
    assert run.strategy_dir("dual") == Path("/runs/a/dual")
    assert run.experiment_dir("dual", 2) == Path("/runs/a/dual/seed2")
    assert run.round_dir("dual", 2, 3) == Path("/runs/a/dual/seed2/round3")
    assert run.selected_csv("dual", 2, 3) == Path("/runs/a/dual/seed2/round3/selected.csv")
    assert run.model_pt("dual", 2, 3) == Path("/runs/a/dual/seed2/round3/model.pt")
    # round r's batch was chosen by round r-1's model; round 0's set by nothing, its own model stands in
    assert run.selecting_model_pt("dual", 2, 3) == Path("/runs/a/dual/seed2/round2/model.pt")
    assert run.selecting_model_pt("dual", 2, 0) == Path("/runs/a/dual/seed2/round0/model.pt")

    writer = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    made = writer.make_round_dir("random", 1, 4)
    assert made == tmp_path / "run" / "random" / "seed1" / "round4" and made.is_dir()
    for missing in (tmp_path / "none", writer.config_json):  # absent, or a file
        with pytest.raises(XalError) as err:
            RunFolder.open(missing)
        assert message(err) == f"run directory {missing} not found"


def test_run_config_is_plain_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loop = {"lam": 0.3, "train": {"checkpoint": Path("m.pt"), "sizes": (32, 64)}}
    assert run_config("p.zarr", ("random", "dual"), 3, 2, "resnet18", loop) == {
        "format": 1, "pool": str(tmp_path.resolve() / "p.zarr"), "strategies": ["random", "dual"],
        "seeds": [0, 1, 2], "rounds": 2, "arch": "resnet18",
        "loop": {"lam": 0.3, "train": {"checkpoint": "m.pt", "sizes": [32, 64]}}}


def test_prepare_creates_the_folder_and_its_config(tmp_path: Path) -> None:
    run = RunWriter.prepare(tmp_path / "new" / "run", CONFIG, overwrite=False)
    assert run.rows == [] and os.listdir(run.path) == ["config.json"]
    assert run.config_json.read_text() == json.dumps(CONFIG, indent=2) + "\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(XalError) as err:
        RunWriter.prepare(tmp_path / "file", CONFIG, overwrite=True)
    assert message(err) == f"--out {tmp_path / 'file'} exists and is not a folder"


def test_add_row_writes_json_and_csv_replacing_a_rounds_row(tmp_path: Path) -> None:
    run = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    run.add_row(row("random", 0, 0))
    run.add_row(row("random", 0, 1, accuracy=math.nan, test_dice=0.25))
    run.add_row(row("random", 0, 0, accuracy=0.75))  # round 0 again: replaces the first row, now last
    assert run.metrics_csv.read_text() == (
        ",".join(METRIC_FIELDS) + "\n"
        "random,0,1,15,nan,0.5,0.5,0.5,0.25,0.5,0.5,0.5,0.5,0.5,0.5,0.5\n"
        "random,0,0,10,0.75,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5\n")
    text = run.metrics_json.read_text()
    assert "NaN" not in text  # NaN is null: plain JSON
    assert json.loads(text) == [row("random", 0, 1, accuracy=None, test_dice=0.25),  # type: ignore[arg-type]
                                row("random", 0, 0, accuracy=0.75)]
    assert sorted(os.listdir(run.path)) == ["config.json", "metrics.csv", "metrics.json"]  # no temp file left


def test_a_failed_rewrite_leaves_both_metrics_files_as_they_were(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    run.add_row(row("dual", 0, 0))
    before = {name: (run.path / name).read_bytes() for name in os.listdir(run.path)}

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("xal_engine.store.files.os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run.add_row(row("dual", 0, 1))
    assert {name: (run.path / name).read_bytes() for name in os.listdir(run.path)} == before


def test_resume_reads_the_rows_back_and_counts_consecutive_rounds(tmp_path: Path) -> None:
    run = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    for r in (0, 1, 3):
        run.add_row(row("dual", 1, r))
    run.add_row(row("random", 1, 0))
    resumed = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    assert [(r["strategy"], r["seed"], r["round"]) for r in resumed.rows] == [
        ("dual", 1, 0), ("dual", 1, 1), ("dual", 1, 3), ("random", 1, 0)]
    assert resumed.completed_rounds("dual", 1) == 2  # 0 and 1; round 3 after the gap does not count
    assert resumed.completed_rounds("random", 1) == 1
    assert resumed.completed_rounds("dual", 0) == 0 and resumed.completed_rounds("entropy", 1) == 0
    resumed.add_row(row("dual", 1, 2))  # the gap filled: 0..3 complete
    assert resumed.completed_rounds("dual", 1) == 4
    assert len(read_metrics_csv(resumed.metrics_csv)) == 5


def test_resume_refuses_another_config_but_not_another_num_workers(tmp_path: Path) -> None:
    path = tmp_path / "run"
    RunWriter.prepare(path, CONFIG, overwrite=False).add_row(row("random", 0, 0))
    RunWriter.prepare(path, CONFIG, overwrite=False).make_round_dir("random", 0, 0)
    cases = {"rounds, seeds": CONFIG | {"rounds": 3, "seeds": [0, 1, 2]},
             "loop.train.epochs": with_train(epochs=4, num_workers=0)}  # the nested field itself
    for differs, other in cases.items():
        with pytest.raises(XalError) as err:
            RunWriter.prepare(path, other, overwrite=False)
        assert message(err) == (f"{path / 'config.json'} holds another configuration (differs in: {differs}); "
                                "use another --out or pass --overwrite")
    for train in ({"epochs": 3, "num_workers": 4}, {"epochs": 3}):  # changed or left out: same results
        resumed = RunWriter.prepare(path, with_train(**train), overwrite=False)
        assert len(resumed.rows) == 1
        assert json.loads(resumed.config_json.read_text()) == CONFIG  # the first config stays
    fresh = RunWriter.prepare(path, cases["loop.train.epochs"], overwrite=True)
    assert fresh.rows == [] and os.listdir(path) == ["config.json"]  # metrics and rounds deleted
    assert json.loads(fresh.config_json.read_text()) == cases["loop.train.epochs"]


def test_more_seeds_extend_the_run_and_fewer_resume_part_of_it(tmp_path: Path) -> None:
    path = tmp_path / "run"
    RunWriter.prepare(path, CONFIG, overwrite=False).add_row(row("random", 1, 0))
    more = CONFIG | {"seeds": [0, 1, 2, 3], "loop": {**CONFIG["loop"], "seeds": 4}}
    grown = RunWriter.prepare(path, more, overwrite=False)
    assert [(r["strategy"], r["seed"]) for r in grown.rows] == [("random", 1)]  # the done rows are kept
    assert json.loads(grown.config_json.read_text()) == more  # the record says what the folder now holds
    fewer = CONFIG | {"seeds": [0], "loop": {**CONFIG["loop"], "seeds": 1}}
    part = RunWriter.prepare(path, fewer, overwrite=False)
    assert len(part.rows) == 1 and json.loads(part.config_json.read_text()) == more  # not shrunk


def test_the_refusal_names_every_nested_field_that_differs(tmp_path: Path) -> None:
    path = tmp_path / "run"
    RunWriter.prepare(path, CONFIG, overwrite=False)
    other = CONFIG | {"arch": "resnet50", "loop": {"initial": 12, "train": {"epochs": 3, "lr": 0.1}}}
    with pytest.raises(XalError) as err:
        RunWriter.prepare(path, other, overwrite=False)
    assert message(err) == (f"{path / 'config.json'} holds another configuration (differs in: arch, "
                            "loop.initial, loop.train.lr); use another --out or pass --overwrite")


def test_non_finite_numbers_are_null_in_config_and_metrics_json(tmp_path: Path) -> None:
    config = CONFIG | {"loop": {"initial": 10, "train": {"epochs": 3, "lr": math.nan, "clip": math.inf}}}
    run = RunWriter.prepare(tmp_path / "run", config, overwrite=False)
    run.add_row(row("dual", 0, 0, accuracy=math.inf, auroc=-math.inf, test_dice=np.float64("nan")))

    def refuse(name: str) -> None:
        raise AssertionError(f"not JSON: {name}")

    stored = json.loads(run.config_json.read_text(), parse_constant=refuse)
    assert stored["loop"]["train"] == {"epochs": 3, "lr": None, "clip": None}
    rows = json.loads(run.metrics_json.read_text(), parse_constant=refuse)
    assert (rows[0]["accuracy"], rows[0]["auroc"], rows[0]["test_dice"], rows[0]["macro_f1"]) == (
        None, None, None, 0.5)
    assert read_metrics_csv(run.metrics_csv)[0]["accuracy"] == "nan"
    table = RunFolder(run.path).read_metrics(["accuracy", "macro_f1"])  # the reader reads null back as NaN
    assert math.isnan(table.values["accuracy"][0]) and table.values["macro_f1"][0] == 0.5
    resumed = RunWriter.prepare(tmp_path / "run", config, overwrite=False)  # stored config == its own
    assert resumed.rows == rows


def test_an_unreadable_config_is_refused_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.json").write_text("format 1")
    with pytest.raises(XalError) as err:
        RunWriter.prepare(path, CONFIG, overwrite=False)
    assert message(err) == (f"{path / 'config.json'} cannot be read as JSON (Expecting value: line 1 column 1 "
                            "(char 0)); pass --overwrite to start afresh")


def test_read_config_errors_name_the_file(tmp_path: Path) -> None:
    folder = RunFolder.open(tmp_path)
    cfg = tmp_path / "config.json"
    expected = {
        None: (f"{cfg} not found: {tmp_path} is not a loop run directory "
               "(expected config.json and metrics.csv from `xal-engine loop`)"),
        "[1, 2]": f"{cfg} must hold a JSON object (got list)",
        "version 1": f"{cfg} cannot be read as JSON (Expecting value: line 1 column 1 (char 0))",
    }
    for text, expected_message in expected.items():
        if text is not None:
            cfg.write_text(text)
        with pytest.raises(XalError) as err:
            folder.read_config()
        assert message(err) == expected_message
    cfg.write_text(json.dumps(CONFIG))
    assert folder.read_config() == CONFIG


def test_read_metrics_by_column(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "strategy,seed,round,n_labelled,accuracy,test_dice\n"
        "random,0,0,10,0.5,\n"
        "dual,1.0,2,20.0,nan,0.25\n"
        "\n"
        "random,0,1,15,1e-1,0.75\n")
    table = RunFolder.open(tmp_path).read_metrics(("accuracy", "test_dice", "auroc"))
    assert table.strategy == ["random", "dual", "random"]
    assert table.seed.dtype == np.int64 and table.seed.tolist() == [0, 1, 0]  # "1.0" is the integer 1
    assert table.round.dtype == np.int64 and table.round.tolist() == [0, 2, 1]
    assert table.n_labelled.tolist() == [10.0, 20.0, 15.0]
    assert list(table.values) == ["accuracy", "test_dice", "auroc"]
    np.testing.assert_array_equal(table.values["accuracy"], [0.5, np.nan, 0.1])  # "nan" and "1e-1" parse
    np.testing.assert_array_equal(table.values["test_dice"], [np.nan, 0.25, 0.75])  # empty cell: NaN
    np.testing.assert_array_equal(table.values["auroc"], [np.nan] * 3)  # absent column: NaN


HEADER = "strategy,seed,round,n_labelled,accuracy"


@pytest.mark.parametrize("text, problem", [
    ("strategy,accuracy\nrandom,0.5\n",
     "missing column(s) seed, round, n_labelled (expected strategy, seed, round, n_labelled and the metrics)"),
    # line numbers count blank lines; a row is checked strategy first, then column by column
    (f"{HEADER}\nrandom,0,0,10,0.5\n\n,0,1,ten,0.5\n", "line 4: empty strategy"),
    (f"{HEADER}\nrandom,0,0,10,0.5\nrandom,0,1,ten,high\n", "line 3: column n_labelled is 'ten', expected a number"),
    (f"{HEADER}\nrandom,0,0,10,0.5\nrandom,0,1,15,high\n", "line 3: column accuracy is 'high', expected a number"),
    (f"{HEADER}\nrandom,1.5,0,10,0.5\n", "column seed holds 1.5, expected integers >= 0"),
    (f"{HEADER}\nrandom,0,-1,10,0.5\n", "column round holds -1.0, expected integers >= 0"),
    (f"{HEADER}\nrandom,,0,10,0.5\n", "column seed holds nan, expected integers >= 0"),
])
def test_read_metrics_errors_name_the_file_line_and_column(text: str, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    with pytest.raises(XalError) as err:
        RunFolder.open(tmp_path).read_metrics(("accuracy",))
    assert message(err) == f"{path}: {problem}"


def test_read_metrics_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(XalError) as err:
        RunFolder.open(tmp_path).read_metrics(())
    assert message(err) == (f"{tmp_path / 'metrics.csv'} not found: the run has not completed a round yet "
                            f"(or {tmp_path} is not a loop run directory)")


def test_metrics_csv_strings_round_trip_byte_for_byte(tmp_path: Path) -> None:
    run = RunWriter.prepare(tmp_path / "run", CONFIG, overwrite=False)
    run.add_row(row("random", 0, 0, auroc=math.nan))
    run.add_row(row("dual", 1, 1, accuracy=1 / 3))
    rows = read_metrics_csv(run.metrics_csv)  # strings as written, no checks
    assert rows[0] == dict(zip(METRIC_FIELDS, ["random", "0", "0", "10", "0.5", "0.5", "0.5", "nan", "0.5",
                                               "0.5", "0.5", "0.5", "0.5", "0.5", "0.5", "0.5"], strict=True))
    assert rows[1]["accuracy"] == "0.3333333333333333" and rows[1]["n_labelled"] == "15"
    write_metrics_csv(tmp_path / "copy.csv", rows)
    assert (tmp_path / "copy.csv").read_bytes() == run.metrics_csv.read_bytes()
    write_metrics_csv(tmp_path / "dual.csv", [r for r in rows if r["strategy"] == "dual"])
    assert (tmp_path / "dual.csv").read_text().splitlines() == [run.metrics_csv.read_text().splitlines()[i]
                                                                for i in (0, 2)]


def test_rows_from_before_the_stopping_signal_are_written_with_nan_there(tmp_path: Path) -> None:
    old = {k: v for k, v in row("random", 0, 0).items() if k not in ("pred_kappa", "stop_suggested")}
    write_metrics_csv(tmp_path / "m.csv", [old])
    got = read_metrics_csv(tmp_path / "m.csv")[0]
    assert (got["pred_kappa"], got["stop_suggested"], got["accuracy"]) == ("nan", "nan", "0.5")


def test_read_selected_and_count_selected(tmp_path: Path) -> None:
    path = tmp_path / "selected.csv"
    path.write_text("rank,index,id,score\n1,7,img_7,0.9\n2,3,img_3,0.8\n3,12,img_12,0.1\n")
    index, ids = read_selected(path)
    assert index.dtype == np.int64 and index.tolist() == [7, 3, 12] and ids == ["img_7", "img_3", "img_12"]
    index, ids = read_selected(path, 2)  # the first rows in rank order
    assert index.tolist() == [7, 3] and ids == ["img_7", "img_3"]
    assert count_selected(path) == 3
    path.write_text("rank,index,id\n")
    index, ids = read_selected(path)
    assert index.dtype == np.int64 and index.shape == (0,) and ids == [] and count_selected(path) == 0
    path.write_text("")
    assert count_selected(path) == 0


def test_read_selected_errors(tmp_path: Path) -> None:
    path = tmp_path / "selected.csv"
    path.write_text("rank,id\n1,img_0\n")
    with pytest.raises(XalError) as err:
        read_selected(path)
    assert message(err) == f"{path}: expected columns index and id (a batch CSV from `xal-engine select`)"
    path.write_text("rank,index,id\n1,7,img_7\n2,x,img_x\n")
    with pytest.raises(XalError) as err:
        read_selected(path)
    assert message(err) == f"{path}: line 3: index is not an integer"
    assert read_selected(path, 1)[0].tolist() == [7]  # rows past the limit are not read


def test_batches_in_round_order(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for r in (10, 0, 2, 1):
        run.round_dir("dual", 0, r).mkdir(parents=True)
    for r in (10, 0, 2):
        run.selected_csv("dual", 0, r).write_text("rank,index,id\n")
    run.model_pt("dual", 0, 1).write_text("")  # round 1: a checkpoint but no batch
    (run.experiment_dir("dual", 0) / "roundx").mkdir()  # not a round folder
    (run.experiment_dir("dual", 0) / "roundx" / "selected.csv").write_text("rank,index,id\n")
    run.selected_csv("dual", 1, 5).parent.mkdir(parents=True)
    run.selected_csv("dual", 1, 5).write_text("rank,index,id\n")
    assert run.batches("dual", 0) == [(0, run.selected_csv("dual", 0, 0)), (2, run.selected_csv("dual", 0, 2)),
                                      (10, run.selected_csv("dual", 0, 10))]  # by number: 2 before 10
    assert run.batches("dual", 1) == [(5, run.selected_csv("dual", 1, 5))]
    assert run.batches("random", 0) == []  # no folder yet
