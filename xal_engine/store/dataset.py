"""Feeding pool images to a model: loader datasets over pool ranges (training blocks, scoring units)
and re-batching.

One loader item is one chunk-aligned block of the pool restricted to a sorted index subset (a split,
or the images an AL experiment labelled); blocks decode in DataLoader worker processes, in the pool's
own dtype (uint8 travels 4x lighter than float32), and become float on the device. Memory holds a
few blocks and the (N,) index arrays, never the pool.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xal_engine.errors import XalError
from xal_engine.store.location import is_remote

if TYPE_CHECKING:
    from xal_engine.store.pool import Pool

# A block or batch: images (n,C,H,W) pool dtype, rois (n,H,W) bool, has_roi (n,) bool,
# labels (n,) int64 (-1 unknown), index (n,) int64 pool positions.
Block = dict[str, torch.Tensor]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _from_fd_handoff(exc_value: BaseException | None, tb: TracebackType | None) -> bool:
    """Whether an exception is the connection error of a loader worker's file-descriptor handoff
    (multiprocessing.resource_sharer) that a stopping parent cut mid-handshake."""
    sharer = False
    while tb is not None:
        sharer |= tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py"))
        tb = tb.tb_next
    return sharer and isinstance(exc_value, (OSError, EOFError, multiprocessing.AuthenticationError))


def _quiet_fd_handoff(args: threading.ExceptHookArgs, previous: Callable[..., Any]) -> None:
    """threading.excepthook of a loader worker: the thread that hands shared-memory file descriptors
    to the parent (multiprocessing.resource_sharer) raises a connection error when the parent drops
    the connection mid-handshake because it is stopping (SIGTERM, Ctrl-C); that is the parent's exit,
    not a worker error, and must not print a traceback over its one-line message. Anything else is
    reported as before."""
    if not _from_fd_handoff(args.exc_value, args.exc_traceback):
        previous(args)


def _quiet_fd_handoff_sys(exc_type: type[BaseException], exc_value: BaseException, tb: TracebackType | None,
                          previous: Callable[..., Any]) -> None:
    """The same filter as sys.excepthook: resource_sharer's serving loop catches its errors itself and
    reports them through sys.excepthook, not threading.excepthook."""
    if not _from_fd_handoff(exc_value, tb):
        previous(exc_type, exc_value, tb)


def _die_with_parent(worker_id: int, parent: int) -> None:
    """In a loader worker on Linux: the kernel kills it (SIGKILL) as soon as its parent exits, and it
    exits now when the parent already has (it was reparented before the request took effect)."""
    threading.excepthook = functools.partial(_quiet_fd_handoff, previous=threading.excepthook)
    sys.excepthook = functools.partial(_quiet_fd_handoff_sys, previous=sys.excepthook)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the loader's own parent check remains
        return
    if os.getppid() != parent:
        os._exit(1)


def worker_exit_with_parent() -> Callable[[int], None] | None:
    """A DataLoader ``worker_init_fn`` that makes the workers of a loader built by this process die
    with it, even when it is SIGKILLed; None off Linux, where workers keep the loader's own check."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(_die_with_parent, parent=os.getpid())


def select_indices(pool: Pool, split: int | None = None, known_labels: bool = True,
                   labelled_only: str | None = None) -> np.ndarray:
    """Sorted int64 pool positions: in ``split`` (None: any), with a label >= 0 when
    ``known_labels``, and marked ``al/<labelled_only>/labelled_round >= 0`` when an experiment is
    named (an XalError if the pool has no such experiment)."""
    keep = np.ones(pool.n, dtype=bool)
    if split is not None:
        keep &= pool.column("split") == split
    if known_labels:
        keep &= pool.column("labels") >= 0
    if labelled_only is not None:
        keep &= pool.read_labelled_round(labelled_only) >= 0
    return np.flatnonzero(keep).astype(np.int64)


