"""The state of one active-learning experiment in a pool, under ``al/<experiment>/``, and the history
of label imports that makes each one undoable, under ``labels_history/``.

    al/<experiment>/
        labelled_round  (N,) int16, fill -1   the AL round each image was labelled in, -1 = not labelled
        attributes                            what the AL loop records (strategy, seed, run folder, config)
                                              and ``imports``: one record per label import of the experiment
    labels_history/                           attribute ``imports``: one record per label import of the
                                              pool (with or without an experiment), numbered 1, 2, ...
        <number>/                             what that import replaced, for the rows it wrote:
            index           (n,) int64        rows whose label was written, sorted
            labels          (n,) int16        their labels before
            roi_index       (m,) int64        rows that received a mask, sorted (a subset of index)
            has_roi         (m,) bool         their has_roi before
            rois            (m, H, W) bool    their masks before
            round_index     (k,) int64        rows marked by the experiment, sorted (k = 0 without one)
            labelled_round  (k,) int16        their rounds before
            planned_labels  (n,) int16        the labels the import writes
            planned_rois    (m, H, W) bool    the masks it writes
            planned_labelled_round (k,) int16 the rounds it writes
            attribute ``round_chunks_created``: chunks of labelled_round the import created

An import's record is ``state: "pending"`` from before its first row write until after its last
(``"complete"``; a record without ``state`` is complete). A pending import was interrupted: its
planned values are written again (:func:`xal_engine.jobs.label.complete_pending`) before the next
label import or undo, so an import is applied whole or (with ``label --undo``) not at all.

The history arrays are chunked along their first axis like the pool's arrays and blosc + CRC32C
compressed. Imports are numbered pool-wide because experiments share ``labels``/``rois``: undoing
one import must not put back a label a later import (of any experiment) wrote.

The experiment group and its array are created by the first label import or loop round;
``Pool.open(path, "r+")`` is needed to write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.sync import sync

from xal_engine.errors import PoolError
from xal_engine.store.format import AL_GROUP, LABELLED_ROUND, LABELS_HISTORY, compressors, write_rows

if TYPE_CHECKING:
    from xal_engine.store.pool import Pool

IMPORTS_ATTR = "imports"  # list of import records (dicts), oldest first
ROUND_CHUNKS_ATTR = "round_chunks_created"
ROUNDS_REPLACED_ATTR = "rounds_replaced"  # on an import record: its experiment's rounds were replaced since
# Attribute of labels_history: the pool generation, how many times label imports and undos have
# changed (or begun to change) labels, has_roi or rois, counted before each records update; a score
# run records the generation it scored. Absent: 0.
GENERATION_ATTR = "xal_pool_generation"


def pool_generation(pool: Pool) -> int:
    """The pool's generation: 0 before the first label import or undo."""
    node = pool.group.get(LABELS_HISTORY)
    return int(node.attrs.get(GENERATION_ATTR, 0)) if isinstance(node, zarr.Group) else 0


def bump_generation(pool: Pool) -> int:
    """Count one more change of the pool's labels, has_roi or rois; returns the new generation."""
    generation = pool_generation(pool) + 1
    pool.group.require_group(LABELS_HISTORY).attrs[GENERATION_ATTR] = generation
    return generation


