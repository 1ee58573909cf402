"""Chunk-aligned blocks, index selection, re-batching, input scaling and augmentation (xal_engine.store.dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from xal_engine.core.augment import AugmentConfig, augment_batch
from xal_engine.core.inputs import imagenet_normalization, resolve_device, to_unit_float
from xal_engine.errors import XalError
from xal_engine.store.dataset import BlockDataset, EpochPermutation, block_loader, rebatch, select_indices


@dataclass(frozen=True)
class _Batch:
    images: np.ndarray
    rois: np.ndarray
    has_roi: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    split: np.ndarray


class FakePool:
    """The Pool contract's read side over numpy arrays, with a read log."""

    registry: ClassVar[dict[str, FakePool]] = {}

    def __init__(self, n: int, chunk: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.path = Path(f"/fake/{id(self)}.zarr")
        self.n, self.chunk_size, self.channels, self.height, self.width = n, chunk, 1, 6, 5
        self.group: dict[str, Any] = {
            "images": rng.integers(0, 256, (n, 1, 6, 5), dtype=np.uint8),
            "rois": rng.random((n, 6, 5)) > 0.5,
            "has_roi": rng.random(n) > 0.2,
            "labels": rng.integers(-1, 3, n).astype(np.int16),
            "split": rng.integers(0, 3, n).astype(np.uint8),
        }
        self.reads: list[tuple[int, int]] = []
        FakePool.registry[str(self.path)] = self

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> FakePool:
        return cls.registry[str(path)]

    def chunk_ranges(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_size, self.n)) for s in range(0, self.n, self.chunk_size)]

    def column(self, name: str) -> np.ndarray:
        return self.group[name]

    def read_labelled_round(self, experiment: str) -> np.ndarray:
        key = f"al/{experiment}/labelled_round"
        if key not in self.group:
            raise XalError(f"pool {self.path} has no AL experiment {experiment!r}")
        return self.group[key]

    def read_arrays(self, start: int, stop: int, names) -> dict[str, np.ndarray]:
        self.reads.append((start, stop))
        return {name: self.group[name][start:stop] for name in names}

    def read(self, start: int, stop: int) -> _Batch:
        self.reads.append((start, stop))
        g = self.group
        return _Batch(g["images"][start:stop], g["rois"][start:stop], g["has_roi"][start:stop],
                      g["labels"][start:stop], np.array([str(i) for i in range(start, stop)]),
                      g["split"][start:stop])


def test_to_unit_float_by_dtype() -> None:
    assert to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist() == pytest.approx([0, 0.2, 1])
    u16 = torch.from_numpy(np.array([0, 13107, 65535], dtype=np.uint16))
    assert to_unit_float(u16).tolist() == pytest.approx([0, 0.2, 1])
    f16 = torch.tensor([0.25, 0.5], dtype=torch.float16)
    assert to_unit_float(f16).dtype == torch.float32 and to_unit_float(f16).tolist() == [0.25, 0.5]
    x = torch.full((1, 2, 1, 1), 255, dtype=torch.uint8)
    out = to_unit_float(x, mean=(0.5, 0.25), std=(0.5, 0.25))
    assert out.flatten().tolist() == pytest.approx([1.0, 3.0])
    with pytest.raises(XalError, match="expected uint8, uint16 or a float"):
        to_unit_float(torch.zeros(2, dtype=torch.int32))


