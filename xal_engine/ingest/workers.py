"""Decode items in worker processes, yield results in item order with a bounded number in flight.

Memory stays flat: at most ``2 * workers`` decoded items exist at once, whatever the dataset size.
Any exception while decoding one item becomes a skip reason for that item, never a dead job.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from xal_engine.ingest.common import IngestSource, Item, ItemResult, Skip

_SOURCE: IngestSource | None = None  # set once per worker process by _init_worker


def safe_load(source: IngestSource, item: Item) -> ItemResult:
    """``source.load(item)``; an unexpected error is reported as the item's skip reason."""
    try:
        return source.load(item)
    except Exception as err:  # noqa: BLE001 - bad input of a kind the format did not foresee: report, go on
        return ItemResult.only_skips(Skip(item.key, f"{type(err).__name__}: {err}"))


def _init_worker(source: IngestSource) -> None:
    global _SOURCE
    _SOURCE = source
    torch.set_num_threads(1)  # one process per core; resizing needs no intra-op threads


def _load_in_worker(item: Item) -> ItemResult:
    assert _SOURCE is not None
    return safe_load(_SOURCE, item)


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds (torch already imported) and is safe with one intra-op
    # thread per worker (as in torch's DataLoader); elsewhere spawn.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def ordered_map(source: IngestSource, items: Iterable[Item], workers: int) -> Iterator[tuple[Item, ItemResult]]:
    """(item, result) in the order of ``items``; ``workers == 1`` decodes in this process."""
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small per-item tensors: intra-op threads only spin (10x slower)
        try:
            for item in items:
                yield item, safe_load(source, item)
        finally:
            torch.set_num_threads(threads)
        return
    pending: deque[tuple[Item, Future[ItemResult]]] = deque()
    todo = iter(items)
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_init_worker, initargs=(source,))
    try:
        for item in todo:
            pending.append((item, pool.submit(_load_in_worker, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load_in_worker, nxt)))
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
