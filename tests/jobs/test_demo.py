"""The embedded demo (xal_engine.jobs.demo): pool with a shortcut cue, loop, report, resumption."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pytest
import torch

from xal_engine.jobs import loop
from xal_engine.jobs.demo import DEFAULT, DemoConfig, run_demo, summary_lines
from xal_engine.store import SPLIT_TEST, Pool
from xal_engine.store.run_folder import read_metrics_csv

TINY = DemoConfig(pool=replace(DEFAULT.pool, n=90, size=32), name="tiny",
                  loop=replace(DEFAULT.loop, initial=12, per_round=6, rounds=1,
                               train=replace(DEFAULT.loop.train, epochs=1, target_layer="layer2")))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine run several times slower
    try:
        result = run_demo(out, TINY, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "result": result, "lines": lines}


def test_demo_writes_pool_run_and_report(demo: dict[str, Any]) -> None:
    result = demo["result"]
    assert result.pool == demo["out"] / "tiny-pool.zarr" and result.run_dir == demo["out"] / "tiny-run"
    pool = Pool.open(result.pool)
    assert pool.attrs["synthetic"] == asdict(TINY.pool) and pool.n == 90
    rows = read_metrics_csv(result.run_dir / "metrics.csv")
    assert [(r["strategy"], r["round"]) for r in rows] == [("random", "0"), ("random", "1"), ("dual", "0"),
                                                            ("dual", "1")]
    assert json.loads((result.run_dir / "config.json").read_text())["pool"] == str(result.pool.resolve())
    assert result.report is not None and result.report.is_file()
    assert any(line.startswith("demo: phantom pool") and "shortcut marker in 90%" in line for line in demo["lines"])


def test_demo_pool_has_the_shortcut_only_outside_the_test_split(demo: dict[str, Any]) -> None:
    from xal_engine.ingest.synthetic import generate_block

    pool = Pool.open(demo["result"].pool)
    split = np.asarray(pool.group["split"][:])
    block = generate_block(TINY.pool, 0, split)  # the whole tiny pool is one block
    marked = block.markers.reshape(len(split), -1).any(axis=1)
    assert not marked[split == SPLIT_TEST].any()
    assert marked[split != SPLIT_TEST].mean() > 0.75  # shortcut 0.9 of train/val
    assert np.array_equal(np.asarray(pool.group["rois"][:]), block.rois)  # ROI = lesion, every image


def test_rerun_resumes_without_training(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a complete demo must not train again")

    monkeypatch.setattr(loop, "train", no_training)
    again = run_demo(demo["out"], TINY, log=lambda line: None)
    assert again.rows == demo["result"].rows


def test_missing_report_module_is_a_message(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xal_engine.jobs.report", None)  # the import raises ModuleNotFoundError
    lines: list[str] = []
    result = run_demo(demo["out"], TINY, log=lines.append)
    assert result.report is None
    assert f"report: xal_engine.jobs.report is not installed; the metrics are in {result.run_dir / 'metrics.csv'}" in lines


def test_summary_lines_report_the_last_round_of_each_experiment() -> None:
    row = {"seed": 0, "n_labelled": 10, "accuracy": 0.5, "balanced_accuracy": 0.25, "test_dice": 0.125,
           "test_hit_rate": 1.0}
    rows = [row | {"strategy": "dual", "round": 0}, row | {"strategy": "dual", "round": 1, "n_labelled": 20},
            row | {"strategy": "random", "round": 0, "test_dice": None}]
    assert summary_lines(rows) == [
        "            dual seed 0: round 1, 20 labelled, test acc 0.500, bal acc 0.250, Dice 0.125, hit 1.000",
        "          random seed 0: round 0, 10 labelled, test acc 0.500, bal acc 0.250, Dice n/a, hit 1.000"]


def test_cli_demo_runs_the_library_and_says_where_the_report_is(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from xal_engine import cli
    from xal_engine.jobs import demo as demo_module

    monkeypatch.setattr(demo_module, "QUICK", TINY)  # --quick at the tiny size: the fixture's run, resumed
    monkeypatch.setattr(loop, "train", None)  # nothing may train again
    assert cli.main(["demo", "--out", str(demo["out"]), "--quick"]) == 0
    run_dir = demo["result"].run_dir
    captured = capsys.readouterr()
    assert captured.out == (f"demo complete: 4 rounds recorded in {run_dir}; "
                            f"report {run_dir / 'report' / 'report.html'}\n")
    finished = [line for line in captured.err.splitlines() if "complete" in line or "resuming" in line]
    assert finished == [f"{e}-seed0: already complete (rounds 0..{TINY.loop.rounds} recorded); nothing to run"
                        for e in TINY.loop.strategies]  # a finished run is not "resuming at round 2"
    (demo["out"] / "file").write_text("x")
    assert cli.main(["demo", "--out", str(demo["out"] / "file"), "--quick"]) == 2
    assert "--out" in capsys.readouterr().err


def test_demo_device_and_seeds_flags_reach_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    from xal_engine import cli
    from xal_engine.jobs.demo import with_run

    config = with_run(DEFAULT, device="cpu", seeds=2)
    assert (config.loop.seeds, config.loop.train.device) == (2, "cpu")
    assert with_run(DEFAULT) == replace(DEFAULT, loop=replace(DEFAULT.loop, train=replace(DEFAULT.loop.train,
                                                                                         device="auto")))
    assert cli.main(["demo", "--seeds", "0", "--out", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "xal-engine demo: error: --seeds must be >= 1"
