"""`xal-engine bench`: the benchmark suite (kernel, batch and pool levels) as one command and one table.

The levels are the modules of :mod:`xal_engine.bench`; their rows and charts go to the source
checkout's ``benchmarks/results/``. An installed wheel has none: there the command prints only
(``--no-write``) or says so.
"""

from __future__ import annotations

import argparse
import shlex

from xal_engine.errors import XalError

LEVEL_NAMES = ("kernel", "batch", "pool")  # = xal_engine.bench.suite.LEVELS, without importing torch here


class BenchFailed(XalError):
    """A level could not produce figures (a provider failed, or disagreed with pytorch-grad-cam)."""

    exit_code = 1


def parse_extra(items: list[str]) -> dict[str, tuple[str, ...]]:
    """``LEVEL=ARGS`` flags -> {level: argv}; ARGS is split like a shell would."""
    extra: dict[str, tuple[str, ...]] = {}
    for item in items:
        level, sep, rest = item.partition("=")
        if not sep or level not in LEVEL_NAMES:
            raise XalError(f"--args: expected LEVEL=ARGS with LEVEL one of {', '.join(LEVEL_NAMES)}, got {item!r}")
        extra[level] = extra.get(level, ()) + tuple(shlex.split(rest))
    return extra


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the engine against pytorch-grad-cam and plain inference",
        description=(
            "Runs the benchmark levels (kernel: gradcam_dice vs pytorch-grad-cam's post-processing; "
            "batch: score_batch vs GradCAM + numpy metrics vs plain inference; pool: `score` vs a "
            "pytorch-grad-cam pipeline vs plain inference vs the loader). Each level checks its results "
            "against pytorch-grad-cam before timing, prints into one table (speedup vs pytorch-grad-cam, "
            "ratio vs plain inference) and appends its rows to benchmarks/results/<level>.csv."
        ),
    )
    p.add_argument("--quick", action="store_true", help="small sizes that run on a CPU in a few minutes")
    p.add_argument("--suite", default=",".join(LEVEL_NAMES),
                   help="levels to run, comma-separated (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--plot", action="store_true",
                   help="draw benchmarks/results/<level>_speedup.png from the CSVs afterwards")
    p.add_argument("--no-write", action="store_true", help="print the table only; append no rows")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default: per level)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: per level)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, 0 for torch's default (default: per level, 1 for kernel/batch)")
    p.add_argument("--args", action="append", default=[], metavar="LEVEL=ARGS",
                   help="more flags for one level's script, e.g. --args 'pool=--sizes 500 --workers 0' "
                        "(see python -m xal_engine.bench.<level> --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.bench import plot
    from xal_engine.bench.checkout import results_dir
    from xal_engine.bench.compare import BenchError
    from xal_engine.bench.suite import BenchConfig, run_suite
    from xal_engine.bench.table import format_table

    config = BenchConfig(
        quick=args.quick, levels=tuple(s.strip() for s in args.suite.split(",") if s.strip()),
        device=args.device, write=not args.no_write, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads, extra=parse_extra(args.args),
    )
    results = None
    if config.write or args.plot:  # before any level runs: outside a checkout they have nowhere to go
        results = results_dir("pass --no-write, without --plot, to print the table only")
    try:
        sections = run_suite(config)
    except BenchError as err:
        raise BenchFailed(str(err)) from None
    print(format_table(sections))
    if config.write:
        print(f"appended rows to {results}/{{{','.join(lvl for lvl, _ in sections)}}}.csv")
    if results is not None and args.plot:
        for path in plot.plot_results(results):
            print(f"wrote {path}")
    return 0