def test_imagenet_normalization_per_channel_count() -> None:
    assert imagenet_normalization(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = imagenet_normalization(2)
    assert mean == pytest.approx((0.449, 0.449)) and std == pytest.approx((0.226, 0.226))


def test_select_indices_by_split_label_and_experiment() -> None:
    pool = FakePool(50, 8)
    split, labels = pool.group["split"], pool.group["labels"]
    expected = np.flatnonzero((split == 1) & (labels >= 0))
    assert np.array_equal(select_indices(pool, split=1), expected)
    assert np.array_equal(select_indices(pool, split=None, known_labels=False), np.arange(50))
    rounds = np.full(50, -1, dtype=np.int16)
    rounds[[3, 9, 10, 44]] = [0, 0, 1, 2]
    pool.group["al/exp1/labelled_round"] = rounds
    got = select_indices(pool, split=None, known_labels=False, labelled_only="exp1")
    assert got.tolist() == [3, 9, 10, 44]
    with pytest.raises(XalError, match="no AL experiment 'other'"):
        select_indices(pool, labelled_only="other")


def test_blocks_yield_exactly_the_selected_images() -> None:
    pool = FakePool(37, 8)
    idx = np.array([1, 2, 7, 20, 21, 36])
    ds = BlockDataset(pool, idx)
    assert ds.ranges.tolist() == [[0, 8], [16, 24], [32, 37]]  # chunk 8..16 holds none: never read
    blocks = [ds[i] for i in range(len(ds))]
    assert pool.reads == [(0, 8), (16, 24), (32, 37)]
    index = torch.cat([b["index"] for b in blocks])
    assert index.tolist() == idx.tolist()
    images = torch.cat([b["images"] for b in blocks])
    assert images.dtype == torch.uint8 and np.array_equal(images.numpy(), pool.group["images"][idx])
    assert np.array_equal(torch.cat([b["rois"] for b in blocks]).numpy(), pool.group["rois"][idx])
    assert np.array_equal(torch.cat([b["labels"] for b in blocks]).numpy(), pool.group["labels"][idx])
    with pytest.raises(XalError, match="sorted, unique"):
        BlockDataset(pool, np.array([3, 2]))


def test_loader_with_forked_worker_and_seeded_block_order() -> None:
    pool = FakePool(40, 4)
    ds = BlockDataset(pool, np.arange(40))
    sampler = EpochPermutation(len(ds), seed=5)
    loader = block_loader(ds, sampler, num_workers=1)
    first = [int(b["index"][0]) for b in loader]
    sampler.set_epoch(1)
    second = [int(b["index"][0]) for b in loader]
    expect0 = (torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_003)) * 4).tolist()
    assert first == expect0
    assert sorted(second) == sorted(first) and second != first


def _blocks(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    out, start = [], 0
    for s in sizes:
        out.append({"index": torch.arange(start, start + s), "labels": torch.arange(start, start + s) % 3})
        start += s
    return out


def test_rebatch_sizes_order_and_shuffle() -> None:
    batches = list(rebatch(_blocks([3, 5, 4, 1]), batch_size=4))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert all(torch.equal(b["labels"], b["index"] % 3) for b in batches)  # rows stay aligned
    dropped = list(rebatch(_blocks([3, 5, 4, 1]), batch_size=4, min_last=2))
    assert len(dropped) == 3
    g = torch.Generator().manual_seed(0)
    shuffled = list(rebatch(_blocks([3, 5, 4, 1]), batch_size=4, generator=g, buffer_images=8))
    flat = torch.cat([b["index"] for b in shuffled])
    assert [len(b["index"]) for b in shuffled] == [4, 4, 4, 1]
    assert sorted(flat.tolist()) == list(range(13)) and flat.tolist() != list(range(13))
    assert all(torch.equal(b["labels"], b["index"] % 3) for b in shuffled)


def test_augment_hand_case_shift_and_flip() -> None:
    img = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    roi = img[:, 0] >= 6

    # Find a seed whose draws give hflip and a shift of (dy, dx) = (0, 1) with max_shift 1/3 → 1 px.
    cfg = AugmentConfig(hflip=1.0, vflip=0.0, max_shift=0.34)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        torch.rand(1, 2, generator=g)
        dy = int(torch.randint(-1, 2, (1,), generator=g))
        dx = int(torch.randint(-1, 2, (1,), generator=g))
        if (dy, dx) == (0, 1):
            break
    out, out_roi = augment_batch(img, roi, torch.Generator().manual_seed(seed), cfg)
    # Output column j reads column W-1-(j-1) of the input; column 0 has no source (zero fill).
    expected = torch.tensor([[0.0, 3, 2, 1], [0, 7, 6, 5], [0, 11, 10, 9]])
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out_roi[0], (expected >= 6) & (torch.arange(4) > 0))


