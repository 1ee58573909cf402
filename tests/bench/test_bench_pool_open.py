"""benchmarks/scripts/bench_pool_open.py runs end to end at a tiny size: a fully stored pool (every
check finds nothing missing), one row per step, the chunk files counted."""

import csv
from pathlib import Path

from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "bench_pool_open.py"


def test_the_script_times_open_the_unit_check_and_the_full_listing(tmp_path: Path) -> None:
    module = load_script(SCRIPT)
    out = tmp_path / "pool_open.csv"
    rows = module.main(["--n", "200", "--chunk", "16", "--repeats", "2", "--out", str(out)])
    assert [r["step"] for r in rows] == ["open", "unit_check", "list_all"]
    assert [r["repeats"] for r in rows] == [2, 2, 1]
    stored = list(csv.DictReader(out.open()))
    assert all(r["chunk_files"] == str(13 * 6) and float(r["seconds"]) > 0 for r in stored)  # ceil(200 / 16) x 6
