"""``xal-engine pool create|info|validate``: flags to library calls, results to stdout."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from typing import Any

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.ingest.volume_phantom import CLASSES as VOLUME_CLASSES
from xal_engine.ingest.volume_phantom import VolumePhantomConfig, create_volume_phantom_pool
from xal_engine.progress import plural
from xal_engine.store import SPLIT_NAMES, Pool
from xal_engine.store.files import dumps_json

MIB = float(1 << 20)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="create, inspect and validate pools",
                                   description="Create, inspect and validate pools (Zarr v3).")
    sub = parser.add_subparsers(dest="pool_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser("create", help="write a new pool (synthetic phantoms or BraTS-like brain slices)",
                            description="Write a synthetic phantom pool (images, or volumes with --volumes) or a "
                                        "semi-synthetic BraTS-like pool (--brain-phantom) to OUT (via OUT.partial).")
    create.add_argument("--synthetic", action="store_true", help="generate phantom images")
    create.add_argument("--volumes", action="store_true",
                        help="with --synthetic: 3-D phantom volumes C x DEPTH x SIZE x SIZE (pool format "
                             "v2), 2 classes: a solid sphere or a ring-enhancing elongated ellipsoid, ROI = "
                             "the lesion's voxels; --classes and --shortcut do not apply")
    volume = VolumePhantomConfig()
    create.add_argument("--depth", type=int, default=None, metavar="DEPTH",
                        help=f"--volumes: slices per volume (default {volume.depth})")
    create.add_argument("--lesion-radius", type=float, default=None, metavar="LESION_RADIUS",
                        help="--volumes: the lesion's equivalent-sphere radius as a fraction of min(DEPTH, "
                             "SIZE), x0.8-1.2 per volume; both classes have that volume (default "
                             f"{volume.lesion_radius})")
    create.add_argument("--brain-phantom", action="store_true",
                        help="MNI152 T1 slices with BraTS-like tumours, 3 classes x 3 channels (needs nilearn)")
    create.add_argument("--min-brain", type=float, default=None, metavar="MIN_BRAIN",
                        help="--brain-phantom: slices whose brain area is at least this fraction of the "
                             "largest (default 0.6)")
    create.add_argument("--out", required=True, help="pool path or URL to write (pool.zarr, s3://bucket/prefix/pool.zarr)")
    create.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out")
    defaults = SyntheticConfig()
    helps = {"n": "number of images", "size": "image side in pixels", "classes": "lesion classes",
             "first_class": "first phantom appearance class: pool class j looks like class FIRST_CLASS + j "
                            "(3: the dark round/rim_ellipse/stippled family, a disjoint source pool)",
             "channels": "image channels", "seed": "random seed (same seed: identical pool)",
             "shortcut": "fraction of train/val images with a class-coded corner marker",
             "roi_fraction": "fraction of images with an expert ROI",
             "test_fraction": "fraction of images in the test split",
             "val_fraction": "fraction of images in the validation split"}
    for f in fields(SyntheticConfig):  # default None: run_create fills in the chosen generator's default
        value = getattr(defaults, f.name)
        other = getattr(volume, f.name, value)
        differs = f"; --volumes: {other}" if other != value else ""
        create.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(value),
                            default=None, metavar=f.name.upper(),
                            help=f"{helps[f.name]} (default {value}{differs})")
    create.set_defaults(func=run_create)

    for name, func, text in (("info", run_info, "summarise a pool"),
                             ("validate", run_validate, "decode every chunk and check every value")):
        command = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("pool", metavar="POOL", help="pool path or URL (s3://bucket/prefix/pool.zarr)")
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=func)


def run_create(args: argparse.Namespace) -> int:
    if args.synthetic and args.brain_phantom:
        raise XalError("pool create takes --synthetic or --brain-phantom, not both")
    check_create_flags(args)
    if not (args.synthetic or args.brain_phantom):
        raise XalError("pool create needs --synthetic or --brain-phantom (for real data use `xal-engine ingest`)")
    began = time.perf_counter()
    if args.volumes:
        pool = create_volume_phantom(args)
    elif args.brain_phantom:
        fill_defaults(args, SyntheticConfig())
        pool = create_brain_phantom(args)
    else:
        config = SyntheticConfig(**fill_defaults(args, SyntheticConfig()))
        pool = create_synthetic_pool(config, args.out, overwrite=args.overwrite)
    seconds = time.perf_counter() - began
    info = pool.info()
    print(f"created {pool.path}: {plural(pool.n, pool.kind)} {'x'.join(map(str, (pool.channels, *pool.spatial)))} "
          f"{pool.image_dtype}, {plural(len(pool.classes), 'class', 'classes')}, "
          f"{info['storage']['total']['stored_bytes'] / MIB:.2f} MiB stored "
          f"(images ratio {info['compression_ratio']:.2f}) in {seconds:.1f} s "
          f"({pool.n / max(seconds, 1e-9):.0f} {pool.kind}s/s)")
    return 0


def check_create_flags(args: argparse.Namespace) -> None:
    """One line for a flag that does not apply to the chosen generator (flags left out are None)."""
    if args.volumes:
        if not args.synthetic:
            raise XalError("--volumes needs --synthetic (pool create --synthetic --volumes)")
        for name in ("classes", "shortcut", "min_brain", "first_class"):
            if getattr(args, name) is not None:
                raise XalError(f"--{name.replace('_', '-')} does not apply to --volumes (2 classes: "
                               f"{', '.join(VOLUME_CLASSES)}; no shortcut marker)")
        return
    for name in ("depth", "lesion_radius"):
        if getattr(args, name) is not None:
            raise XalError(f"--{name.replace('_', '-')} applies only to --synthetic --volumes")


def fill_defaults(args: argparse.Namespace, defaults: Any) -> dict[str, Any]:
    """Set each of ``defaults``' fields left out on the command line to its default; returns the fields."""
    values = {}
    for f in fields(defaults):
        given = getattr(args, f.name, None)
        values[f.name] = getattr(defaults, f.name) if given is None else given
        setattr(args, f.name, values[f.name])
    return values


