"""The paper-claim experiment's statistics (benchmarks/experiments/paper_claim.py): the paired dual − baseline
differences, the verdicts and the complete-seed rule, on hand-made run folders with hand-computed answers.
The loops themselves are the tested `xal_engine.jobs.loop`; this checks the numbers the README quotes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from xal_engine.bench import checkout
from xal_engine.errors import XalError
from xal_engine.jobs.report import load_run

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


def write_run(path: Path, rows: list[tuple[str, int, int, float, float, float]]) -> Path:
    """A loop run folder: (strategy, seed, round, accuracy, balanced accuracy, test Dice) per row."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"strategies": ["random", "entropy", "dual"], "arch": "resnet18",
                                                   "loop": {"initial": 10, "per_round": 5, "rounds": 1}}))
    lines = [HEADER] + [f"{s},{k},{r},{10 + 5 * r},{acc},{bal},{acc},0.5,{dice},{dice},{dice},0.5,2.0,1.0"
                        for s, k, r, acc, bal, dice in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_paired_verdict_by_hand() -> None:
    # differences 0.1, 0.2, 0.0: mean 0.1, sample std 0.1 -> |mean| <= std
    s, wins, verdict = paper_claim.paired_verdict({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.4, 1: 0.5, 2: 0.6})
    assert (s.mean, s.std, s.count, wins) == (pytest.approx(0.1), pytest.approx(0.1), 3, 2)
    assert verdict == "within one std: no evidence"
    # differences -0.1, -0.2, -0.15 (seed 3 has no partner, seed 4 is NaN): mean -0.15, std 0.05
    s, wins, verdict = paper_claim.paired_verdict({0: 0.3, 1: 0.3, 2: 0.3, 3: 0.9, 4: math.nan},
                                                  {0: 0.4, 1: 0.5, 2: 0.45, 4: 0.1})
    assert (s.mean, s.std, s.count, wins) == (pytest.approx(-0.15), pytest.approx(0.05), 3, 0)
    assert verdict == "dual lower by more than one std (weak, 3 seeds)"
    s, _, verdict = paper_claim.paired_verdict({0: 0.3}, {0: 0.1})
    assert s.count == 1 and math.isnan(s.std) and verdict == "fewer than two seeds: no verdict"


def test_summary_rows_pair_dual_with_each_baseline_by_seed(tmp_path: Path) -> None:
    final = {  # seed -> (random, entropy, dual) accuracy at the final round; balanced acc = accuracy - 0.1
        0: (0.5, 0.6, 0.6), 1: (0.5, 0.7, 0.7), 2: (0.5, 0.5, 0.8)}
    rows = []
    for seed, values in final.items():
        for strategy, acc in zip(("random", "entropy", "dual"), values):
            rows += [(strategy, seed, 0, 0.4, 0.3, 0.1), (strategy, seed, 1, acc, acc - 0.1, 0.2)]
    run = load_run(write_run(tmp_path / "run", rows))
    spec = paper_claim.PoolSpec("phantom", paper_claim.FULL.pools[0].config)
    text = "\n".join(paper_claim.pool_section(spec, run, seconds=60.0))
    # dual - random: 0.1, 0.2, 0.3 -> 0.200 ± 0.100; dual - entropy: 0.0, 0.0, 0.3 -> 0.100 ± 0.173
    assert ("| dual vs random | accuracy | 0.200 ± 0.100 | 3/3 | "
            "dual higher by more than one std (weak, 3 seeds) |") in text
    assert "| dual vs random | balanced accuracy | 0.200 ± 0.100 | 3/3 |" in text
    assert "| dual vs entropy | accuracy | 0.100 ± 0.173 | 1/3 | within one std: no evidence |" in text
    assert "| dual vs random | test Dice | 0.000 ± 0.000 | 0/3 | within one std: no evidence |" in text
    assert "| dual | 3 | 15 | 0.700 ± 0.100 | 0.600 ± 0.100 | 0.200 ± 0.000 |" in text
    assert "wall time: 1.0 min" in text and "mean seconds per round: train 2.0, score 1.0" in text


def test_only_seeds_that_every_strategy_completed_count(tmp_path: Path) -> None:
    rows = [(s, k, r, 0.5, 0.5, 0.1) for s in ("random", "entropy", "dual") for k in (0, 1) for r in (0, 1)]
    rows = [row for row in rows if row[:3] != ("entropy", 1, 1)]  # entropy stopped after round 0 on seed 1
    run = load_run(write_run(tmp_path / "run", rows))
    loop = replace(paper_claim.FULL.loop, strategies=("random", "entropy", "dual"), seeds=3, rounds=1)
    config = replace(paper_claim.FULL, loop=loop)
    assert paper_claim.complete_seeds(run, config) == [0]
