"""Where benchmark results live: the ``benchmarks/`` folder of the source checkout holding the package.

The levels run from the package; their rows and charts go to ``benchmarks/results/`` next to it
(``pip install -e .``). An installed wheel has no such folder: the caller names the flag that sets
another path, and the error says so.
"""

from __future__ import annotations

from pathlib import Path

from xal_engine.errors import XalError

MARKER = Path("suites") / "conftest.py"  # a file only the checkout's benchmarks/ folder has


def benchmarks_dir(remedy: str = "run from a source checkout") -> Path:
    """The checkout's ``benchmarks/`` folder; XalError ending in ``remedy`` when there is none."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / MARKER).is_file():
        raise XalError(f"benchmark scripts not found at {folder} (benchmarks/ of a source checkout, pip "
                       f"install -e .; an installed wheel has none), so no results/ folder: {remedy}")
    return folder


def results_dir(remedy: str = "run from a source checkout") -> Path:
    """The checkout's ``benchmarks/results/`` folder (see :func:`benchmarks_dir`)."""
    return benchmarks_dir(remedy) / "results"


def level_csv(out: Path | None, level: str, remedy: str = "pass --out PATH") -> Path:
    """``out`` when given, else the checkout's ``benchmarks/results/<level>.csv``."""
    return out if out is not None else results_dir(remedy) / f"{level}.csv"
