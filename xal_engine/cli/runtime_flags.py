"""Flags every compute command shares: ``--threads`` and ``--quiet``."""

from __future__ import annotations

import argparse

from xal_engine.jobs.runtime import THREADS_HELP, resolve_threads


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars (log and summary lines stay)")


def threads(args: argparse.Namespace, loader_workers: int) -> int:
    """``--threads``, or the default for ``loader_workers`` loader processes on this machine."""
    return resolve_threads(args.threads, loader_workers)


def show_progress(args: argparse.Namespace) -> bool | None:
    """``show_progress`` of the jobs: off with ``--quiet``, else on an interactive stderr."""
    return False if args.quiet else None
