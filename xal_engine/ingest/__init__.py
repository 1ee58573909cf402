"""Ingest: the paper's datasets (BraTS, VinDr-CXR, SIIM-COVID) and plain image folders into pools.

Each format lists items and decodes one item into model-ready images; ``ingest`` runs them through
worker processes and ``PoolWriter`` in a fixed order (resumable), and writes ``<out>.ingest.json``.
"""

from xal_engine.ingest.common import IngestConfig, IngestSource, Item, ItemResult, Skip
from xal_engine.ingest.driver import ingest, report_path, summary

__all__ = ["IngestConfig", "IngestSource", "Item", "ItemResult", "Skip", "ingest", "report_path", "summary"]
