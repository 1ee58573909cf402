"""Writing a new pool: :class:`PoolWriter`.

On a local filesystem the writer puts ``<path>.partial`` on disk chunk by chunk and renames it to
``<path>`` on close, so an interrupted write never leaves anything that ``Pool.open`` accepts;
``resume=True`` continues it. An overwrite moves the old pool to ``<path>.replaced-<hex>`` for the
swap; a writer of ``<path>`` finishes a swap a killed one left (see :func:`finish_swap`) before it starts.

An object store has no rename: the writer writes at the URL itself, and its zarr.json carries
``xal_pool_written`` (no ``xal_pool``) until ``close`` replaces it in one PUT (an object is replaced
whole, never torn) with ``xal_pool`` (1, or 2 for volumes). Until then ``Pool.open`` refuses the pool as unfinished, and
``resume=True`` continues it. An overwrite deletes the old pool's keys before writing the new one (a
kill in between leaves an unfinished pool, not the old one).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr

from xal_engine import __version__
from xal_engine.errors import PoolError
from xal_engine.store.files import finite_or_none
from xal_engine.store.format import (
    IMAGE_DTYPES,
    OPTIONAL_ARRAYS,
    OPTIONAL_GROUPS,
    PARTIAL_SUFFIX,
    PER_IMAGE_ARRAYS,
    RESERVED_ATTRS,
    WRITING_ATTR,
    StorageConfig,
    array_specs,
    as_str,
    compressors,
    format_version,
    images_per_chunk,
    open_group,
    optional_arrays,
    optional_specs,
    partial_path,
    structure_problems,
)
from xal_engine.store.location import (
    Location,
    StoreURL,
    delete_all,
    parse_location,
    probe,
    read_json,
    zarr_store,
)
from xal_engine.store.pool import Pool

_DEFAULT_STORAGE = StorageConfig()  # frozen: one shared default is safe


def _is_replaceable(path: Path) -> bool:
    """Only a Zarr group or an empty folder may be deleted to make room for a pool."""
    if path.is_dir():
        return (path / "zarr.json").is_file() or not any(path.iterdir())
    return False


def finish_swap(path: str | Path) -> None:
    """Finish an overwrite of ``path`` killed during its swap: delete a leftover old pool
    ``<path>.replaced-*`` once ``<path>`` exists, or, when killed between the two renames, move in the
    complete new pool from ``<path>.partial`` (else put the old pool back) first."""
    path = Path(path)
    for old in sorted(path.parent.glob(f"{path.name}.replaced-*")):
        if not _is_replaceable(old):
            continue
        if not path.exists():
            partial = partial_path(path)
            (partial if _is_complete(partial) else old).rename(path)
        if old.exists():
            shutil.rmtree(old)


def _is_complete(path: Path) -> bool:
    """Whether ``path`` holds a pool that its writer closed (``xal_pool`` set, nothing left to write)."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and "xal_pool" in attrs and WRITING_ATTR not in attrs


def _remote_state(url: StoreURL) -> str:
    """"missing", "complete" (a pool its writer closed), "unfinished" (a writer's), "group" (another Zarr
    group) or "other" (keys, no zarr.json) at an object-store URL."""
    state = probe(url)
    if state != "group":
        return state
    meta = read_json(url, "zarr.json")
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if not isinstance(attrs, dict):
        return "group"
    if WRITING_ATTR in attrs and "xal_pool" not in attrs:
        return "unfinished"
    return "complete" if "xal_pool" in attrs else "group"


def _parse_extras(path: Location, names: tuple[str, ...]) -> tuple[str, ...]:
    """``extra_arrays`` checked: optional array names, whole groups of them; in the format's order."""
    unknown = sorted(set(names) - set(OPTIONAL_ARRAYS))
    if unknown:
        raise PoolError(f"{path}: unknown optional array(s) {unknown} (expected some of {list(OPTIONAL_ARRAYS)})")
    for kind, group in OPTIONAL_GROUPS.items():
        if set(group) & set(names) and not set(group) <= set(names):
            raise PoolError(f"{path}: the {kind} arrays {list(group)} are written all or none "
                            f"(got {sorted(set(group) & set(names))})")
    return tuple(name for name in OPTIONAL_ARRAYS if name in names)


