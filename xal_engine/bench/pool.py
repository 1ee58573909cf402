"""Pool-level benchmark: `xal-engine score` vs plain inference vs a pytorch-grad-cam pipeline vs the loader.

    python -m xal_engine.bench.pool --quick                      # CPU, small pools (minutes)
    python -m xal_engine.bench.pool --sizes 20000,100000 --image-size 64 --providers loader,xal-engine
    python -m xal_engine.bench.pool --device cuda --arch resnet18 --image-size 224 --precision bf16

All providers read the same synthetic Zarr pool through the same chunk-aligned loader, with the same
model (random init: speed does not depend on the weights) and batch size:
    loader      decode only (Zarr blocks -> pinned tensors): the ceiling of any pipeline
    plain       loader + forward only (torch.no_grad): what inference alone costs
    xal-engine  score_pool: forward, backward to the target layer, fused Grad-CAM -> Dice, Zarr writes
    grad-cam    loader + pytorch_grad_cam.GradCAM (full backward, host copies, cv2) + numpy softmax/Dice
Each provider runs in a fresh process, so its peak RSS is its own (loader workers included); with
--rounds R every provider makes R passes, in rounds, and the median pass is reported. Two pool sizes
show cost linear in N and memory flat. A loader item is a run of whole work units (chunks; at 64x64 a
chunk holds 1024 images), scored --batch-size images at a time. Before any figure is
written, the engine's stored Dice, soft Dice, energy, entropy and hit on the first batch are compared
with the grad-cam pipeline's (fp32 parity tolerances): no speed is reported for a wrong answer. Rows
go to benchmarks/results/pool.csv (--out).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
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
from xal_engine.bench.timing import peak_rss_mb, provenance, synchronize
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


def all_units_loader(pool_path: str, batch_size: int, workers: int, device: torch.device):
    """The scorer's loader over every unit of the pool (a throwaway run only fixes the unit size)."""
    pool = Pool.open(pool_path)
    return unit_loader(pool, all_items(pool, batch_size), with_labels=False, num_workers=workers, device=device)


