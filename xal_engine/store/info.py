"""The summary behind ``Pool.info`` (what ``pool info --json`` prints): counts per split and class,
ROI coverage, chunking, storage per array and the subgroups present."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from xal_engine.store.format import (
    AL_GROUP,
    LABELS_HISTORY,
    PER_IMAGE_ARRAYS,
    RESERVED_ATTRS,
    SCORES_GROUP,
    SPLIT_NAMES,
)

if TYPE_CHECKING:
    from xal_engine.store.pool import Pool


def _storage(array: zarr.Array) -> dict[str, Any]:
    stored = int(array.nbytes_stored())
    raw = None if array.dtype.kind in "TUO" else int(array.nbytes)
    return {"stored_bytes": stored, "raw_bytes": raw, "ratio": stored / raw if raw else None}


def pool_info(pool: Pool) -> dict[str, Any]:
    """Counts per split and class, ROI coverage, chunking, storage and the subgroups present."""
    g = pool.group
    labels, split, has_roi = (pool.arrays[k][:] for k in ("labels", "split", "has_roi"))  # (N,) each
    k = len(pool.classes)
    splits = {}
    for code, name in enumerate(SPLIT_NAMES):
        sel = split == code
        counts = np.bincount(labels[sel].astype(np.int64) + 1, minlength=k + 1) if k else [0]
        splits[name] = {
            "n": int(sel.sum()),
            "labelled": int((labels[sel] >= 0).sum()),
            "has_roi": int(has_roi[sel].sum()),
            "per_class": {c: int(counts[i + 1]) for i, c in enumerate(pool.classes)},
            "unknown": int(counts[0]),
        }
    storage = {name: _storage(array) for name, array in {**pool.arrays, **pool.optional}.items()}
    stored = sum(s["stored_bytes"] for s in storage.values())
    raw = sum(s["raw_bytes"] or 0 for s in storage.values())
    storage["total"] = {"stored_bytes": stored, "raw_bytes": raw, "ratio": stored / raw if raw else None}
    known = set(PER_IMAGE_ARRAYS) | set(pool.optional) | {SCORES_GROUP, AL_GROUP, LABELS_HISTORY}
    extra_attrs = {key: v for key, v in pool.attrs.items() if key not in RESERVED_ATTRS}
    return {
        "path": str(pool.path),
        "format_version": pool.attrs["xal_pool"],
        "n": pool.n,
        "shape": [pool.channels, *pool.spatial],  # (C, H, W), or (C, D, H, W) for volumes
        "kind": pool.kind,
        "dtype": str(pool.image_dtype),
        "classes": pool.classes,
        "modality": pool.attrs.get("modality", ""),
        "source": pool.attrs.get("source", ""),
        "splits": splits,
        "roi_coverage": {"has_roi": int(has_roi.sum()),
                         "fraction": float(has_roi.mean()) if pool.n else 0.0},
        "chunking": {"images_per_chunk": pool.chunk_size, "chunks": pool.n_chunks,
                     "chunk_bytes": pool.chunk_size * pool.channels * math.prod(pool.spatial)
                     * pool.image_dtype.itemsize},
        "compression_ratio": storage["images"]["ratio"],
        "storage": storage,
        "optional_arrays": sorted(pool.optional),
        "score_runs": pool.subgroups(SCORES_GROUP),
        "al_experiments": pool.subgroups(AL_GROUP),
        "other_members": sorted(set(g.keys()) - known),
        "attrs": extra_attrs,
    }
