"""`xal-engine label --import | --undo | --complete`: write annotators' labels (and ROI masks) for a
batch into a pool, put back what one such import replaced, or finish one that was interrupted."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xal_engine.jobs.label import ImportSummary

LAST = "last"


def _import_number(text: str) -> int | None:
    """``--undo`` value: an import number (1, 2, ...) or ``last`` (None)."""
    if text == LAST:
        return None
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an import number or '{LAST}' (got {text!r})") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"import numbers start at 1 (got {number})")
    return number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="import annotators' labels (and ROI masks) into a pool, or undo an import",
        description=(
            "Imports LABELS.csv (columns id, class = a class name or index, optional roi = PNG mask "
            "path relative to the CSV; other columns are ignored) into POOL. Everything is checked "
            "first; any problem aborts the import with nothing written. With --experiment the rows "
            "are marked in al/EXPERIMENT/labelled_round with the round (default: the last round + 1); "
            "an image already labelled keeps its first round. --dry-run checks the same and prints what "
            "would change, writing nothing. Each import is numbered and stores the values it replaced "
            "under labels_history/NUMBER/; --undo puts them back (the last import by default), newest "
            "first: an import is refused while a later one that is not undone wrote the same rows. "
            "--format label-studio reads Label Studio's JSON export of tasks written by `select --format "
            "label-studio` instead: the class from the choices (majority of the annotators, a tie is "
            "refused), the ROI from brush or polygon results (pixel-wise majority), cancelled annotations "
            "ignored, tasks without a usable annotation skipped. --format dicom-seg reads DICOM SEG objects "
            "(a file or a folder) over the pool's source DICOMs (pools ingested from vindr/siim), matched by "
            "SOP Instance UID: ROIs only (the union of the segments other than 'Grad-CAM', or --segment N), "
            "resized to the pool grid; the images' classes are kept."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group) to write into: a path or an s3:// URL")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--import", dest="import_csv", metavar="LABELS.csv",
                        help="CSV file with columns id, class[, roi] (or, with --format label-studio, "
                             "Label Studio's JSON export)")
    action.add_argument("--undo", nargs="?", const=None, default=argparse.SUPPRESS, type=_import_number,
                        metavar="NUMBER|last",
                        help="undo an import: its number (as --json and --dry-run report it) or 'last' "
                             "(the default; with --experiment that experiment's last, with --round the "
                             "import recorded as that round)")
    action.add_argument("--complete", action="store_true",
                        help="finish an interrupted (killed) import from what it stored before its first "
                             "write, without its CSV; score, select, train and loop refuse the pool until "
                             "then")
    p.add_argument("--experiment", default=None,
                   help="AL experiment whose labelled set grows (al/EXPERIMENT/labelled_round); with "
                        "--undo: only its imports")
    p.add_argument("--round", type=int, default=None,
                   help="AL round of this batch (default: the experiment's last round + 1, 0 when new); "
                        "with --undo: the import recorded as this round of --experiment")
    p.add_argument("--format", choices=("csv", "label-studio", "dicom-seg"), default="csv",
                   help="what --import reads: csv (default), label-studio (its JSON export) or dicom-seg "
                        "(SEG.dcm or a folder of SEGs)")
    p.add_argument("--segment", type=int, default=None, metavar="N",
                   help="with --format dicom-seg: import segment N only (default: the union of every "
                        "segment but 'Grad-CAM')")
    p.add_argument("--allow-any-split", action="store_true",
                   help="accept validation/test ids too (labelled, never marked as AL-labelled)")
    p.add_argument("--allow-outside-rois", action="store_true",
                   help="read ROI paths that lead outside the CSV's folder (absolute, '..' or a symlink "
                        "out); refused by default so that a CSV cannot make the import read any file")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check and print what would change (labels set/changed per class, "
                        "ROIs added/replaced, the round and import number); write nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items() if n) or "none"


def run(args: argparse.Namespace) -> int:
    if "undo" in args:
        return _undo(args)
    if args.complete:
        return _complete(args)
    from xal_engine.jobs.label import ImportConfig, import_labels

    config = ImportConfig(experiment=args.experiment, round=args.round,
                          allow_any_split=args.allow_any_split, allow_outside_rois=args.allow_outside_rois,
                          dry_run=args.dry_run, format=args.format, segment=args.segment)
    summary = import_labels(args.pool, args.import_csv, config)
    if args.json:
        print(json.dumps(asdict(summary)))
        return 0
    print(_import_line(summary, rois_only=args.format == "dicom-seg"))
    return 0


def _import_line(summary: ImportSummary, rois_only: bool = False) -> str:
    """The one-line summary of an import, or of what a dry run would do; ``rois_only``: a DICOM SEG
    import, which brings masks and keeps the rows' classes."""
    from xal_engine.progress import plural

    where = f" (experiment {summary.experiment}, round {summary.round})" if summary.experiment else ""
    if summary.dry_run:
        notes = [f"labels set: {_nonzero(summary.set_per_class)}",
                 f"changed: {_nonzero(summary.changed_per_class)}", f"unchanged: {summary.n_unchanged}",
                 (f"ROI masks: {summary.n_rois_added} added (has_roi False -> True), "
                  f"{summary.n_rois_replaced} replaced")]
        if summary.experiment:
            notes.append(f"{summary.n_new} newly labelled by the experiment")
    else:
        notes = [plural(summary.n_rois, "ROI mask")]
        if summary.n_relabelled:
            notes.append(f"{summary.n_relabelled} replaced an existing label")
    if summary.n_outside_train:
        notes.append(f"{summary.n_outside_train} outside the train split")
    if summary.n_skipped:
        notes.append(f"{plural(summary.n_skipped, 'task')} without a usable annotation skipped")
    if summary.ignored_columns:
        notes.append(f"ignored column(s) {', '.join(summary.ignored_columns)}")
    labels = (f"{plural(summary.n_imported, 'ROI mask')} (classes kept)" if rois_only
              else plural(summary.n_imported, "label"))
    if summary.dry_run:
        return (f"dry run: would import {labels} into {summary.pool} as import {summary.import_number}{where}; "
                f"{'; '.join(notes)}; nothing written")
    return f"imported {labels} into {summary.pool}{where}: {_nonzero(summary.per_class)}; {'; '.join(notes)}"


