"""`xal-engine ingest {brats,vindr,siim,folder} SRC --out POOL`: a dataset on disk -> a pool."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = {
    "brats": "BraTS case folders (2020/2021 and 2023 layouts) -> tumour slices, 3 classes by "
             "dominant sub-region (edema, necrotic_core, enhancing)",
    "vindr": "VinDr-CXR DICOMs + annotations CSV -> radiographs, class = chosen class with most boxes",
    "siim": "SIIM-COVID DICOMs + study/image level CSVs -> radiographs with study labels, opacity ROIs",
    "folder": "PNG/JPEG/TIFF images (8/16 bit) with optional masks folder and labels CSV",
}


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _common(p: argparse.ArgumentParser) -> None:
    from xal_engine.ingest.common import IngestConfig

    d = IngestConfig()
    p.add_argument("src", metavar="SRC", help="the dataset's folder")
    p.add_argument("--out", required=True, help="pool to write (Zarr v3 group): pool.zarr or s3://bucket/prefix/pool.zarr")
    p.add_argument("--size", type=int, default=224, help="output images are SIZE x SIZE (default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="decoding processes; 1 decodes in this process (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="fraction of patients (split units) in the test split (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of patients in the validation split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split assignment (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=None, help="images per pool chunk (default: from the image size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ingest into --out")
    p.add_argument("--json", action="store_true", help="print the ingest report as JSON instead of one line")


def _brats(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], Any]:
    from xal_engine.ingest.brats import BratsSettings, BratsSource

    d = BratsSettings()
    p.add_argument("--min-tumour-voxels", type=int, default=d.min_tumour_voxels,
                   help="keep axial slices with at least this many tumour voxels (default: %(default)s)")
    p.add_argument("--normalise", choices=("slice", "volume"), default="slice",
                   help="min-max each channel per slice or per volume (default: %(default)s)")
    p.add_argument("--roi", choices=("dominant", "whole-tumour"), default=d.roi,
                   help="ROI = mask of the dominant label or of the whole tumour (default: %(default)s)")
    p.add_argument("--dtype", choices=("uint8", "float16"), default=d.dtype, help="(default: %(default)s)")
    return lambda a: BratsSource(Path(a.src), a.size, BratsSettings(
        a.min_tumour_voxels, a.normalise == "volume", a.roi, a.dtype))


def _dicom_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8", help="(default: %(default)s)")
    p.add_argument("--no-window", action="store_true",
                   help="ignore the DICOM window / VOI LUT: min-max of each image instead")


def _vindr(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], Any]:
    from xal_engine.ingest.vindr import DEFAULT_CLASSES, VindrSettings, VindrSource

    p.add_argument("--annotations", default=None,
                   help="annotations CSV (default: annotations_train.csv or train.csv under SRC)")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help="comma-separated chosen classes, in tie-break order (default: %(default)s)")
    p.add_argument("--keep-no-finding", action="store_true",
                   help="keep images all readers marked 'No finding' as an extra class without ROI")
    _dicom_flags(p)
    return lambda a: VindrSource(Path(a.src), a.size, VindrSettings(
        _names(a.classes) or (), a.keep_no_finding, a.dtype, not a.no_window, _path(a.annotations)))


def _siim(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], Any]:
    from xal_engine.ingest.siim import SiimSettings, SiimSource

    p.add_argument("--study-csv", default=None, help="default: train_study_level.csv under SRC")
    p.add_argument("--image-csv", default=None, help="default: train_image_level.csv under SRC")
    _dicom_flags(p)
    return lambda a: SiimSource(Path(a.src), a.size, SiimSettings(
        a.dtype, not a.no_window, _path(a.study_csv), _path(a.image_csv)))


def _folder(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], Any]:
    from xal_engine.ingest.folder import FolderSettings, FolderSource

    p.add_argument("--masks", default=None, help="folder of masks named like the images (nonzero = ROI)")
    p.add_argument("--labels", default=None, help="CSV with columns id (image path without suffix), class")
    p.add_argument("--classes", default=None, help="comma-separated class order (default: sorted names)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: as the first image")
    p.add_argument("--dtype", choices=("uint8", "uint16", "float16"), default=None,
                   help="default: as the first image (8 -> uint8, 16 bit -> uint16)")
    p.add_argument("--max-megapixels", type=float, default=FolderSettings.max_megapixels,
                   help="skip images whose header gives more pixels, before decoding them "
                        "(default: %(default)g)")
    p.add_argument("--masks-folder-as-images", action="store_true",
                   help="without --masks, read SRC/masks as images too (by default it is skipped as a "
                        "folder of masks)")
    return lambda a: FolderSource(Path(a.src), a.size, FolderSettings(
        _path(a.masks), _path(a.labels), _names(a.classes), a.channels, a.dtype, a.max_megapixels,
        a.masks_folder_as_images))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="turn a dataset on disk into a pool",
                       description="Decode a dataset in parallel into a pool; bad items are skipped and "
                                   "listed with their reason in <out>.ingest.json.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True,
                               parser_class=type(p))
    for name, build in (("brats", _brats), ("vindr", _vindr), ("siim", _siim), ("folder", _folder)):
        fp = formats.add_parser(name, help=FORMATS[name], description=FORMATS[name])
        _common(fp)
        fp.set_defaults(func=run, make_source=build(fp))


def run(args: argparse.Namespace) -> int:
    from xal_engine.ingest import IngestConfig, ingest, summary
    from xal_engine.store.files import dumps_json

    config = IngestConfig(workers=args.workers, test_fraction=args.test_fraction,
                          val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite,
                          resume=args.resume, chunk_size=args.chunk_size)
    report = ingest(args.make_source(args), args.out, config)  # a path or an object-store URL
    print(dumps_json(report, indent=1) if args.json else summary(report))
    return 0
