"""`xal-engine ingest {brats,vindr,siim,folder} SRC --out POOL`: a dataset on disk -> a pool."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = {
    "brats": "BraTS case folders (2020/2021 and 2023 layouts) -> tumour slices, 3 classes by "
             "dominant sub-region (edema, necrotic_core, enhancing); --volumes: whole cases as GRID^3 "
             "volumes, class by dominant sub-region or grade (LGG/HGG)",
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
    from xal_engine.ingest.brats import BratsSettings
    from xal_engine.ingest.brats_volumes import DEFAULT_GRID

    d = BratsSettings()
    # --size, --min-tumour-voxels, --normalise and --roi default to None so that a 2-D-only flag given
    # with --volumes is refused rather than ignored; the 2-D defaults are applied in _brats_source.
    size = next(a for a in p._actions if a.dest == "size")
    size.help = f"2-D: output slices are SIZE x SIZE (default: {size.default}); volumes use --grid"
    p.set_defaults(size=None, slice_size=size.default)
    p.add_argument("--min-tumour-voxels", type=int, default=None,
                   help="2-D: keep axial slices with at least this many tumour voxels "
                        f"(default: {d.min_tumour_voxels})")
    p.add_argument("--normalise", choices=("slice", "volume"), default=None,
                   help="min-max each channel per slice or per volume (default: slice; --volumes: "
                        "always per volume, over the brain)")
    p.add_argument("--roi", choices=("dominant", "whole-tumour"), default=None,
                   help=f"ROI = mask of the dominant label or of the whole tumour (default: {d.roi}; "
                        "whole-tumour with --volumes)")
    p.add_argument("--dtype", choices=("uint8", "float16"), default=d.dtype, help="(default: %(default)s)")
    v = p.add_argument_group("volumes", "whole cases instead of slices: T1ce/FLAIR/T2 cropped to the brain's "
                                        "bounding box, padded to a cube, resampled to GRID^3, one class a case")
    v.add_argument("--volumes", action="store_true", help="write one (3, GRID, GRID, GRID) volume per case")
    v.add_argument("--grid", type=int, default=None, help=f"volumes are GRID^3 voxels (default: {DEFAULT_GRID})")
    v.add_argument("--class-by", choices=("dominant", "grade"), default=None,
                   help="class of a volume: sub-region with most voxels (edema, necrotic_core, enhancing) or "
                        "the BraTS 2020 grade (LGG, HGG) from name_mapping.csv (default: dominant)")
    v.add_argument("--name-mapping", default=None,
                   help="with --class-by grade: BraTS 2020's name_mapping.csv (default: found under SRC)")
    return _brats_source


def _brats_source(a: argparse.Namespace) -> Any:
    """BratsSource (slices) or, with --volumes, BratsVolumeSource; flags of the other mode refused."""
    from xal_engine.errors import XalError
    from xal_engine.ingest.brats import BratsSettings, BratsSource

    def given(*dests: str) -> list[str]:
        return [f"--{n.replace('_', '-')}" for n in dests if getattr(a, n) is not None]

    if not a.volumes:
        if given("grid", "class_by", "name_mapping"):
            raise XalError(f"{', '.join(given('grid', 'class_by', 'name_mapping'))}: only with --volumes")
        d = BratsSettings()
        return BratsSource(Path(a.src), a.slice_size if a.size is None else a.size, BratsSettings(
            d.min_tumour_voxels if a.min_tumour_voxels is None else a.min_tumour_voxels,
            a.normalise == "volume", a.roi or d.roi, a.dtype))
    from xal_engine.ingest.brats_volumes import DEFAULT_GRID, BratsVolumeSettings, BratsVolumeSource

    if given("size", "min_tumour_voxels") or a.normalise == "slice":
        flags = given("size", "min_tumour_voxels") + (["--normalise slice"] if a.normalise == "slice" else [])
        raise XalError(f"{', '.join(flags)}: 2-D only, not with --volumes (volumes are --grid^3, whole cases, "
                       "normalised per volume)")
    dv = BratsVolumeSettings()
    return BratsVolumeSource(Path(a.src), DEFAULT_GRID if a.grid is None else a.grid, BratsVolumeSettings(
        a.class_by or dv.class_by, a.roi or dv.roi, a.dtype, _path(a.name_mapping)))


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
