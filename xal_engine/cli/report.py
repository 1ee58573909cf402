"""`xal-engine report RUN_DIR`: learning curves, summary tables and CAM contact sheets of a loop run."""

from __future__ import annotations

import argparse
import sys

from xal_engine.core.cam_methods import CAM_METHOD_NAMES, cam_method_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="learning curves, tables and Grad-CAM contact sheets of a loop run",
        description=(
            "Reads RUN_DIR (written by `xal-engine loop`: config.json, metrics.csv, per-round "
            "selected.csv and model.pt) and writes learning_curves.png, contact_<strategy>.png, "
            "report.md and report.html to OUT. A run still in progress is reported as far as it got."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="loop run directory")
    p.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/report)")
    p.add_argument("--pool", default=None,
                   help="pool the run used, for the contact sheets (default: the path in config.json)")
    p.add_argument("--device", default="auto", help="where CAMs are recomputed: auto, cpu, cuda or cuda:N")
    p.add_argument("--cam-method", choices=CAM_METHOD_NAMES, default=None,
                   help=f"CAM method of the contact sheets: {cam_method_help()} (default: the one the run "
                        "scored with, from its config.json)")
    p.add_argument("--max-images", type=int, default=36,
                   help="images per contact sheet, best ranks first (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.errors import XalError
    from xal_engine.jobs.report import ReportConfig, make_report

    if args.max_images < 1:
        raise XalError(f"--max-images must be at least 1 (got {args.max_images})")
    files = make_report(args.run_dir, args.out, args.pool,
                        ReportConfig(device=args.device, max_images=args.max_images, cam_method=args.cam_method))
    for note in files.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {files.html}: {len(files.sheets)} contact sheet(s), report.md and {files.curves.name} "
          "beside it")
    return 0
