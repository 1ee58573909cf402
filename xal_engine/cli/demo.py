"""``xal-engine demo``: the embedded default end to end (library side: :mod:`xal_engine.jobs.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xal_engine.cli.runtime_flags import add_runtime_flags, show_progress, threads


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the embedded default end to end",
        description="Create a synthetic phantom pool whose train/val images carry a shortcut cue, run "
                    "random vs dual active-learning rounds on it (resnet18, CPU or GPU), and write the "
                    "report. Everything goes under DIR; a rerun resumes after the last complete round. "
                    "About 2 minutes on 2 CPU cores (1,200 images, 120 + 3 x 120 labels).")
    parser.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default ./demo-out)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke-test size: 300 images, one round, 3 epochs (about 15 s on 2 CPU cores)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, metavar="K",
                        help="seeds 0..K-1 per strategy (default: 1; another count is another run: "
                             "use another --out)")
    add_runtime_flags(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from xal_engine.jobs import demo
    from xal_engine.progress import plural

    config = demo.QUICK if args.quick else demo.DEFAULT
    config = demo.with_threads(config, threads(args, config.loop.train.num_workers))
    config = demo.with_run(config, device=args.device, seeds=args.seeds)
    result = demo.run_demo(Path(args.out), config, show_progress=show_progress(args))
    where = f"report {result.report}" if result.report else f"metrics {result.run_dir / 'metrics.csv'}"
    print(f"demo complete: {plural(len(result.rows), 'round')} recorded in {result.run_dir}; {where}")
    return 0
