"""``xal-engine pool create|info|validate``: flags to library calls, results to stdout."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from typing import Any

from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.progress import plural
from xal_engine.store import SPLIT_NAMES, Pool
from xal_engine.store.files import dumps_json

MIB = float(1 << 20)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="create, inspect and validate pools",
                                   description="Create, inspect and validate pools (Zarr v3).")
    sub = parser.add_subparsers(dest="pool_command", metavar="SUBCOMMAND", required=True)

    create = sub.add_parser("create", help="write a new pool (synthetic phantoms or BraTS-like brain slices)",
                            description="Write a synthetic phantom pool or a semi-synthetic BraTS-like pool "
                                        "(--brain-phantom) to OUT (via OUT.partial).")
    create.add_argument("--synthetic", action="store_true", help="generate phantom images")
    create.add_argument("--brain-phantom", action="store_true",
                        help="MNI152 T1 slices with BraTS-like tumours, 3 classes x 3 channels (needs nilearn)")
    create.add_argument("--min-brain", type=float, default=0.6, metavar="MIN_BRAIN",
                        help="--brain-phantom: slices whose brain area is at least this fraction of the "
                             "largest (default 0.6)")
    create.add_argument("--out", required=True, help="pool path or URL to write (pool.zarr, s3://bucket/prefix/pool.zarr)")
    create.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out")
    defaults = SyntheticConfig()
    helps = {"n": "number of images", "size": "image side in pixels", "classes": "lesion classes",
             "channels": "image channels", "seed": "random seed (same seed: identical pool)",
             "shortcut": "fraction of train/val images with a class-coded corner marker",
             "roi_fraction": "fraction of images with an expert ROI",
             "test_fraction": "fraction of images in the test split",
             "val_fraction": "fraction of images in the validation split"}
    for f in fields(SyntheticConfig):
        value = getattr(defaults, f.name)
        create.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(value),
                            default=value, metavar=f.name.upper(),
                            help=f"{helps[f.name]} (default {value})")
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
    if not (args.synthetic or args.brain_phantom):
        raise XalError("pool create needs --synthetic or --brain-phantom (for real data use `xal-engine ingest`)")
    began = time.perf_counter()
    if args.brain_phantom:
        pool = create_brain_phantom(args)
    else:
        config = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig)})
        pool = create_synthetic_pool(config, args.out, overwrite=args.overwrite)
    seconds = time.perf_counter() - began
    info = pool.info()
    print(f"created {pool.path}: {plural(pool.n, 'image')} {pool.channels}x{pool.height}x{pool.width} "
          f"{pool.image_dtype}, {plural(len(pool.classes), 'class', 'classes')}, "
          f"{info['storage']['total']['stored_bytes'] / MIB:.2f} MiB stored "
          f"(images ratio {info['compression_ratio']:.2f}) in {seconds:.1f} s "
          f"({pool.n / max(seconds, 1e-9):.0f} img/s)")
    return 0


def create_brain_phantom(args: argparse.Namespace) -> Pool:
    from xal_engine.ingest.brain_phantom import (  # torch, nilearn
        BrainPhantomConfig,
        create_brain_phantom_pool,
    )

    defaults = SyntheticConfig()
    for name in ("classes", "channels"):
        if getattr(args, name) != getattr(defaults, name):
            raise XalError(f"--{name} does not apply to --brain-phantom (3 classes, 3 channels T1ce/FLAIR/T2)")
    shared = {f.name: getattr(args, f.name) for f in fields(BrainPhantomConfig) if f.name != "min_brain"}
    config = BrainPhantomConfig(**shared, min_brain=args.min_brain)
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
    c, h, w = info["shape"]
    classes = info["classes"]
    lines = [(f"{info['path']}  (pool format v{info['format_version']}, source {info['source'] or '-'}, "
              f"modality {info['modality'] or '-'})"),
             f"images: {info['n']} x {c}x{h}x{w} {info['dtype']}",
             f"classes: {', '.join(classes)}", ""]
    rows = [["split", "images", "labelled", "has_roi", *classes, "unknown"]]
    for name in SPLIT_NAMES:
        s = info["splits"][name]
        rows.append([name, str(s["n"]), str(s["labelled"]), str(s["has_roi"]),
                     *(str(s["per_class"][k]) for k in classes), str(s["unknown"])])
    lines += _table(rows)
    roi = info["roi_coverage"]
    chunking, storage = info["chunking"], info["storage"]
    images, total = storage["images"], storage["total"]
    lines += ["",
              f"ROI coverage: {roi['has_roi']}/{info['n']} images ({100 * roi['fraction']:.1f}%)",
              (f"chunking: {chunking['images_per_chunk']} images per chunk, {chunking['chunks']} "
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
