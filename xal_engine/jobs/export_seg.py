"""``export-seg``: a batch's ROIs and thresholded Grad-CAMs as DICOM SEG objects over the source DICOMs.

For each id of ``--ids-from`` (a batch CSV from ``select``: its ``id`` column), one file
``OUT/<id>.seg.dcm`` (written to a temporary file, then renamed) holding a BINARY Segmentation that
references the image's source DICOM (found under ``--sources`` by the SOP Instance UID the pool keeps),
with segment ``ROI`` (the pool's ROI, when the image has one) and ``Grad-CAM``, both at the source's
Rows x Columns by the inverse of the ingest's mapping (:mod:`xal_engine.exchange.dicom_seg`). The
Grad-CAM mask is the run's thresholded map on the pool grid, exactly the set the run's Dice measured
(:func:`xal_engine.jobs.label_studio_export.cam_masks` of the stored CAMs, else recomputed with the run's
model as ``select --overlays`` does). All SEGs of one export share one new Series Instance UID.

Everything is checked before the first file is written: the pool keeps DICOM UIDs, every id is in it,
the run has CAMs (or its model), every source is found and has the recorded Rows x Columns.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xal_engine.errors import XalError
from xal_engine.exchange.dicom_seg import (
    build_seg,
    require_highdicom,
    require_uids,
    source_index,
    to_source_grid,
    write_seg,
)
from xal_engine.jobs.batch_sheet import OverlayConfig, cam_source, file_stem, read_images, recompute_cams
from xal_engine.jobs.label_studio_export import cam_masks
from xal_engine.progress import plural
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

SEG_SUFFIX = ".seg.dcm"


@dataclass(frozen=True)
class ExportSegConfig:
    """Flags of ``xal-engine export-seg``."""

    device: str = "auto"  # where CAMs are recomputed when the run stored none
    batch_size: int = 32


@dataclass(frozen=True)
class ExportSegFiles:
    files: list[Path]  # OUT/<id>.seg.dcm, in the order of --ids-from
    n_rois: int  # SEGs with an ROI segment
    cams: str  # "stored" or "recomputed"
    series_uid: str

    def line(self) -> str:
        out = self.files[0].parent if self.files else "?"
        return (f"wrote {plural(len(self.files), 'DICOM SEG')} ({self.n_rois} with the pool's ROI, {self.cams} "
                f"Grad-CAM) -> {out}")


def read_ids(path: str | Path) -> list[str]:
    """The ``id`` column of a batch CSV."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "id" not in (reader.fieldnames or []):
                raise XalError(f"--ids-from {path}: no 'id' column (expected a batch CSV from select)")
            ids = [row["id"].strip() for row in reader if (row.get("id") or "").strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise XalError(f"--ids-from {path}: unreadable CSV ({err})") from None
    if not ids:
        raise XalError(f"--ids-from {path}: no ids")
    return ids


def export_seg(pool_path: str | Path, run_name: str, ids_from: str | Path, sources: str | Path,
               out: str | Path, config: ExportSegConfig = ExportSegConfig()) -> ExportSegFiles:
    """Check everything, then write one SEG per id (see the module doc)."""
    import pydicom

    hd = require_highdicom()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise XalError(f"--out {out}: expected a folder, found a file")
    if not out.parent.is_dir():
        raise XalError(f"--out {out}: its parent folder does not exist")
    pool = Pool.open(pool_path)
    pool.require_images("export-seg (one SEG frame per 2-D source image)")
    pool.require_settled("before export-seg")
    require_uids(pool, "export-seg")
    ids = read_ids(ids_from)
    index = pool.find_ids(ids)  # (n,) int64, -1 = unknown
    if (index < 0).any():
        unknown = [i for i, k in zip(ids, index) if k < 0]
        raise XalError(f"--ids-from {ids_from}: {len(unknown)} id(s) not in pool {pool.path} "
                       f"(first: {unknown[0]!r})")
    if len(set(ids)) != len(ids):
        raise XalError(f"--ids-from {ids_from}: an id appears twice")
    try:
        source = cam_source(ScoreRun.open(pool.group, run_name), OverlayConfig(device=config.device,
                                                                                batch_size=config.batch_size))
    except XalError as err:
        raise XalError(str(err).replace("--overlays:", "export-seg:", 1)) from None
    uids = [str(u) for u in pool.take("sop_instance_uid", index)]
    shapes = pool.take("source_shape", index)  # (n, 2) Rows, Columns
    found = source_index(sources, set(uids))
    missing = [(i, u) for i, u in zip(ids, uids) if u not in found]
    if missing:
        raise XalError(f"--sources {sources}: no DICOM with SOP Instance UID {missing[0][1]} (image "
                       f"{missing[0][0]!r}; {len(missing)} source(s) missing)")
    batch = read_images(pool, index)
    if source.stored:
        low = ScoreRun.open(pool.group, run_name).take("cam", index).astype(np.float32)  # (n, h, w)
    else:
        assert source.model is not None
        low = recompute_cams(source.model, pool, batch, source.config, source.target_layer)[0].cam
    cams = cam_masks(low, (pool.height, pool.width), source.config.threshold)  # (n, H, W) pool grid
    datasets = []
    for id_, uid, (rows, cols) in zip(ids, uids, shapes.tolist()):
        ds = pydicom.dcmread(found[uid])
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise XalError(f"--sources: {found[uid]} is {ds.Rows}x{ds.Columns}, the pool recorded {rows}x{cols} "
                           f"for {id_!r} (SOP Instance UID {uid})")
        datasets.append(ds)
    out.mkdir(exist_ok=True)
    series_uid = hd.UID()
    files = []
    for k, (id_, ds) in enumerate(zip(ids, datasets)):
        rows, cols = int(ds.Rows), int(ds.Columns)
        roi = to_source_grid(batch.rois[k], rows, cols) if batch.has_roi[k] else None
        seg = build_seg(ds, roi, to_source_grid(cams[k], rows, cols), series_uid)
        files.append(write_seg(out / f"{file_stem(id_)}{SEG_SUFFIX}", seg))
    return ExportSegFiles(files=files, n_rois=int(batch.has_roi.sum()),
                          cams="stored" if source.stored else "recomputed", series_uid=str(series_uid))