class PoolWriter:
    """Writes a new pool chunk by chunk: ``with PoolWriter(...) as w: w.append(...)``.

    Appends of any size are buffered to whole chunks; each full chunk is written at once, then
    ``xal_pool_written`` records it as durable (``n_written``), so ``resume=True`` continues an
    interrupted ``<path>.partial`` after its last whole chunk. ``close`` flushes the tail, sets
    ``xal_pool`` (1; 2 for volumes) and renames ``<path>.partial`` to ``<path>``.

    ``depth=D`` writes a volume pool (format version 2): images (n, C, D, H, W), rois (n, D, H, W).

    ``extra_arrays`` names optional per-image arrays (whole groups of ``OPTIONAL_GROUPS``, e.g. the
    DICOM UIDs) that every ``append`` then gives in ``extra``; a pool written without them has none.
    """

    def __init__(self, path: str | Path, *, channels: int, height: int, width: int, depth: int | None = None,
                 dtype: np.dtype | str, classes: list[str], modality: str = "", source: str = "",
                 attrs: Mapping[str, Any] | None = None, overwrite: bool = False,
                 chunk_size: int | None = None, resume: bool = False,
                 storage: StorageConfig = _DEFAULT_STORAGE, extra_arrays: tuple[str, ...] = ()) -> None:
        self.path = parse_location(path)
        self.remote = isinstance(self.path, StoreURL)
        # where the pool is written until close: <path>.partial locally, the URL itself on an object store
        self.partial: Location = self.path if isinstance(self.path, StoreURL) else partial_path(self.path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in IMAGE_DTYPES:
            raise PoolError(f"{self.path}: image dtype {self.dtype} is not supported "
                            "(expected uint8, uint16 or float16)")
        spatial = (height, width) if depth is None else (depth, height, width)
        if min(channels, *spatial) < 1:
            raise PoolError(f"{self.path}: image shape {(channels, *spatial)} must be positive")
        self.version = format_version(len(spatial))
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise PoolError(f"{self.path}: classes must be a non-empty list of names")
        clash = sorted(set(attrs or {}) & set(RESERVED_ATTRS))
        if clash:
            raise PoolError(f"{self.path}: attrs may not set reserved keys {clash}")
        self.shape = (channels, *spatial)
        self.chunk_size = chunk_size or images_per_chunk(channels, *spatial, self.dtype,
                                                         target_bytes=storage.target_chunk_bytes)
        if self.chunk_size < 1:
            raise PoolError(f"{self.path}: chunk_size must be at least 1 (got {self.chunk_size})")
        if isinstance(self.path, StoreURL):
            state = _remote_state(self.path)
            if state in ("complete", "group") and not overwrite:
                raise PoolError(f"{self.path} already exists (pass --overwrite to replace it)")
            if state == "other":
                raise PoolError(f"{self.path} exists and is not a Zarr group: refusing to replace it")
            self._remote_state = state
        else:
            finish_swap(self.path)
            if self.path.exists() and not overwrite:
                raise PoolError(f"{self.path} already exists (pass --overwrite to replace it)")
            if self.path.exists() and not _is_replaceable(self.path):
                raise PoolError(f"{self.path} exists and is not a Zarr group: refusing to replace it")
        self.extras = _parse_extras(self.path, extra_arrays)
        self._specs = {**array_specs(channels, spatial, self.dtype),
                       **{name: spec for name, spec in optional_specs().items() if name in self.extras}}
        meta = finite_or_none({"classes": list(classes), "modality": modality, "source": source,
                               "xal_engine_version": __version__, **(attrs or {})})  # zarr.json: strict JSON
        if resume and self._resumable():
            self._group = self._reopen(meta)
        else:
            self._group = self._create(meta, storage)
        with zarr.config.set({"array.write_empty_chunks": True}):  # a missing chunk = a lost one
            self._arrays = {name: self._group[name] for name in (*PER_IMAGE_ARRAYS, *self.extras)}
        self._n = int(self._group.attrs[WRITING_ATTR])
        self._buffer = {name: np.empty((self.chunk_size, *tail), dtype=object if dt is str else dt)
                        for name, (tail, dt, _) in self._specs.items()}
        self._fill = 0
        self._closed = False

    def _resumable(self) -> bool:
        if isinstance(self.partial, StoreURL):
            return self._remote_state == "unfinished"
        return self.partial.exists()

    def _create(self, meta: dict[str, Any], storage: StorageConfig) -> zarr.Group:
        if isinstance(self.partial, StoreURL):
            if self._remote_state != "missing":  # an old pool (--overwrite) or an unfinished write
                delete_all(self.partial)
            target: Any = zarr_store(self.partial, read_only=False)
        else:
            if self.partial.exists():
                if not _is_replaceable(self.partial):
                    raise PoolError(f"{self.partial} exists and is not a Zarr group: refusing to replace it")
                shutil.rmtree(self.partial)
            target = str(self.partial)
        group = zarr.open_group(target, mode="w-", zarr_format=3,
                                attributes={**meta, WRITING_ATTR: 0})
        for name, (tail, dtype, fill) in self._specs.items():
            dt = np.dtype(dtype)
            cname = storage.image_cname if name in ("images", "rois") else "lz4"
            group.create_array(name, shape=(0, *tail), chunks=(self.chunk_size, *tail), dtype=dtype,
                               fill_value=fill, compressors=compressors(dt, cname, storage.clevel))
        return group

    def _reopen(self, meta: dict[str, Any]) -> zarr.Group:
        """Continue ``<path>.partial`` after its last durable chunk, dropping anything later.

        A crash inside a flush can leave the arrays at different lengths: all are cut back to
        ``xal_pool_written`` first, then the layout must match this writer's.
        """
        group = open_group(self.partial, "r+")
        arrays = {name: group.get(name) for name in PER_IMAGE_ARRAYS}
        if WRITING_ATTR not in group.attrs or not all(isinstance(a, zarr.Array) for a in arrays.values()):
            raise PoolError(f"{self.partial} cannot be resumed: it is not an unfinished pool")
        extras = optional_arrays(group)
        if set(extras) != set(self.extras):
            raise PoolError(f"{self.partial} cannot be resumed: it stores the optional arrays "
                            f"{sorted(extras) or 'none'}, this write {sorted(self.extras) or 'none'}")
        arrays.update(extras)
        if isinstance(self.partial, Path):  # half-written chunk files (an object PUT is whole or absent)
            for stray in self.partial.rglob(f"*{PARTIAL_SUFFIX}"):
                stray.unlink()
        n = int(group.attrs[WRITING_ATTR])
        for array in arrays.values():
            array.resize((n, *array.shape[1:]))
        images = arrays["images"]
        if structure_problems(group) or images.shape[1:] != self.shape \
                or images.dtype != self.dtype or images.chunks[0] != self.chunk_size:
            raise PoolError(f"{self.partial} cannot be resumed: it holds {images.dtype} images "
                            f"{images.shape[1:]} in chunks of {images.chunks[0]}, this write "
                            f"{self.dtype} {self.shape} in chunks of {self.chunk_size}")
        group.attrs.update(meta)
        return group

    @property
    def n_written(self) -> int:
        """Images durably written (whole chunks): a resumed write continues from here."""
        return self._n

    def append(self, images: np.ndarray, rois: np.ndarray, has_roi: np.ndarray, labels: np.ndarray,
               ids: np.ndarray | list[str], split: np.ndarray,
               extra: Mapping[str, np.ndarray] | None = None) -> None:
        """Add images (n, C, H, W) with their rois (n, H, W) (volumes: (n, C, D, H, W), (n, D, H, W)), has_roi, labels, ids and split (n,), and
        the optional arrays named by ``extra_arrays`` in ``extra`` (exactly those)."""
        if self._closed:
            raise PoolError(f"{self.path}: the writer is closed")
        extra = dict(extra or {})
        if set(extra) != set(self.extras):
            raise PoolError(f"{self.path}: appended optional arrays {sorted(extra) or 'none'}, expected "
                            f"{sorted(self.extras) or 'none'} (the writer's extra_arrays)")
        data = self._parse(images, rois, has_roi, labels, ids, split, extra)
        count, done = len(data["images"]), 0
        while done < count:
            take = min(count - done, self.chunk_size - self._fill)
            for name, buffer in self._buffer.items():
                buffer[self._fill:self._fill + take] = data[name][done:done + take]
            self._fill += take
            done += take
            if self._fill == self.chunk_size:
                self._flush()

    def _parse(self, images: np.ndarray, rois: np.ndarray, has_roi: np.ndarray, labels: np.ndarray,
               ids: np.ndarray | list[str], split: np.ndarray,
               extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = {"images": np.asarray(images), "rois": np.asarray(rois), "has_roi": np.asarray(has_roi),
                "labels": np.asarray(labels), "ids": np.asarray(ids), "split": np.asarray(split),
                **{name: np.asarray(value) for name, value in extra.items()}}
        n = len(data["images"])
        for name, (tail, dtype, _) in self._specs.items():
            array = data[name]
            if array.shape != (n, *tail):
                raise PoolError(f"{self.path}: appended '{name}' has shape {array.shape}, "
                                f"expected {(n, *tail)}")
            if dtype is str:
                if array.dtype.kind not in "TUO":
                    raise PoolError(f"{self.path}: appended '{name}' must be strings (got {array.dtype})")
            elif name in ("labels", "split", "source_shape", "crop_box"):
                if array.dtype.kind not in "iu":
                    raise PoolError(f"{self.path}: appended '{name}' must be integers (got {array.dtype})")
            elif array.dtype != dtype:
                raise PoolError(f"{self.path}: appended '{name}' has dtype {array.dtype}, "
                                f"expected {np.dtype(dtype)}")
        data["labels"] = data["labels"].astype(np.int16)
        data["split"] = data["split"].astype(np.uint8)
        for name in ("source_shape", "crop_box"):
            if name in data:
                data[name] = data[name].astype(np.int32)
        return data

    def _flush(self) -> None:
        """Write the buffered images as one chunk-aligned block, then mark them durable."""
        if self._fill == 0:
            return
        start, stop = self._n, self._n + self._fill
        for name, array in self._arrays.items():
            array.resize((stop, *array.shape[1:]))
            block = self._buffer[name][:self._fill]
            array[start:stop] = as_str(block) if block.dtype == object else block
        self._group.attrs[WRITING_ATTR] = stop
        self._n, self._fill = stop, 0

    def close(self) -> Pool:
        """Flush, mark the pool complete and move ``<path>.partial`` to ``<path>``."""
        if self._closed:
            return Pool.open(self.path)
        self._flush()
        attrs = dict(self._group.attrs)
        del attrs[WRITING_ATTR]
        self._group.attrs.put({**attrs, "xal_pool": self.version})  # one metadata write
        self._closed = True
        if isinstance(self.path, StoreURL):  # that write published it: nothing to rename
            return Pool.open(self.path)
        if self.path.exists():  # overwrite: swap in the new pool, then delete the old one
            old = self.path.with_name(f"{self.path.name}.replaced-{uuid.uuid4().hex[:8]}")
            self.path.rename(old)
            self.partial.rename(self.path)
            shutil.rmtree(old)
        else:
            self.partial.rename(self.path)
        return Pool.open(self.path)

    def __enter__(self) -> PoolWriter:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:  # leave <path>.partial (resumable); Pool.open refuses it
            self._closed = True
