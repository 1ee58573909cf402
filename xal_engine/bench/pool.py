"""Pool-level benchmark: `xal-engine score` vs plain inference vs a pytorch-grad-cam pipeline vs the loader.

    python -m xal_engine.bench.pool --device cuda --precision bf16   # GPU: resnet18, 3x224x224 pools
    python -m xal_engine.bench.pool --quick                          # CPU: 1x64x64 pools of 256, 1024
    python -m xal_engine.bench.pool --sizes 20000,100000 --image-size 64 --channels 1 --providers loader,xal-engine

All providers read the same synthetic Zarr pool through the same chunk-aligned loader, with the same
model (random init: speed does not depend on the weights), precision and batch size:
    loader      decode only (Zarr blocks -> pinned tensors): the ceiling of any pipeline
    plain       loader + forward only (torch.no_grad): what inference alone costs
    xal-engine  score_pool: forward, backward to the target layer, fused Grad-CAM -> Dice, Zarr writes
    grad-cam    loader + pytorch_grad_cam.GradCAM (full backward, host copies, cv2) + numpy softmax/Dice
The default case is the size users run: 3x224x224 uint8 images (--quick: 1x64x64, a CPU check).

Warm-up: before its timed pass, every provider makes one untimed pass over a separate warm-up pool
of --warmup-images images (default: one batch) of the same shape, in the same process: CUDA context,
cuDNN autotuning, the Triton compile and lazy initialisation are paid there, not in the timed pass.
The timed pass is then the whole call as a user makes it (for xal-engine: score_pool, model load and
run creation included).

Precision: every provider runs at --precision (autocast), grad-cam included. pytorch-grad-cam 1.5.7
cannot run in bf16 (its .numpy() of a bf16 tensor fails): that is tried on one batch first, and then
the case has no grad-cam row and so no speedup_vs_grad_cam; a bf16 engine row is never compared
with an fp32 grad-cam time. TF32 is off for every provider (timing.no_tf32), so fp32 rows are fp32.

Each provider runs in a fresh process, so its peak RSS is its own (loader workers included); with
--rounds R every provider makes R timed passes, in rounds, and the median pass is reported. Two pool
sizes show cost linear in N and memory flat. A loader item is a run of whole work units, scored
--batch-size images at a time. Before any figure is written, the engine's stored results on the first
batch are compared with the fp32 grad-cam pipeline's (on the CPU): in fp32 Dice, soft Dice, energy,
entropy and hit within the parity tolerances; in bf16/fp16 soft Dice and energy within 0.05 where
the predicted class is unchanged. No speed is reported for a wrong answer. Rows go to
benchmarks/results/pool.csv (--out); ``sizes`` names the shape, model, batch, workers and warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from xal_engine.bench import baseline
from xal_engine.bench.compare import (
    CHECK_NONE,
    CHECK_PASS,
    CHECK_REFERENCE,
    GRAD_CAM,
    BenchError,
    add_ratios,
    check,
    near_tie_hits,
)
from xal_engine.bench.table import run_and_finish
from xal_engine.bench.timing import no_tf32, peak_rss_mb, provenance, synchronize
from xal_engine.core.inputs import resolve_device, to_unit_float
from xal_engine.core.models import Checkpoint, build_model, load_checkpoint, parse_arch, save_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, class_names, create_synthetic_pool
from xal_engine.jobs.score import score_pool, unit_loader
from xal_engine.jobs.streaming import PRECISIONS, ScoreConfig, all_items, load_scoring_model, to_device
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

LEVEL = "pool"
COLUMNS = ["benchmark", "provider", "sizes", "dtype", "n_images", "seconds", "images_per_s",
           "speedup_vs_grad_cam", "ratio_vs_plain", "check", "peak_rss_mb", "peak_gpu_mb", "device", "xal_engine", "torch", "triton",
           "date", "git_commit"]
PROVIDERS = ("loader", "plain", "xal-engine", "grad-cam")
LOW_PRECISION_TOL = 0.05  # soft Dice / energy of a bf16/fp16 run vs the fp32 reference (as the batch level)


def all_units_loader(pool_path: str, batch_size: int, workers: int, device: torch.device):
    """The scorer's loader over every unit of the pool (a throwaway run only fixes the unit size)."""
    pool = Pool.open(pool_path)
    return unit_loader(pool, all_items(pool, batch_size), with_labels=False, num_workers=workers, device=device)


