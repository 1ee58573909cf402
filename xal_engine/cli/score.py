"""`xal-engine score`: score every image of a pool (uncertainty + Grad-CAM agreement with the ROI)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from xal_engine.cli.runtime_flags import add_runtime_flags, show_progress, threads
from xal_engine.core.cam_methods import CAM_METHOD_NAMES, cam_method_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a pool: uncertainty and Grad-CAM/ROI agreement per image",
        description=(
            "One streaming pass over the pool: forward, backward down to the Grad-CAM layer, fused "
            "Grad-CAM -> Dice kernel. Results go to POOL/scores/RUN/. Resumable: rerunning the same "
            "command after an interruption computes only the work units not yet done."
        ),
    )
    p.add_argument("--pool", required=True, help="pool (Zarr v3 group) to score: a path or an s3:// URL")
    p.add_argument("--model", required=True, help="checkpoint written by `xal-engine train`")
    p.add_argument("--run", default="default", help="name of the score run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="CAM threshold tau for the hard Dice (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="model precision under autocast (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="loader processes decoding Zarr chunks; 0: a read-ahead thread of this process "
                        "(default: 0 on 2 cores or fewer, else half the cores, at most 8)")
    p.add_argument("--unit-size", type=int, default=None, metavar="N",
                   help="images per work unit of a new run, rounded up to whole pool chunks: the grain of "
                        "writes, resume, shards and Ray calls (default: 4096; an existing run keeps its own)")
    p.add_argument("--targets", choices=("pred", "label"), default="pred",
                   help="Grad-CAM target class: predicted, or the known label (default: %(default)s)")
    p.add_argument("--shard-id", type=int, default=0, help="this process's shard (default: 0)")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the run's work units between this many processes (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of this name made with another model or config")
    p.add_argument("--kernel", choices=("auto", "triton", "torch"), default="auto",
                   help="Grad-CAM -> Dice implementation: the fused Triton kernel (CUDA), the pure-torch "
                        "reference, or auto: the kernel on CUDA, the reference elsewhere (default: %(default)s)")
    p.add_argument("--save-cams", action="store_true",
                   help="also store each image's low-resolution Grad-CAM (fp16) as RUN/cam, for "
                        "`select --overlays`")
    p.add_argument("--embeddings", action="store_true",
                   help="also store each image's pooled penultimate features (the classifier's input, fp16) "
                        "as RUN/embedding, from the same forward pass")
    mc = p.add_argument_group("MC dropout (T stochastic passes of the classifier head over the trunk's "
                              "features, computed once)")
    mc.add_argument("--mc-samples", type=int, default=0, metavar="T",
                    help="store bald, mc_entropy and variation_ratio from T >= 2 passes (default: 0, off)")
    mc.add_argument("--mc-dropout", type=float, default=None, metavar="P",
                    help="dropout probability of the passes, in (0, 1) (default: the checkpoint's "
                         "head_dropout, from `train --head-dropout`)")
    mc.add_argument("--mc-seed", type=int, default=0,
                    help="seed of the dropout masks; with each image's pool index it fixes them, so shards "
                         "and resumed runs equal one run (default: %(default)s)")
    p.add_argument("--cam-method", default="gradcam", choices=CAM_METHOD_NAMES,
                   help=f"the CAM that Dice, soft Dice, energy and the pointing game measure: {cam_method_help()}; "
                        "a run with another method is another run (default: %(default)s)")
    p.add_argument("--target-layer", metavar="NAME", default=None,
                   help="Grad-CAM layer (dotted module name, e.g. layer2) in place of the one stored in the "
                        "checkpoint; a run with another layer is another run (default: the checkpoint's)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this process; ray: actors on a Ray cluster (default: %(default)s)")
    ray = p.add_argument_group("--backend ray")
    ray.add_argument("--address", default=None,
                     help="running Ray cluster (HOST:6379, auto, ray://...); default: a local instance")
    ray.add_argument("--workers", type=int, default=2, help="scoring actors (default: %(default)s)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=None,
                     help="GPUs per actor (default: 1 on a cluster with GPUs unless --device cpu, else 0)")
    ray.add_argument("--num-cpus-per-worker", type=float, default=1.0,
                     help="CPUs per actor (default: %(default)s)")
    ray.add_argument("--units-per-call", type=int, default=1,
                     help="work units per actor call (default: %(default)s)")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xal_engine.jobs.runtime import default_loader_workers
    from xal_engine.jobs.score import ScoreConfig, score_pool
    from xal_engine.store.files import dumps_json

    workers = default_loader_workers() if args.num_workers is None else args.num_workers
    config = ScoreConfig(
        run=args.run, batch_size=args.batch_size, device=args.device, threshold=args.threshold,
        precision=args.precision, num_workers=workers, shard_id=args.shard_id,
        num_shards=args.num_shards, targets=args.targets, overwrite=args.overwrite, kernel=args.kernel,
        save_cams=args.save_cams, target_layer=args.target_layer, threads=threads(args, workers),
        embeddings=args.embeddings, mc_samples=args.mc_samples, mc_dropout=args.mc_dropout, mc_seed=args.mc_seed,
        unit_size=args.unit_size, cam_method=args.cam_method,
    )
    if args.backend == "ray":
        from xal_engine.jobs.score_ray import RayConfig, score_pool_ray

        ray_config = RayConfig(
            address=args.address, workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
            num_cpus_per_worker=args.num_cpus_per_worker, units_per_call=args.units_per_call,
        )
        summary = score_pool_ray(args.pool, args.model, config, ray_config, show_progress=show_progress(args))
    else:
        summary = score_pool(args.pool, args.model, config, show_progress=show_progress(args))
    print(dumps_json(asdict(summary)) if args.json else summary.line())
    return 0
