"""The content check behind ``Pool.validate``: every chunk decoded, every value checked.

Problems are collected, never raised: one line per kind, naming the array and the first few image
indices, so a single run reports everything that is wrong with a pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from xal_engine.progress import progress
from xal_engine.store.format import SPLIT_TEST, as_str, read_arrays

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
        for name, array in pool.arrays.items():
            missing = array.nchunks - array.nchunks_initialized
            if missing:
                self.problems.append(f"array '{name}': {missing} of {array.nchunks} chunk(s) missing "
                                     "(they would read as fill values)")
        with progress(pool.n, "validate", enabled=show_progress) as bar:
            for start, stop in pool.chunk_ranges():
                self._check_chunk(start, stop)
                bar.update(stop - start)
        self.problems += [f.message() for f in self.findings.values() if f.count]
        self._check_unique_ids()
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
            f["nonfinite"].add(start, ~np.isfinite(d["images"]).all(axis=(1, 2, 3)))
        if d["labels"] is not None:
            f["label"].add(start, (d["labels"] < -1) | (d["labels"] >= len(self.pool.classes)))
        if d["split"] is not None:
            f["split"].add(start, d["split"] > SPLIT_TEST)
        if d["rois"] is not None and d["has_roi"] is not None:
            nonempty = d["rois"].any(axis=(1, 2))  # (n,)
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
