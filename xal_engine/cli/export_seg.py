"""`xal-engine export-seg`: a batch's ROIs and thresholded Grad-CAMs as DICOM SEG over the source DICOMs."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-seg",
        help="write a batch's ROIs and Grad-CAMs as DICOM SEG objects over their source DICOMs",
        description=(
            "For each id of --ids-from (a batch CSV from select), writes OUT/<id>.seg.dcm: a BINARY DICOM "
            "SEG referencing the image's source DICOM (found under --sources by the SOP Instance UID the "
            "pool keeps; pools ingested from vindr/siim), with segments 'ROI' (the pool's, when it has one) "
            "and 'Grad-CAM' (score run --run's thresholded CAM, stored by score --save-cams or recomputed "
            "with the run's model), at the source image's resolution. Opens in OHIF / 3D Slicer over the "
            "originals; edited SEGs import back with `label --import DIR --format dicom-seg`."
        ),
    )
    p.add_argument("--pool", required=True, help="pool ingested from DICOM (vindr, siim)")
    p.add_argument("--run", required=True, help="score run whose Grad-CAMs are exported")
    p.add_argument("--ids-from", required=True, metavar="BATCH.csv", help="CSV with an 'id' column")
    p.add_argument("--sources", required=True, metavar="DIR", help="folder holding the source DICOMs")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="folder the SEG files go into")
    p.add_argument("--device", default="auto", help="where CAMs are recomputed when the run stored none")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.jobs.export_seg import ExportSegConfig, export_seg

    files = export_seg(args.pool, args.run, args.ids_from, args.sources, args.out,
                       ExportSegConfig(device=args.device))
    if args.json:
        print(json.dumps({"files": [str(f) for f in files.files], "n_rois": files.n_rois, "cams": files.cams,
                          "series_uid": files.series_uid}))
    else:
        print(files.line())
    return 0
