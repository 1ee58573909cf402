"""The ingest driver: list items, decode them (in workers), write them in order through PoolWriter.

Resume: before each item's images are appended, a line (item index, image count, skips) goes to
``<out>.ingest.progress.jsonl``. After a crash, ``PoolWriter(resume=True)`` keeps its whole chunks
(``n_written`` images); items wholly inside them are not decoded again (their skips come from the
log), the item straddling the boundary is decoded again and its first images dropped. The log's
first line fingerprints the settings and the item list, so a changed source or flag is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.ingest.common import IngestConfig, IngestSource, Item, Skip, assign_splits
from xal_engine.ingest.workers import ordered_map
from xal_engine.progress import plural, progress
from xal_engine.store import SPLIT_NAMES, Pool, PoolWriter
from xal_engine.store.files import atomic_write_text, dumps_json, write_target
from xal_engine.store.location import Location, StoreURL, parse_location


def sidecar_base(out: Location) -> Path:
    """Where the report and progress log of an ingest into ``out`` go: beside a local pool; for a pool
    in an object store, in the working directory under the pool's name (resume from the same place)."""
    return out if isinstance(out, Path) else Path(out.name)


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".ingest.json")


def progress_log_path(out: Path) -> Path:
    return out.with_name(out.name + ".ingest.progress.jsonl")


class ProgressLog:
    """Append-only record of the items already handed to the writer (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint

    def start(self, n_written: int) -> tuple[int, int, list[Skip]]:
        """(first item to decode, images of it to drop, skips of the items already done)."""
        records = self._read() if n_written > 0 else []
        start, cum, skips = 0, 0, []
        for rec in records:
            if rec["index"] != start or cum + rec["n"] > n_written:
                break
            cum += rec["n"]
            skips += [Skip(*s) for s in rec["skipped"]]
            start += 1
        with open(self.path, "w") as f:  # keep only what the pool holds
            f.write(dumps_json({"fingerprint": self.fingerprint}) + "\n")
            f.writelines(dumps_json(rec) + "\n" for rec in records[:start])
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open until finish()
        return start, n_written - cum, skips

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []  # no log: decode from the start, drop the images already written
        lines = self.path.read_text().splitlines()
        if not lines or json.loads(lines[0]).get("fingerprint") != self.fingerprint:
            raise XalError(f"--resume: {self.path} was written with other settings or another item "
                           "list; rerun with the same flags and source, or start over with --overwrite")
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line
                break
        return records

    def record(self, index: int, n: int, skipped: tuple[Skip, ...]) -> None:
        self._file.write(dumps_json({"index": index, "n": n, "skipped": [list(s) for s in skipped]}) + "\n")

    def finish(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _fingerprint(settings: dict[str, Any], items: list[Item]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for item in items:
        h.update(item.key.encode() + b"\0")
    return h.hexdigest()


def _counts(pool: Pool) -> dict[str, Any]:
    labels, split = pool.column("labels"), pool.column("split")
    per_class = {name: int((labels == k).sum()) for k, name in enumerate(pool.classes)}
    if (labels < 0).any():
        per_class["unknown"] = int((labels < 0).sum())
    return {"images": pool.n, "per_class": per_class,
            "per_split": {name: int((split == k).sum()) for k, name in enumerate(SPLIT_NAMES)},
            "with_roi": int(pool.column("has_roi").sum())}


def ingest(source: IngestSource, out: Path | str | StoreURL, config: IngestConfig | None = None) -> dict[str, Any]:
    """Build the pool at ``out`` from ``source``; returns the report also written to <out>.ingest.json."""
    config = config or IngestConfig()
    t0 = time.perf_counter()
    out = parse_location(out)  # a local path or an object-store URL
    beside = sidecar_base(out)
    if beside.parent.is_dir():  # else the pool's writer creates it
        write_target(report_path(beside))  # a report path that is not a file is refused before any work
    items, skipped = source.scan()
    if not items:
        first = f"; first: {skipped[0].item}: {skipped[0].reason}" if skipped else ""
        raise XalError(f"{source.root}: no usable {source.name} data found ({len(skipped)} skipped{first})")
    splits = assign_splits([it.group for it in items], config.test_fraction, config.val_fraction, config.seed)
    settings = {"format": source.name, "size": source.size, "test_fraction": config.test_fraction,
                "val_fraction": config.val_fraction, "seed": config.seed,
                "split_unit": "patient/case (brats), image (vindr, folder), study (siim)",
                **source.settings()}
    writer = PoolWriter(out, channels=source.channels, height=source.size, width=source.size,
                        depth=source.depth, dtype=source.dtype, classes=source.classes, modality=source.modality,
                        source=str(source.root.resolve()), attrs={"ingest": settings},
                        overwrite=config.overwrite, chunk_size=config.chunk_size, resume=config.resume,
                        extra_arrays=source.extra_arrays)
    log = ProgressLog(progress_log_path(beside), _fingerprint(settings, items))
    with writer:
        resumed_from = writer.n_written
        start, drop, done_skips = log.start(resumed_from)
        skipped += done_skips
        bar = progress(len(items), f"ingest {source.name}", unit="item", enabled=config.show_progress)
        bar.update(start)
        appended = 0
        for index, (item, result) in enumerate(ordered_map(source, items[start:], config.workers), start):
            item_skips = tuple(Skip(s.item, " ".join(s.reason.split())) for s in result.skipped)  # one line each
            log.record(index, len(result), item_skips)   # before append: the log covers the pool
            skipped += item_skips
            n, first = len(result), min(drop, len(result))
            drop -= first
            appended += n - first
            if n > first:
                part = slice(first, n)
                writer.append(result.images[part], result.rois[part], result.has_roi[part],
                              result.labels[part], list(result.ids[part]),
                              np.full(n - first, splits[item.group], np.uint8),
                              {name: value[part] for name, value in result.extra.items()})
            bar.set_postfix(images=resumed_from + appended, refresh=False)
            bar.update(1)
        bar.close()
        if drop > 0:
            raise XalError(f"--resume: {source.root} now yields {drop} images fewer than the interrupted "
                           "ingest wrote; start over with --overwrite")
        if resumed_from + appended == 0:
            raise XalError(f"{source.root}: no usable {source.name} images "
                           f"({len(skipped)} skipped; first: {skipped[0].item}: {skipped[0].reason})")
        pool = writer.close()
    log.finish()
    report = {"format": source.name, "source": str(source.root), "pool": str(out), "kind": pool.kind,
              "items": len(items),
              **_counts(pool), "classes": pool.classes, "resumed_from": resumed_from,
              "skipped_count": len(skipped), "skipped": [s._asdict() for s in skipped],
              "settings": settings, "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(report_path(beside), dumps_json(report, indent=1, default=str) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    """The one-line summary the CLI prints."""
    splits = " / ".join(f"{k} {v}" for k, v in report["per_split"].items())
    return (f"ingest {report['format']}: {plural(report['images'], report.get('kind', 'image'))} from "
            f"{plural(report['items'], 'item')} "
            f"({report['skipped_count']} skipped) -> {report['pool']} [{splits}]; "
            f"report {report_path(sidecar_base(parse_location(report['pool'])))}")
