"""Ingest: the paper's datasets (BraTS, VinDr-CXR, SIIM-COVID), plain image folders and the synthetic
generators (phantoms, BraTS-like brain slices) into pools.

Each format lists items and decodes one item into model-ready images; ``ingest`` runs them through
worker processes and ``PoolWriter`` in a fixed order (resumable), and writes ``<out>.ingest.json``.
The driver's names are imported on first use, so that `pool create --help` does not load torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "IngestConfig": "xal_engine.ingest.common", "IngestSource": "xal_engine.ingest.common",
    "Item": "xal_engine.ingest.common", "ItemResult": "xal_engine.ingest.common",
    "Skip": "xal_engine.ingest.common", "ingest": "xal_engine.ingest.driver",
    "report_path": "xal_engine.ingest.driver", "summary": "xal_engine.ingest.driver",
}
__all__ = ["IngestConfig", "IngestSource", "Item", "ItemResult", "Skip", "ingest", "report_path", "summary"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xal_engine.ingest' has no attribute {name!r}")
