"""The state of one active-learning experiment in a pool, under ``al/<experiment>/``.

    labelled_round  (N,) int16, fill -1   the AL round each image was labelled in, -1 = not labelled
    attributes                            what the AL loop records (strategy, seed, run folder, config)
                                          and ``imports``: one record per label import

The group and its array are created by the first label import or loop round; ``Pool.open(path, "r+")``
is needed to write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from xal_engine.errors import PoolError
from xal_engine.store.format import AL_GROUP, LABELLED_ROUND, compressors, write_rows

if TYPE_CHECKING:
    from xal_engine.store.pool import Pool

IMPORTS_ATTR = "imports"  # list of {"file", "round", "n_new", "time"}, oldest first


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
        return np.asarray(node[:])

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

    def attrs(self) -> dict[str, Any]:
        """The experiment's attributes; {} when it does not exist yet."""
        node = self.pool.group.get(self.key)
        return dict(node.attrs) if node is not None else {}

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Set ``values`` in the experiment's attributes (one metadata write per key, in order)."""
        self._group().attrs.update(values)

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
