"""benchmarks/scripts/bench_run_state.py runs end to end at a small size, for both layouts: every step
timed, the total the sum of create, resume and done read; bad flags are one line and exit 2 (nothing
written)."""

import csv
from pathlib import Path

import pytest
from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "bench_run_state.py"


def test_both_layouts_are_timed_step_by_step(tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    out = tmp_path / "run_state.csv"
    rows = module.main(["--n", "200", "--chunk", "16", "--repeats", "1", "--out", str(out)])
    layouts = {r["layout"]: r for r in rows}
    assert layouts["units"]["unit_size"] == 208 and layouts["units"]["units"] == 1  # 13 chunks hold 200
    assert layouts["one_chunk_per_unit"]["unit_size"] == 16 and layouts["one_chunk_per_unit"]["units"] == 13
    for name in layouts:
        steps = {r["step"]: r["seconds"] for r in rows if r["layout"] == name}
        assert list(steps) == list(module.STEPS)
        total = next(r["total_create_resume_done_s"] for r in rows if r["layout"] == name)
        assert total == pytest.approx(steps["create"] + steps["resume"] + steps["done_read"], abs=3e-4)
    assert len(list(csv.DictReader(out.open()))) == len(rows) == 2 * len(module.STEPS)


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "0"], "--n: expected at least 1, got 0"),
    (["--chunk", "0"], "--chunk: expected at least 1, got 0"),
    (["--repeats", "-1"], "--repeats: expected at least 1, got -1"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys, tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    out = tmp_path / "run_state.csv"
    with pytest.raises(SystemExit) as exit_info:
        module.main([*args, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()
