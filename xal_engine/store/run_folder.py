"""The run folder of ``xal-engine loop`` (format RUN_FORMAT): its layout, its writing and its checked reading.

    RUN_DIR/
        config.json                  format, pool, strategies, seeds, rounds, arch, loop config
        metrics.json                 [row, ...]: one per (strategy, seed, round), METRIC_FIELDS, NaN as null
        metrics.csv                  the same rows, columns METRIC_FIELDS, NaN as nan
        <strategy>/seed<k>/round<r>/
            selected.csv             the images labelled IN round r, rank order (the batch CSV of
            selected.csv.json        ``xal-engine select`` and its sidecar; round 0: the initial set)
            model.pt                 the checkpoint trained on the labels of rounds 0..r
        report/                      where ``xal-engine report`` writes by default
        .lock                        while a loop writes the folder: its pid and host (store.locks)

Round r's batch is chosen with the scores of round r-1's model (nothing chooses round 0's set). Every
file is replaced atomically, and a round is complete once its metrics row is written (last), so a
rerun continues after the last complete round. Only the configuration that made a folder resumes it
(the RESUME_FREE fields of its loop's training config aside).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.store.files import atomic_write_text, dumps_json, finite_or_none, jsonable
from xal_engine.store.location import absolute
from xal_engine.store.locks import RUN_DIR_LOCK, LockFile

RUN_FORMAT = 1
METRIC_FIELDS = ("strategy", "seed", "round", "n_labelled", "accuracy", "balanced_accuracy", "macro_f1",
                 "auroc", "test_dice", "test_soft_dice", "test_energy", "test_hit_rate", "pred_kappa",
                 "stop_suggested", "train_seconds", "score_seconds")
KEY_COLUMNS = METRIC_FIELDS[:4]  # strategy, seed, round, n_labelled: what every metrics.csv needs
# loop.train fields that may change between a run and its resumption (another machine, other cores)
RESUME_FREE = ("num_workers", "threads")
# loop fields added after run folders were first written, at the value that earlier runs behaved as
ADDED_LOOP = {"mc_samples": 20, "mc_dropout": None, "initial_strategy": "stratified", "initial_model": None}
ADDED_TRAIN = {"head_dropout": None}

CONFIG_JSON = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
SELECTED_CSV = "selected.csv"
MODEL_PT = "model.pt"
REPORT_DIR = "report"
_ROUND = "round"  # round folders: round0, round1, ...


def run_config(pool: str | Path, strategies: Iterable[str], seeds: int, rounds: int, arch: str,
               loop: dict[str, Any]) -> dict[str, Any]:
    """What config.json holds (JSON values): the pool's absolute path (or its URL), seeds 0..seeds-1, the loop config."""
    return jsonable({"format": RUN_FORMAT, "pool": absolute(pool), "strategies": list(strategies),
                     "seeds": list(range(seeds)), "rounds": rounds, "arch": arch, "loop": loop})


@dataclass(frozen=True)
class MetricsTable:
    """metrics.csv by column, rows in file order (n rows)."""

    strategy: list[str]  # (n,) non-empty
    seed: np.ndarray  # (n,) int64 >= 0
    round: np.ndarray  # (n,) int64 >= 0
    n_labelled: np.ndarray  # (n,) float64
    values: dict[str, np.ndarray]  # metric -> (n,) float64, NaN where empty or the column is absent


