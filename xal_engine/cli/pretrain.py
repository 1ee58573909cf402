"""`xal-engine pretrain`: learn a backbone from the pool's own unlabelled images (no published weights needed)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from xal_engine.cli.runtime_flags import add_runtime_flags, show_progress, threads
from xal_engine.core.models import ARCHS


def register(sub: argparse._SubParsersAction) -> None:
    from xal_engine.jobs.pretrain import METHODS, PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining on a pool's images; writes a backbone for train/loop --pretrained",
        description=(
            "For a modality without published weights: the network learns from the pool's train-split "
            "images, labelled or not, by a pretext task (rotation: predict which of 0/90/180/270 degrees "
            "an image was turned by). The epoch with the best rotation accuracy on the validation split is "
            "kept; the test split is never read. Writes OUT atomically: the trunk without the pretext head, "
            "which `train --pretrained OUT` and `loop --pretrained OUT` load for the same --arch."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group, a path or an s3:// URL) to learn from")
    p.add_argument("--out", required=True, help="backbone file to write (its folder must exist)")
    p.add_argument("--arch", default=d.arch, help=f"{', '.join(ARCHS)} (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method, help="pretext task (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step, each shown at all four rotations (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="loader processes decoding Zarr chunks (default: %(default)s)")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.jobs.pretrain import PretrainConfig, pretrain
    from xal_engine.store import Pool
    from xal_engine.store.files import dumps_json

    config = PretrainConfig(arch=args.arch, method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, device=args.device, num_workers=args.num_workers,
                            threads=threads(args, args.num_workers))
    result = pretrain(Pool.open(args.pool), args.out, config, show_progress=show_progress(args))
    print(dumps_json(asdict(result)) if args.json else result.line())
    return 0
