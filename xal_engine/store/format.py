"""The pool format: a Zarr v3 group of per-image arrays, chunked along N only.

Version 1 holds 2-D images, version 2 volumes; nothing else differs (``xal_pool`` names the version,
and the images' rank must agree with it):

    images   (N, C, H, W)     uint8 | uint16 | float16   v1: model-ready pixels
             (N, C, D, H, W)                             v2: model-ready voxels
    rois     (N, H, W)        bool                       expert ROI at image resolution
             (N, D, H, W)                                v2: at volume resolution
    has_roi  (N,)          bool                        False where no ROI exists
    labels   (N,)          int16, fill -1              class index, -1 = unknown
    ids      (N,)          str                         stable external id
    split    (N,)          uint8                       0 train pool, 1 validation, 2 test

Optional per-image arrays, all or none of a group (absent in pools whose source gives none of them;
pools without them open and read unchanged):

    sop_instance_uid     (N,)    str     DICOM sources (vindr, siim): the image's SOP Instance UID,
    series_instance_uid  (N,)    str     its Series and Study Instance UIDs (matching DICOM SEG
    study_instance_uid   (N,)    str     objects to pool rows, and exported SEGs to their sources)
    source_shape         (N, 2)  int32   the source image's Rows, Columns (pool image = the whole
                                         source resized to H x W, no crop or padding)

    crop_box             (N, 2, 3) int32    volume sources (``ingest brats --volumes``): the source
    source_spacing       (N, 3)    float32  box each volume was cut from, [start, size] in source voxel
                                            axes (i, j, k) (start may be < 0 and start + size past the
                                            source: zero padding), and the source voxel spacing in mm

Every per-image array uses the same chunk length, so one chunk-aligned range [a, b) decodes exactly
one chunk of each. Volumes are chunked like images, whole: as many volumes per chunk as fit the target
(4 MiB: 128 volumes of 1x32³ uint8, 4 of 3x64³, 1 of 3x96³), and one volume per chunk when a volume alone is larger
(3x128³ uint8 = 6 MiB, float16 = 12 MiB). Sub-volume chunks were not chosen because every reader
(train, score, report) needs whole volumes: they would multiply the requests per volume (a cost on
object stores) without reducing the bytes read. Each chunk is blosc (bit-shuffled) + CRC32C: a corrupted chunk raises on read.
Other subgroups (``scores/<run>/``, ``al/<experiment>/``) are added later by other commands.

This module owns the layout itself: names, dtypes, fill values, attribute names, chunk sizing and
codecs, how a group is opened, read by range or rewritten by row, and how its structure is checked.
Reading is :mod:`.pool`, writing :mod:`.writer`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from xal_engine.errors import PoolError
from xal_engine.store.location import StoreURL, parse_location, probe, zarr_store

FORMAT_VERSION = 1          # 2-D images
VOLUME_FORMAT_VERSION = 2   # volumes
FORMAT_VERSIONS = (FORMAT_VERSION, VOLUME_FORMAT_VERSION)
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float16))
PER_IMAGE_ARRAYS = ("images", "rois", "has_roi", "labels", "ids", "split")
# The (N,) per-image arrays: small enough to read whole (images and rois are read by range).
COLUMNS = ("has_roi", "labels", "ids", "split")
# Optional per-image arrays (see the module doc), by group: a pool stores a whole group or none of it.
DICOM_ARRAYS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "source_shape")
GEOMETRY_ARRAYS = ("crop_box", "source_spacing")
OPTIONAL_GROUPS = {"dicom": DICOM_ARRAYS, "volume geometry": GEOMETRY_ARRAYS}
OPTIONAL_ARRAYS = DICOM_ARRAYS + GEOMETRY_ARRAYS
OPTIONAL_COLUMNS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")  # (N,) str
PARTIAL_SUFFIX = ".partial"
# Present only while a writer owns the group: how many images are durably written.
WRITING_ATTR = "xal_pool_written"
RESERVED_ATTRS = ("xal_pool", WRITING_ATTR, "classes", "modality", "source", "xal_engine_version")
SCORES_GROUP, AL_GROUP = "scores", "al"
LABELS_HISTORY = "labels_history"  # label imports' records and the values each replaced (al_state)
LABELLED_ROUND = "labelled_round"  # al/<experiment>/labelled_round (N,) int16: the round labelled, -1 = not


@dataclass(frozen=True)
class StorageConfig:
    """How a pool is laid out on disk."""

    target_chunk_bytes: int = 4 << 20  # images per chunk: largest power of two under this (1-8 MiB)
    image_cname: str = "lz4"           # blosc codec for images/rois: lz4 writes ~4x faster than zstd
    clevel: int = 5


# what Zarr raises for a zarr.json that does not parse or describes no valid node
METADATA_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError)


def partial_path(path: str | Path) -> Path:
    """Where a writer puts the local pool at ``path`` until it is complete (object stores: no such
    place; the writer publishes the pool's completion in its zarr.json instead)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def format_version(spatial_dims: int) -> int:
    """The format version of a pool of ``spatial_dims``-D images (2: images, 3: volumes)."""
    if spatial_dims not in (2, 3):
        raise PoolError(f"pools hold 2-D images or 3-D volumes, not {spatial_dims}-D data")
    return FORMAT_VERSION if spatial_dims == 2 else VOLUME_FORMAT_VERSION


def images_per_chunk(channels: int, *spatial_and_dtype: Any,
                     target_bytes: int = StorageConfig.target_chunk_bytes) -> int:
    """Largest power of two of images (or volumes) whose raw chunk fits ``target_bytes`` (at least 1):
    ``images_per_chunk(C, H, W, dtype)`` or ``images_per_chunk(C, D, H, W, dtype)``.

    A 4 MiB target gives chunks in (2, 4] MiB: 64 images at 1x256², 1024 at 1x64², 128 volumes at 1x32³.
    """
    *spatial, dtype = spatial_and_dtype
    per_image = channels * math.prod(spatial) * np.dtype(dtype).itemsize
    count = max(1, target_bytes // per_image)
    return 1 << (count.bit_length() - 1)


def compressors(dtype: np.dtype, cname: str, clevel: int) -> tuple[Any, ...]:
    """blosc + CRC32C; bit-shuffle for numbers (8-bit images do not compress without it)."""
    if dtype.kind in "biuf":
        blosc = BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle")
    else:  # variable-length strings: a byte stream, nothing to shuffle
        blosc = BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")
    return (blosc, Crc32cCodec())


def array_specs(channels: int, spatial: tuple[int, ...],
                dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], Any, Any]]:
    """name -> (shape after N, dtype, fill value) of every per-image array; ``spatial`` (H, W) or (D, H, W)."""
    return {
        "images": ((channels, *spatial), dtype, 0),
        "rois": (tuple(spatial), np.dtype(bool), False),
        "has_roi": ((), np.dtype(bool), False),
        "labels": ((), np.dtype(np.int16), -1),
        "ids": ((), str, ""),
        "split": ((), np.dtype(np.uint8), SPLIT_TRAIN),
    }