class RunFolder:
    """A run folder's paths, and its files read back with checks (an XalError names the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder, for reading."""
        folder = cls(path)
        if not folder.path.is_dir():
            raise XalError(f"run directory {folder.path} not found")
        return folder

    # ------------------------------------------------------------------------------------ layout
    @property
    def config_json(self) -> Path:
        return self.path / CONFIG_JSON

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def metrics_json(self) -> Path:
        return self.path / METRICS_JSON

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def lock_file(self) -> Path:
        return self.path / RUN_DIR_LOCK

    def lock(self) -> LockFile:
        """RUN_DIR/.lock taken (the folder created if need be): a second process writing the same run
        folder is refused with the holder's pid and host. Release it with ``release()`` or ``with``."""
        if self.path.exists() and not self.path.is_dir():
            raise XalError(f"--out {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        return LockFile(self.lock_file, f"run folder {self.path}").acquire()

    def strategy_dir(self, strategy: str) -> Path:
        return self.path / strategy

    def experiment_dir(self, strategy: str, seed: int) -> Path:
        return self.strategy_dir(strategy) / f"seed{seed}"

    def round_dir(self, strategy: str, seed: int, round_: int) -> Path:
        return self.experiment_dir(strategy, seed) / f"{_ROUND}{round_}"

    def selected_csv(self, strategy: str, seed: int, round_: int) -> Path:
        return self.round_dir(strategy, seed, round_) / SELECTED_CSV

    def model_pt(self, strategy: str, seed: int, round_: int) -> Path:
        return self.round_dir(strategy, seed, round_) / MODEL_PT

    def selecting_model_pt(self, strategy: str, seed: int, round_: int) -> Path:
        """The checkpoint whose scores chose round ``round_``'s batch (round 0: its own model)."""
        return self.model_pt(strategy, seed, max(round_ - 1, 0))

    def batches(self, strategy: str, seed: int) -> list[tuple[int, Path]]:
        """(round, selected.csv) of each round folder of (strategy, seed) holding a batch, in round order."""
        n = len(_ROUND)
        found = sorted((int(p.name[n:]), p) for p in self.experiment_dir(strategy, seed).glob(f"{_ROUND}*")
                       if p.name[n:].isdigit() and (p / SELECTED_CSV).is_file())
        return [(r, folder / SELECTED_CSV) for r, folder in found]

    # ----------------------------------------------------------------------------------- reading
    def read_config(self) -> dict[str, Any]:
        """config.json, which must hold a JSON object."""
        path = self.config_json
        if not path.is_file():
            raise XalError(f"{path} not found: {path.parent} is not a loop run directory "
                           "(expected config.json and metrics.csv from `xal-engine loop`)")
        value = _read_json(path)
        if not isinstance(value, dict):
            raise XalError(f"{path} must hold a JSON object (got {type(value).__name__})")
        return value

    def read_metrics(self, metrics: Iterable[str]) -> MetricsTable:
        """metrics.csv with KEY_COLUMNS, a strategy in every row, integer seeds and rounds >= 0, and
        numbers (or empty cells) in the ``metrics`` columns, checked in that order row by row."""
        path = self.metrics_csv
        if not path.is_file():
            raise XalError(f"{path} not found: the run has not completed a round yet "
                           f"(or {self.path} is not a loop run directory)")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in KEY_COLUMNS if c not in fields]
            if missing:
                raise XalError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(expected {', '.join(KEY_COLUMNS)} and the metrics)")
            rows = [(reader.line_num, row) for row in reader]
        metrics = tuple(metrics)
        cols: dict[str, list[float]] = {c: [] for c in ("seed", "round", "n_labelled", *metrics)}
        strategy = []
        for line, row in rows:
            if not row["strategy"]:
                raise XalError(f"{path}: line {line}: empty strategy")
            strategy.append(row["strategy"])
            for name, values in cols.items():
                values.append(_number(row.get(name), path, line, name))
        for name in ("seed", "round"):
            bad = [v for v in cols[name] if not (math.isfinite(v) and v == int(v) and v >= 0)]
            if bad:
                raise XalError(f"{path}: column {name} holds {bad[0]!r}, expected integers >= 0")
        return MetricsTable(strategy=strategy, seed=np.asarray(cols["seed"], dtype=np.int64),
                            round=np.asarray(cols["round"], dtype=np.int64),
                            n_labelled=np.asarray(cols["n_labelled"], dtype=np.float64),
                            values={m: np.asarray(cols[m], dtype=np.float64) for m in metrics})


