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
