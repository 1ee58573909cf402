"""`xal-engine loop`: simulated active-learning rounds (labels revealed from the pool) into a run folder."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from xal_engine.cli.runtime_flags import add_runtime_flags, show_progress, threads
from xal_engine.core.acquisition import BALANCES, STRATEGIES
from xal_engine.core.cam_methods import CAM_METHOD_NAMES, cam_method_help
from xal_engine.core.strategies import strategy_help
from xal_engine.progress import plural
from xal_engine.store.files import dumps_json

if TYPE_CHECKING:
    from xal_engine.jobs.loop import LoopConfig


def register(sub: argparse._SubParsersAction) -> None:
    from xal_engine.jobs.loop import LoopConfig

    d = LoopConfig()
    t = d.train
    p = sub.add_parser(
        "loop",
        help="simulate active-learning rounds: train, score, evaluate, select, reveal labels",
        description=(
            "For every seed and strategy: label an initial train-split set (drawn by the seed, "
            "stratified by true label, the same for every strategy), then each round train "
            "(model selection on the validation split), score the pool, evaluate on the test split "
            "and select the next batch. Writes RUN_DIR/config.json, metrics.csv/json and per round "
            "<strategy>/seed<k>/round<r>/{model.pt,selected.csv}. Rerunning resumes after the last "
            "complete round."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group) with labels for every train image")
    p.add_argument("--arch", default=t.arch, help="backbone (default: %(default)s)")
    p.add_argument("--strategy", action="append", choices=STRATEGIES, required=True,
                   help=f"acquisition strategy; repeat for several. {strategy_help()}")
    p.add_argument("--initial", type=int, required=True, help="images labelled in round 0")
    p.add_argument("--initial-strategy", choices=("stratified", "typiclust"), default=d.initial_strategy,
                   help="round 0: stratified (random within each true class, the default) or typiclust "
                        "(label-free: the most typical image of each of --initial k-means clusters of the "
                        "embeddings by --initial-model)")
    p.add_argument("--initial-model", default=None, metavar="CKPT",
                   help="typiclust: checkpoint whose pooled features embed the pool (any model, e.g. one "
                        "pretrained on other data; trained on nothing of this pool's labels)")
    p.add_argument("--pretrained", metavar="PATH", default=None,
                   help="every round's model starts from these weights: a backbone from `xal-engine pretrain` "
                        "(same --arch), a torchvision ImageNet state dict, or 'imagenet' (default: random init)")
    p.add_argument("--per-round", type=int, required=True, help="images selected per round")
    p.add_argument("--rounds", type=int, required=True, help="selection rounds after round 0")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds 0..K-1 (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created or resumed)")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam,
                   help="dual: weight of entropy (default: %(default)s)")
    p.add_argument("--dice", choices=("hard", "soft"), default=d.dice, help="(default: %(default)s)")
    p.add_argument("--balance", choices=BALANCES, default=d.balance,
                   help="class balance of a batch: predicted class (default), none, or oracle (TRUE "
                        "labels, as the paper's code; leaks labels)")
    p.add_argument("--retrain", choices=("scratch", "finetune"), default=d.retrain,
                   help="fresh weights each round, or continue from the previous round (default: %(default)s)")
    p.add_argument("--explanation-loss", type=float, default=0.0, metavar="W",
                   help="add W * (1 - soft Dice(CAM, ROI)) on labelled images with an ROI (default: 0)")
    p.add_argument("--cam-method", choices=CAM_METHOD_NAMES, default=d.cam_method,
                   help="CAM method of every round's scoring (the Dice the acquisition reads) and of the "
                        f"explanation loss: {cam_method_help()} (default: %(default)s)")
    p.add_argument("--target-layer", default=None,
                   help="Grad-CAM layer (dotted module name; default: the deepest stage of the "
                        "architecture whose map at the pool's image size is at least 7x7)")
    p.add_argument("--head-dropout", type=float, default=None, metavar="P",
                   help="train every round's model with dropout P before the classifier (bald's MC passes "
                        "use it)")
    p.add_argument("--mc-samples", type=int, default=d.mc_samples,
                   help="MC-dropout passes of the head for bald (default: %(default)s)")
    p.add_argument("--mc-dropout", type=float, default=None, metavar="P",
                   help="dropout P of bald's MC passes (default: the model's --head-dropout)")
    p.add_argument("--epochs", type=int, default=t.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="(default: %(default)s)")
    p.add_argument("--device", default=t.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=t.num_workers,
                   help="loader processes decoding Zarr chunks (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run folder with another configuration and start afresh")
    p.add_argument("--take-over-experiments", action="store_true",
                   help="replace the labelled set of an AL experiment of the same name that `label --import` "
                        "made or wrote to (its imports' labels and masks stay undoable)")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the metrics rows as JSON")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> LoopConfig:
    from dataclasses import replace

    from xal_engine.core.models import parse_arch
    from xal_engine.jobs.loop import LoopConfig

    parse_arch(args.arch)
    d = LoopConfig()
    train_fields = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
                    "device": args.device, "num_workers": args.num_workers,
                    "target_layer": args.target_layer, "explanation_weight": args.explanation_loss,
                    "threads": threads(args, args.num_workers), "head_dropout": args.head_dropout}
    return LoopConfig(strategies=tuple(args.strategy), seeds=args.seeds, initial=args.initial,
                      per_round=args.per_round, rounds=args.rounds, lam=args.lam, dice=args.dice,
                      balance=args.balance, retrain=args.retrain, mc_samples=args.mc_samples,
                      mc_dropout=args.mc_dropout, initial_strategy=args.initial_strategy,
                      initial_model=args.initial_model, cam_method=args.cam_method, pretrained=args.pretrained,
                      train=replace(d.train, cam_method=args.cam_method, **train_fields))


def run(args: argparse.Namespace) -> int:
    from xal_engine.jobs.loop import run_loop

    config = config_from_args(args)
    rows = run_loop(args.pool, args.out, config, overwrite=args.overwrite, show_progress=show_progress(args),
                    take_over_experiments=args.take_over_experiments)
    if args.json:
        print(dumps_json(rows))
    else:
        print(f"{plural(len(rows), 'round')} recorded ({', '.join(config.strategies)}; "
              f"{plural(config.seeds, 'seed')}) -> {args.out}/metrics.csv")
    return 0