def optional_specs() -> dict[str, tuple[tuple[int, ...], Any, Any]]:
    """name -> (shape after N, dtype, fill value) of every optional per-image array."""
    return {
        "sop_instance_uid": ((), str, ""),
        "series_instance_uid": ((), str, ""),
        "study_instance_uid": ((), str, ""),
        "source_shape": ((2,), np.dtype(np.int32), 0),
        "crop_box": ((2, 3), np.dtype(np.int32), 0),
        "source_spacing": ((3,), np.dtype(np.float32), 0.0),
    }


def optional_arrays(group: zarr.Group, members: Mapping[str, zarr.Array] | None = None) -> dict[str, zarr.Array]:
    """The optional per-image arrays ``group`` stores (name -> array; {} in a pool without them);
    ``members``: its arrays as :func:`group_arrays` read them, when the caller has them."""
    if members is not None:
        return {name: members[name] for name in OPTIONAL_ARRAYS if name in members}
    present = set(group.array_keys())
    return {name: group[name] for name in OPTIONAL_ARRAYS if name in present}


def group_arrays(group: zarr.Group) -> dict[str, zarr.Array] | None:
    """Every array directly in ``group`` (name -> array), their metadata read concurrently in one
    pass (a pool's open fetched it array by array, 16 round trips); None when some child's
    metadata does not parse: the one-by-one checks then name which."""
    try:
        return {name: node for name, node in group.members() if isinstance(node, zarr.Array)}
    except METADATA_ERRORS:
        return None


def as_str(values: np.ndarray) -> np.ndarray:
    """Zarr's variable-length strings (numpy StringDType) as a fixed-width ``<U`` array."""
    values = np.asarray(values)
    if values.dtype.kind == "T":
        width = int(np.strings.str_len(values).max(initial=1))
        return values.astype(f"<U{max(width, 1)}")
    return values.astype(np.str_)


