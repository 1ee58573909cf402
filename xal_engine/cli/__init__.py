"""The ``xal-engine`` command line: a thin layer that maps flags to library calls.

Each command lives in its own module exposing ``register(subparsers)``; the parser built there sets
``func(args) -> int``. User mistakes raise :class:`~xal_engine.errors.XalError` and end as one line
on stderr with exit code 2 (``pool validate`` findings: 1), never a traceback. Ctrl-C ends a command
with one line ``interrupted`` (exit 130), SIGTERM the same way (exit 143): the job's cleanup runs.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from xal_engine.errors import XalError

# Command modules, in the order `--help` lists them.
COMMAND_MODULES = [
    "xal_engine.cli.demo",
    "xal_engine.cli.pool",
    "xal_engine.cli.ingest",
    "xal_engine.cli.pretrain",
    "xal_engine.cli.train",
    "xal_engine.cli.score",
    "xal_engine.cli.select",
    "xal_engine.cli.loop",
    "xal_engine.cli.label",
    "xal_engine.cli.label_studio",
    "xal_engine.cli.export_seg",
    "xal_engine.cli.report",
    "xal_engine.cli.bench",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``xal-engine pool create: error: …``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def command_name(module: str) -> str:
    """The command a module under cli/ implements: cli.label_studio -> label-studio."""
    return module.rsplit(".", 1)[1].replace("_", "-")


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser; with `only`, just that command's module is imported (torch loads only when needed)."""
    parser = ArgumentParser(
        prog="xal-engine",
        description="Explainability-guided active learning for medical imaging pools.",
    )
    from xal_engine import __version__

    parser.add_argument("--version", action="version", version=f"xal-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMAND_MODULES:
        if only is None or command_name(name) == only:
            importlib.import_module(name).register(sub)
    return parser


def requested_command(argv: Sequence[str]) -> str | None:
    """The command named on the line, when it is a known one (the first word not starting with '-')."""
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {command_name(m) for m in COMMAND_MODULES}
    return first if first in known else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a job stops the same way: loader workers stopped, finished
    work units stored, lock files released."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread inside the block (the previous handler
    comes back after it). Forked loader workers inherit the handler, and exit quietly on it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=requested_command(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a flag error already printed by argparse
        return int(exit_.code or 0)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except XalError as err:
        print(f"xal-engine {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated:
        print(f"xal-engine {args.command}: interrupted (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"xal-engine {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