def _one_pass(provider: str, pool_path: str, model_path: str, args: argparse.Namespace,
              device: torch.device, run_name: str) -> None:
    """One pass of ``provider`` over the whole pool at ``pool_path`` (synchronised at the end)."""
    autocast = PRECISIONS[args.precision]
    if provider == "xal-engine":
        score_pool(pool_path, model_path, ScoreConfig(
            run=run_name, batch_size=args.batch_size, device=str(device), precision=args.precision,
            num_workers=args.workers, overwrite=True), show_progress=False)
        synchronize(device)
        return
    # plain inference as well as it is done: the scorer's channels-last model and batch size
    model, ckpt = (load_scoring_model(Path(model_path), device) if provider == "plain"
                   else load_checkpoint(model_path, device=device))
    loader = all_units_loader(pool_path, args.batch_size, args.workers, device)
    cam = grad_cam_of(model, ckpt.target_layer) if provider == GRAD_CAM else None
    for item in to_device(loader, device):
        if provider == "loader":
            continue
        for a in range(0, item["images"].shape[0], args.batch_size):  # an item is whole chunks
            x = to_unit_float(item["images"][a:a + args.batch_size])
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if provider == "plain":
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.no_grad():
                        probs = model(x).float().softmax(1)
                        probs.argmax(1).cpu()  # the one host copy a real pipeline makes
                else:
                    baseline.pipeline(cam, x, item["rois"][a:a + args.batch_size].cpu().numpy())
    synchronize(device)


def grad_cam_of(model: torch.nn.Module, target_layer: str):
    """pytorch_grad_cam.GradCAM of ``model`` at its dotted ``target_layer``."""
    from pytorch_grad_cam import GradCAM

    from xal_engine.core.models import resolve_layer

    return GradCAM(model=model, target_layers=[resolve_layer(model, target_layer)])


