"""Importing annotators' labels (and optional ROI masks) for a batch into a pool: ``label --import``.

The CSV has a header with ``id`` and ``class`` (a class name of the pool, or its index) and an
optional ``roi`` column (a PNG mask, relative to the CSV's folder; nonzero = ROI; an empty cell = no
mask for that row). Other columns are ignored, so a batch CSV from ``select`` with a ``class`` column
added imports as it is.

The import is all or nothing: the file, every row and every mask are checked first, and any problem
raises one :class:`XalError` naming the file, the line and the problem (the first few, then a
count) before anything is written. Then only the chunks holding the imported rows are rewritten:
``rois``/``has_roi`` (rows with a mask), ``labels``, and last ``al/<experiment>/labelled_round``
(so an image never counts as labelled before its label is in place). This module parses, checks and
plans; the rows are written by :meth:`Pool.write_rows` and :meth:`ALExperiment.mark_labelled`.

AL rounds: an image enters the experiment in the round it is first imported; re-importing it later
corrects its label (and mask) but keeps that first round. Validation and test images are refused
unless ``allow_any_split``; they then get their label and mask but are never marked as labelled by
the experiment (an experiment's labelled set lies in the train split).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xal_engine.errors import XalError
from xal_engine.store import SPLIT_NAMES, SPLIT_TRAIN, Pool

ID, CLASS, ROI = "id", "class", "roi"
MAX_ROUND = int(np.iinfo(np.int16).max)


@dataclass(frozen=True)
class ImportConfig:
    """Flags of ``xal-engine label --import``."""

    experiment: str | None = None  # AL experiment (al/<experiment>/); None: labels and ROIs only
    round: int | None = None  # None: max existing round + 1 (0 for a new experiment)
    allow_any_split: bool = False  # accept validation/test ids (never marked as AL-labelled)
    shown: int = 5  # problems listed in the error before "and N more"


@dataclass(frozen=True)
class LabelRows:
    """The parsed rows of a label CSV, one entry per data row."""

    lines: list[int]  # line number in the file (1 = header)
    ids: list[str]
    classes: list[str]  # the class cell as written (name or index)
    rois: list[str]  # ROI path as written, "" = none
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
    chunks_written: int  # chunks of 'labels' rewritten
    ignored_columns: list[str]


class Problems:
    """Problems found in one file: collected, then raised together as one line."""

    def __init__(self, path: Path, shown: int) -> None:
        self.path, self.shown = path, shown
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def raise_any(self) -> None:
        if not self.items:
            return
        items = sorted(self.items, key=lambda item: item[0])
        listed = "; ".join(f"line {line}: {msg}" if line else msg for line, msg in items[:self.shown])
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
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT) > 0
        if not mask.any():
            return f"ROI mask {path} is empty once resized to {height}x{width}"
    return mask


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
    classes = pool.classes
    for r, (line, id_, cell, roi) in enumerate(zip(rows.lines, rows.ids, rows.classes, rows.rois)):
        if id_ in first_line:
            problems.add(line, f"duplicate id {id_!r} (also on line {first_line[id_]})")
            continue
        first_line[id_] = line
        if index[r] < 0:
            problems.add(line, f"unknown id {id_!r} (not in the pool)")
        elif split[index[r]] != SPLIT_TRAIN and not config.allow_any_split:
            problems.add(line, f"id {id_!r} is in the {SPLIT_NAMES[split[index[r]]]} split; only train-split "
                               "images are imported (pass --allow-any-split to label it anyway)")
        k = _class_index(cell, classes)
        if k is None:
            problems.add(line, f"unknown class {cell!r} (expected one of {', '.join(classes)} "
                               f"or an index 0..{len(classes) - 1})")
        else:
            labels[r] = k
        if roi:
            roi_paths[r] = csv_path.parent / roi
    masks: dict[int, np.ndarray] = {}
    for r, path in roi_paths.items():
        mask = load_roi_png(path, pool.height, pool.width)
        if isinstance(mask, str):
            problems.add(rows.lines[r], mask)
        else:
            masks[r] = mask
    problems.raise_any()
    order = np.argsort(index, kind="stable")
    with_roi = np.array([r for r in order if r in masks], dtype=np.int64)
    rois = np.stack([masks[r] for r in with_roi]) if len(with_roi) else \
        np.zeros((0, pool.height, pool.width), dtype=bool)
    return _Plan(index=index[order], labels=labels[order], roi_index=index[with_roi], rois=rois,
                 in_train=split[index[order]] == SPLIT_TRAIN)


def import_labels(pool_path: str | Path, csv_path: str | Path,
                  config: ImportConfig = ImportConfig()) -> ImportSummary:
    """Check ``csv_path`` completely against the pool, then write its labels (see the module doc)."""
    _check_experiment(config)
    csv_path = Path(csv_path)
    pool = Pool.open(pool_path, mode="r+")
    if not pool.classes:
        raise XalError(f"pool {pool.path} has no class names (attribute 'classes')")
    problems = Problems(csv_path, config.shown)
    rows = read_label_csv(csv_path, problems)
    plan = _plan(pool, rows, csv_path, config, problems)
    experiment = pool.experiment(config.experiment) if config.experiment is not None else None
    previous = experiment.read_labelled_round(missing_ok=True) if experiment is not None else \
        np.full(pool.n, -1, dtype=np.int16)  # (N,) int16, -1 = not labelled
    round_ = config.round if config.round is not None else int(previous.max(initial=-1)) + 1
    if round_ > MAX_ROUND:
        raise XalError(f"pool {pool.path}: experiment {config.experiment!r} has no round left "
                       f"(rounds are int16, at most {MAX_ROUND})")
    old_labels = pool.take("labels", plan.index)  # (n,) int16

    # Everything is checked: write, marking the rows labelled last.
    pool.write_rows("rois", plan.roi_index, plan.rois)
    pool.write_rows("has_roi", plan.roi_index, np.ones(len(plan.roi_index), dtype=bool))
    chunks = pool.write_rows("labels", plan.index, plan.labels)
    if experiment is not None:
        marked = plan.index[plan.in_train]
        first = np.where(previous[marked] >= 0, previous[marked], round_).astype(np.int16)
        experiment.mark_labelled(marked, first)
        experiment.record_import({
            "file": str(csv_path), "round": round_, "n_new": int((previous[marked] < 0).sum()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    counts = np.bincount(plan.labels, minlength=len(pool.classes))
    return ImportSummary(
        pool=str(pool.path), file=str(csv_path), experiment=config.experiment,
        round=round_ if config.experiment is not None else None, n_imported=len(plan.index),
        per_class={c: int(n) for c, n in zip(pool.classes, counts)}, n_rois=len(plan.roi_index),
        n_relabelled=int((old_labels >= 0).sum()), n_outside_train=int((~plan.in_train).sum()),
        chunks_written=chunks, ignored_columns=rows.ignored_columns)
