"""Reading a pool: :class:`Pool` opens and checks one (the layout is :mod:`xal_engine.store.format`)
and reads it by chunk-aligned range, by whole (N,) column or by row, and finds ids; opened ``r+``, it
rewrites rows of its per-image arrays in place (label imports).

Its checks, summary and AL experiments live in :mod:`.validate`, :mod:`.info` and :mod:`.al_state`;
callers import all of them from :mod:`xal_engine.store`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from xal_engine.errors import PoolError
from xal_engine.store.al_state import ALExperiment, LabelsHistory
from xal_engine.store.format import (
    COLUMNS,
    FORMAT_VERSIONS,
    GEOMETRY_ARRAYS,
    OPTIONAL_ARRAYS,
    OPTIONAL_COLUMNS,
    PARTIAL_SUFFIX,
    PER_IMAGE_ARRAYS,
    WRITING_ATTR,
    as_str,
    chunk_key,
    group_arrays,
    missing_chunk_error,
    missing_chunks,
    open_group,
    optional_arrays,
    read_arrays,
    structure_problems,
    write_rows,
)
from xal_engine.store.info import pool_info
from xal_engine.store.location import Location, StoreURL, parse_location
from xal_engine.store.validate import validate_pool

__all__ = ["Pool", "PoolBatch"]


@dataclass(frozen=True)
class PoolBatch:
    """Images [start, stop) of a pool, every per-image array (numpy)."""

    start: int
    stop: int
    images: np.ndarray   # (n, C, H, W) pool dtype; (n, C, D, H, W) in a volume pool
    rois: np.ndarray     # (n, H, W) bool; (n, D, H, W) in a volume pool
    has_roi: np.ndarray  # (n,) bool
    labels: np.ndarray   # (n,) int16, -1 unknown
    ids: np.ndarray      # (n,) str
    split: np.ndarray    # (n,) uint8


def _check_unfinished(path: Location) -> None:
    if path.name.endswith(PARTIAL_SUFFIX):
        raise PoolError(f"{path} is an unfinished pool (.partial): its writing was interrupted; "
                        "create or ingest it again")


class Pool:
    """An open pool. Use :meth:`open`; ``mode="r+"`` lets other commands add subgroups."""

    def __init__(self, path: Location, group: zarr.Group, members: dict[str, zarr.Array] | None = None) -> None:
        """``members``: the group's arrays as ``group_arrays`` read them (:meth:`open` passes them)."""
        self.path = path
        self.group = group
        # the per-image arrays' metadata never changes after the writer closes: open it once
        self.arrays: dict[str, zarr.Array] = {name: members[name] if members is not None else group[name]
                                              for name in PER_IMAGE_ARRAYS}
        # the optional per-image arrays this pool stores ({} without them): read by take / column only
        self.optional: dict[str, zarr.Array] = optional_arrays(group, members)
        images = self.arrays["images"]
        self.n, self.channels = int(images.shape[0]), int(images.shape[1])
        # (H, W), or (D, H, W) in a volume pool (format version 2)
        self.spatial: tuple[int, ...] = tuple(int(s) for s in images.shape[2:])
        self.is_volume = len(self.spatial) == 3
        self.depth: int | None = self.spatial[0] if self.is_volume else None
        self.height, self.width = self.spatial[-2:]
        self.image_dtype = np.dtype(images.dtype)
        self.chunk_size = int(images.chunks[0])
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.classes: list[str] = list(self.attrs.get("classes", []))
        # A missing chunk would read as fill values (black images, split 0), so every read checks that
        # its chunks are stored, when it needs them (listing a 1M-image pool's 375k chunk files at
        # open took 24 s): on a local store each chunk's file once (a stat), remembered; on an
        # object store one listing per array (one request per 1000 keys, where a check per chunk
        # would be one request each), taken on the array's first read.
        store = group.store
        self._root: Path | None = Path(store.root) if isinstance(store, zarr.storage.LocalStore) else None
        self._stored: dict[str, set[int]] = {}  # local: chunks seen stored
        self._missing: dict[str, set[int]] = {}  # object store: the listing's missing chunks

    @classmethod
    def open(cls, path: str | Path | StoreURL, mode: str = "r") -> Pool:
        """Open ``path`` (a local path or an object-store URL, see :mod:`.location`); :class:`PoolError`
        names what is wrong when it is not a valid pool. A pool whose writer has not finished (no
        ``xal_pool``, ``xal_pool_written`` set: on an object store, where nothing is renamed, the only
        sign of it) is refused."""
        path = parse_location(path)
        if mode not in ("r", "r+"):
            raise PoolError(f"pool mode must be 'r' or 'r+' (got {mode!r})")
        _check_unfinished(path)
        group = open_group(path, mode)
        attrs = group.attrs
        version = attrs.get("xal_pool")
        if version is None:
            if WRITING_ATTR in attrs:
                raise PoolError(f"{path} is an unfinished pool: its writing was interrupted")
            raise PoolError(f"{path} is not a pool: the group has no 'xal_pool' attribute")
        if type(version) is not int or version not in FORMAT_VERSIONS:
            raise PoolError(f"{path}: pool format version {version!r} is not supported "
                            f"(this xal-engine reads versions {', '.join(map(str, FORMAT_VERSIONS))})")
        classes = attrs.get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise PoolError(f"{path}: attribute 'classes' must be a list of class names")
        members = group_arrays(group)  # every array's metadata in one pass, for the checks and the pool
        problems = structure_problems(group, members)
        if problems:
            raise PoolError(f"{path}: " + "; ".join(problems))
        images = members["images"] if members is not None else group["images"]
        if images.ndim != version + 3:  # v1: (N, C, H, W), v2: (N, C, D, H, W)
            raise PoolError(f"{path}: pool format version {version} stores "
                            f"{'volumes (N, C, D, H, W)' if version == 2 else 'images (N, C, H, W)'}, but "
                            f"array 'images' has shape {images.shape}")
        return cls(path, group, members)

    def __repr__(self) -> str:
        return (f"Pool({str(self.path)!r}, n={self.n}, shape={(self.channels, *self.spatial)}, "
                f"dtype={self.image_dtype}, classes={self.classes})")

    @property
    def kind(self) -> str:
        """"volume" or "image": what one row of the pool is, for messages."""
        return "volume" if self.is_volume else "image"

    def require_images(self, what: str) -> None:
        """Refuse (one line) a volume pool in a command that handles 2-D images only."""
        if self.is_volume:
            raise PoolError(f"pool {self.path} holds volumes {(self.channels, *self.spatial)}: {what} handles "
                            "2-D image pools only")

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def read(self, start: int, stop: int) -> PoolBatch:
        """Images [start, stop), every per-image array; chunk-aligned ranges decode each chunk once."""
        data = self.read_arrays(start, stop, PER_IMAGE_ARRAYS)
        data["ids"] = as_str(data["ids"])
        return PoolBatch(start=start, stop=stop, **data)

    def read_arrays(self, start: int, stop: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Images [start, stop) of the per-image arrays ``names`` only (the scorer reads images, rois,
        has_roi and maybe labels: decoding ids and split too cost it 40 %), decoded concurrently."""
        if not 0 <= start <= stop <= self.n:
            raise PoolError(f"{self.path}: cannot read images {start}..{stop} of a pool of {self.n}")
        unknown = [name for name in names if name not in self.arrays]
        if unknown:
            raise PoolError(f"{self.path}: {unknown[0]!r} is not a per-image array "
                            f"(expected one of {', '.join(PER_IMAGE_ARRAYS)})")
        arrays = {name: self.arrays[name] for name in names}
        if stop > start:
            self._check_stored(arrays, range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1))
        data = read_arrays(arrays, start, stop)
        for name, value in data.items():
            if isinstance(value, Exception):
                raise PoolError(f"{self.path}: array '{name}' images {start}..{stop - 1} cannot be "
                                f"decoded ({type(value).__name__}: {value}); run `xal-engine pool "
                                "validate`") from value
        return data  # type: ignore[return-value]

    def column(self, name: str) -> np.ndarray:
        """The whole (N,) per-image array ``name`` (has_roi, labels, ids or split, or an optional str
        column the pool stores, e.g. sop_instance_uid) in its pool dtype; strings as ``<U``, as
        :meth:`read` gives ids."""
        if name not in COLUMNS and name not in OPTIONAL_COLUMNS:
            raise PoolError(f"{self.path}: {name!r} is not an (N,) per-image array "
                            f"(expected one of {', '.join((*COLUMNS, *OPTIONAL_COLUMNS))})")
        array = self._array(name)
        self._check_stored({name: array})
        values = self._decoded(name, lambda array: array[:])
        return as_str(values) if values.dtype.kind in "TUO" else values

    def take(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` ((n,) positions) of the per-image array ``name``, decoding only the chunks
        that hold them; ids as ``<U`` strings, as :meth:`read` gives them."""
        array = self._array(name)
        self._check_stored({name: array}, np.unique(np.asarray(index, dtype=np.int64) // self.chunk_size))
        values = self._decoded(name, lambda array: array.oindex[index])
        return as_str(values) if values.dtype.kind in "TUO" else values

    def find_ids(self, ids: Sequence[str]) -> np.ndarray:
        """(n,) int64 pool positions of ``ids``, -1 where the pool has no such id."""
        self._check_stored({"ids": self.arrays["ids"]})
        pool_ids = self._decoded("ids", lambda array: array[:])  # (N,) numpy StringDType (zarr's str), or <U / object
        if pool_ids.dtype.kind == "O":
            pool_ids = pool_ids.astype(np.str_)
        order = np.argsort(pool_ids, kind="stable")
        ranked = pool_ids[order]
        query = np.asarray(ids, dtype=pool_ids.dtype if pool_ids.dtype.kind == "T" else np.str_)
        pos = np.minimum(np.searchsorted(ranked, query), max(self.n - 1, 0))  # (n,)
        found = (ranked[pos] == query) if self.n else np.zeros(len(ids), dtype=bool)
        return np.where(found, order[pos], -1).astype(np.int64)

    def write_rows(self, name: str, index: np.ndarray, values: np.ndarray) -> int:
        """Set rows ``index`` ((n,) sorted unique positions) of the per-image array ``name`` to
        ``values``, rewriting only the chunks that hold them; needs mode ``r+``. Returns the count of
        chunks rewritten."""
        array = self._array(name)
        if self.group.read_only:
            raise PoolError(f"pool {self.path} is open read-only; open it with mode 'r+' to write '{name}'")
        written = write_rows(array, index, values)
        rewritten = np.unique(index // self.chunk_size).tolist()  # stored now, every one of them
        self._stored.setdefault(name, set()).update(rewritten)
        self._missing.get(name, set()).difference_update(rewritten)
        return written

    def missing_chunks(self, name: str, chunks: Sequence[int] | range | None = None) -> list[int]:
        """Chunks along N of the per-image array ``name`` (of ``chunks``, or all) that are not stored,
        ascending."""
        array = self._array(name)
        chunks = range(-(-array.shape[0] // array.chunks[0])) if chunks is None else chunks
        if self._root is None:
            if name not in self._missing:
                self._missing[name] = set(missing_chunks(array))
            missing = self._missing[name]
            return sorted(missing.intersection(chunks)) if missing else []
        stored = self._stored.setdefault(name, set())
        lost = []
        for c in chunks:
            if c not in stored:
                if os.path.isfile(self._root / chunk_key(array, c)):
                    stored.add(c)
                else:
                    lost.append(c)
        return sorted(lost)

    def _check_stored(self, arrays: dict[str, zarr.Array], chunks: Any = None) -> None:
        """:class:`PoolError` when a chunk (of ``chunks``, or any) of ``arrays`` is not stored."""
        for name in arrays:
            lost = self.missing_chunks(name, None if chunks is None else [int(c) for c in chunks])
            if lost:
                raise missing_chunk_error(f"pool {self.path}", name, lost[0], self.chunk_size, self.n)

    def _decoded(self, name: str, read: Callable[[zarr.Array], Any]) -> np.ndarray:
        """``read(array)`` of the per-image array ``name`` as numpy; :class:`PoolError` when a chunk of it
        cannot be decoded (checksum, blosc)."""
        try:
            return np.asarray(read(self._array(name)))
        except Exception as err:
            raise PoolError(f"{self.path}: array '{name}' cannot be decoded ({type(err).__name__}: {err}); "
                            "run `xal-engine pool validate`") from err

    def _array(self, name: str) -> zarr.Array:
        if name in self.arrays:
            return self.arrays[name]
        if name in self.optional:
            return self.optional[name]
        if name in OPTIONAL_ARRAYS:
            by = "ingest brats --volumes" if name in GEOMETRY_ARRAYS else "DICOM ingests: vindr, siim"
            raise PoolError(f"pool {self.path} has no '{name}' array (an optional per-image array, "
                            f"stored by {by})")
        raise PoolError(f"{self.path}: {name!r} is not a per-image array "
                        f"(expected one of {', '.join(PER_IMAGE_ARRAYS)})")

    def chunk_ranges(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """[start, stop) cut at chunk boundaries: [(start, b1), (b1, b2), ..., (bk, stop)]."""
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise PoolError(f"{self.path}: range {start}..{stop} is outside a pool of {self.n}")
        cuts = range((start // self.chunk_size + 1) * self.chunk_size, stop, self.chunk_size)
        edges = [start, *cuts, stop]
        return [(a, b) for a, b in itertools.pairwise(edges) if b > a]

    def subgroups(self, name: str) -> list[str]:
        """Names under ``scores/`` or ``al/`` (score runs, AL experiments)."""
        node = self.group.get(name)
        return sorted(node.group_keys()) if isinstance(node, zarr.Group) else []

    def experiment(self, name: str) -> ALExperiment:
        """The AL experiment ``al/<name>/`` (it need not exist yet)."""
        return ALExperiment(self, name)

    def labels_history(self) -> LabelsHistory:
        """``labels_history/``: the record of every label import and what it replaced."""
        return LabelsHistory(self)

    def require_settled(self, when: str) -> None:
        """Refuse (:class:`PoolError`, one line) a pool whose last label import was interrupted: its
        labels, ROIs and labelled rounds are part old, part new until the import is completed. Every
        job that reads labels or ROIs (score, select, train, loop) calls this after opening the pool."""
        history = self.labels_history()
        if history.pending() is not None:
            raise PoolError(history.interrupted(when))

    def labelled_round_array(self, experiment: str) -> zarr.Array | None:
        """``al/<experiment>/labelled_round``, checked to be (N,) int16; None when the experiment is new."""
        return self.experiment(experiment).labelled_round_array()

    def read_labelled_round(self, experiment: str) -> np.ndarray:
        """(N,) int16: the AL round each image was labelled in by ``experiment``, -1 = not labelled."""
        return self.experiment(experiment).read_labelled_round()

    def create_labelled_round(self, experiment: str) -> zarr.Array:
        """A new ``al/<experiment>/labelled_round`` of -1, chunked and checksummed like the pool's arrays
        (replaces an existing one); needs mode ``r+``."""
        return self.experiment(experiment).create_labelled_round()

    def validate(self, show_progress: bool | None = None) -> list[str]:
        """Decode every chunk and check every value; every problem found, [] when valid."""
        return validate_pool(self, show_progress)

    def info(self) -> dict[str, Any]:
        """Summary of the pool: what ``pool info --json`` prints."""
        return pool_info(self)
