"""The benchmark suite behind `xal-engine bench`: run chosen levels, keep their rows, append the CSVs.

Each level is a module of this package with ``parse_args(argv)``, ``run(args) -> rows``, ``COLUMNS``
and ``LEVEL``; the suite builds its argv from one :class:`BenchConfig`, so a level runs the same from
here as from its own command line (``python -m xal_engine.bench.<level>``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from xal_engine.bench.checkout import level_csv, results_dir
from xal_engine.bench.timing import append_rows
from xal_engine.errors import XalError

# level -> its module (imported only when the level runs); in the order they run (cheapest first)
LEVELS: dict[str, str] = {"kernel": "xal_engine.bench.kernel", "batch": "xal_engine.bench.batch",
                          "pool": "xal_engine.bench.pool"}
TIMED = ("kernel", "batch")  # levels with --warmup/--repeats (the pool level times one whole pass)
WRITE_REMEDY = "pass --no-write to print the table only"  # outside a checkout, where rows cannot go


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    levels: tuple[str, ...] = tuple(LEVELS)
    device: str = "auto"
    write: bool = True  # append rows to benchmarks/results/<level>.csv
    warmup: int | None = None  # None: each level's default
    repeats: int | None = None
    threads: int | None = None
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # level -> more argv for it

    def __post_init__(self) -> None:
        unknown = [name for name in (*self.levels, *self.extra) if name not in LEVELS]
        if unknown or not self.levels:
            raise XalError(f"--suite: unknown benchmark level(s) {', '.join(unknown) or '(none given)'}; "
                             f"expected some of {', '.join(LEVELS)}")


def level_argv(level: str, config: BenchConfig) -> list[str]:
    """The command line of one level's script for ``config`` (always --no-write: the suite writes)."""
    argv = ["--device", config.device, "--no-write"] + (["--quick"] if config.quick else [])
    if config.threads is not None:
        argv += ["--threads", str(config.threads)]
    if level in TIMED:
        argv += ["--warmup", str(config.warmup)] if config.warmup is not None else []
        argv += ["--repeats", str(config.repeats)] if config.repeats is not None else []
    return argv + list(config.extra.get(level, ()))


def run_suite(config: BenchConfig) -> list[tuple[str, list[dict]]]:
    """(level, rows) per level, in LEVELS order; each level's rows are appended once it has passed."""
    if config.write:
        results_dir(WRITE_REMEDY)  # before any level runs: outside a checkout the rows have nowhere to go
    sections = []
    threads = torch.get_num_threads()  # the levels set their own; give the caller's back
    try:
        for level in (name for name in LEVELS if name in config.levels):
            sections.append((level, run_level(level, config)))
    finally:
        torch.set_num_threads(threads)
    return sections


def run_level(level: str, config: BenchConfig) -> list[dict]:
    """One level's checked rows, appended to its CSV when ``config.write``."""
    script = importlib.import_module(LEVELS[level])
    argv = level_argv(level, config)
    try:
        args = script.parse_args(argv)
    except SystemExit:  # argparse has printed why
        raise XalError(f"{level}: invalid arguments '{' '.join(argv)}' "
                       f"(see python -m {LEVELS[level]} --help)") from None
    rows = script.run(args)
    if config.write:
        append_rows(level_csv(args.out, level, WRITE_REMEDY), rows, script.COLUMNS)
    return rows