class ALExperiment:
    """``al/<name>/`` of ``pool``; nothing is read or created until a method is called."""

    def __init__(self, pool: Pool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.key = f"{AL_GROUP}/{name}"

    def labelled_round_array(self) -> zarr.Array | None:
        """``al/<name>/labelled_round``, checked to be (N,) int16; None when the experiment is new."""
        pool = self.pool
        key = f"{self.key}/{LABELLED_ROUND}"
        node = pool.group.get(key)
        if node is None:
            return None
        if not isinstance(node, zarr.Array) or node.shape != (pool.n,) or node.dtype != np.int16:
            raise PoolError(f"pool {pool.path}: {key} is not an (N,) int16 array of {pool.n} rounds")
        return node

    def read_labelled_round(self, missing_ok: bool = False) -> np.ndarray:
        """(N,) int16: the AL round each image was labelled in, -1 = not labelled. A new experiment
        raises :class:`PoolError`, or with ``missing_ok`` reads as all -1."""
        node = self.labelled_round_array()
        if node is None:
            if missing_ok:
                return np.full(self.pool.n, -1, dtype=np.int16)
            pool = self.pool
            known = ", ".join(pool.subgroups(AL_GROUP)) or "none"
            raise PoolError(f"pool {pool.path} has no AL experiment {self.name!r} (array "
                            f"{self.key}/{LABELLED_ROUND} missing; experiments: {known}); "
                            "`xal-engine label --experiment NAME --import labels.csv` starts one")
        try:
            return np.asarray(node[:])
        except Exception as err:  # checksum mismatch or undecodable chunk: one line, not a traceback
            raise PoolError(f"pool {self.pool.path}: array '{self.key}/{LABELLED_ROUND}' cannot be decoded "
                            f"({type(err).__name__}: {err}); run `xal-engine pool validate`") from err

    def create_labelled_round(self) -> zarr.Array:
        """A new ``al/<name>/labelled_round`` of -1, chunked and checksummed like the pool's arrays
        (replaces an existing one)."""
        pool = self.pool
        group = pool.group.require_group(AL_GROUP).require_group(self.name)
        dtype = np.dtype(np.int16)
        return group.create_array(LABELLED_ROUND, shape=(pool.n,), chunks=(pool.chunk_size,), dtype=dtype,
                                  fill_value=-1, compressors=compressors(dtype, "lz4", 5), overwrite=True)

    def mark_labelled(self, index: np.ndarray, rounds: np.ndarray) -> int:
        """Set ``labelled_round[index] = rounds`` ((n,) sorted unique positions, (n,) int16), rewriting
        only the chunks that hold them; a new experiment's array is created (all -1) first. Returns the
        count of chunks rewritten."""
        node = self.labelled_round_array()
        if node is None:
            node = self.create_labelled_round()
        return write_rows(node, index, rounds)

    def missing_chunks(self, index: np.ndarray) -> list[int]:
        """Chunks of ``labelled_round`` holding rows ``index`` ((n,) positions) that are not stored yet
        (all of them for a new experiment), ascending."""
        chunks = np.unique(np.asarray(index, dtype=np.int64) // self.pool.chunk_size).tolist()
        node = self.labelled_round_array()
        if node is None:
            return chunks
        store, encode = node.store, node.metadata.encode_chunk_key
        return [c for c in chunks if not sync(store.exists(f"{node.path}/{encode((c,))}"))]

    def restore_labelled_round(self, index: np.ndarray, rounds: np.ndarray, created: list[int]) -> int:
        """Put back ``labelled_round[index] = rounds`` ((n,) sorted unique positions, (n,) int16) as
        they were before an import; chunks in ``created`` (made by that import) are removed again when
        they are back to all -1, so the stored chunks are the ones that were there. Returns the count
        of chunks rewritten or removed."""
        node = self.labelled_round_array()
        if node is None:
            if len(index):
                raise PoolError(f"pool {self.pool.path}: {self.key}/{LABELLED_ROUND} is missing; "
                                f"expected the rounds of the import being undone")
            return 0
        index = np.asarray(index, dtype=np.int64)
        fresh = np.isin(index // self.pool.chunk_size, created)  # (n,) rows in chunks the import made
        dropping = node.with_config({"write_empty_chunks": False})  # an all -1 chunk is deleted
        if fresh.any():
            dropping.oindex[index[fresh]] = rounds[fresh]
        return write_rows(node, index[~fresh], rounds[~fresh]) + len(np.unique(index[fresh] // node.chunks[0]))

    def mark_import_undone(self, number: int, when: str) -> None:
        """Set ``undone`` on this experiment's record of pool import ``number`` (no-op without one)."""
        node = self.pool.group.get(self.key)
        if not isinstance(node, zarr.Group):
            return
        imports = [dict(r) for r in node.attrs.get(IMPORTS_ATTR, [])]
        for record in imports:
            if record.get("import") == number:
                record["undone"] = when
        node.attrs[IMPORTS_ATTR] = imports

    def attrs(self) -> dict[str, Any]:
        """The experiment's attributes; {} when it does not exist yet."""
        node = self.pool.group.get(self.key)
        return dict(node.attrs) if node is not None else {}

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Set ``values`` in the experiment's attributes (one metadata write per key, in order)."""
        self._group().attrs.update(values)

    def imports(self) -> list[dict[str, Any]]:
        """The experiment's import records ([] when none or when it does not exist yet)."""
        return [dict(r) for r in self.attrs().get(IMPORTS_ATTR, [])]

    def take_over(self, when: str) -> None:
        """Detach the experiment's label imports from its rounds before another writer replaces them:
        their records in ``labels_history`` get ``rounds_replaced`` (an undo then puts back labels and
        masks only) and move from ``imports`` to ``replaced_imports`` here."""
        history = self.pool.labels_history()
        records = history.records()
        for record in records:
            if record.get("experiment") == self.name and not record.get(ROUNDS_REPLACED_ATTR):
                record[ROUNDS_REPLACED_ATTR] = when
        if records:
            self.pool.group.require_group(LABELS_HISTORY).attrs[IMPORTS_ATTR] = records
        node = self.pool.group.get(self.key)
        if isinstance(node, zarr.Group):
            replaced = [*node.attrs.get("replaced_imports", []), *self.imports()]
            node.attrs.update({"replaced_imports": replaced, IMPORTS_ATTR: []})

    def record_import(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to the experiment's ``imports`` attribute."""
        group = self._group()
        imports = list(group.attrs.get(IMPORTS_ATTR, []))
        imports.append(dict(record))
        group.attrs[IMPORTS_ATTR] = imports

    def _group(self) -> zarr.Group:
        node = self.pool.group.get(self.key)
        if not isinstance(node, zarr.Group):
            raise PoolError(f"pool {self.pool.path} has no AL experiment {self.name!r} "
                            f"(group {self.key} missing)")
        return node


@dataclass(frozen=True)
class PreviousValues:
    """What one label import replaced, for the rows it wrote: enough to put them back."""

    index: np.ndarray  # (n,) int64 rows whose label was written, sorted
    labels: np.ndarray  # (n,) int16 their labels before
    roi_index: np.ndarray  # (m,) int64 rows that received a mask, sorted
    has_roi: np.ndarray  # (m,) bool their has_roi before
    rois: np.ndarray  # (m, H, W) bool their masks before
    round_index: np.ndarray  # (k,) int64 rows marked by the experiment, sorted; (0,) without one
    labelled_round: np.ndarray  # (k,) int16 their rounds before, -1 = not labelled
    round_chunks_created: list[int]  # chunks of labelled_round the import created (removed on undo)


@dataclass(frozen=True)
class PlannedValues:
    """What one label import writes, for the rows of its :class:`PreviousValues`."""

    labels: np.ndarray  # (n,) int16 for index
    rois: np.ndarray  # (m, H, W) bool for roi_index
    labelled_round: np.ndarray  # (k,) int16 for round_index


# array name -> (dtype, shape after the first axis is "", "hw" for (H, W))
_HISTORY_ARRAYS: dict[str, tuple[np.dtype, str]] = {
    "index": (np.dtype(np.int64), ""), "labels": (np.dtype(np.int16), ""),
    "roi_index": (np.dtype(np.int64), ""), "has_roi": (np.dtype(bool), ""),
    "rois": (np.dtype(bool), "hw"), "round_index": (np.dtype(np.int64), ""),
    "labelled_round": (np.dtype(np.int16), ""),
}
# planned array -> (the history array giving its rows, dtype, "hw" for (H, W))
_PLANNED_ARRAYS: dict[str, tuple[str, np.dtype, str]] = {
    "planned_labels": ("index", np.dtype(np.int16), ""), "planned_rois": ("roi_index", np.dtype(bool), "hw"),
    "planned_labelled_round": ("round_index", np.dtype(np.int16), ""),
}
PENDING, COMPLETE = "pending", "complete"
_SAME_LENGTH = (("index", "labels"), ("roi_index", "has_roi"), ("roi_index", "rois"),
                ("round_index", "labelled_round"))


class LabelsHistory:
    """``labels_history/`` of ``pool``: the import records and what each import replaced."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def records(self) -> list[dict[str, Any]]:
        """The import records, oldest first ([] before the first import); checked to be numbered
        1, 2, ... with a ``history`` key."""
        node = self.pool.group.get(LABELS_HISTORY)
        if node is None:
            return []
        where = f"pool {self.pool.path}: {LABELS_HISTORY}"
        if not isinstance(node, zarr.Group):
            raise PoolError(f"{where} is not a group; expected the label import history")
        records = node.attrs.get(IMPORTS_ATTR, [])
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and r.get("number") == i + 1 and isinstance(r.get("history"), str)
                for i, r in enumerate(records)):
            raise PoolError(f"{where}: attribute '{IMPORTS_ATTR}' is not a list of import records "
                            "numbered 1, 2, ... with a 'history' key")
        return [dict(r) for r in records]

    def key(self, number: int) -> str:
        return f"{LABELS_HISTORY}/{number}"

    def write(self, number: int, previous: PreviousValues, planned: PlannedValues) -> str:
        """Store ``previous`` and ``planned`` as ``labels_history/<number>/`` (replacing a leftover group
        of that number from an import that never recorded itself); returns its key."""
        pool = self.pool
        group = pool.group.require_group(LABELS_HISTORY).create_group(str(number), overwrite=True)
        arrays = {name: (dtype, tail, getattr(previous, name)) for name, (dtype, tail) in _HISTORY_ARRAYS.items()}
        arrays.update({name: (dtype, tail, getattr(planned, name.removeprefix("planned_")))
                       for name, (_, dtype, tail) in _PLANNED_ARRAYS.items()})
        for name, (dtype, tail, given) in arrays.items():
            values = np.asarray(given, dtype=dtype)
            inner = pool.spatial if tail else ()
            array = group.create_array(name, shape=values.shape, chunks=(pool.chunk_size, *inner), dtype=dtype,
                                       fill_value=0, compressors=compressors(dtype, "lz4", 5))
            if len(values):
                array[...] = values
        group.attrs[ROUND_CHUNKS_ATTR] = [int(c) for c in previous.round_chunks_created]
        return self.key(number)

    def _group(self, number: int) -> zarr.Group:
        group = self.pool.group.get(self.key(number))
        if not isinstance(group, zarr.Group):
            raise PoolError(f"pool {self.pool.path}: {self.key(number)} is missing; expected what import "
                            f"{number} replaced")
        return group

    def _decode(self, group: zarr.Group, name: str) -> np.ndarray:
        """``labels_history/<number>/<name>`` decoded, its dtype and trailing shape checked."""
        pool = self.pool
        dtype, tail = _HISTORY_ARRAYS[name] if name in _HISTORY_ARRAYS else _PLANNED_ARRAYS[name][1:]
        node = group.get(name)
        inner = pool.spatial if tail else ()
        where = f"pool {pool.path}: {group.path}/{name}"
        if not isinstance(node, zarr.Array) or node.dtype != dtype or node.shape[1:] != inner:
            raise PoolError(f"{where} is not an (n{', *spatial' if tail else ''},) {dtype} array")
        try:
            return np.asarray(node[...])
        except Exception as err:  # checksum or blosc failure: a damaged history chunk
            raise PoolError(f"{where} cannot be decoded ({type(err).__name__}: {err})") from err

    def written_rows(self, number: int) -> np.ndarray:
        """(n,) int64: the rows import ``number`` wrote (sorted)."""
        return self._decode(self._group(number), "index")

    def read(self, number: int) -> PreviousValues:
        """``labels_history/<number>/``, every array decoded and checked against the pool."""
        pool = self.pool
        group = self._group(number)
        where = f"pool {pool.path}: {group.path}"
        values = {name: self._decode(group, name) for name in _HISTORY_ARRAYS}
        for a, b in _SAME_LENGTH:
            if len(values[a]) != len(values[b]):
                raise PoolError(f"{where}: {a} has {len(values[a])} rows but {b} {len(values[b])}")
        for name in ("index", "roi_index", "round_index"):
            rows = values[name]
            if len(rows) and (rows[0] < 0 or rows[-1] >= pool.n or (np.diff(rows) <= 0).any()):
                raise PoolError(f"{where}/{name} is not sorted unique positions 0..{pool.n - 1}")
        created = group.attrs.get(ROUND_CHUNKS_ATTR)
        if not isinstance(created, list) or not all(type(c) is int for c in created):
            raise PoolError(f"{where}: attribute '{ROUND_CHUNKS_ATTR}' is not a list of chunk numbers")
        return PreviousValues(**values, round_chunks_created=created)

    def read_planned(self, number: int, previous: PreviousValues) -> PlannedValues:
        """The values import ``number`` writes, checked against its ``previous`` rows."""
        group = self._group(number)
        values = {}
        for name, (rows, _, _) in _PLANNED_ARRAYS.items():
            array = self._decode(group, name)
            if len(array) != len(getattr(previous, rows)):
                raise PoolError(f"pool {self.pool.path}: {group.path}/{name} has {len(array)} rows but "
                                f"{rows} {len(getattr(previous, rows))}")
            values[name.removeprefix("planned_")] = array
        return PlannedValues(**values)

    def pending(self) -> dict[str, Any] | None:
        """The record of the import that was interrupted (state ``pending``); None when there is none."""
        pending = [r for r in self.records() if r.get("state") == PENDING]
        return pending[-1] if pending else None

    def interrupted(self, when: str) -> str:
        """The one-line refusal for a pool whose pending import must be completed ``when`` ("before
        scoring"), naming the commands that complete it."""
        record = self.pending()
        assert record is not None
        path = self.pool.path
        return (f"pool {path}: label import {record['number']} ({record.get('file')}) was interrupted and "
                f"must be completed {when}; run `xal-engine label --pool {path} --complete` (or rerun "
                f"that import), or `xal-engine label --pool {path} --undo` to complete and then undo it")

    def set_state(self, number: int, state: str) -> None:
        """Set ``state`` on the record of import ``number``."""
        records = self.records()
        records[number - 1]["state"] = state
        bump_generation(self.pool)
        self.pool.group.require_group(LABELS_HISTORY).attrs[IMPORTS_ATTR] = records

    def record(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (its ``number`` the next one) to ``labels_history``'s ``imports``."""
        bump_generation(self.pool)
        group = self.pool.group.require_group(LABELS_HISTORY)
        group.attrs[IMPORTS_ATTR] = [*self.records(), dict(record)]

    def mark_undone(self, number: int, when: str) -> None:
        """Set ``undone`` on the record of import ``number``."""
        records = self.records()
        records[number - 1]["undone"] = when
        bump_generation(self.pool)
        self.pool.group.require_group(LABELS_HISTORY).attrs[IMPORTS_ATTR] = records