def read_arrays(arrays: Mapping[str, zarr.Array], start: int,
                stop: int) -> dict[str, np.ndarray | Exception]:
    """Images [start, stop) of every array, decoded concurrently (~1.3x faster than one by one);
    an array whose chunk cannot be decoded (checksum, blosc) gives its exception instead."""

    async def gather() -> list[np.ndarray | BaseException]:
        reads = (array.async_array.getitem(slice(start, stop)) for array in arrays.values())
        return await asyncio.gather(*reads, return_exceptions=True)

    values = sync(gather())
    for value in values:
        if isinstance(value, BaseException) and not isinstance(value, Exception):
            raise value  # KeyboardInterrupt and the like
    return dict(zip(arrays, values, strict=True))  # type: ignore[arg-type]


def write_arrays(arrays: Mapping[str, zarr.Array], start: int, values: Mapping[str, np.ndarray]) -> None:
    """Rows [start, start + len) of every array from ``values`` (name -> rows), encoded and stored
    concurrently (a score run's 4096-image unit of nine arrays: 7 ms instead of 12 one by one); the
    first failure is raised once every write has ended."""

    async def gather() -> list[None | BaseException]:
        writes = (array.async_array.setitem(slice(start, start + len(values[name])), values[name])
                  for name, array in arrays.items())
        return await asyncio.gather(*writes, return_exceptions=True)

    for outcome in sync(gather()):
        if isinstance(outcome, BaseException):
            raise outcome


def chunk_key(array: zarr.Array, chunk: int) -> str:
    """Store key of chunk ``chunk`` along N of ``array`` (chunked along N only)."""
    return f"{array.path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def stored_keys(group: zarr.Group | zarr.Array) -> set[str]:
    """Every store key under ``group`` (one listing: a chunk lookup per read would be one per key)."""
    prefix = f"{group.path}/" if group.path else ""

    async def listing() -> set[str]:
        return {key async for key in group.store.list_prefix(prefix)}

    return sync(listing())


