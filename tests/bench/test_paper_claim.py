"""The paper-claim experiment (benchmarks/experiments/paper_claim.py): the random-map baseline, the arms
and their seed pairing, the precondition rule and the paired-comparison rows, on hand-made run folders with
hand-computed answers; and its quick scale end to end (every phase and arm at a smoke-test size)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from xal_engine.bench import checkout, stats
from xal_engine.errors import XalError
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, Pool, PoolWriter

try:
    SCRIPT = checkout.benchmarks_dir() / "experiments" / "paper_claim.py"
except XalError:  # an installed package without the checkout's benchmarks/ folder
    pytest.skip("benchmarks/ folder not found next to the package", allow_module_level=True)

# The experiment is a script, not a module of the package: load it from its file.
_spec = importlib.util.spec_from_file_location("paper_claim", SCRIPT)
paper_claim = importlib.util.module_from_spec(_spec)
sys.modules["paper_claim"] = paper_claim  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(paper_claim)

HEADER = ("strategy,seed,round,n_labelled,accuracy,balanced_accuracy,macro_f1,auroc,test_dice,test_soft_dice,"
          "test_energy,test_hit_rate,train_seconds,score_seconds")
# a two-arm configuration: random and dual, hard Dice only, W = 0 only, 1 round
CONFIG = replace(paper_claim.CPU, explanation_weights=(0.0,),
                 loop=replace(paper_claim.CPU.loop, strategies=("random", "dual"), rounds=1))


def write_run(path: Path, rows: list[tuple[str, int, int, float, float]]) -> None:
    """A loop run folder: (strategy, seed, round, accuracy, test Dice) per row; 10 + 10·round labels."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"strategies": ["random", "dual"], "arch": "resnet18"}))
    lines = [HEADER] + [f"{s},{k},{r},{10 + 10 * r},{acc},{acc},{acc},0.5,{dice},{dice},{dice},0.5,2.0,1.0"
                        for s, k, r, acc, dice in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_random_map_baseline_by_hand(tmp_path: Path) -> None:
    # 10 x 10 images; test ROIs of 10 and 40 pixels: Dice 2|R| / (100 + 2|R|) = 20/120, 80/180; hit |R|/100
    rois = np.zeros((4, 10, 10), bool)
    rois[0, 0, :] = True         # test, 10 px
    rois[1, :4, :] = True        # test, 40 px
    rois[2, :, :] = True         # train: not counted
    split = np.array([SPLIT_TEST, SPLIT_TEST, SPLIT_TRAIN, SPLIT_TEST], np.uint8)  # image 3: test, no ROI
    with PoolWriter(tmp_path / "p.zarr", channels=1, height=10, width=10, dtype="uint8", classes=["a", "b"]) as w:
        w.append(np.zeros((4, 1, 10, 10), np.uint8), rois, np.array([1, 1, 1, 0], bool), np.zeros(4, np.int16),
                 ["a", "b", "c", "d"], split)
    got = paper_claim.random_map_baseline(Pool.open(tmp_path / "p.zarr"))
    assert got["dice"] == pytest.approx((20 / 120 + 80 / 180) / 2)
    assert got["hit"] == pytest.approx((0.1 + 0.4) / 2)


def test_arms_pair_complete_seeds_and_the_rows_use_the_paired_statistics(tmp_path: Path) -> None:
    root = tmp_path / "phantom"
    final = {0: (0.5, 0.6), 1: (0.5, 0.7), 2: (0.6, 0.9)}  # seed -> (random, dual) final accuracy
    rows = []
    for seed, (r, d) in final.items():
        rows += [("random", seed, 0, 0.4, 0.3), ("random", seed, 1, r, 0.3),
                 ("dual", seed, 0, 0.4, 0.4), ("dual", seed, 1, d, 0.5)]
    rows += [("random", 3, 0, 0.4, 0.3), ("random", 3, 1, 0.9, 0.3), ("dual", 3, 0, 0.4, 0.3)]  # seed 3 unfinished
    write_run(root / "w0-hard", rows)
    arms, seeds = paper_claim.load_arms(root, CONFIG)
    assert seeds == [0, 1, 2] and sorted(arms) == ["dual W=0", "random W=0"]
    dual = arms["dual W=0"]
    assert dual.final["accuracy"] == {0: 0.6, 1: 0.7, 2: 0.9} and dual.round0_dice == {0: 0.4, 1: 0.4, 2: 0.4}
    # ALC over labels 10..20: the trapezoid mean of (0.4, final)
    assert dual.alc["accuracy"] == {0: pytest.approx(0.5), 1: pytest.approx(0.55), 2: pytest.approx(0.65)}
    # precondition: upper bound 0.6 >= 0.5; lowest round-0 Dice 0.3 (random) vs 2 x 0.1
    measured = {"upper_w1": {"test": {"dice": 0.6}}, "random_map": {"dice": 0.1}}
    ok, why = paper_claim.precondition_verdict(measured, arms, CONFIG)
    assert ok and "lowest round-0 test Dice of an arm 0.300" in why
    ok, _ = paper_claim.precondition_verdict({**measured, "random_map": {"dice": 0.2}}, arms, CONFIG)
    assert not ok  # 0.3 < 2 x 0.2
    measured = {"layers": {"layer1": {"val": {"dice": 0.5, "hit": 0.7}, "test": {"dice": 0.4, "hit": 0.6}}},
                "chosen_layer": "layer1", "random_map": {"dice": 0.1, "hit": 0.05},
                **{k: {"test": {"accuracy": 0.9, "dice": 0.6, "soft_dice": 0.4, "hit": 0.8}} for k in ("upper_w0", "upper_w1")}}
    (root / "precondition.json").write_text(json.dumps(measured))
    spec = paper_claim.PoolSpec("phantom", CONFIG.pools[0].config, CONFIG.pools[0].source)
    text = "\n".join(paper_claim.pool_section(spec, root, CONFIG, seconds=60.0))
    # dual − random final accuracy: 0.1, 0.2, 0.3 (mean 0.2); the CI and p values from xal_engine.bench.stats
    c = stats.compare({"a": {0: 0.6, 1: 0.7, 2: 0.9}, "b": {0: 0.5, 1: 0.5, 2: 0.6}}, "a", "b")
    assert c.p_permutation == pytest.approx(0.25)  # 2 of the 8 sign patterns reach |mean| >= 0.2
    assert (f"| dual W=0 − random W=0 | final accuracy | +0.200 [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | 0.250 | "
            f"{c.p_wilcoxon:.3f} | 3/3 |") in text
    assert "**Precondition holds**" in text and "| layer1 (chosen) | 0.500 | 0.700 | 0.400 | 0.600 |" in text
    assert "| dual W=0 | 20 | 0.733 ± 0.153 |" in text
    need = stats.seeds_needed(c.std_diff, 0.02)  # std of (0.1, 0.2, 0.3) = 0.1: ((1.96 + 0.84) · 5)² -> 197
    assert need == 197 and f"| 3/3 | {need} |" in text and "this run has 3." in text


@pytest.mark.slow
def test_quick_scale_runs_every_phase_and_arm(tmp_path: Path) -> None:
    assert paper_claim.main(["--scale", "quick", "--work", str(tmp_path), "--pools", "phantom", "shortcut",
                             "--jobs", "1"]) == 0  # in-process: the script is not an importable module here
    out = tmp_path / "quick" / "results"
    text = (out / "summary.md").read_text()
    record = json.loads((out / "config.json").read_text())
    assert record["scale"] == "quick" and record["config"]["loop"]["seeds"] == 2
    for pool in ("phantom", "shortcut"):
        measured = json.loads((out / pool / "precondition.json").read_text())
        assert measured["chosen_layer"] == max(measured["layers"], key=lambda k: measured["layers"][k]["val"]["dice"])
        assert 0.0 <= measured["upper_w1"]["test"]["dice"] <= 1.0
        for arm in ("w0-hard", "w0-soft", "w1-hard", "w1-soft"):
            assert (out / pool / arm / "metrics.csv").is_file()
            assert (out / pool / arm / "report" / "learning_curves.png").is_file()
        assert f"## {pool}" in text
    for arm in ("random", "entropy", "bald", "coreset", "misalignment", "dual", "dual-soft"):
        assert f"| {arm} W=1 |" in text and f"| {arm} W=0 |" in text
    assert "dual W=1 − random W=1" in text and "dual W=1 − dual W=0" in text