def test_augment_keeps_image_and_roi_aligned() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 2, 9, 7)
    rois = images[:, 0] > 0.5
    out, out_rois = augment_batch(images, rois, g, AugmentConfig(hflip=0.5, vflip=0.5, max_shift=0.3))
    # Where a pixel has a source, the moved ROI is exactly the moved channel-0 threshold.
    inside = out[:, 1] != 0
    assert torch.equal(out_rois[inside], (out[:, 0] > 0.5)[inside])
    assert not torch.equal(out, images)
    ident, ident_rois = augment_batch(images, rois, g, AugmentConfig(hflip=0.0, vflip=0.0, max_shift=0.0))
    assert torch.equal(ident, images) and torch.equal(ident_rois, rois)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(XalError, match="device 'tpu' is not valid"):
        resolve_device("tpu")
    with pytest.raises(XalError, match="device 'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(XalError, match="CUDA is not available"):
            resolve_device("cuda")


def test_real_pool_blocks_in_forked_workers_match_direct_reads(tmp_path: Path) -> None:
    from xal_engine.store import Pool, PoolWriter

    rng = np.random.default_rng(2)
    n = 40
    images = rng.integers(0, 65536, (n, 2, 4, 3), dtype=np.uint16)
    with PoolWriter(tmp_path / "p.zarr", channels=2, height=4, width=3, dtype="uint16",
                    classes=["x", "y"], chunk_size=8) as w:
        w.append(images, rng.random((n, 4, 3)) > 0.5, np.ones(n, bool), (np.arange(n) % 2).astype(np.int16),
                 np.array([f"i{i}" for i in range(n)]), np.zeros(n, np.uint8))
    pool = Pool.open(tmp_path / "p.zarr")
    idx = np.array([0, 5, 9, 17, 18, 39])
    ds = BlockDataset(pool, idx)
    blocks = list(block_loader(ds, EpochPermutation(len(ds), None), num_workers=2))
    got = torch.cat([b["images"] for b in blocks])
    assert got.dtype == torch.uint16 and np.array_equal(got.numpy(), images[idx])
    assert torch.cat([b["index"] for b in blocks]).tolist() == idx.tolist()
    assert to_unit_float(got).max() <= 1.0


QUIET_FD_HANDOFF = """
import functools, os, sys, threading
import multiprocessing
from xal_engine.store.dataset import _quiet_fd_handoff, _quiet_fd_handoff_sys
threading.excepthook = functools.partial(_quiet_fd_handoff, previous=threading.excepthook)
sys.excepthook = functools.partial(_quiet_fd_handoff_sys, previous=sys.excepthook)
sharer = os.path.join(os.path.dirname(multiprocessing.__file__), "resource_sharer.py")
scope = {"sys": sys}
# Frames in resource_sharer.py: one raising out of the thread (threading.excepthook), one catching
# and reporting through sys.excepthook, as its serving loop does.
exec(compile("def serve(exc):\\n    raise exc\\n"
             "def serve_loop(exc):\\n    try:\\n        raise exc\\n    except BaseException:\\n"
             "        sys.excepthook(*sys.exc_info())\\n", sharer, "exec"), scope)
auth = multiprocessing.AuthenticationError("digest received was wrong")
for exc, where in ((ConnectionResetError("reset"), scope["serve"]), (EOFError(), scope["serve"]),
                   (ValueError("a real bug"), scope["serve"]),
                   (ConnectionResetError("elsewhere"), lambda e: (_ for _ in ()).throw(e)),
                   (auth, scope["serve_loop"]), (BrokenPipeError("pipe"), scope["serve_loop"]),
                   (KeyError("a real loop bug"), scope["serve_loop"])):
    t = threading.Thread(target=where, args=(exc,))
    t.start()
    t.join()
"""


def test_a_workers_fd_handoff_cut_by_a_stopping_parent_prints_nothing() -> None:
    """Stopped by SIGTERM, the parent may drop a loader worker's file-descriptor handoff mid-way; the
    worker's multiprocessing.resource_sharer thread then raises a connection error that used to print a
    traceback over the one-line message. Only that is silenced: other errors still print."""
    import subprocess
    import sys

    err = subprocess.run([sys.executable, "-c", QUIET_FD_HANDOFF], capture_output=True, text=True,
                         check=True).stderr
    assert "reset" not in err and "EOFError" not in err and "digest" not in err and "pipe" not in err
    assert "ValueError: a real bug" in err and "ConnectionResetError: elsewhere" in err
    assert "KeyError: 'a real loop bug'" in err
