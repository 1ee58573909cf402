"""Large benchmark pools built fast: a few synthetic images generated once, then repeated.

Generating phantoms costs far more than writing them; for a throughput benchmark the pixels need
only be realistic (lesion-like ROIs, the pool writer's chunking and codecs), not distinct. A
32k-image 224x224x3 pool takes about 15-25 s this way, most of it the chunk encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xal_engine.ingest.synthetic import SyntheticConfig, class_names, generate_block
from xal_engine.store import Pool, PoolWriter


def repeated_pool(path: str | Path, n: int, size: int = 224, channels: int = 3, classes: int = 3,
                  distinct: int = 64, seed: int = 0) -> Pool:
    """A (n, channels, size, size) uint8 pool: ``distinct`` synthetic images (ROIs, labels, splits)
    repeated in order, ids ``img_0000000``... unique, the pool writer's default chunking."""
    distinct = max(1, min(distinct, n))
    split = np.zeros(distinct, dtype=np.uint8)
    g = generate_block(SyntheticConfig(n=distinct, size=size, classes=classes, channels=channels, seed=seed),
                       0, split)
    with PoolWriter(path, channels=channels, height=size, width=size, dtype=np.uint8,
                    classes=class_names(classes)) as w:
        for start in range(0, n, distinct):
            k = min(distinct, n - start)
            ids = np.char.mod("img_%07d", np.arange(start, start + k)).astype(np.str_)
            w.append(g.images[:k], g.rois[:k], g.has_roi[:k], g.labels[:k], ids, g.split[:k])
    return Pool.open(path)
