"""The content check behind ``Pool.validate``: every chunk decoded, every value checked, of the
per-image arrays, of every score run (its done units) and of every AL experiment and label import.

Problems are collected, never raised: one line per kind, naming the array and the first few image
indices, so a single run reports everything that is wrong with a pool.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from xal_engine.core.fields import REQUIRED_NAMES
from xal_engine.errors import XalError
from xal_engine.progress import progress
from xal_engine.store.format import (
    AL_GROUP,
    LABELLED_ROUND,
    LABELS_HISTORY,
    SCORES_GROUP,
    SPLIT_TEST,
    as_str,
    missing_chunks,
    read_arrays,
    stored_keys,
)
from xal_engine.store.score_run import DONE, ScoreRun

ROI_METRICS = ("dice", "soft_dice", "energy")  # in [0, 1] with an ROI, NaN without

if TYPE_CHECKING:
    from xal_engine.store.pool import Pool


def validate_pool(pool: Pool, show_progress: bool | None = None) -> list[str]:
    """Every problem found in ``pool``, [] when valid."""
    return _Checker(pool).run(show_progress)


class _Findings:
    """One kind of per-image problem: how many images, and the first few indices."""

    SHOWN = 5

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.first: list[int] = []

    def add(self, start: int, bad: np.ndarray) -> None:
        index = np.flatnonzero(bad)  # bad: (n,) bool over images [start, start + n)
        self.count += len(index)
        self.first.extend((start + index[:self.SHOWN - len(self.first)]).tolist())

    def message(self) -> str:
        shown = ", ".join(map(str, self.first)) + (", ..." if self.count > len(self.first) else "")
        return f"{self.what}: {self.count} image(s) (index {shown})"


class _Checker:
    """Content checks of :meth:`Pool.validate`, one chunk-aligned range at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        k = len(pool.classes)
        self.problems: list[str] = []
        self.findings = {
            "nonfinite": _Findings("images: non-finite pixels"),
            "label": _Findings(f"labels: outside -1..{k - 1}"),
            "split": _Findings("split: value not in {0, 1, 2}"),
            "roi_extra": _Findings("rois: has_roi is False but the ROI is not empty"),
            "roi_missing": _Findings("rois: has_roi is True but the ROI is empty"),
            "empty_id": _Findings("ids: empty id"),
        }
        self.ids: list[np.ndarray] = []

    def run(self, show_progress: bool | None) -> list[str]:
        pool = self.pool
        if not pool.classes:
            self.problems.append("attribute 'classes' is empty")
        for name, array in {**pool.arrays, **pool.optional}.items():
            missing = len(missing_chunks(array))  # listed now: the store may have changed since open
            if missing:
                self.problems.append(f"array '{name}': {missing} of {array.nchunks} chunk(s) missing "
                                     "(they would read as fill values)")
        with progress(pool.n, "validate", enabled=show_progress) as bar:
            for start, stop in pool.chunk_ranges():
                self._check_chunk(start, stop)
                bar.update(stop - start)
        self.problems += [f.message() for f in self.findings.values() if f.count]
        self._check_unique_ids()
        self._check_optional()
        for run in pool.subgroups(SCORES_GROUP):
            self._check_run(run)
        for experiment in pool.subgroups(AL_GROUP):
            self._check_experiment(experiment)
        for number in pool.subgroups(LABELS_HISTORY):
            self._check_history(number)
        history = pool.labels_history()
        if history.pending() is not None:
            self.problems.append(history.interrupted("before it is used"))
        return self.problems

    def _check_chunk(self, start: int, stop: int) -> None:
        d: dict[str, Any] = read_arrays(self.pool.arrays, start, stop)
        for name, value in d.items():
            if isinstance(value, Exception):  # checksum mismatch or undecodable chunk: report, go on
                self.problems.append(f"array '{name}' chunk {start // self.pool.chunk_size} (images "
                                     f"{start}..{stop - 1}) cannot be decoded: "
                                     f"{type(value).__name__}: {value}")
                d[name] = None
        f = self.findings
        if d["images"] is not None and d["images"].dtype.kind == "f":
            f["nonfinite"].add(start, ~np.isfinite(d["images"]).reshape(stop - start, -1).all(axis=1))
        if d["labels"] is not None:
            f["label"].add(start, (d["labels"] < -1) | (d["labels"] >= len(self.pool.classes)))
        if d["split"] is not None:
            f["split"].add(start, d["split"] > SPLIT_TEST)
        if d["rois"] is not None and d["has_roi"] is not None:
            nonempty = d["rois"].reshape(stop - start, -1).any(axis=1)  # (n,)
            f["roi_extra"].add(start, ~d["has_roi"] & nonempty)
            f["roi_missing"].add(start, d["has_roi"] & ~nonempty)
        if d["ids"] is not None:
            ids = as_str(d["ids"])
            f["empty_id"].add(start, ids == "")
            self.ids.append(ids)

    def _check_unique_ids(self) -> None:
        if not self.ids:
            return
        values, counts = np.unique(np.concatenate(self.ids), return_counts=True)
        dup = (counts > 1) & (values != "")
        if dup.any():
            shown = ", ".join(repr(v) for v in values[dup][:_Findings.SHOWN].tolist())
            self.problems.append(f"ids: {int(dup.sum())} id(s) used more than once ({shown})")

    def _check_optional(self) -> None:
        """The optional per-image arrays stored (DICOM UIDs, source shapes, volume geometry): every chunk
        decodable, no empty UID, positive source shapes, crop sizes and spacings."""
        pool = self.pool
        if not pool.optional:
            return
        positive = {"source_shape": "source_shape: rows or columns below 1",
                    "crop_box": "crop_box: a size below 1", "source_spacing": "source_spacing: not positive"}
        findings = {name: _Findings(positive.get(name, f"{name}: empty UID")) for name in pool.optional}
        for start, stop in pool.chunk_ranges():
            for name, value in read_arrays(pool.optional, start, stop).items():
                if isinstance(value, Exception):
                    self._undecodable(name, start // pool.chunk_size, start, stop, value)
                elif name == "source_shape":
                    findings[name].add(start, (value < 1).any(axis=1))
                elif name == "crop_box":
                    findings[name].add(start, (value[:, 1] < 1).any(axis=1))
                elif name == "source_spacing":
                    findings[name].add(start, ~(value > 0).all(axis=1))  # NaN too
                else:
                    findings[name].add(start, as_str(value) == "")
        self.problems += [f.message() for f in findings.values() if f.count]

    def _undecodable(self, key: str, chunk: int, start: int, stop: int, err: Exception) -> None:
        self.problems.append(f"array '{key}' chunk {chunk} (images {start}..{stop - 1}) cannot be decoded: "
                             f"{type(err).__name__}: {err}")

    def _check_run(self, name: str) -> None:
        """The done units of ``scores/<name>/``: every chunk stored and decodable, values in range."""
        pool, where = self.pool, f"{SCORES_GROUP}/{name}"
        present = set(pool.group[SCORES_GROUP][name].array_keys())
        absent = [a for a in (*REQUIRED_NAMES, DONE) if a not in present]
        if absent:
            self.problems.append(f"{where}: missing array(s) {', '.join(map(repr, absent))}; expected a "
                                 "score run's result arrays and done flags")
            return
        try:
            run = ScoreRun.open(pool.group, name)
            done = run.done_mask()
        except (XalError, KeyError) as err:
            self.problems.append(f"{where}: cannot be opened ({type(err).__name__}: {err})")
            return
        arrays = {f.name: run.group[f.name] for f in run.fields}
        for field, array in arrays.items():
            if array.shape[0] != pool.n or array.chunks[0] != run.unit_size:
                self.problems.append(f"array '{where}/{field}' has shape {array.shape}, chunks {array.chunks}; "
                                     f"expected {pool.n} images in chunks of {run.unit_size}")
                return
        units = np.flatnonzero(done).tolist()
        keys = stored_keys(run.group)
        lost_units: set[int] = set()
        for field in run.always_stored:
            lost = missing_chunks(arrays[field], keys, units)
            lost_units.update(lost)
            if lost:
                shown = ", ".join(map(str, lost[:_Findings.SHOWN])) + (", ..." if len(lost) > _Findings.SHOWN else "")
                self.problems.append(f"array '{where}/{field}': {len(lost)} chunk(s) of done units missing "
                                     f"(chunk {shown}); expected every chunk of a done unit stored")
        k = int(arrays["probs"].shape[1])
        checks = {"probs": "outside [0, 1] or not summing to 1", "pred": f"outside 0..{k - 1}",
                  "entropy": f"outside [0, ln {k}]", "margin": "outside [0, 1]",
                  "least_confidence": "outside [0, 1]", "hit": "True where has_roi is False"}
        for f in ROI_METRICS:
            checks[f] = "outside [0, 1] where has_roi is True"
            checks[f"{f}/no_roi"] = "not NaN where has_roi is False"
        # optional fields, where the run stores them; NaN only for an image with non-finite logits (pred -1)
        samples = (run.group.attrs.get("fingerprint") or {}).get("mc_samples")
        vr_max = 1.0 - 1.0 / samples if isinstance(samples, int) and samples >= 2 else 1.0
        optional = {"bald": f"outside [0, ln {k}]", "mc_entropy": f"outside [0, ln {k}]",
                    "variation_ratio": f"outside [0, {vr_max:.6g}]", "embedding": "not finite"}
        checks.update({f: what for f, what in optional.items() if f in arrays})
        findings = {key: _Findings(f"{where}/{key.split('/')[0]}: {what}") for key, what in checks.items()}
        has_roi_all = np.asarray(pool.arrays["has_roi"][:], dtype=bool)
        eps = 1e-5  # fp32 rounding of values computed in [0, 1]
        for unit in (u for u in units if u not in lost_units):  # lost chunks read as fill: reported above
            start, stop = run.unit_range(unit)
            d = read_arrays(arrays, start, stop)
            if any(isinstance(v, Exception) for v in d.values()):
                for field, value in d.items():
                    if isinstance(value, Exception):
                        self._undecodable(f"{where}/{field}", unit, start, stop, value)
                continue
            has_roi = has_roi_all[start:stop]
            probs = d["probs"].astype(np.float32)  # (n, K)
            tol = k * 2.0 ** -11  # K fp16 roundings of at most half an ulp of 1
            findings["probs"].add(start, ~((probs >= 0) & (probs <= 1)).all(axis=1)
                                  | ~(np.abs(probs.sum(axis=1) - 1) <= tol))
            findings["pred"].add(start, (d["pred"] < 0) | (d["pred"] >= k))
            findings["entropy"].add(start, ~((d["entropy"] >= -eps) & (d["entropy"] <= math.log(k) + eps)))
            for f in ("margin", "least_confidence"):
                findings[f].add(start, ~((d[f] >= -eps) & (d[f] <= 1 + eps)))
            findings["hit"].add(start, d["hit"] & ~has_roi)
            for f in ROI_METRICS:
                findings[f].add(start, has_roi & ~((d[f] >= -eps) & (d[f] <= 1 + eps)))
                findings[f"{f}/no_roi"].add(start, ~has_roi & ~np.isnan(d[f]))
            scored = d["pred"] >= 0
            for f, top in (("bald", math.log(k)), ("mc_entropy", math.log(k)), ("variation_ratio", vr_max)):
                if f in d:
                    findings[f].add(start, scored & ~((d[f] >= -eps) & (d[f] <= top + eps)))
            if "embedding" in d:
                findings["embedding"].add(start, scored & ~np.isfinite(d["embedding"]).all(axis=1))
        self.problems += [f.message() for f in findings.values() if f.count]

    def _check_experiment(self, name: str) -> None:
        """``al/<name>/labelled_round``: every stored chunk decodable, rounds >= -1 (a chunk not stored
        is rows never labelled)."""
        pool, key = self.pool, f"{AL_GROUP}/{name}/{LABELLED_ROUND}"
        try:
            node = pool.experiment(name).labelled_round_array()
        except XalError as err:
            self.problems.append(str(err))
            return
        if node is None:
            return
        below = _Findings(f"{key}: below -1")
        for start, stop in pool.chunk_ranges():
            value = read_arrays({LABELLED_ROUND: node}, start, stop)[LABELLED_ROUND]
            if isinstance(value, Exception):
                self._undecodable(key, start // pool.chunk_size, start, stop, value)
            else:
                below.add(start, value < -1)
        if below.count:
            self.problems.append(below.message())

    def _check_history(self, number: str) -> None:
        """``labels_history/<number>/``: every array decodable and consistent with the pool."""
        if not number.isdigit():
            self.problems.append(f"{LABELS_HISTORY}/{number}: not an import number")
            return
        try:
            self.pool.labels_history().read(int(number))
        except XalError as err:
            self.problems.append(str(err))
