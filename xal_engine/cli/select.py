"""`xal-engine select`: rank unlabelled train images by an acquisition strategy; write the batch."""

from __future__ import annotations

import argparse

from xal_engine.core.acquisition import BALANCES, MISSING_ROI_RULES, NORMALISATIONS, STRATEGIES
from xal_engine.core.strategies import strategy_help
from xal_engine.store.files import dumps_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="pick the next images to label from a score run",
        description=(
            "Ranks the unlabelled train images of POOL by the chosen acquisition over score run RUN "
            "and writes the top BUDGET to a CSV (plus OUT.json with the selection config). "
            "dual = lambda * entropy + (1 - lambda) * (1 - Dice). Images without an ROI follow "
            "--missing-roi: 'mean' gives them the mean misalignment of images with an ROI (they "
            "compete on uncertainty), 'last' ranks them after all images with an ROI, 'skip' drops them. "
            "--format label-studio makes OUT a new (or empty) folder holding tasks.json (Label Studio "
            "tasks with the predicted class and the thresholded Grad-CAM as pre-annotations, the score, "
            "entropy and Dice in each task's data), config.xml (the labelling config), images/ (PNGs) and "
            "the batch as batch.csv and batch.csv.json; import the annotations back with "
            "`xal-engine label --import EXPORT.json --format label-studio`."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group): a path or an s3:// URL")
    p.add_argument("--run", default="default", help="score run to rank by (default: %(default)s)")
    p.add_argument("--strategy", choices=STRATEGIES, default="dual",
                   help=f"acquisition (default: dual). {strategy_help()}")
    p.add_argument("--budget", type=int, required=True, help="number of images to select")
    p.add_argument("--lambda", dest="lam", type=float, default=0.3,
                   help="weight of uncertainty in dual (default: %(default)s)")
    p.add_argument("--dice", choices=("hard", "soft"), default="hard",
                   help="Dice used for misalignment (default: %(default)s)")
    p.add_argument("--normalise", choices=NORMALISATIONS, default="none",
                   help="rescale each term over the candidates before combining (default: none)")
    p.add_argument("--balance", choices=BALANCES, default="predicted",
                   help="class balance by predicted class (default), none, or oracle (TRUE labels, "
                        "as the paper's code; leaks labels, recorded as such)")
    p.add_argument("--missing-roi", choices=MISSING_ROI_RULES, default="mean",
                   help="rule for images without an ROI (default: mean)")
    p.add_argument("--experiment", default=None,
                   help="AL experiment whose labelled images are excluded (al/EXPERIMENT/)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random and of the sampling in badge, dual-diverse, typiclust (default: 0)")
    p.add_argument("--device", default="auto",
                   help="where batch-aware strategies compute: auto (CUDA when available), cpu, cuda[:N]")
    p.add_argument("--out", required=True,
                   help="CSV file to write (OUT.json is written beside it; a symlink's target is replaced, "
                        "a directory, device, FIFO or socket is refused)")
    p.add_argument("--format", choices=("csv", "label-studio"), default="csv",
                   help="csv: OUT is the batch CSV (default); label-studio: OUT is a folder for a Label "
                        "Studio project (tasks.json, config.xml, images/, batch.csv); Grad-CAMs are the "
                        "run's stored ones (score --save-cams), else recomputed with its model")
    p.add_argument("--image-url-prefix", default=None, metavar="URL",
                   help="with --format label-studio: task images are URL + file name (PNGs served "
                        "elsewhere) instead of the relative path images/FILE")
    p.add_argument("--overlays", default=None, metavar="DIR",
                   help="also draw the batch: DIR/contact_sheet.png and DIR/<rank>_<id>.png, Grad-CAM over "
                        "each image (stored by `score --save-cams`, else recomputed with the run's model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.core.acquisition import SelectConfig
    from xal_engine.errors import XalError
    from xal_engine.jobs.batch_sheet import check_overlays, write_overlays
    from xal_engine.jobs.label_studio_export import check_export, write_label_studio
    from xal_engine.jobs.select import check_out, select_batch, write_batch

    config = SelectConfig(strategy=args.strategy, budget=args.budget, lam=args.lam, dice=args.dice,
                          normalise=args.normalise, balance=args.balance,
                          missing_roi=args.missing_roi, seed=args.seed, device=args.device)
    studio = args.format == "label-studio"
    if args.image_url_prefix is not None and not studio:
        raise XalError("--image-url-prefix goes with --format label-studio")
    # before the ranking, which can take a while
    tasks_source = check_export(args.pool, args.run, args.out, args.device) if studio else check_out(args.out)
    source = check_overlays(args.pool, args.run, args.overlays) if args.overlays else None  # before writing
    selection = select_batch(args.pool, args.run, config, experiment=args.experiment)
    studio_files = None
    if studio:
        studio_files = write_label_studio(args.pool, selection, tasks_source, args.out, args.image_url_prefix)
        csv_path = studio_files.csv
        sidecar = csv_path.with_name(csv_path.name + ".json")
    else:
        csv_path, sidecar = write_batch(selection, args.out, args.pool)
    overlays = write_overlays(args.pool, selection, source, args.overlays) if source is not None else None
    summary = {"selected": len(selection.rows), "candidates": selection.n_candidates, "budget": config.budget,
               "strategy": config.strategy, "balance": config.balance, "out": str(csv_path),
               "config": str(sidecar)}
    if studio_files is not None:
        summary |= {"format": "label-studio", "tasks": str(studio_files.tasks), "tasks_cams": studio_files.cams,
                    "tasks_with_roi": studio_files.n_rois}
    if overlays is not None:
        summary |= {"overlays": str(overlays.sheet.parent), "overlay_cams": overlays.cams}
    print(dumps_json(summary) if args.json else selection.line(csv_path))
    if studio_files is not None and not args.json:
        print(studio_files.line())
    if overlays is not None and not args.json:
        print(overlays.line())
    return 0