def missing_chunks(array: zarr.Array, keys: set[str] | None = None,
                   chunks: range | list[int] | None = None) -> list[int]:
    """Chunks along N of ``array`` (all of them, or ``chunks``) with no stored key, ascending; ``keys``
    from :func:`stored_keys` of a group holding ``array`` (listed here when None)."""
    keys = stored_keys(array) if keys is None else keys
    chunks = range(-(-array.shape[0] // array.chunks[0])) if chunks is None else chunks
    return [c for c in chunks if chunk_key(array, c) not in keys]


def missing_chunk_error(where: str, name: str, chunk: int, chunk_size: int, n: int,
                        what: str = "images") -> PoolError:
    """The error of reading a chunk that is not stored (it would read as fill values)."""
    first, last = chunk * chunk_size, min((chunk + 1) * chunk_size, n) - 1
    return PoolError(f"{where}: array '{name}' chunk {chunk} ({what} {first}..{last}) is missing, expected "
                     "it stored; run `xal-engine pool validate`")


def write_rows(array: zarr.Array, index: np.ndarray, values: np.ndarray) -> int:
    """``array[index] = values`` (``index``: (n,) sorted unique positions along N) rewriting only the
    chunks that hold ``index`` (each read, updated and written whole); chunks are kept even when they
    equal the fill value (a missing chunk reads as a lost one). Returns their count."""
    if not len(index):
        return 0
    array.with_config({"write_empty_chunks": True}).oindex[index] = values
    return len(np.unique(index // array.chunks[0]))


def open_group(path: str | Path | StoreURL, mode: str) -> zarr.Group:
    """The Zarr v3 group at ``path`` (a local path or an object-store URL, see :mod:`.location`);
    :class:`PoolError` when it is missing or unreadable."""
    loc = parse_location(path)
    if isinstance(loc, StoreURL):
        return _open_remote_group(loc, mode)
    path = loc
    if not path.exists():
        hint = partial_path(path)
        if hint.exists():
            raise PoolError(f"{path} does not exist; {hint} is an unfinished pool whose writing was "
                            "interrupted: create or ingest it again")
        raise PoolError(f"{path} does not exist")
    if not (path / "zarr.json").is_file():
        raise PoolError(f"{path} is not a pool: no zarr.json (expected a Zarr v3 group)")
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as err:  # any failure to parse the metadata: not a readable group
        raise PoolError(f"{path} is not a pool: cannot open it as a Zarr v3 group "
                        f"({type(err).__name__}: {err})") from err


def _open_remote_group(url: StoreURL, mode: str) -> zarr.Group:
    """The group at an object-store URL: probed first, so that an unknown bucket, refused credentials
    or an unreachable endpoint is one line (bounded retries, see :mod:`.location`)."""
    state = probe(url)
    if state == "missing":
        raise PoolError(f"{url} does not exist")
    if state == "other":
        raise PoolError(f"{url} is not a pool: no zarr.json (expected a Zarr v3 group)")
    try:
        return zarr.open_group(zarr_store(url, read_only=mode == "r"), mode=mode, zarr_format=3,
                               use_consolidated=False)
    except PoolError:
        raise
    except Exception as err:
        raise PoolError(f"{url} is not a pool: cannot open it as a Zarr v3 group "
                        f"({type(err).__name__}: {err})") from err


def structure_problems(group: zarr.Group, members: Mapping[str, zarr.Array] | None = None) -> list[str]:
    """Missing arrays, wrong dtypes, inconsistent N/C/D/H/W or chunk lengths ([] when consistent);
    ``members``: the group's arrays as :func:`group_arrays` read them, when the caller has them."""
    arrays: dict[str, zarr.Array] = {}
    problems = []
    for name in PER_IMAGE_ARRAYS:
        try:
            node = members.get(name) if members is not None else group.get(name)
        except METADATA_ERRORS as err:
            # its zarr.json does not parse, or describes no valid array
            problems.append(f"array '{name}' has unreadable metadata ({name}/zarr.json: "
                            f"{type(err).__name__}: {err})")
            continue
        if not isinstance(node, zarr.Array):
            problems.append(f"missing array '{name}'")
        else:
            arrays[name] = node
    if "images" not in arrays:
        return problems
    images = arrays["images"]
    if images.ndim not in (4, 5):
        return problems + [f"array 'images' has shape {images.shape}, expected (N, C, H, W) or (N, C, D, H, W)"]
    n, channels, *spatial = images.shape
    expected = array_specs(channels, tuple(spatial), images.dtype)
    if images.dtype not in IMAGE_DTYPES:
        problems.append(f"array 'images' has dtype {images.dtype}, expected uint8, uint16 or float16")
    for name, array in arrays.items():
        tail, dtype, _ = expected[name]
        if array.shape != (n, *tail):
            problems.append(f"array '{name}' has shape {array.shape}, expected {(n, *tail)} "
                            f"to match 'images' {images.shape}")
            if array.ndim == 0:
                continue
        if name == "ids":
            if array.dtype.kind not in "TUO":
                problems.append(f"array 'ids' has dtype {array.dtype}, expected str")
        elif name != "images" and array.dtype != dtype:
            problems.append(f"array '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if array.ndim == len(tail) + 1 and array.chunks[1:] != array.shape[1:]:
            problems.append(f"array '{name}' is chunked {array.chunks}: pools chunk along N only")
        if array.chunks[0] != images.chunks[0]:
            problems.append(f"array '{name}' has {array.chunks[0]} images per chunk, 'images' "
                            f"{images.chunks[0]}: every per-image array must use the same chunk length")
    return problems + _optional_problems(group, n, images.chunks[0], members)


def _optional_problems(group: zarr.Group, n: int, chunk: int,
                       members: Mapping[str, zarr.Array] | None) -> list[str]:
    """The optional per-image arrays present: whole groups, shape (n, ...), dtype, chunked like 'images'."""
    try:
        present = optional_arrays(group, members)
    except METADATA_ERRORS as err:
        return [f"an optional per-image array has unreadable metadata ({type(err).__name__}: {err})"]
    problems = []
    for kind, names in OPTIONAL_GROUPS.items():
        got = [name for name in names if name in present]
        if got and len(got) != len(names):
            missing = ", ".join(repr(name) for name in names if name not in present)
            problems.append(f"missing array(s) {missing}: the {kind} arrays are stored all or none "
                            f"(found {', '.join(map(repr, got))})")
    specs = optional_specs()
    for name, array in present.items():
        tail, dtype, _ = specs[name]
        if array.shape != (n, *tail):
            problems.append(f"array '{name}' has shape {array.shape}, expected {(n, *tail)} to match 'images'")
        if dtype is str:
            if array.dtype.kind not in "TUO":
                problems.append(f"array '{name}' has dtype {array.dtype}, expected str")
        elif array.dtype != dtype:
            problems.append(f"array '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if array.ndim and array.chunks[0] != chunk:
            problems.append(f"array '{name}' has {array.chunks[0]} images per chunk, 'images' {chunk}: "
                            "every per-image array must use the same chunk length")
    return problems
