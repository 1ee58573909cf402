"""`xal-engine label --import`: write annotators' labels (and ROI masks) for a batch into a pool."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="import annotators' labels (and ROI masks) into a pool",
        description=(
            "Imports LABELS.csv (columns id, class = a class name or index, optional roi = PNG mask "
            "path relative to the CSV; other columns are ignored) into POOL. Everything is checked "
            "first; any problem aborts the import with nothing written. With --experiment the rows "
            "are marked in al/EXPERIMENT/labelled_round with the round (default: the last round + 1); "
            "an image already labelled keeps its first round."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group) to write into")
    p.add_argument("--import", dest="import_csv", metavar="LABELS.csv", required=True,
                   help="CSV file with columns id, class[, roi]")
    p.add_argument("--experiment", default=None,
                   help="AL experiment whose labelled set grows (al/EXPERIMENT/labelled_round)")
    p.add_argument("--round", type=int, default=None,
                   help="AL round of this batch (default: the experiment's last round + 1, 0 when new)")
    p.add_argument("--allow-any-split", action="store_true",
                   help="accept validation/test ids too (labelled, never marked as AL-labelled)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.jobs.label import ImportConfig, import_labels

    config = ImportConfig(experiment=args.experiment, round=args.round,
                          allow_any_split=args.allow_any_split)
    summary = import_labels(args.pool, args.import_csv, config)
    if args.json:
        print(json.dumps(asdict(summary)))
        return 0
    per_class = ", ".join(f"{name} {n}" for name, n in summary.per_class.items() if n)
    where = f" (experiment {summary.experiment}, round {summary.round})" if summary.experiment else ""
    notes = [f"{summary.n_rois} ROI mask(s)"]
    if summary.n_relabelled:
        notes.append(f"{summary.n_relabelled} replaced an existing label")
    if summary.n_outside_train:
        notes.append(f"{summary.n_outside_train} outside the train split")
    if summary.ignored_columns:
        notes.append(f"ignored column(s) {', '.join(summary.ignored_columns)}")
    print(f"imported {summary.n_imported} label(s) into {summary.pool}{where}: {per_class}; "
          f"{'; '.join(notes)}")
    return 0