def create_volume_phantom(args: argparse.Namespace) -> Pool:
    config = VolumePhantomConfig(**fill_defaults(args, VolumePhantomConfig()))
    return create_volume_phantom_pool(config, args.out, overwrite=args.overwrite)


def create_brain_phantom(args: argparse.Namespace) -> Pool:
    from xal_engine.ingest.brain_phantom import (  # torch, nilearn
        BrainPhantomConfig,
        create_brain_phantom_pool,
    )

    defaults = SyntheticConfig()
    for name in ("classes", "channels", "first_class"):
        if getattr(args, name) != getattr(defaults, name):
            raise XalError(f"--{name.replace('_', '-')} does not apply to --brain-phantom (3 classes, 3 channels T1ce/FLAIR/T2)")
    config = BrainPhantomConfig(**fill_defaults(args, BrainPhantomConfig()))
    return create_brain_phantom_pool(config, args.out, overwrite=args.overwrite)


def run_info(args: argparse.Namespace) -> int:
    info = Pool.open(args.pool).info()
    print(dumps_json(info, indent=2) if args.json else format_info(info))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    pool = Pool.open(args.pool)
    problems = pool.validate()
    if args.json:
        print(dumps_json({"path": str(pool.path), "valid": not problems, "problems": problems}, indent=2))
    elif problems:
        print("\n".join(f"  - {p}" for p in problems))
        print(f"{pool.path}: INVALID, {plural(len(problems), 'problem')}")
    else:
        print(f"{pool.path}: valid ({plural(pool.n, 'image')}, {plural(pool.n_chunks, 'chunk')} decoded and "
              "checked)")
    return 1 if problems else 0


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))) for row in rows]


def format_info(info: dict[str, Any]) -> str:
    """The human-readable ``pool info``: one table of counts per split and class, then storage."""
    kind = f"{info['kind']}s"  # images or volumes
    classes = info["classes"]
    lines = [(f"{info['path']}  (pool format v{info['format_version']}, source {info['source'] or '-'}, "
              f"modality {info['modality'] or '-'})"),
             f"{kind}: {info['n']} x {'x'.join(map(str, info['shape']))} {info['dtype']}",
             f"classes: {', '.join(classes)}", ""]
    rows = [["split", kind, "labelled", "has_roi", *classes, "unknown"]]
    for name in SPLIT_NAMES:
        s = info["splits"][name]
        rows.append([name, str(s["n"]), str(s["labelled"]), str(s["has_roi"]),
                     *(str(s["per_class"][k]) for k in classes), str(s["unknown"])])
    lines += _table(rows)
    roi = info["roi_coverage"]
    chunking, storage = info["chunking"], info["storage"]
    images, total = storage["images"], storage["total"]
    lines += ["",
              f"ROI coverage: {roi['has_roi']}/{info['n']} {kind} ({100 * roi['fraction']:.1f}%)",
              (f"chunking: {chunking['images_per_chunk']} {kind} per chunk, {chunking['chunks']} "
               f"chunk(s), {chunking['chunk_bytes'] / MIB:.2f} MiB raw per image chunk"),
              (f"storage: images {images['stored_bytes'] / MIB:.2f} MiB stored / "
               f"{images['raw_bytes'] / MIB:.2f} MiB raw (ratio {_ratio(images['ratio'])}); all arrays "
               f"{total['stored_bytes'] / MIB:.2f} MiB (ratio {_ratio(total['ratio'])})"),
              f"score runs: {', '.join(info['score_runs']) or '(none)'}",
              f"AL experiments: {', '.join(info['al_experiments']) or '(none)'}"]
    if info["other_members"]:
        lines.append(f"other members: {', '.join(info['other_members'])}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