def run_provider(provider: str, pool_path: str, model_path: str, args: argparse.Namespace,
                 warmup_path: str | None = None) -> dict:
    """One timed pass of ``provider`` over the whole pool (in a fresh process unless --in-process),
    after one untimed pass over ``warmup_path`` (when given); TF32 off throughout."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    n = Pool.open(pool_path).n
    with no_tf32():
        if warmup_path is not None:
            _one_pass(provider, warmup_path, model_path, args, device, "bench-warmup")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        _one_pass(provider, pool_path, model_path, args, device, "bench")
        seconds = time.perf_counter() - t0
    return {"provider": provider, "seconds": seconds, "n_images": n,
            "peak_rss_mb": peak_rss_mb() + peak_rss_mb(children=True),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}


def grad_cam_unsupported(pool_path: str, model_path: str, args: argparse.Namespace) -> str | None:
    """Why pytorch-grad-cam cannot run at --precision (tried once on a few images, on the benchmark
    device), or None when it can (fp32 always can)."""
    autocast = PRECISIONS[args.precision]
    if autocast is None:
        return None
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(model_path, device=device)
    batch = Pool.open(pool_path).read(0, min(2, Pool.open(pool_path).n))
    x = to_unit_float(torch.from_numpy(batch.images)).to(device)
    try:
        with torch.autocast(device.type, dtype=autocast):
            baseline.pipeline(grad_cam_of(model, ckpt.target_layer), x, batch.rois)
    except (TypeError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        return (f"not supported by pytorch-grad-cam {version('grad-cam')} in {args.precision} "
                f"({type(err).__name__}: {reason})")
    return None


def check_agreement(pool_path: str, model_path: str, args: argparse.Namespace,
                    images: int | None = None) -> dict[str, float]:
    """Max errors of the engine's stored run vs the fp32 grad-cam pipeline (on the CPU) on the first
    batch (or the first ``images``): fp32 parity tolerances for an fp32 run; for bf16/fp16, soft Dice
    and energy within LOW_PRECISION_TOL where the predicted class is unchanged. ParityError otherwise."""
    pool = Pool.open(pool_path)
    model, ckpt = load_checkpoint(model_path)
    batch = pool.read(0, min(pool.n, args.batch_size if images is None else images))
    x = to_unit_float(torch.from_numpy(batch.images))
    with no_tf32():
        ref = baseline.pipeline(grad_cam_of(model, ckpt.target_layer), x, batch.rois)
    stored = ScoreRun.open(pool.group, "bench").read(("dice", "soft_dice", "energy", "entropy", "hit", "pred"))
    got = {k: v[: len(x)] for k, v in stored.items()}
    nan = np.full(len(x), np.nan)
    if args.precision != "fp32":
        same = batch.has_roi & (got["pred"] == ref["logits"].argmax(1))
        keep = {k: np.where(same, ref[k], nan) for k in ("soft_dice", "energy")}
        return check(f"xal-engine {args.precision}", got, keep,
                     {"soft_dice": LOW_PRECISION_TOL, "energy": LOW_PRECISION_TOL})
    # The run has NaN ROI metrics where has_roi is False; a pixel within 1e-5 of tau may flip the Dice.
    near_tau = (np.abs(ref["maps"] - 0.5) < 1e-5).any((1, 2))
    ref = {**ref, "dice": np.where(batch.has_roi & ~near_tau, ref["dice"], nan),
           "soft_dice": np.where(batch.has_roi, ref["soft_dice"], nan),
           "energy": np.where(batch.has_roi, ref["energy"], nan)}
    got["hit"] = np.where(batch.has_roi, got["hit"], ref["hit"])
    return check("xal-engine", got, ref, {"dice": 1e-4, "soft_dice": 1e-4, "energy": 1e-4, "entropy": 1e-4},
                 near_tie_hits(ref["maps"], batch.rois))


def median_pass(passes: list[dict]) -> dict:
    """The pass with the median time (the lower middle one for an even count), and the largest peak memory."""
    middle = sorted(passes, key=lambda r: r["seconds"])[(len(passes) - 1) // 2]
    return {**middle, "peak_rss_mb": max(r["peak_rss_mb"] for r in passes),
            "peak_gpu_mb": max(r["peak_gpu_mb"] for r in passes)}


def _child(conn, provider, pool_path, model_path, args, warmup_path) -> None:
    try:
        conn.send(run_provider(provider, pool_path, model_path, args, warmup_path))
    except Exception as err:  # noqa: BLE001 - any failure is reported by the parent as one line
        conn.send({"error": f"{type(err).__name__}: {err}"})


def measure(provider: str, pool_path: str, model_path: str, args: argparse.Namespace,
            warmup_path: str | None = None) -> dict:
    """``run_provider`` in a fresh process (in this one with --in-process); BenchError if it fails."""
    if args.in_process:
        return run_provider(provider, pool_path, model_path, args, warmup_path)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, provider, pool_path, model_path, args, warmup_path))
    proc.start()
    child.close()
    while not parent.poll(1.0):  # a child that dies sends nothing: do not wait for it forever
        if not proc.is_alive():
            raise BenchError(f"provider {provider} died (exit code {proc.exitcode})")
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise BenchError(f"provider {provider} failed: {result['error']}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small pools for a CPU check: sizes 256,1024, 1x64x64 images (unless given)")
    p.add_argument("--sizes", default=None, help="pool sizes, comma-separated (default 2000,10000)")
    p.add_argument("--image-size", type=int, default=None, help="H = W (default 224, quick 64)")
    p.add_argument("--channels", type=int, default=None, help="image channels (default 3, quick 1)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="autocast precision of every provider (grad-cam included, where it can)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the scoring process (0: torch's default; 1: on a shared CPU "
                        "more threads make timings erratic)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--grad-cam-max", type=int, default=5000,
                   help="skip the (slow) grad-cam provider on pools larger than this")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed passes per provider, in rounds; the median is reported (default 1, quick 3)")
    p.add_argument("--warmup-images", type=int, default=None,
                   help="images of the warm-up pool each provider passes over, untimed, before its timed "
                        "pass (default: --batch-size; 0: no warm-up)")
    p.add_argument("--in-process", action="store_true",
                   help="run every provider in this process (for CI: no fresh interpreter each; peak RSS "
                        "is then the largest so far, not the provider's own)")
    p.add_argument("--workdir", default=None, help="where pools are built (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only, append nothing")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ("256,1024" if args.quick else "2000,10000")
    args.rounds = args.rounds or (3 if args.quick else 1)
    # 224x224x3: what users score; quick 64 (a 2x2 layer4 map: 32 gives 1x1, an all-zero CAM)
    args.image_size = args.image_size or (64 if args.quick else 224)
    args.channels = args.channels or (1 if args.quick else 3)
    args.warmup_images = args.batch_size if args.warmup_images is None else args.warmup_images
    if args.warmup_images < 0:
        p.error(f"--warmup-images must be >= 0, got {args.warmup_images}")
    return args


def save_model(path: str | Path, args: argparse.Namespace) -> str:
    """A random-init checkpoint of --arch for --channels inputs and 3 classes (seeded)."""
    torch.manual_seed(0)
    info = Checkpoint(arch=args.arch, num_classes=3, in_channels=args.channels, classes=tuple(class_names(3)),
                      target_layer=parse_arch(args.arch).target_layer)
    save_checkpoint(path, build_model(args.arch, 3, args.channels), info)
    return str(path)


def synthetic_pool(path: str | Path, n: int, args: argparse.Namespace) -> str:
    create_synthetic_pool(SyntheticConfig(n=n, size=args.image_size, classes=3, channels=args.channels, seed=0,
                                          shortcut=0.5), path, show_progress=False)
    return str(path)


def case_name(n: int, args: argparse.Namespace) -> str:
    return f"pool_{args.channels}x{args.image_size}_N{n}"


def case_sizes(n: int, args: argparse.Namespace) -> str:
    return (f"N={n} {args.channels}x{args.image_size}x{args.image_size} {args.arch} batch={args.batch_size} "
            f"workers={args.workers} warmup={args.warmup_images}")


def run(args: argparse.Namespace) -> list[dict]:
    """Build the pools and model, time every provider (after its warm-up) in a fresh process, check;
    the rows."""
    sizes = [int(s) for s in args.sizes.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    device = resolve_device(args.device)
    meta = provenance(device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model_path = save_model(Path(tmp) / "model.pt", args)
        warmup_path = (synthetic_pool(Path(tmp) / "warmup.zarr", args.warmup_images, args)
                       if args.warmup_images else None)
        for n in sizes:
            pool_path = synthetic_pool(Path(tmp) / f"pool{n}.zarr", n, args)
            runs = [p for p in providers if not (p == GRAD_CAM and n > args.grad_cam_max)]
            if GRAD_CAM in runs and (why := grad_cam_unsupported(pool_path, model_path, args)):
                print(f"N={n:>7} {GRAD_CAM}: {why}: no row, no speedup vs {GRAD_CAM} (never compared across "
                      "precisions)", file=sys.stderr)
                runs.remove(GRAD_CAM)
            passes: dict[str, list[dict]] = {p: [] for p in runs}
            for _ in range(args.rounds):  # rounds of one pass each: load drift slows every provider alike
                for provider in runs:
                    passes[provider].append(measure(provider, pool_path, model_path, args, warmup_path))
                    print(f"N={n:>7} {provider:>10}: {n / passes[provider][-1]['seconds']:9.1f} img/s, "
                          f"peak RSS {passes[provider][-1]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            results = {p: median_pass(r) for p, r in passes.items()}
            checked = "xal-engine" in results
            if checked:
                errors = check_agreement(pool_path, model_path, args)
                print(f"N={n:>7} xal-engine {args.precision} vs {GRAD_CAM} fp32: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), file=sys.stderr)
            reference = CHECK_REFERENCE if args.precision == "fp32" else CHECK_NONE
            case_rows = [{
                "benchmark": case_name(n, args), "provider": provider, "sizes": case_sizes(n, args),
                "dtype": args.precision, "n_images": n, "seconds": round(r["seconds"], 3),
                "images_per_s": round(n / r["seconds"], 1),
                "check": {"xal-engine": CHECK_PASS, GRAD_CAM: reference}.get(provider, CHECK_NONE)
                if checked else CHECK_NONE,
                "peak_rss_mb": round(r["peak_rss_mb"], 1), "peak_gpu_mb": round(r["peak_gpu_mb"], 1), **meta,
            } for provider, r in results.items()]
            add_ratios(case_rows, "seconds")  # every row of a case has --precision: ratios never mix them
            rows += case_rows
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_and_finish(LEVEL, parse_args(argv), run, COLUMNS)


if __name__ == "__main__":
    main()
