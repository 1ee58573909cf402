"""benchmarks/scripts/bench_host_overhead.py runs end to end at a tiny size: every case in one run,
its ratios computed from its own medians; bad flags are one line and exit 2."""

import csv
from pathlib import Path

import pytest
from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "bench_host_overhead.py"


def test_every_case_is_measured_and_its_ratios_come_from_the_same_run(tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    out = tmp_path / "host_overhead.csv"
    rows = module.main(["--n", "40", "--repeats", "1", "--workers", "0", "--batch-size", "16", "--out", str(out)])
    assert [r["case"] for r in rows] == list(module.CASES)
    by_case = {r["case"]: r for r in rows}
    assert all(r["n_images"] == 40 and r["num_workers"] == 0 and r["seconds"] > 0 for r in rows)
    assert by_case["plain"]["ratio_vs_plain"] == 1.0 and by_case["compute"]["ratio_vs_compute"] == 1.0
    score, plain = by_case["score"], by_case["plain"]
    assert score["ratio_vs_plain"] == pytest.approx(score["images_per_s"] / plain["images_per_s"], rel=1e-2)
    # one round: the per-round ratio is the ratio of the round's times, which are the medians
    assert score["round_ratio_vs_plain"] == score["round_ratio_min"] == score["round_ratio_max"]
    assert score["round_ratio_vs_plain"] == pytest.approx(score["ratio_vs_plain"], abs=2e-3)
    assert by_case["writer"]["images_per_s_per_loader_core"] == ""  # the writer runs in the main process
    stored = list(csv.DictReader(out.open()))
    assert [r["case"] for r in stored] == list(module.CASES)


def test_per_round_ratios_pair_each_case_with_plain_of_the_same_round(tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    rows = module.main(["--n", "24", "--repeats", "3", "--workers", "0", "--batch-size", "16",
                        "--out", str(tmp_path / "host_overhead.csv")])
    by_case = {r["case"]: r for r in rows}
    plain = by_case["plain"]
    assert plain["round_ratio_vs_plain"] == plain["round_ratio_min"] == plain["round_ratio_max"] == 1.0
    for row in rows:
        assert 0 < row["round_ratio_min"] <= row["round_ratio_vs_plain"] <= row["round_ratio_max"]


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "0"], "--n: expected at least 1, got 0"),
    (["--repeats", "0"], "--repeats: expected at least 1, got 0"),
    (["--workers", "0,x"], "--workers: expected comma-separated counts"),
    (["--workers", "-1"], "--workers: expected at least 0, got -1"),
    (["--device", "tpu"], "device 'tpu' is not valid"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys) -> None:
    module = load_script(SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
