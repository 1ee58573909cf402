"""The stored results of a scoring run: ``scores/<run>/`` inside a pool (pool format v1).

Layout (N = pool size, K = classes, U = number of work units): one array per result field of
:mod:`xal_engine.core.fields`, plus the done flags:

    probs            (N, K) float16
    pred             (N,)   int16
    entropy, margin, least_confidence, dice, soft_dice, energy   (N,) float32 (ROI metrics NaN without ROI)
    hit              (N,)   bool
    cam              (N, h, w) float16, only in runs scored with --save-cams (h, w: the target layer's
                     feature map, fixed at creation)
    embedding        (N, D) float16, only in runs scored with --embeddings (D: the head's input size)
    bald, mc_entropy, variation_ratio   (N,) float32, only in runs scored with --mc-samples T
    done             (U,)   bool, one chunk per flag

A work unit is a whole number of the pool's chunks, sized for the writer (:func:`unit_size_for`: at
least 4096 images by default, ``score --unit-size``), and every result array is chunked by unit, so
writing a unit is one chunk-aligned assignment per array (all arrays concurrently) and a 1M-image
run has ~245 units, not 62.5k. A unit's `done` flag is set only after all its arrays are written; a
crash before that leaves it pending and a rerun recomputes it, so a run is idempotent. Each flag is its own chunk: shards that
write different units never touch the same chunk (Zarr has no locks). A run keeps the unit size it
was created with (``unit_size`` attribute): runs made when a unit was one pool chunk open and resume
as they are.

Every array is blosc + CRC32C like the pool's (runs written before have zstd only and still read), and
every chunk of a done unit is stored, fill values included: a missing chunk of a done unit is a lost
one, never a fill value. A missing `done` flag reads as not done (the unit is scored again).

A run's attributes (its fingerprint among them) are written with its group, before any array, and
`done` is created last: a run without both is a creation that was killed and is created again.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata

from xal_engine.core.fields import BY_NAME, FIELDS, REQUIRED_NAMES, Field, Layout, PerImage
from xal_engine.errors import PoolError, XalError
from xal_engine.store.files import jsonable
from xal_engine.store.format import (
    PARTIAL_SUFFIX,
    compressors,
    missing_chunk_error,
    missing_chunks,
    stored_keys,
    write_arrays,
)
from xal_engine.store.location import local_root
from xal_engine.store.locks import score_create_lock_path, waiting_lock

DONE = "done"
DEFAULT_UNIT_IMAGES = 4096  # images per work unit of a new run: the writer's cost is per unit (~10 ms)
GENERATION_KEY = "pool_generation"  # in a fingerprint: the pool generation scored (absent: 0)

# A unit's results on the host: every registry field, rows in pool order, in its stored dtype.
UnitResult = PerImage[np.ndarray]


def check_run_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise XalError(f"--run must be letters, digits, '-', '_' or '.', got {name!r}")
    return name


def unit_size_for(chunk_size: int, n: int, requested: int | None = None) -> int:
    """Images per work unit of a new run over a pool of ``n`` images in chunks of ``chunk_size``: the
    smallest whole number of chunks holding ``requested`` images (default :data:`DEFAULT_UNIT_IMAGES`),
    at most the whole pool (rounded up to a chunk)."""
    wanted = DEFAULT_UNIT_IMAGES if requested is None else requested
    if wanted < 1:
        raise XalError(f"--unit-size must be at least 1 image, got {wanted}")
    chunks = max(1, -(-wanted // chunk_size))
    return chunk_size * min(chunks, max(1, -(-n // chunk_size)))


class ScoreRun:
    """One run's arrays in an open pool group (mode "r+" to write)."""

    def __init__(self, group: zarr.Group, name: str, n: int, unit_size: int,
                 created: dict[str, zarr.Array] | None = None) -> None:
        """``created``: every array of a run this process has just created (name -> handle), which
        makes the run :attr:`created` and spares reading back what was just written."""
        self.group = group
        self.name = name
        self.n = n
        self.unit_size = unit_size
        self.n_units = math.ceil(n / unit_size)
        # the registry fields this run stores: every required one, and the optional ones it was made with
        present = set(group.array_keys() if created is None else created)
        self.fields: tuple[Field, ...] = tuple(f for f in FIELDS if not f.optional or f.name in present)
        self.field_names: tuple[str, ...] = tuple(f.name for f in self.fields)
        # Runs written before checksums skipped chunks equal to the fill value (a unit without ROIs
        # has no dice chunk): there only the fields that never equal their fill must be stored.
        done = None if DONE not in present else group[DONE] if created is None else created[DONE]
        self.checked = done is not None and any(isinstance(c, Crc32cCodec) for c in done.compressors)
        self.always_stored = tuple(f.name for f in self.fields if self.checked or not f.needs_roi)
        # True when this object created the run: no unit is done and no chunk file exists, so a
        # plan needs neither a cleaning pass nor a read of the done flags.
        self.created = created is not None
        self._writable: dict[str, zarr.Array] | None = None  # handles opened once, by write_unit
        if created is not None:
            self._writable = self._writable_handles(created)
        # units this object marked done (a lower bound of the stored flags: other shards write theirs)
        self._written = np.zeros(self.n_units, dtype=bool)

    def has(self, name: str) -> bool:
        """Whether the run stores field ``name`` (an optional field such as ``cam`` may be absent)."""
        return any(f.name == name for f in self.fields)

    # ---------------------------------------------------------------- creation and opening
    @classmethod
    def create_or_resume(
        cls,
        pool_group: zarr.Group,
        name: str,
        *,
        n: int,
        n_classes: int,
        unit_size: int,
        fingerprint: dict[str, Any],
        attrs: dict[str, Any],
        overwrite: bool = False,
        cam_shape: tuple[int, ...] | None = None,
        embedding_dim: int | None = None,
        mc: bool = False,
    ) -> ScoreRun:
        """Open run `name` for writing; create it when new, with a `cam` array of (h, w) maps per image
        when `cam_shape` is given, an `embedding` array of (D,) features when `embedding_dim` is, and
        the MC-dropout arrays (`bald`, `mc_entropy`, `variation_ratio`) with `mc`.

        An existing run with another fingerprint (model, target layer, threshold, precision, …) is
        refused unless `overwrite`, which deletes it first; one scored at another pool generation
        (labels imported or undone since) is refused as stale. A run whose creation was interrupted
        (no fingerprint or no `done`) is created again. On a local store the creation holds
        ``<pool>.score-create.lock``, so shards started together create the run once and the others
        open it; an object store has no lock (start one shard first there, or use ``--backend ray``,
        whose driver creates the run before any actor starts).
        """
        check_run_name(name)
        root = _local_path(pool_group)
        with waiting_lock(score_create_lock_path(root)) if root is not None else nullcontext():
            existing = pool_group.require_group("scores").get(name)
            if root is not None:  # a creator killed while writing scores/zarr.json left its temporary
                for stray in (root / "scores").glob(f"zarr.*{PARTIAL_SUFFIX}"):  # only creators write it
                    stray.unlink(missing_ok=True)
            if isinstance(existing, zarr.Group) and not overwrite and _created(existing):
                _check_fingerprint(name, existing.attrs.get("fingerprint"), jsonable(fingerprint))
                return cls(existing, name, n, _stored_unit_size(existing))  # its own layout, old or new
            layout = Layout(n_classes=n_classes, cam_shape=cam_shape, embedding_dim=embedding_dim, mc=mc)
            return cls._create(pool_group, name, n=n, unit_size=unit_size,
                               attrs={**jsonable(attrs), "fingerprint": jsonable(fingerprint),
                                      "unit_size": unit_size}, layout=layout)

    @classmethod
    def _create(cls, pool_group: zarr.Group, name: str, *, n: int, unit_size: int,
                attrs: dict[str, Any], layout: Layout) -> ScoreRun:
        """A new run replacing whatever ``scores/<name>`` holds; its attributes (the fingerprint among
        them) are written with the group, `done` last."""
        scores = pool_group["scores"]
        folder = _local_path(scores)
        if folder is not None:
            shutil.rmtree(folder / name, ignore_errors=True)  # also a folder a killed creation left
        elif name in scores:
            del scores[name]
        group = scores.create_group(name, attributes=attrs)
        # the field arrays in one concurrent creation (a third of the time of one create_array each)
        arrays = dict(group.create_hierarchy(_field_metadata(layout, n, unit_size), overwrite=True))
        arrays[DONE] = group.create_array(
            DONE, shape=(math.ceil(n / unit_size),), chunks=(1,), dtype="bool", fill_value=False,
            compressors=compressors(np.dtype(bool), "lz4", 5), overwrite=True)
        return cls(group, name, n, unit_size, created=arrays)

    @classmethod
    def open(cls, pool_group: zarr.Group, name: str) -> ScoreRun:
        """An existing run, for reading (select, report)."""
        check_run_name(name)
        if "scores" not in pool_group or name not in pool_group["scores"]:
            runs = sorted(pool_group["scores"].group_keys()) if "scores" in pool_group else []
            known = f"; runs in this pool: {', '.join(runs)}" if runs else "; this pool has no score runs"
            raise XalError(f"no score run {name!r} in the pool{known}")
        group = pool_group["scores"][name]
        return cls(group, name, group["pred"].shape[0], _stored_unit_size(group))

    # ---------------------------------------------------------------- units
    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_size
        return start, min(start + self.unit_size, self.n)

    def done_mask(self) -> np.ndarray:
        """(U,) bool done flags; :class:`PoolError` when `done` is missing or cannot be decoded."""
        if DONE not in self.group.array_keys():
            raise PoolError(f"{self.where}: array '{DONE}' is missing, expected the (U,) done flags; "
                            "run `xal-engine pool validate`")
        return self._decode(DONE, lambda a: np.asarray(a[:], dtype=bool), set(), [])

    def shard_units(self, shard_id: int = 0, num_shards: int = 1) -> range:
        """The units shard ``shard_id`` of ``num_shards`` owns: contiguous, disjoint, covering the run."""
        return range(self.n_units * shard_id // num_shards, self.n_units * (shard_id + 1) // num_shards)

    def pending_units(self, shard_id: int = 0, num_shards: int = 1) -> list[int]:
        """Units of this shard not marked done."""
        done = self.done_mask()
        return [u for u in self.shard_units(shard_id, num_shards) if not done[u]]

    def write_unit(self, unit: int, result: UnitResult) -> None:
        """Write one unit's rows (one chunk per array, all arrays concurrently), then mark it done."""
        start, stop = self.unit_range(unit)
        if result.pred.shape[0] != stop - start:
            raise ValueError(f"unit {unit} has {stop - start} images, result has {result.pred.shape[0]}")
        if self._writable is None:  # one metadata read per array and run, not per unit
            self._writable = self._writable_handles({name: self.group[name]
                                                     for name in (*self.field_names, DONE)})
        fields = {name: self._writable[name] for name in self.field_names}
        rows = {f.name: np.asarray(result[f.name], dtype=f.dtype) for f in self.fields}
        for name, values in rows.items():  # Zarr would store a wider row cut to size, silently
            if values.shape != (want := (stop - start, *fields[name].shape[1:])):
                raise ValueError(f"unit {unit}: field '{name}' has shape {values.shape}, expected {want}")
        write_arrays(fields, start, rows)
        self._writable[DONE][unit] = True  # only once every array of the unit is stored
        self._written[unit] = True

    def _writable_handles(self, arrays: dict[str, zarr.Array]) -> dict[str, zarr.Array]:
        """The handles write_unit writes through: every field chunk stored, fill values included."""
        fields = {name: arrays[name].with_config({"write_empty_chunks": True}) for name in self.field_names}
        return {**fields, DONE: arrays[DONE]}

    def is_complete(self) -> bool:
        """Whether every unit is done; without reading the flags when this object wrote all of them."""
        return bool(self._written.all()) or bool(self.done_mask().all())

    def read(self, fields: tuple[str, ...] = REQUIRED_NAMES) -> dict[str, np.ndarray]:
        """Fields ``fields`` of every image; :class:`PoolError` when a chunk of a done unit or of
        `done` is missing or fails its checksum (units not done read as fill values)."""
        keys = stored_keys(self.group)
        done_units = np.flatnonzero(self.done_mask()).tolist()
        return {f: self._decode(f, lambda a: a[:], keys, done_units) for f in fields}

    def take(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` ((n,) positions) of field ``name``, decoding only the chunks that hold them."""
        if not self.has(name):
            raise XalError(f"score run {self.name!r} stores no {name!r} ({BY_NAME[name].doc})")
        index = np.asarray(index, dtype=np.int64)
        keys = stored_keys(self.group)
        done = self.done_mask()
        units = [u for u in np.unique(index // self.unit_size).tolist() if done[u]]
        return self._decode(name, lambda a: a.oindex[index], keys, units)

    @property
    def where(self) -> str:
        root = _local_path(self.group)
        return f"score run {root if root is not None else self.name}"

    def _decode(self, name: str, read: Any, keys: set[str], units: list[int]) -> np.ndarray:
        array = self.group[name]
        lost = missing_chunks(array, keys, units) if units and name in self.always_stored else []
        if lost:
            raise missing_chunk_error(self.where, name, lost[0], self.unit_size, self.n)
        try:
            return np.asarray(read(array))
        except Exception as err:  # checksum or blosc failure: a damaged chunk
            raise PoolError(f"{self.where}: array '{name}' cannot be decoded ({type(err).__name__}: "
                            f"{err}); run `xal-engine pool validate`") from err

    def clean_partial_files(self, units: Iterable[int] | None = None) -> int:
        """Remove the half-written chunk files (``<array>/c/<unit>….partial``) a killed writer left in
        ``units`` (default: every unit), local stores only; returns the count. Only the shard that owns
        a unit writes its chunks, so a shard cleaning its own units never touches a live shard's file."""
        root = _local_path(self.group)
        if root is None:
            return 0
        wanted = set(range(self.n_units) if units is None else units)
        removed = 0
        for name in self.group.array_keys():
            for path in (root / name / "c").rglob(f"*{PARTIAL_SUFFIX}"):
                first = path.relative_to(root / name / "c").parts[0].split(".", 1)[0]
                if first.isdigit() and int(first) in wanted:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _field_metadata(layout: Layout, n: int, unit_size: int) -> dict[str, ArrayV3Metadata]:
    """Each field array's metadata, (N,), (N, K), (N, h, w) or (N, D) chunked by work unit, for
    ``create_hierarchy``: its zarr.json document (Zarr v3 spec) parsed by Zarr, equal to what
    ``create_array`` makes (tested) in a tenth of the time (drawing each up in a store took 5 ms a run)."""
    metadata = {}
    for field in layout.fields:
        tail, dtype = layout.tail(field), np.dtype(field.dtype)
        blosc, checksum = (codec.to_dict() for codec in compressors(dtype, "lz4", 5))
        blosc["configuration"]["typesize"] = dtype.itemsize  # as Zarr sets it from the dtype
        serializer = {"name": "bytes"}  # with an endianness only where there are bytes to order
        if dtype.itemsize > 1:
            serializer["configuration"] = {"endian": "little"}
        metadata[field.name] = ArrayV3Metadata.from_dict({
            "zarr_format": 3, "node_type": "array", "shape": (n, *tail), "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": (unit_size, *tail)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": field.fill, "codecs": (serializer, blosc, checksum), "attributes": {},
        })
    return metadata


def _created(group: zarr.Group) -> bool:
    """Whether the run's creation finished: the fingerprint is written with the group, `done` last."""
    return "fingerprint" in group.attrs and isinstance(group.get(DONE), zarr.Array)


def _stored_unit_size(group: zarr.Group) -> int:
    """A run's images per unit: its ``unit_size`` attribute, else its arrays' chunk length."""
    return int(group.attrs.get("unit_size", group["pred"].chunks[0]))


def _check_fingerprint(name: str, old: Any, new: dict[str, Any]) -> None:
    """:class:`XalError` unless fingerprint ``old`` (stored) is ``new``; a missing generation is 0."""
    if isinstance(old, dict):
        then, now = old.get(GENERATION_KEY, 0), new.get(GENERATION_KEY, 0)
        if then != now:
            raise XalError(f"pool changed since run {name!r} was scored (generation {then} -> {now}); "
                           "rescore with --overwrite or another --run")
        old = {k: v for k, v in old.items() if k != GENERATION_KEY}
        new = {k: v for k, v in new.items() if k != GENERATION_KEY}
    if old != new:
        raise XalError(f"run {name!r} exists in this pool with a different {_describe_difference(old, new)}; "
                       "choose another --run or pass --overwrite")


def _local_path(group: zarr.Group) -> Path | None:
    """The run's folder on a local store; None on an object store (no locks, no .partial files there)."""
    return local_root(group)


def _describe_difference(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "configuration"
    new = jsonable(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "configuration (" + ", ".join(keys) + ")" if keys else "configuration"