def _complete(args: argparse.Namespace) -> int:
    from xal_engine.errors import XalError
    from xal_engine.jobs.label import complete_interrupted

    given = [flag for flag, value in (("--experiment", args.experiment), ("--round", args.round),
                                      ("--allow-any-split", args.allow_any_split),
                                      ("--allow-outside-rois", args.allow_outside_rois),
                                      ("--dry-run", args.dry_run)) if value not in (None, False)]
    if given:
        raise XalError(f"{given[0]} does not go with --complete (the interrupted import keeps its own)")
    record = complete_interrupted(args.pool)
    if args.json:
        print(json.dumps({"pool": args.pool, "completed": record}))
        return 0
    where = f" (experiment {record['experiment']}, round {record['round']})" if record.get("experiment") else ""
    print(f"completed label import {record['number']} ({record.get('file')}) of {args.pool}{where}")
    return 0


def _undo(args: argparse.Namespace) -> int:
    from xal_engine.errors import XalError
    from xal_engine.jobs.label import UndoConfig, undo_import
    from xal_engine.progress import plural

    if args.allow_any_split:
        raise XalError("--allow-any-split goes with --import, not --undo")
    config = UndoConfig(number=args.undo, experiment=args.experiment, round=args.round, dry_run=args.dry_run)
    summary = undo_import(args.pool, config)
    if args.json:
        print(json.dumps(asdict(summary)))
        return 0
    fields: dict[str, Any] = {"experiment": summary.experiment, "round": summary.round}
    where = ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None)
    what = (f"{plural(summary.n_labels, 'label')}, {plural(summary.n_rois, 'ROI mask')} and "
            f"{plural(summary.n_rounds, 'AL round')}")
    head = "dry run: would undo" if summary.dry_run else "undid"
    tail = "; nothing written" if summary.dry_run else ""
    print(f"{head} import {summary.import_number} of {summary.pool} ({summary.file}"
          f"{'; ' + where if where else ''}): {'would put back' if summary.dry_run else 'put back'} "
          f"{what}{tail}")
    return 0
