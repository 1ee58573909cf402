"""`xal-engine select`: rank a pool's unlabelled train images from a scoring run and write a batch.

Candidates are the train split (split 0) minus the images an AL experiment has already labelled
(`al/<experiment>/labelled_round >= 0`). Validation and test images are never candidates. The batch is
written as CSV (one row per selected image: rank, index, id, acquisition score and every per-image
number of the run) with a JSON sidecar holding the selection config, both written atomically.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xal_engine.core import strategies
from xal_engine.core.acquisition import RunScores, SelectConfig, select
from xal_engine.core.fields import FIELDS, REQUIRED_NAMES
from xal_engine.errors import XalError
from xal_engine.progress import plural
from xal_engine.store import SPLIT_TRAIN, Pool
from xal_engine.store.files import atomic_write, atomic_write_text, dumps_json, write_target
from xal_engine.store.score_run import ScoreRun

# The batch CSV: rank and identity, the acquisition score, every scalar result field (the predicted
# class's name after `pred`), and whether the image has an ROI.
RESULT_COLUMNS = tuple(f.name for f in FIELDS if f.in_batch_csv)
CSV_FIELDS = ("rank", "index", "id", "score",
              *(c for name in RESULT_COLUMNS for c in ((name, "pred_class") if name == "pred" else (name,))),
              "has_roi")


@dataclass(frozen=True)
class BatchSelection:
    indices: np.ndarray  # [b] pool indices, best first
    rows: list[dict]  # CSV rows
    config: SelectConfig
    run: str
    experiment: str | None
    n_candidates: int

    def line(self, out: str | Path) -> str:
        """The one-line summary of ``select``; it says when --budget was more than could be selected."""
        n, budget = len(self.rows), self.config.budget
        candidates = plural(self.n_candidates, "candidate")
        if n >= budget:
            head = f"selected {n} of {candidates}"
        elif n == self.n_candidates:
            head = f"budget {budget} > {candidates}: selected {n}"
        else:  # --missing-roi skip leaves fewer eligible images than candidates
            head = f"budget {budget} > {n} eligible of {candidates}: selected {n}"
        how = ("batch-aware" if strategies.get(self.config.strategy).batch_aware
               else f"balance {self.config.balance}")
        return f"{head} by {self.config.strategy} ({how}) -> {out}"


def labelled_mask(pool: Pool, experiment: str | None) -> np.ndarray:
    """(N,) bool: images the experiment has labelled (all False without an experiment)."""
    if experiment is None:
        return np.zeros(pool.n, dtype=bool)
    return pool.read_labelled_round(experiment) >= 0


def select_batch(pool_path: str | Path, run_name: str, config: SelectConfig,
                 experiment: str | None = None) -> BatchSelection:
    pool = Pool.open(pool_path)
    pool.require_settled("before selecting")
    run = ScoreRun.open(pool.group, run_name)
    done = run.done_mask()
    if not done.all():
        raise XalError(
            f"score run {run_name!r} is incomplete ({int(done.sum())} of {done.size} work units done); "
            "finish it with `xal-engine score` first"
        )
    train = pool.column("split") == SPLIT_TRAIN  # (N,)
    labelled = labelled_mask(pool, experiment)  # (N,)
    candidates = np.flatnonzero(train & ~labelled)
    if candidates.size == 0:
        raise XalError("the pool has no unlabelled train images left to select from")
    strategy = strategies.get(config.strategy)
    extra = tuple(f for f in strategy.needs if f not in REQUIRED_NAMES)
    lacking = [f for f in extra if not run.has(f)]
    if lacking:
        raise XalError(f"strategy {config.strategy!r} needs the run's {', '.join(lacking)}, which score run "
                       f"{run_name!r} does not store; {strategy.how or 'score the run again'}")
    r = run.read((*REQUIRED_NAMES, *extra))
    # fp16 fields (probs) are ranked in fp32; an embedding stays fp16 (D values an image)
    scores = RunScores(**{name: v[candidates].astype(np.float32)
                          if v.dtype == np.float16 and name in REQUIRED_NAMES else v[candidates]
                          for name, v in r.items()})
    labels = pool.column("labels")[candidates] if config.balance == "oracle" else None
    # the train images the experiment already has, for strategies that spread the batch away from them
    centres = r["embedding"][np.flatnonzero(train & labelled)] if "embedding" in r else None
    chosen = select(scores, config, labels=labels, labelled_embedding=centres)
    indices = candidates[chosen.order]
    ids = pool.column("ids")
    has_roi = pool.column("has_roi")
    classes = pool.classes
    rows = []
    for rank, (pos, idx) in enumerate(zip(chosen.order, indices), start=1):
        rows.append({
            "rank": rank, "index": int(idx), "id": str(ids[idx]), "score": float(chosen.score[pos]),
            **{name: _cell(r[name][idx]) for name in RESULT_COLUMNS},
            "pred_class": classes[int(r["pred"][idx])], "has_roi": bool(has_roi[idx]),
        })
    return BatchSelection(indices=indices, rows=rows, config=config, run=run_name,
                          experiment=experiment, n_candidates=int(candidates.size))


def _cell(value: np.generic) -> int | float | bool:
    """A numpy scalar as the Python number the CSV writes (int, float or bool by its dtype)."""
    if value.dtype == np.bool_:
        return bool(value)
    return int(value) if value.dtype.kind in "iu" else float(value)


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_out(out: str | Path) -> None:
    """Refuse an --out (or its .json sidecar) that is not a file to write, before any work or writing."""
    out = Path(out)
    if not out.parent.is_dir():
        raise XalError(f"--out directory {out.parent} does not exist")
    for path in (out, sidecar_path(out)):
        try:
            write_target(path)
        except XalError as err:
            raise XalError(f"--out: {err}") from None


def write_batch(selection: BatchSelection, out: str | Path, pool_path: str | Path) -> tuple[Path, Path]:
    """Write `out` (CSV) and `out`.json (selection config) atomically; returns both paths. A symlink
    is followed (its target is replaced); anything else that is not a regular file is refused."""
    out = Path(out)
    check_out(out)  # both, so a refused sidecar leaves no CSV behind
    meta = {
        "pool": str(pool_path), "run": selection.run, "experiment": selection.experiment,
        "n_candidates": selection.n_candidates, "n_selected": len(selection.rows),
        "config": asdict(selection.config),
        # the paper's class balance by TRUE labels leaks the labels the batch is meant to discover
        "oracle_balance": selection.config.balance == "oracle",
    }
    sidecar = sidecar_path(out)
    atomic_write(out, lambda f: _write_csv(f, selection.rows))
    atomic_write_text(sidecar, dumps_json(meta, indent=2) + "\n")
    return out, sidecar


def _write_csv(f, rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
