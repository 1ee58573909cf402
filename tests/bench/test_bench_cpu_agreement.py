"""benchmarks/scripts/bench_cpu_agreement.py runs end to end at a tiny size: every provider checked
equal to the reference before it is timed, one row per provider and case (from N, and from A)."""

import csv
from pathlib import Path

import pytest

pytest.importorskip("numba")

from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "bench_cpu_agreement.py"


def test_the_script_writes_one_checked_row_per_provider_and_side(tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    out = tmp_path / "cpu_agreement.csv"
    rows = module.main(["--batch", "3", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert [(r["provider"], r["input"], r["map_side"]) for r in rows] == [
        *((p, "N", side) for side in (7, 14, 28, 56) for p in ("reference", "torch-ops", "compiled")),
        *((p, "A", side) for side in (7, 14, 28, 56) for p in ("reference", "two-step", "compiled"))]
    assert [r["channels"] for r in rows if r["input"] == "A"] == [c for c in (512, 256, 128, 16) for _ in range(3)]
    stored = list(csv.DictReader(out.open()))
    assert len(stored) == 24 and all(float(r["ms_per_batch"]) > 0 for r in stored)
    assert all(r["speedup_vs_reference"] == "1.0" for r in stored if r["provider"] == "reference")


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "1"], "--batch: expected at least 2, got 1"),
    (["--repeats", "0"], "--repeats: expected at least 1, got 0"),
    (["--threads", "0"], "--threads: expected at least 1, got 0"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys) -> None:
    module = load_script(SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