class PoolRanges(Dataset[Block]):
    """Base of the loader datasets: items are contiguous pool ranges decoded in loader workers.

    The pool is reopened by path in each process, so no zarr handle crosses a fork or a pickle.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool_type = type(pool)
        self._path = pool.path
        self._pool: Pool | None = pool
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # spawn: pickle the path, not the open pool
        return {**self.__dict__, "_pool": None}

    def _open(self) -> Pool:
        if self._pool is not None and self._pid != os.getpid() and is_remote(self._path):
            raise XalError(f"pool {self._path}: an object-store pool cannot be read in forked loader "
                           "workers (obstore's runtime does not survive a fork); use --num-workers 0 (the "
                           "in-process read-ahead fetches several items concurrently)")
        if self._pool is None or self._pid != os.getpid():
            self._pool = self._pool_type.open(self._path)
            self._pid = os.getpid()
        return self._pool

    def _read(self, start: int, stop: int, rows: np.ndarray | None = None, labels: bool = True) -> Block:
        """images (n,C,H,W) pool dtype, rois (n,H,W), has_roi (n,) and labels (n,) int64 (only with
        ``labels``: nothing else is decoded) of images [start, stop), or of its ``rows`` (offsets from
        start) only."""
        names = ("images", "rois", "has_roi", "labels") if labels else ("images", "rois", "has_roi")
        data = self._open().read_arrays(start, stop, names)
        sel = slice(None) if rows is None else rows  # a view of the whole range, or a gathered copy
        block = {name: torch.from_numpy(np.ascontiguousarray(data[name][sel])) for name in names[:3]}
        if labels:
            block["labels"] = torch.from_numpy(data["labels"][sel].astype(np.int64))
        return block


class BlockDataset(PoolRanges):
    """Item i = the selected images of the i-th chunk-aligned pool range that holds any (training).

    ``indices`` must be sorted and unique.
    """

    def __init__(self, pool: Pool, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (np.any(np.diff(indices) <= 0) or indices[0] < 0 or indices[-1] >= pool.n):
            raise XalError(f"indices must be sorted, unique and within [0, {pool.n})")
        super().__init__(pool)
        self.indices = indices
        ranges = np.asarray(pool.chunk_ranges(), dtype=np.int64).reshape(-1, 2)  # (chunks, 2)
        # CSR layout: the selected positions of range r are indices[offsets[r]:offsets[r+1]].
        offsets = np.searchsorted(indices, np.concatenate([ranges[:, 0], ranges[-1:, 1]]))
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        self.ranges = ranges[nonempty]  # (blocks, 2)
        self._lo = offsets[nonempty]
        self._hi = offsets[nonempty + 1]

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> Block:
        start, stop = (int(v) for v in self.ranges[i])
        index = self.indices[self._lo[i]:self._hi[i]]
        return {**self._read(start, stop, rows=index - start), "index": torch.from_numpy(index.copy())}


class UnitRanges(PoolRanges):
    """Item i = the images of ``items[i]`` = (unit, start, stop): a chunk-aligned range of pool images
    inside one work unit of a score run (scoring). The item adds ``unit`` and ``start`` (ints); labels
    only ``with_labels``."""

    def __init__(self, pool: Pool, items: list[tuple[int, int, int]], with_labels: bool) -> None:
        super().__init__(pool)
        self.items = items
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        unit, start, stop = self.items[i]
        return {"unit": unit, "start": start, **self._read(start, stop, labels=self.with_labels)}


REMOTE_READ_AHEAD = 4  # reader threads over an object-store pool (items fetched concurrently, yielded in order)


def read_ahead(dataset: Dataset[Any], depth: int = 2, pin: bool = False,
               threads: int | None = None) -> Iterator[Any]:
    """``dataset``'s items in order, decoded by one thread up to ``depth`` items ahead of the consumer:
    in-process loading (no worker processes) that still overlaps decode with compute, since blosc and
    the Zarr codecs release the GIL. ``pin``: the thread also copies each item's tensors into pinned
    memory (for CUDA; blocks reused through torch's caching host allocator), as a DataLoader's pin
    thread does for worker processes. Over a pool in an object store, where an item waits on round
    trips rather than on the CPU, ``threads`` (default :data:`REMOTE_READ_AHEAD`; 1 for a local pool)
    fetch items concurrently, at least two per thread ahead, still yielded in order."""
    remote = is_remote(getattr(dataset, "_path", None))
    threads = (REMOTE_READ_AHEAD if remote else 1) if threads is None else threads
    depth = max(depth, 2 * threads) if threads > 1 else depth

    def load(i: int) -> Any:
        item = dataset[i]
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()} if pin else item

    with ThreadPoolExecutor(threads, thread_name_prefix="xal-read") as reader:
        ahead: collections.deque[Future[Any]] = collections.deque()
        try:
            for i in range(len(dataset)):  # type: ignore[arg-type]
                ahead.append(reader.submit(load, i))
                if len(ahead) > depth:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


class EpochPermutation(Sampler[int]):
    """Block order: a seeded permutation per epoch (``set_epoch``), or in order when ``seed`` is None."""

    def __init__(self, n: int, seed: int | None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def block_loader(dataset: BlockDataset, sampler: Sampler[int], num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader[Block]:
    """A DataLoader yielding one block per item (no collation), decoded in ``num_workers`` forked
    processes that stay alive across epochs and die with their parent."""
    fork = num_workers > 0 and sys.platform.startswith("linux")
    # obstore's runtime does not survive a fork: workers over an object-store pool are spawned
    context = ("spawn" if is_remote(dataset._path) else "fork" if fork else None) if num_workers else None
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      multiprocessing_context=context, prefetch_factor=2 if num_workers else None,
                      worker_init_fn=worker_exit_with_parent() if num_workers else None)


def _cat(blocks: list[Block]) -> Block:
    return {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}


def _take(block: Block, rows: torch.Tensor | slice) -> Block:
    return {k: v[rows] for k, v in block.items()}


def rebatch(blocks: Iterable[Block], batch_size: int, generator: torch.Generator | None = None,
            buffer_images: int = 0, min_last: int = 1) -> Iterator[Block]:
    """Blocks of any size -> batches of ``batch_size`` (the last may be smaller, dropped when under
    ``min_last``). With a generator, rows are shuffled within a buffer of at least ``buffer_images``
    images (block order is shuffled by the sampler), so memory stays at a few blocks."""
    pending: list[Block] = []
    held = 0
    target = max(batch_size, buffer_images)
    for block in blocks:
        pending.append(block)
        held += len(block["index"])
        if held < target:
            continue
        buf = _cat(pending)
        if generator is not None:
            buf = _take(buf, torch.randperm(held, generator=generator))
        full = held - held % batch_size
        for s in range(0, full, batch_size):
            yield _take(buf, slice(s, s + batch_size))
        pending = [_take(buf, slice(full, held))] if full < held else []
        held -= full
    if held:
        buf = _cat(pending)
        if generator is not None:
            buf = _take(buf, torch.randperm(held, generator=generator))
        for s in range(0, held, batch_size):
            part = _take(buf, slice(s, s + batch_size))
            if len(part["index"]) >= min_last:
                yield part