def run_provider(provider: str, pool_path: str, model_path: str, args: argparse.Namespace) -> dict:
    """One timed pass of `provider` over the whole pool (in a fresh process)."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    n = Pool.open(pool_path).n
    autocast = PRECISIONS[args.precision]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if provider == "xal-engine":
        score_pool(pool_path, model_path, ScoreConfig(
            run="bench", batch_size=args.batch_size, device=str(device), precision=args.precision,
            num_workers=args.workers, overwrite=True), show_progress=False)
    else:
        # plain inference as well as it is done: the scorer's channels-last model and batch size
        model, ckpt = (load_scoring_model(Path(model_path), device) if provider == "plain"
                       else load_checkpoint(model_path, device=device))
        loader = all_units_loader(pool_path, args.batch_size, args.workers, device)
        if provider == "grad-cam":
            from pytorch_grad_cam import GradCAM

            from xal_engine.core.models import resolve_layer

            cam = GradCAM(model=model, target_layers=[resolve_layer(model, ckpt.target_layer)])
        for item in to_device(loader, device):
            if provider == "loader":
                continue
            for a in range(0, item["images"].shape[0], args.batch_size):  # an item is whole chunks
                x = to_unit_float(item["images"][a:a + args.batch_size])
                if provider == "plain":
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.no_grad(), torch.autocast(device.type, dtype=autocast,
                                                         enabled=autocast is not None):
                        probs = model(x).float().softmax(1)
                        probs.argmax(1).cpu()  # the one host copy a real pipeline makes
                else:
                    baseline.pipeline(cam, x, item["rois"][a:a + args.batch_size].cpu().numpy())
        synchronize(device)
    seconds = time.perf_counter() - t0
    return {"provider": provider, "seconds": seconds, "n_images": n,
            "peak_rss_mb": peak_rss_mb() + peak_rss_mb(children=True),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}


def check_agreement(pool_path: str, model_path: str, args: argparse.Namespace) -> dict[str, float]:
    """Max errors of the engine's stored run vs the grad-cam pipeline on the first batch, within the
    fp32 parity tolerances (ParityError otherwise)."""
    from pytorch_grad_cam import GradCAM

    from xal_engine.core.models import resolve_layer

    pool = Pool.open(pool_path)
    model, ckpt = load_checkpoint(model_path)
    batch = pool.read(0, min(pool.n, args.batch_size))
    x = to_unit_float(torch.from_numpy(batch.images))
    ref = baseline.pipeline(GradCAM(model=model, target_layers=[resolve_layer(model, ckpt.target_layer)]),
                            x, batch.rois)
    stored = ScoreRun.open(pool.group, "bench").read(("dice", "soft_dice", "energy", "entropy", "hit"))
    got = {k: v[: len(x)] for k, v in stored.items()}
    # The run has NaN ROI metrics where has_roi is False; a pixel within 1e-5 of tau may flip the Dice.
    near_tau = (np.abs(ref["maps"] - 0.5) < 1e-5).any((1, 2))
    nan = np.full(len(x), np.nan)
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


def _child(conn, provider, pool_path, model_path, args) -> None:
    try:
        conn.send(run_provider(provider, pool_path, model_path, args))
    except Exception as err:  # noqa: BLE001 - any failure is reported by the parent as one line
        conn.send({"error": f"{type(err).__name__}: {err}"})


def measure(provider: str, pool_path: str, model_path: str, args: argparse.Namespace) -> dict:
    if args.in_process:
        return run_provider(provider, pool_path, model_path, args)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, provider, pool_path, model_path, args))
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
                   help="small pools for a CPU check: sizes 256,1024 (unless given)")
    p.add_argument("--sizes", default=None, help="pool sizes, comma-separated (default 2000,10000)")
    p.add_argument("--image-size", type=int, default=None, help="H = W (default 64)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
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
    p.add_argument("--in-process", action="store_true",
                   help="run every provider in this process (for CI: no fresh interpreter each; peak RSS "
                        "is then the largest so far, not the provider's own)")
    p.add_argument("--workdir", default=None, help="where pools are built (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only, append nothing")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Build the pools and model, time every provider in a fresh process, check; the rows."""
    args.sizes = args.sizes or ("256,1024" if args.quick else "2000,10000")
    args.rounds = args.rounds or (3 if args.quick else 1)
    args.image_size = args.image_size or 64  # 64: a 2x2 layer4 map (32 gives 1x1, an all-zero CAM)
    sizes = [int(s) for s in args.sizes.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    device = resolve_device(args.device)
    meta = provenance(device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        torch.manual_seed(0)
        model_path = str(Path(tmp) / "model.pt")
        info = Checkpoint(arch=args.arch, num_classes=3, in_channels=args.channels, classes=tuple(class_names(3)),
                          target_layer=parse_arch(args.arch).target_layer)
        save_checkpoint(model_path, build_model(args.arch, 3, args.channels), info)
        for n in sizes:
            pool_path = str(Path(tmp) / f"pool{n}.zarr")
            create_synthetic_pool(SyntheticConfig(n=n, size=args.image_size, classes=3,
                                                  channels=args.channels, seed=0, shortcut=0.5),
                                  pool_path, show_progress=False)
            runs = [p for p in providers if not (p == GRAD_CAM and n > args.grad_cam_max)]
            passes: dict[str, list[dict]] = {p: [] for p in runs}
            for _ in range(args.rounds):  # rounds of one pass each: load drift slows every provider alike
                for provider in runs:
                    passes[provider].append(measure(provider, pool_path, model_path, args))
                    print(f"N={n:>7} {provider:>10}: {n / passes[provider][-1]['seconds']:9.1f} img/s, "
                          f"peak RSS {passes[provider][-1]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            results = {p: median_pass(r) for p, r in passes.items()}
            checked = "xal-engine" in results and GRAD_CAM in results and args.precision == "fp32"
            if checked:
                errors = check_agreement(pool_path, model_path, args)
                print(f"N={n:>7} xal-engine vs grad-cam: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
                      file=sys.stderr)
            case_rows = [{
                "benchmark": f"pool_N{n}", "provider": provider,
                "sizes": f"N={n} {args.channels}x{args.image_size}x{args.image_size} {args.arch} "
                         f"batch={args.batch_size} workers={args.workers}",
                "dtype": args.precision, "n_images": n, "seconds": round(r["seconds"], 3),
                "images_per_s": round(n / r["seconds"], 1),
                "check": {"xal-engine": CHECK_PASS, GRAD_CAM: CHECK_REFERENCE}.get(provider, CHECK_NONE)
                if checked else CHECK_NONE,
                "peak_rss_mb": round(r["peak_rss_mb"], 1), "peak_gpu_mb": round(r["peak_gpu_mb"], 1), **meta,
            } for provider, r in results.items()]
            add_ratios(case_rows, "seconds")
            rows += case_rows
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_and_finish(LEVEL, parse_args(argv), run, COLUMNS)


if __name__ == "__main__":
    main()
