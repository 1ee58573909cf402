"""``xal-engine demo``: the embedded default end to end (for now: a phantom pool with a shortcut cue)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xal_engine.cli.pool import format_info
from xal_engine.errors import XalError
from xal_engine.pool import Pool
from xal_engine.synthetic import SyntheticConfig, create_synthetic_pool

# A small pool a CPU handles in seconds: half of the train/val images carry the class marker.
DEMO_POOL = SyntheticConfig(n=600, size=64, classes=3, channels=1, seed=0, shortcut=0.5)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the embedded default end to end",
                                   description="Create a small synthetic pool with a shortcut cue "
                                               "under DIR and summarise it.")
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output folder (default ./demo-out)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out))
    return 0


def run_demo(out: Path, config: SyntheticConfig = DEMO_POOL) -> Pool:
    """Write ``out/pool.zarr`` (replacing an earlier demo pool) and print its summary."""
    if out.exists() and not out.is_dir():
        raise XalError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    pool = create_synthetic_pool(config, out / "pool.zarr", overwrite=True)
    print(format_info(pool.info()))
    return pool
