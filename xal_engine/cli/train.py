"""`xal-engine train`: train a classifier on a pool and write one checkpoint file."""

from __future__ import annotations

import argparse
from pathlib import Path

from xal_engine.cli.runtime_flags import add_runtime_flags, show_progress, threads
from xal_engine.core.models import ARCHS
from xal_engine.progress import plural
from xal_engine.store.files import dumps_json


def register(sub: argparse._SubParsersAction) -> None:
    from xal_engine.jobs.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a classifier on a pool's train split and write a checkpoint",
        description=(
            "Supervised training on split 0 images with a known label (or only those an AL experiment "
            "labelled); the epoch with the best validation balanced accuracy is kept. The test split "
            "is never read. Writes OUT atomically."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group) to train on")
    p.add_argument("--arch", default=d.arch, help=f"{', '.join(ARCHS)} (default: %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint file to write (its folder must exist)")
    p.add_argument("--target-layer", metavar="NAME", default=None,
                   help="Grad-CAM layer stored in the checkpoint (dotted module name, e.g. layer3; default: "
                        "the deepest stage of --arch whose map at the pool's image size is at least 7x7)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--labelled-only", metavar="EXPERIMENT", default=None,
                   help="train only on images labelled by this AL experiment (al/EXPERIMENT/labelled_round)")
    p.add_argument("--pretrained", metavar="PATH", default=None,
                   help="a backbone from `xal-engine pretrain` (same --arch and channels), a torchvision state "
                        "dict of the 3-channel ImageNet model, or 'imagenet' for the published weights "
                        "(torch.hub cache or download)")
    p.add_argument("--normalize", choices=("none", "imagenet"), default="none",
                   help="input normalisation after scaling to [0, 1]; 'imagenet' suits ImageNet "
                        "weights (default: %(default)s)")
    p.add_argument("--head-dropout", type=float, default=d.head_dropout, metavar="P",
                   help="dropout probability on the classifier's input, in [0, 1), recorded in the checkpoint "
                        "(for `score --mc-samples`); archs without dropout there get one (default: none; "
                        "efficientnet_b0 keeps its own 0.2)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="loader processes decoding Zarr chunks (default: %(default)s)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA too")
    p.add_argument("--no-class-weighting", action="store_true",
                   help="plain cross entropy instead of inverse-frequency class weights")
    p.add_argument("--no-augment", action="store_true", help="no random flips or shifts")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.core.inputs import imagenet_normalization
    from xal_engine.core.models import parse_arch, save_checkpoint
    from xal_engine.errors import XalError
    from xal_engine.jobs.train import TrainConfig, train
    from xal_engine.store import Pool

    parse_arch(args.arch)  # before opening anything: a typo fails at once
    out = Path(args.out)
    if not out.parent.is_dir():
        raise XalError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise XalError(f"--out {out} is a directory; expected a file name such as {out / 'model.pt'}")
    pool = Pool.open(args.pool)
    mean, std = imagenet_normalization(pool.channels) if args.normalize == "imagenet" else (None, None)
    config = TrainConfig(
        arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device, amp=not args.no_amp,
        class_weighting=not args.no_class_weighting, augment=not args.no_augment,
        num_workers=args.num_workers, labelled_only=args.labelled_only, normalize_mean=mean,
        normalize_std=std, target_layer=args.target_layer, threads=threads(args, args.num_workers),
        head_dropout=args.head_dropout,
    )
    result = train(pool, config, pretrained=args.pretrained, show_progress=show_progress(args))
    save_checkpoint(out, result.model, result.checkpoint)
    m = result.metrics
    ckpt = result.checkpoint
    summary = {"out": str(out), **{k: v for k, v in m.items() if k != "history"},
               "target_layer": ckpt.target_layer, "target_map": ckpt.target_map}
    if args.json:
        print(dumps_json(summary))
    else:
        scores = (f"val bal acc {m['val_balanced_accuracy']:.3f}, val acc {m['val_accuracy']:.3f}"
                  if "val_accuracy" in m else f"train loss {m['train_loss']:.4f} (no validation split)")
        cells = "x".join(map(str, ckpt.target_map or (0, 0)))  # h x w, volumes d x h x w
        kind = "volume" if "depth" in ckpt.pool else "image"
        print(f"trained {args.arch} on {plural(m['n_train'], kind)}; epoch {m['best_epoch']} kept "
              f"({scores}); Grad-CAM layer {ckpt.target_layer} ({cells} map) -> {out}")
    return 0
