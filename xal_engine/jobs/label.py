"""Importing annotators' labels (and optional ROI masks) for a batch into a pool: ``label --import``.

The CSV has a header with ``id`` and ``class`` (a class name of the pool, or its index) and an
optional ``roi`` column (a PNG mask, relative to the CSV's folder; nonzero = ROI; an empty cell = no
mask for that row). An ROI path must stay inside the CSV's folder once symlinks are resolved (no
absolute path, no ``..`` out of it) unless ``allow_outside_rois`` is set: a CSV from elsewhere must
not make the import read arbitrary files. Other columns are ignored, so a batch CSV from ``select``
with a ``class`` column added imports as it is.

The import is all or nothing: the file, every row and every mask are checked first, and any problem
raises one :class:`XalError` naming the file, the line and the problem (the first few, then a
count) before anything is written. A dry run stops there and reports what would change. Otherwise
what the import replaces (the rows' labels, has_roi, masks and rounds) and what it writes are stored
as the next numbered ``labels_history/<number>/`` and recorded as ``pending``, then only the chunks
holding the imported rows are rewritten: ``rois``/``has_roi`` (rows with a mask), ``labels``, and last
``al/<experiment>/labelled_round`` (so an image never counts as labelled before its label is in
place); the record is then marked ``complete``. This module parses, checks and plans; the rows are
written by :meth:`Pool.write_rows` and :meth:`ALExperiment.mark_labelled`, the history by
:class:`LabelsHistory`.

An interrupted import (killed, power lost) stays ``pending`` and is completed, never rolled back
implicitly: the next import or undo first writes its planned values again (:func:`complete_pending`),
and ``label --complete`` does only that. Until then score, select, train and loop refuse the pool
(:meth:`Pool.require_settled`) and ``pool validate`` reports the import.
Run again with the same file and flags, it completes as the same import number and round and reports
the summary the uninterrupted import would have (``resumed``); ``--undo`` after it completes and then
undoes it. A dry run with a pending import is refused unless it is that import's rerun.

Undo (``label --undo``) puts one import's previous values back, byte for byte, and marks its records
undone. Imports are undone newest first: an import is refused while a later import that is not undone
wrote one of its rows, since putting its values back would silently drop the later labels.

AL rounds: an image enters the experiment in the round it is first imported; re-importing it later
corrects its label (and mask) but keeps that first round. Validation and test images are refused
unless ``allow_any_split``; they then get their label and mask but are never marked as labelled by
the experiment (an experiment's labelled set lies in the train split).

Label Studio (``format="label-studio"``, ``label --import export.json --format label-studio``): the
rows come from Label Studio's JSON export, read by :func:`xal_engine.exchange.label_studio.read_export`
(class by majority of the annotators, ROI from brush RLE or polygons, pixel-wise majority; cancelled
annotations ignored, tasks without a usable one skipped and counted); problems name the task's position
in the export ("task 3: ..."). Everything else (checks, history, pending, dry run, undo) is the same.

DICOM SEG (``format="dicom-seg"``, ``label --import SEG.dcm|DIR --format dicom-seg [--segment N]``): ROIs
only, from SEG objects over the pool's source DICOMs, matched by SOP Instance UID and mapped to the pool
grid by :func:`xal_engine.exchange.dicom_seg.read_seg` (union of the segments other than ``Grad-CAM``,
or segment N). The rows' classes are kept (a row class of None): an image without a label keeps none and
is not marked by ``--experiment``. A SEG referencing an image that is not in the pool is refused; problems
name the SEG file's position ("SEG file 2: ...") and the file.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.exchange.label_studio import read_export, resize_mask
from xal_engine.store import SPLIT_NAMES, SPLIT_TRAIN, Pool
from xal_engine.store.al_state import (
    COMPLETE,
    PENDING,
    ROUNDS_REPLACED_ATTR,
    LabelsHistory,
    PlannedValues,
    PreviousValues,
)

ID, CLASS, ROI = "id", "class", "roi"
MAX_ROUND = int(np.iinfo(np.int16).max)
FORMATS = ("csv", "label-studio", "dicom-seg")


@dataclass(frozen=True)
class ImportConfig:
    """Flags of ``xal-engine label --import``."""

    experiment: str | None = None  # AL experiment (al/<experiment>/); None: labels and ROIs only
    round: int | None = None  # None: max existing round + 1 (0 for a new experiment)
    allow_any_split: bool = False  # accept validation/test ids (never marked as AL-labelled)
    allow_outside_rois: bool = False  # accept ROI paths leading outside the CSV's folder
    dry_run: bool = False  # check and count everything, write nothing (the pool is opened read-only)
    shown: int = 5  # problems listed in the error before "and N more"
    format: str = "csv"  # the file: "csv" (id,class[,roi]), "label-studio" (its JSON export) or "dicom-seg"
    segment: int | None = None  # dicom-seg: the segment number to import; None = union (module doc)


@dataclass(frozen=True)
class UndoConfig:
    """Flags of ``xal-engine label --undo``."""

    number: int | None = None  # the import to undo (labels_history numbering); None: the last one
    experiment: str | None = None  # only this experiment's imports
    round: int | None = None  # the import recorded as this round of ``experiment``
    dry_run: bool = False


@dataclass(frozen=True)
class LabelRows:
    """The parsed rows of a label file, one entry per data row (CSV) or usable task (Label Studio)."""

    lines: list[int]  # line number in the file (1 = header); a Label Studio task's position (1-based)
    ids: list[str]
    classes: list[str | None]  # the class cell as written (name or index); None = keep the row's label
    rois: list[str | np.ndarray]  # ROI path as written ("" = none), or an in-memory (h, w) bool mask
    ignored_columns: list[str]


@dataclass(frozen=True)
class ImportSummary:
    pool: str
    file: str
    experiment: str | None
    round: int | None  # None without an experiment
    n_imported: int
    per_class: dict[str, int]
    n_rois: int  # rows that brought a mask
    n_relabelled: int  # rows that already had a label (train split: marked by the experiment)
    n_outside_train: int  # validation/test rows (only with allow_any_split)
    chunks_written: int  # chunks of 'labels' rewritten (that would be, in a dry run)
    ignored_columns: list[str]
    dry_run: bool
    import_number: int  # labels_history/<import_number>/ holds what it replaced; --undo NUMBER
    set_per_class: dict[str, int]  # labels set on rows without one, by new class
    changed_per_class: dict[str, int]  # labels replacing another class, by new class
    n_unchanged: int  # rows whose label stays the same
    n_rois_added: int  # masks on rows without one (has_roi False -> True)
    n_rois_replaced: int  # masks replacing an existing one
    n_new: int  # train rows the experiment marks as labelled for the first time
    resumed: bool = False  # the run completed this import, interrupted before (same number and round)
    n_skipped: int = 0  # Label Studio tasks without a usable annotation (none, cancelled or empty)


@dataclass(frozen=True)
class UndoSummary:
    pool: str
    import_number: int
    file: str
    experiment: str | None
    round: int | None
    dry_run: bool
    n_labels: int  # rows whose label is put back
    n_rois: int  # rows whose mask and has_roi are put back
    n_rounds: int  # rows whose labelled_round is put back


class Problems:
    """Problems found in one file: collected, then raised together as one line."""

    def __init__(self, path: Path, shown: int, unit: str = "line") -> None:
        self.path, self.shown, self.unit = path, shown, unit  # unit: what a number names ("line", "task")
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def raise_any(self) -> None:
        if not self.items:
            return
        items = sorted(self.items, key=lambda item: item[0])
        listed = "; ".join(f"{self.unit} {line}: {msg}" if line else msg for line, msg in items[:self.shown])
        more = f"; and {len(items) - self.shown} more" if len(items) > self.shown else ""
        count = f"{len(items)} problem(s), nothing imported: " if len(items) > 1 else "nothing imported: "
        raise XalError(f"{self.path}: {count}{listed}{more}")


def read_label_csv(path: str | Path, problems: Problems) -> LabelRows:
    """Parse ``path``; file-level errors raise at once, row-level ones go to ``problems``."""
    path = Path(path)
    if not path.is_file():
        raise XalError(f"label file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is dropped
    except UnicodeDecodeError as err:
        raise XalError(f"{path}: not UTF-8 text (byte {err.start}); expected a CSV file") from None
    except OSError as err:
        raise XalError(f"{path}: cannot be read ({err.strerror})") from None
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):  # blank lines before it
            header = next(reader, None)
        if header is None:
            raise XalError(f"{path}: the file is empty; expected a header line 'id,class[,roi]'")
        columns = [c.strip().lower() for c in header]
        missing = [c for c in (ID, CLASS) if c not in columns]
        if missing:
            raise XalError(f"{path}: line {reader.line_num}: header {','.join(columns)!r} lacks column(s) "
                           f"{', '.join(missing)} (expected id, class and optionally roi)")
        twice = sorted({c for c in columns if c and columns.count(c) > 1})
        if twice:
            raise XalError(f"{path}: line {reader.line_num}: column(s) {', '.join(twice)} appear twice")
        where = {name: columns.index(name) for name in (ID, CLASS, ROI) if name in columns}
        rows = LabelRows([], [], [], [], [c for c in columns if c not in where])
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(columns):
                problems.add(line, f"expected {len(columns)} fields, found {len(row)}")
                continue
            cells = {name: row[i].strip() for name, i in where.items()}
            empty = [name for name in (ID, CLASS) if not cells[name]]
            if empty:
                problems.add(line, f"empty {' and '.join(empty)}")
                continue
            rows.lines.append(line)
            rows.ids.append(cells[ID])
            rows.classes.append(cells[CLASS])
            rows.rois.append(cells.get(ROI, ""))
    except csv.Error as err:
        raise XalError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from None
    if not rows.lines and not problems.items:
        raise XalError(f"{path}: no data rows after the header")
    return rows


def _class_index(cell: str, classes: list[str]) -> int | None:
    """A class name of the pool, else an index 0..K-1 written as an integer; None if neither."""
    if cell in classes:
        return classes.index(cell)
    try:
        k = int(cell)
    except ValueError:
        return None
    return k if 0 <= k < len(classes) else None


def load_roi_png(path: Path, height: int, width: int) -> np.ndarray | str:
    """A mask file as (H, W) bool (nonzero in any colour channel; alpha ignored), resized nearest
    with half-pixel centres when its size differs; else the problem, as a message."""
    import cv2

    if not path.is_file():
        return f"ROI file {path} not found"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # None when the file cannot be decoded
    if mask is None or mask.size == 0:
        return f"ROI file {path} cannot be read as an image"
    if mask.ndim == 3:
        mask = mask[..., :3] if mask.shape[2] == 4 else mask  # BGRA: drop alpha
        mask = mask.any(axis=2)
    mask = mask != 0
    if not mask.any():
        return f"ROI mask {path} is empty (no nonzero pixel)"
    if mask.shape != (height, width):
        mask = resize_mask(mask, height, width)
        if not mask.any():
            return f"ROI mask {path} is empty once resized to {height}x{width}"
    return mask


def read_label_studio(path: str | Path, pool: Pool, problems: Problems) -> tuple[LabelRows, int]:
    """Label Studio's JSON export as rows (ROIs as in-memory masks at the pool's size) and the number
    of tasks skipped for want of a usable annotation."""
    pool.require_images("importing a Label Studio export (2-D brush masks)")
    got = read_export(path, pool, problems)
    rows = LabelRows(lines=got.tasks, ids=got.ids, classes=got.classes,
                     rois=[m if m is not None else "" for m in got.masks], ignored_columns=[])
    if not rows.lines and not problems.items:
        raise XalError(f"{path}: no task has a usable annotation ({got.n_skipped} skipped: none, "
                       "cancelled or empty)")
    return rows, got.n_skipped


def read_dicom_seg(path: str | Path, pool: Pool, problems: Problems, segment: int | None) -> LabelRows:
    """DICOM SEG objects (a file or a folder of them) as ROI-only rows: masks at the pool's size, the
    class None (kept)."""
    from xal_engine.exchange.dicom_seg import read_seg

    pool.require_images("importing DICOM SEG objects (one frame per source image)")
    got = read_seg(path, pool, problems, segment)
    rows = LabelRows(lines=got.files, ids=got.ids, classes=[None] * len(got.ids), rois=list(got.masks),
                     ignored_columns=[])
    if not rows.lines and not problems.items:
        raise XalError(f"{path}: the SEG objects reference no source image")
    return rows


def _outside(cell: str, folder: Path) -> str | None:
    """Why the ROI path ``cell`` (relative to ``folder``) leads outside ``folder`` once symlinks are
    resolved; None when it stays inside."""
    base = folder.resolve()
    if (folder / cell).resolve().is_relative_to(base):
        return None
    return (f"ROI path {cell!r} leads outside the CSV's folder {base} "
            "(pass --allow-outside-rois to read it anyway)")


def _check_experiment(config: ImportConfig) -> None:
    name = config.experiment
    if name is None:
        if config.round is not None:
            raise XalError("--round needs --experiment (the AL experiment the round belongs to)")
        return
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise XalError(f"--experiment {name!r} is not a valid name (non-empty, no '/', no leading '.')")
    if config.round is not None and not 0 <= config.round <= MAX_ROUND:
        raise XalError(f"--round must be between 0 and {MAX_ROUND} (got {config.round})")


@dataclass(frozen=True)
class _Plan:
    """What an import writes: sorted unique pool positions and their values."""

    index: np.ndarray  # (n,) int64 pool positions, sorted
    labels: np.ndarray  # (n,) int16
    roi_index: np.ndarray  # (m,) int64 positions receiving a mask, sorted
    rois: np.ndarray  # (m, H, W) bool
    in_train: np.ndarray  # (n,) bool


def _plan(pool: Pool, rows: LabelRows, csv_path: Path, config: ImportConfig,
          problems: Problems) -> _Plan:
    """Check every row against the pool; the positions and values to write."""
    index = pool.find_ids(rows.ids)  # (n,) int64, -1 = unknown id
    split = pool.column("split")  # (N,) uint8
    first_line: dict[str, int] = {}
    labels = np.full(len(index), -1, dtype=np.int16)
    roi_paths: dict[int, Path] = {}
    masks: dict[int, np.ndarray] = {}
    keep = np.zeros(len(index), dtype=bool)  # (n,) rows whose class is None: their label is kept
    classes = pool.classes
    for r, (line, id_, cell, roi) in enumerate(zip(rows.lines, rows.ids, rows.classes, rows.rois)):
        if id_ in first_line:
            problems.add(line, f"duplicate id {id_!r} (also on {problems.unit} {first_line[id_]})")
            continue
        first_line[id_] = line
        if index[r] < 0:
            problems.add(line, f"unknown id {id_!r} (not in the pool)")
        elif split[index[r]] != SPLIT_TRAIN and not config.allow_any_split:
            problems.add(line, f"id {id_!r} is in the {SPLIT_NAMES[split[index[r]]]} split; only train-split "
                               "images are imported (pass --allow-any-split to label it anyway)")
        k = None if cell is None else _class_index(cell, classes)
        if cell is None:
            keep[r] = index[r] >= 0
        elif k is None:
            problems.add(line, f"unknown class {cell!r} (expected one of {', '.join(classes)} "
                               f"or an index 0..{len(classes) - 1})")
        else:
            labels[r] = k
        if isinstance(roi, np.ndarray):  # in memory (Label Studio): the PNG masks' resize rule
            mask = resize_mask(roi, pool.height, pool.width)
            if mask.any():
                masks[r] = mask
            else:
                problems.add(line, f"the ROI of {id_!r} is empty once resized to {pool.height}x{pool.width}")
        elif roi and pool.is_volume:
            problems.add(line, f"ROI {roi!r}: ROI images are 2-D; pool {pool.path} holds volumes (import "
                               "their labels with an empty roi column)")
        elif roi:
            path = csv_path.parent / roi
            outside = None if config.allow_outside_rois else _outside(roi, csv_path.parent)
            if outside:
                problems.add(line, outside)
            else:
                roi_paths[r] = path
    for r, path in roi_paths.items():
        mask = load_roi_png(path, pool.height, pool.width)
        if isinstance(mask, str):
            problems.add(rows.lines[r], mask)
        else:
            masks[r] = mask
    problems.raise_any()
    if keep.any():
        labels[keep] = pool.take("labels", index[keep])
    order = np.argsort(index, kind="stable")
    with_roi = np.array([r for r in order if r in masks], dtype=np.int64)
    rois = np.stack([masks[r] for r in with_roi]) if len(with_roi) else \
        np.zeros((0, *pool.spatial), dtype=bool)
    return _Plan(index=index[order], labels=labels[order], roi_index=index[with_roi], rois=rois,
                 in_train=split[index[order]] == SPLIT_TRAIN)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0].astype(np.int64), minlength=len(classes))  # (K,), -1 kept unlabelled
    return {c: int(n) for c, n in zip(classes, counts)}


def import_labels(pool_path: str | Path, csv_path: str | Path,
                  config: ImportConfig = ImportConfig()) -> ImportSummary:
    """Check ``csv_path`` completely against the pool, record what it replaces in ``labels_history/``,
    then write its labels (see the module doc); with ``dry_run`` only check and count."""
    _check_experiment(config)
    if config.format not in FORMATS:
        raise XalError(f"--format {config.format!r}: expected one of {', '.join(FORMATS)}")
    if config.segment is not None and config.format != "dicom-seg":
        raise XalError("--segment goes with --format dicom-seg")
    csv_path = Path(csv_path)
    pool = Pool.open(pool_path, mode="r" if config.dry_run else "r+")
    if not pool.classes:
        raise XalError(f"pool {pool.path} has no class names (attribute 'classes')")
    skipped = 0
    if config.format == "dicom-seg":
        problems = Problems(csv_path, config.shown, unit="SEG file")
        rows = read_dicom_seg(csv_path, pool, problems, config.segment)
    elif config.format == "label-studio":
        problems = Problems(csv_path, config.shown, unit="task")
        rows, skipped = read_label_studio(csv_path, pool, problems)
    else:
        problems = Problems(csv_path, config.shown)
        rows = read_label_csv(csv_path, problems)
    plan = _plan(pool, rows, csv_path, config, problems)
    experiment = pool.experiment(config.experiment) if config.experiment is not None else None
    history = pool.labels_history()
    pending = history.pending()
    resumed = pending is not None and _same_import(history, pending, plan, config)
    if pending is not None and not resumed:
        if config.dry_run:
            raise XalError(history.interrupted("before a dry run"))
        complete_pending(pool)
    if resumed:
        number, round_ = int(pending["number"]), pending["round"]
        old = history.read(number)
        marked = old.round_index
        first = history.read_planned(number, old).labelled_round
    else:
        number = len(history.records()) + 1
        labelled = plan.in_train & (plan.labels >= 0)  # (n,) an ROI-only row without a label is not marked
        marked = plan.index[labelled] if experiment is not None else np.zeros(0, dtype=np.int64)  # (k,)
        previous = experiment.read_labelled_round(missing_ok=True) if experiment is not None else \
            np.full(pool.n, -1, dtype=np.int16)  # (N,) int16, -1 = not labelled
        round_ = config.round if config.round is not None else int(previous.max(initial=-1)) + 1
        if round_ > MAX_ROUND:
            raise XalError(f"pool {pool.path}: experiment {config.experiment!r} has no round left "
                           f"(rounds are int16, at most {MAX_ROUND})")
        old = PreviousValues(
            index=plan.index, labels=pool.take("labels", plan.index), roi_index=plan.roi_index,
            has_roi=pool.take("has_roi", plan.roi_index), rois=pool.take("rois", plan.roi_index),
            round_index=marked, labelled_round=previous[marked],
            round_chunks_created=experiment.missing_chunks(marked) if experiment is not None else [])
        first = np.where(old.labelled_round >= 0, old.labelled_round, round_).astype(np.int16)  # (k,)
    known = old.labels >= 0  # (n,) rows that had a label
    summary = ImportSummary(
        pool=str(pool.path), file=str(csv_path), experiment=config.experiment,
        round=round_ if experiment is not None else None, n_imported=len(plan.index),
        per_class=_per_class(plan.labels, pool.classes), n_rois=len(plan.roi_index),
        n_relabelled=int(known.sum()), n_outside_train=int((~plan.in_train).sum()),
        chunks_written=len(np.unique(plan.index // pool.chunk_size)), ignored_columns=rows.ignored_columns,
        dry_run=config.dry_run, import_number=number,
        set_per_class=_per_class(plan.labels[~known], pool.classes),
        changed_per_class=_per_class(plan.labels[known & (old.labels != plan.labels)], pool.classes),
        n_unchanged=int((old.labels == plan.labels).sum()), n_rois_added=int((~old.has_roi).sum()),
        n_rois_replaced=int(old.has_roi.sum()), n_new=int((old.labelled_round < 0).sum()),
        resumed=resumed, n_skipped=skipped)
    if config.dry_run:
        return summary
    if resumed:
        complete_pending(pool)
        return summary

    # Everything is checked. What the import replaces and what it writes are stored, and the import
    # recorded as pending, before the first row is written; it is marked complete after the last.
    planned = PlannedValues(labels=plan.labels, rois=plan.rois, labelled_round=first)
    key = history.write(number, old, planned)
    history.record({"number": number, "file": str(csv_path), "experiment": config.experiment,
                    "round": summary.round, "n_rows": len(plan.index), "n_rois": len(plan.roi_index),
                    "n_new": summary.n_new, "history": key, "time": _now(), "undone": None,
                    "state": PENDING})
    complete_pending(pool)
    return summary


def _same_import(history: LabelsHistory, record: dict[str, Any], plan: _Plan, config: ImportConfig) -> bool:
    """Whether ``plan`` (with ``config``) is the pending import ``record`` run again: the same
    experiment and round, rows and values (the file may be named another way)."""
    if record.get("experiment") != config.experiment or \
            (config.round is not None and record.get("round") != config.round):
        return False
    old = history.read(int(record["number"]))
    planned = history.read_planned(int(record["number"]), old)
    return (np.array_equal(old.index, plan.index) and np.array_equal(planned.labels, plan.labels)
            and np.array_equal(old.roi_index, plan.roi_index) and np.array_equal(planned.rois, plan.rois))


def complete_pending(pool: Pool) -> int | None:
    """Write the planned values of the pending (interrupted) import of ``pool`` again, in the import's
    order, and mark it complete: an interrupted import is finished, never left half applied. Returns
    its number, None when no import is pending."""
    history = pool.labels_history()
    record = history.pending()
    if record is None:
        return None
    number = int(record["number"])
    old = history.read(number)
    planned = history.read_planned(number, old)
    name = record.get("experiment")
    if len(old.round_index) and name is None:
        raise XalError(f"pool {pool.path}: labels_history/{number} has rounds but its record names no "
                       "experiment")
    pool.write_rows("rois", old.roi_index, planned.rois)
    pool.write_rows("has_roi", old.roi_index, np.ones(len(old.roi_index), dtype=bool))
    pool.write_rows("labels", old.index, planned.labels)
    if name is not None:  # rows are marked labelled last: never before their label is in place
        experiment = pool.experiment(name)
        experiment.mark_labelled(old.round_index, planned.labelled_round)
        if not any(r.get("import") == number for r in experiment.imports()):
            experiment.record_import({"file": record.get("file"), "round": record.get("round"),
                                      "n_new": record.get("n_new"), "time": record.get("time"),
                                      "import": number, "history": record["history"]})
    history.set_state(number, COMPLETE)
    return number


def complete_interrupted(pool_path: str | Path) -> dict[str, Any]:
    """``label --complete``: finish the pool's interrupted import without its CSV (its planned values
    are in ``labels_history/``); returns its record. An XalError when no import is pending."""
    pool = Pool.open(pool_path, mode="r+")
    record = pool.labels_history().pending()
    if record is None:
        raise XalError(f"pool {pool.path}: no label import is pending (nothing was interrupted)")
    complete_pending(pool)
    return record


def _undo_target(pool: Pool, records: list[dict[str, Any]], config: UndoConfig) -> dict[str, Any]:
    """The record of the import ``config`` names; :class:`XalError` when there is nothing to undo."""
    if not records:
        raise XalError(f"pool {pool.path}: nothing to undo (no label import is recorded in labels_history)")
    if config.number is not None:
        if not 1 <= config.number <= len(records):
            raise XalError(f"--undo {config.number}: pool {pool.path} has imports 1..{len(records)}")
        target = records[config.number - 1]
        if config.experiment is not None and target.get("experiment") != config.experiment:
            raise XalError(f"--undo {config.number}: import {config.number} of pool {pool.path} is not of "
                           f"experiment {config.experiment!r} (it is of {target.get('experiment')!r})")
        if config.round is not None and target.get("round") != config.round:
            raise XalError(f"--undo {config.number}: import {config.number} was recorded as round "
                           f"{target.get('round')}, not --round {config.round}")
        if target.get("undone"):
            raise XalError(f"--undo {config.number}: import {config.number} of pool {pool.path} is already "
                           f"undone ({target['undone']})")
        return target
    live = [r for r in records if not r.get("undone")
            and (config.experiment is None or r.get("experiment") == config.experiment)
            and (config.round is None or r.get("round") == config.round)]
    if not live:
        which = "" if config.experiment is None else f" of experiment {config.experiment!r}"
        which += "" if config.round is None else f" recorded as round {config.round}"
        raise XalError(f"pool {pool.path}: nothing to undo (no import{which} is left that is not "
                       "already undone)")
    if config.round is not None and len(live) > 1:
        numbers = ", ".join(str(r["number"]) for r in live)
        raise XalError(f"--round {config.round}: experiment {config.experiment!r} has imports {numbers} "
                       "recorded as that round; pass --undo NUMBER")
    return live[-1]


def undo_import(pool_path: str | Path, config: UndoConfig = UndoConfig()) -> UndoSummary:
    """Put back what one import replaced (labels, has_roi, rois, labelled_round) and mark its records
    undone. Refused when a later import that is not undone wrote one of its rows (undo newest first).
    Everything is read and checked before the first write."""
    if config.experiment is not None:
        _check_experiment(ImportConfig(experiment=config.experiment))
    elif config.round is not None:
        raise XalError("--round needs --experiment (the AL experiment the round belongs to)")
    pool = Pool.open(pool_path, mode="r" if config.dry_run else "r+")
    history: LabelsHistory = pool.labels_history()
    pending = history.pending()
    if pending is not None:
        if config.dry_run:
            raise XalError(history.interrupted("before a dry run"))
        complete_pending(pool)
    records = history.records()
    target = _undo_target(pool, records, config)
    number = int(target["number"])
    old = history.read(number)
    if target.get(ROUNDS_REPLACED_ATTR):  # a loop took the experiment over: its rounds are not this import's
        none = np.zeros(0, dtype=np.int64)
        old = replace(old, round_index=none, labelled_round=none.astype(np.int16), round_chunks_created=[])
    for later in records[number:]:
        if later.get("undone"):
            continue
        overlap = np.intersect1d(old.index, history.written_rows(int(later["number"])))  # (j,) shared rows
        if len(overlap):
            raise XalError(f"--undo {number}: import {later['number']} ({later.get('file')}) later wrote "
                           f"{len(overlap)} of the same rows (first: {pool.take('ids', overlap[:1])[0]}); "
                           f"undo newest first (--undo {later['number']})")
    name = target.get("experiment")
    if len(old.round_index) and name is None:
        raise XalError(f"pool {pool.path}: labels_history/{number} has rounds but its record names no "
                       "experiment")
    experiment = pool.experiment(name) if name is not None else None
    if experiment is not None and len(old.round_index):
        experiment.read_labelled_round()  # checked to exist as (N,) int16 before anything is written
    summary = UndoSummary(pool=str(pool.path), import_number=number, file=str(target.get("file")),
                          experiment=name, round=target.get("round"), dry_run=config.dry_run,
                          n_labels=len(old.index), n_rois=len(old.roi_index), n_rounds=len(old.round_index))
    if config.dry_run:
        return summary

    # The reverse of an import: unmark the rows first, so an image never counts as labelled once its
    # label is gone; the records are marked undone last (an interrupted undo can be run again).
    if experiment is not None:
        experiment.restore_labelled_round(old.round_index, old.labelled_round, old.round_chunks_created)
    pool.write_rows("labels", old.index, old.labels)
    pool.write_rows("has_roi", old.roi_index, old.has_roi)
    pool.write_rows("rois", old.roi_index, old.rois)
    when = _now()
    if experiment is not None:
        experiment.mark_import_undone(number, when)
    history.mark_undone(number, when)
    return summary