class RunWriter(RunFolder):
    """The loop's side of a run folder: created or resumed, round folders, one metrics row per round."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.rows: list[dict[str, Any]] = []  # metrics.json, in the order rows were recorded

    @classmethod
    def prepare(cls, path: str | Path, config_json: dict[str, Any], overwrite: bool) -> RunWriter:
        """Create the folder, or resume it: an existing config.json must equal ``config_json``
        (``overwrite`` deletes the old run first). A non-empty folder without config.json is refused."""
        run = cls(path)
        cfg = run.config_json
        config_json = finite_or_none(config_json)  # as config.json stores it: NaN as null
        if run.path.exists() and not run.path.is_dir():
            raise XalError(f"--out {run.path} exists and is not a folder")
        if run.path.is_dir() and any(p.name != RUN_DIR_LOCK for p in run.path.iterdir()) and not cfg.is_file():
            raise XalError(f"--out {run.path} is not empty and holds no config.json: not a loop run folder")
        grown = False
        if cfg.is_file():
            old = _read_json(cfg, "; pass --overwrite to start afresh")
            if overwrite:
                _clear(run.path)
            elif _comparable(old, seeds=False) != _comparable(config_json, seeds=False):
                diff = _differences(_comparable(old), _comparable(config_json)) or ["the whole file"]
                raise XalError(f"{cfg} holds another configuration (differs in: {', '.join(diff)}); "
                               "use another --out or pass --overwrite")
            # more seeds than the folder's: the same run extended (seeds 0..k-1 are resumed, not redone)
            grown = len(config_json.get("seeds", [])) > len(old.get("seeds", []))
        run.path.mkdir(parents=True, exist_ok=True)
        if grown or not cfg.is_file():
            atomic_write_text(cfg, dumps_json(config_json, indent=2) + "\n")
        if run.metrics_json.is_file():
            run.rows = _read_json(run.metrics_json, "; pass --overwrite to start afresh")
        return run

    def make_round_dir(self, strategy: str, seed: int, round_: int) -> Path:
        path = self.round_dir(strategy, seed, round_)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def completed_rounds(self, strategy: str, seed: int) -> int:
        """Number of consecutive complete rounds 0, 1, … of one experiment."""
        done = {int(r["round"]) for r in self.rows if r["strategy"] == strategy and int(r["seed"]) == seed}
        n = 0
        while n in done:
            n += 1
        return n

    def add_row(self, row: dict[str, Any]) -> None:
        """Record one round's metrics (replacing an earlier row of that round) and rewrite metrics.json
        and metrics.csv atomically. A NaN (no test image with an ROI, no class with both outcomes) or an
        infinity is null in JSON, nan in CSV."""
        row = finite_or_none(dict(row))
        self.rows = [r for r in self.rows if (r["strategy"], int(r["seed"]), int(r["round"]))
                     != (row["strategy"], row["seed"], row["round"])] + [row]
        atomic_write_text(self.metrics_json, dumps_json(self.rows, indent=1) + "\n")
        write_metrics_csv(self.metrics_csv, self.rows)


def write_metrics_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """metrics.csv of ``rows`` (each with the METRIC_FIELDS keys; one written before a column existed
    has nan there), replaced atomically: a float as its repr, None as nan, anything else (the strings
    of :func:`read_metrics_csv` too) as ``str``."""
    lines = [",".join(METRIC_FIELDS)]  # header, then one line per row
    lines += [",".join(_csv_value(r.get(f)) for f in METRIC_FIELDS) for r in rows]  # older rows: nan
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def read_metrics_csv(path: str | Path) -> list[dict[str, str]]:
    """metrics.csv as written, one dict of strings per row (no checks)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_selected(path: Path, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Pool indices (n,) int64 and ids of the first ``limit`` rows (None: all) of a batch CSV, in rank
    order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"index", "id"} <= set(reader.fieldnames or []):
            raise XalError(f"{path}: expected columns index and id (a batch CSV from `xal-engine select`)")
        rows = [(reader.line_num, r) for r in reader][:limit]
    try:
        index = np.asarray([int(r["index"]) for _, r in rows], dtype=np.int64)
    except ValueError:
        bad = next(line for line, r in rows if not r["index"].strip().isdigit())
        raise XalError(f"{path}: line {bad}: index is not an integer") from None
    return index, [r["id"] for _, r in rows]


def count_selected(path: Path) -> int:
    """Images in a batch CSV (its rows, the header excluded)."""
    with open(path, newline="") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


# -------------------------------------------------------------------------------------- helpers
def _read_json(path: Path, hint: str = "") -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise XalError(f"{path} cannot be read as JSON ({err}){hint}") from None


def _number(text: str | None, path: Path, line: int, column: str) -> float:
    """A metrics.csv cell as a float; empty or absent is NaN."""
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise XalError(f"{path}: line {line}: column {column} is {text!r}, expected a number") from None


def _comparable(config: dict[str, Any], seeds: bool = True) -> dict[str, Any]:
    """config.json without the RESUME_FREE training fields, and with the fields added since a run
    folder was begun at the values that run used (ADDED_LOOP, ADDED_TRAIN); ``seeds=False`` also
    without the seed count (a run with more or fewer seeds is the same run, extended or resumed in part)."""
    loop = {**ADDED_LOOP, **dict(config.get("loop", {}))}
    train = {**ADDED_TRAIN, **dict(loop.get("train", {}))}
    loop["train"] = {k: v for k, v in train.items() if k not in RESUME_FREE}
    if not seeds:
        loop.pop("seeds", None)
        return {**{k: v for k, v in config.items() if k != "seeds"}, "loop": loop}
    return {**config, "loop": loop}


def _clear(folder: Path) -> None:
    """Delete a run folder's contents but its lock file, which the process clearing it holds."""
    for child in folder.iterdir():
        if child.name == RUN_DIR_LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted paths (``loop.train.epochs``) of the fields where two JSON objects differ, sorted;
    nested objects are compared field by field so that the message names the field itself."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix]
    found: list[str] = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}.{key}" if prefix else str(key)
        found += _differences(old[key], new[key], name) if key in old and key in new else [name]
    return found


def _csv_value(v: Any) -> str:
    if v is None:
        return "nan"
    return repr(v) if isinstance(v, float) else str(v)
