"""`xal-engine pretrain`: learn a backbone without published weights: from the pool's own unlabelled
images (rotation), or from a separate labelled source pool of other lesion types (supervised)."""

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
        help="pretrain a backbone (rotation on a pool's images, or supervised on a source pool) for "
             "train/loop --pretrained",
        description=(
            "For a modality without published weights. --method rotation: the network learns from the "
            "pool's train-split images, labelled or not, by a pretext task (predict which of 0/90/180/270 "
            "degrees an image was turned by); the epoch with the best rotation accuracy on the validation "
            "split is kept. --method supervised: a classifier is trained on a separate, labelled SOURCE "
            "pool of other lesion types (its train split; the epoch with the best validation balanced "
            "accuracy is kept), optionally with the explanation loss on its images with an ROI; the "
            "stand-in for ImageNet weights. The test split is never read. Writes OUT atomically: the trunk "
            "without the head, which `train --pretrained OUT` and `loop --pretrained OUT` load for the "
            "same --arch with a fresh head for the target pool's classes."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group, a path or an s3:// URL) to learn from; "
                                                   "--method supervised: the labelled source pool")
    p.add_argument("--out", required=True, help="backbone file to write (its folder must exist)")
    p.add_argument("--arch", default=d.arch, help=f"{', '.join(ARCHS)} (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method, help="rotation (self-supervised) or supervised (on a labelled source pool) "
                                                              "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step (rotation: each shown at all four rotations) (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="loader processes decoding Zarr chunks (default: %(default)s)")
    p.add_argument("--explanation-loss", type=float, default=None, metavar="W",
                   help="--method supervised: add W·(1 - soft Dice(Grad-CAM, ROI)) on source images with an "
                        "ROI (default: 0, off)")
    p.add_argument("--target-layer", metavar="NAME", default=None,
                   help="--method supervised: the Grad-CAM layer of the explanation loss (default: the deepest "
                        "stage of --arch whose map is at least 7x7)")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.errors import XalError
    from xal_engine.jobs.pretrain import PretrainConfig, pretrain
    from xal_engine.store import Pool
    from xal_engine.store.files import dumps_json

    if args.method != "supervised":  # one line for a flag of the other method
        for flag, value in (("--explanation-loss", args.explanation_loss), ("--target-layer", args.target_layer)):
            if value is not None:
                raise XalError(f"{flag} applies only to --method supervised, not {args.method}")
    config = PretrainConfig(arch=args.arch, method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, device=args.device, num_workers=args.num_workers,
                            threads=threads(args, args.num_workers),
                            explanation_weight=args.explanation_loss or 0.0, target_layer=args.target_layer)
    result = pretrain(Pool.open(args.pool), args.out, config, show_progress=show_progress(args))
    print(dumps_json(asdict(result)) if args.json else result.line())
    return 0
