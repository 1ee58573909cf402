"""Pool-level benchmark: `xal-engine score` vs plain inference vs a pytorch-grad-cam pipeline vs the loader.

    python benchmarks/bench_pool.py --quick                      # CPU, small pools (minutes)
    python benchmarks/bench_pool.py --sizes 20000,100000 --image-size 64 --providers loader,xal-engine
    python benchmarks/bench_pool.py --device cuda --arch resnet18 --image-size 224 --precision bf16

All providers read the same synthetic Zarr pool through the same chunk-aligned loader, with the same
model (random init: speed does not depend on the weights) and batch size:
    loader      decode only (Zarr blocks -> pinned tensors): the ceiling of any pipeline
    plain       loader + forward only (torch.no_grad): what inference alone costs
    xal-engine  score_pool: forward, backward to the target layer, fused Grad-CAM -> Dice, Zarr writes
    grad-cam    loader + pytorch_grad_cam.GradCAM (full backward, host copies, cv2) + numpy softmax/Dice
Each provider runs in a fresh process, so its peak RSS is its own (loader workers included). Two pool
sizes show cost linear in N and memory flat. Before any figure is written, the grad-cam pipeline's
soft Dice on the first batch is compared with the engine's (|Δ| <= 1e-4 in fp32): no speed is
reported for a wrong answer. Rows go to benchmarks/results/pool.csv.
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

from xal_engine.benchmarking import append_rows, peak_rss_mb, provenance, synchronize
from xal_engine.data import resolve_device, to_unit_float
from xal_engine.models import Checkpoint, build_model, load_checkpoint, save_checkpoint
from xal_engine.pool import Pool
from xal_engine.score_pool import (
    PRECISIONS, ScoreConfig, UnitBlocks, group_units, loader_context, score_pool, to_device,
)
from xal_engine.score_store import ScoreRun
from xal_engine.synthetic import SyntheticConfig, create_synthetic_pool

RESULTS = Path(__file__).resolve().parent / "results" / "pool.csv"
COLUMNS = ["benchmark", "provider", "sizes", "dtype", "n_images", "seconds", "images_per_s",
           "ratio_vs_plain", "peak_rss_mb", "peak_gpu_mb", "device", "xal_engine", "torch", "triton",
           "date", "git_commit"]
PROVIDERS = ("loader", "plain", "xal-engine", "grad-cam")


def all_units_loader(pool_path: str, batch_size: int, workers: int, device: torch.device):
    """The scorer's loader over every unit of the pool (a throwaway run only fixes the unit size)."""
    pool = Pool.open(pool_path)
    run = ScoreRun(pool.group, "bench", pool.n, pool.chunk_size)
    items = group_units(run, list(range(run.n_units)), batch_size)
    return torch.utils.data.DataLoader(
        UnitBlocks(pool_path, items, with_labels=False), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
        multiprocessing_context=loader_context() if workers else None)


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
        model, ckpt = load_checkpoint(model_path, device=device)
        loader = all_units_loader(pool_path, args.batch_size, args.workers, device)
        if provider == "grad-cam":
            from pytorch_grad_cam import GradCAM

            from xal_engine.models import resolve_layer

            cam = GradCAM(model=model, target_layers=[resolve_layer(model, ckpt.target_layer)])
        for item in to_device(loader, device):
            if provider == "loader":
                continue
            x = to_unit_float(item["images"])
            if provider == "plain":
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    probs = model(x).float().softmax(1)
                    probs.argmax(1).cpu()  # the one host copy a real pipeline makes
            else:
                grad_cam_pipeline(cam, x, item["rois"].cpu().numpy())
        synchronize(device)
    seconds = time.perf_counter() - t0
    return {"provider": provider, "seconds": seconds, "n_images": n,
            "peak_rss_mb": peak_rss_mb() + peak_rss_mb(children=True),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}


def grad_cam_pipeline(cam, x: torch.Tensor, rois: np.ndarray) -> dict[str, np.ndarray]:
    """What a user writes with pytorch-grad-cam: maps, then numpy uncertainty and ROI agreement."""
    maps = cam(input_tensor=x, targets=None)  # (B, H, W) float32 numpy, predicted class
    logits = cam.outputs.detach().float().cpu().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(1)
    r = rois.astype(np.float32)
    inter = (maps * r).sum((1, 2))
    soft = np.where(maps.sum((1, 2)) + r.sum((1, 2)) > 0,
                    2 * inter / np.maximum(maps.sum((1, 2)) + r.sum((1, 2)), 1e-30), 0.0)
    hard_mask = (maps >= 0.5).astype(np.float32)
    den = hard_mask.sum((1, 2)) + r.sum((1, 2))
    dice = np.where(den > 0, 2 * (hard_mask * r).sum((1, 2)) / np.maximum(den, 1e-30), 0.0)
    return {"entropy": entropy, "soft_dice": soft, "dice": dice}


def check_agreement(pool_path: str, model_path: str, args: argparse.Namespace) -> float:
    """Max |soft Dice| difference between the grad-cam pipeline and the engine's run, first batch."""
    from pytorch_grad_cam import GradCAM

    from xal_engine.models import resolve_layer

    pool = Pool.open(pool_path)
    model, ckpt = load_checkpoint(model_path)
    batch = pool.read(0, min(pool.n, args.batch_size))
    x = to_unit_float(torch.from_numpy(batch.images))
    ref = grad_cam_pipeline(GradCAM(model=model, target_layers=[resolve_layer(model, ckpt.target_layer)]),
                            x, batch.rois)
    run = ScoreRun.open(pool.group, "bench").read(("soft_dice",))["soft_dice"][: len(x)]
    ok = batch.has_roi
    return float(np.abs(run[ok] - ref["soft_dice"][ok]).max()) if ok.any() else 0.0


def _child(conn, provider, pool_path, model_path, args) -> None:
    conn.send(run_provider(provider, pool_path, model_path, args))


def measure(provider: str, pool_path: str, model_path: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, provider, pool_path, model_path, args))
    proc.start()
    child.close()
    while not parent.poll(1.0):  # a child that dies sends nothing: do not wait for it forever
        if not proc.is_alive():
            raise SystemExit(f"provider {provider} died (exit code {proc.exitcode})")
    result = parent.recv()
    proc.join()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small pools for a CPU check (overrides sizes)")
    p.add_argument("--sizes", default="2000,10000", help="pool sizes, comma-separated")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--grad-cam-max", type=int, default=5000,
                   help="skip the (slow) grad-cam provider on pools larger than this")
    p.add_argument("--workdir", default=None, help="where pools are built (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only, append nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.quick:
        args.sizes, args.image_size, args.batch_size = "256,1024", 32, 64
    sizes = [int(s) for s in args.sizes.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    device = resolve_device(args.device)
    meta = provenance(device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        torch.manual_seed(0)
        model_path = str(Path(tmp) / "model.pt")
        info = Checkpoint(arch=args.arch, num_classes=3, in_channels=args.channels,
                          classes=("round", "ringed", "stippled"), target_layer="")
        from xal_engine.models import parse_arch

        info = Checkpoint(**{**info.__dict__, "target_layer": parse_arch(args.arch).target_layer})
        save_checkpoint(model_path, build_model(args.arch, 3, args.channels), info)
        for n in sizes:
            pool_path = str(Path(tmp) / f"pool{n}.zarr")
            create_synthetic_pool(SyntheticConfig(n=n, size=args.image_size, classes=3,
                                                  channels=args.channels, seed=0, shortcut=0.5),
                                  pool_path, show_progress=False)
            results = {}
            for provider in providers:
                if provider == "grad-cam" and n > args.grad_cam_max:
                    continue
                results[provider] = measure(provider, pool_path, model_path, args)
                print(f"N={n:>7} {provider:>10}: {n / results[provider]['seconds']:9.1f} img/s, "
                      f"peak RSS {results[provider]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            if "xal-engine" in results and "grad-cam" in results and args.precision == "fp32":
                delta = check_agreement(pool_path, model_path, args)
                if delta > 1e-4:
                    raise SystemExit(f"grad-cam and xal-engine disagree: max |soft Dice diff| = {delta:.2e}")
            plain = results.get("plain")
            for provider, r in results.items():
                rows.append({
                    "benchmark": "pool", "provider": provider,
                    "sizes": f"N={n} {args.channels}x{args.image_size}x{args.image_size} {args.arch} "
                             f"batch={args.batch_size} workers={args.workers}",
                    "dtype": args.precision, "n_images": n, "seconds": round(r["seconds"], 3),
                    "images_per_s": round(n / r["seconds"], 1),
                    "ratio_vs_plain": round(plain["seconds"] / r["seconds"], 3) if plain else "",
                    "peak_rss_mb": round(r["peak_rss_mb"], 1), "peak_gpu_mb": round(r["peak_gpu_mb"], 1),
                    **meta,
                })
    if not args.no_write:
        append_rows(args.out, rows, COLUMNS)
    for row in rows:
        print(f"{row['sizes']:<48} {row['provider']:>10} {row['images_per_s']:>9} img/s  "
              f"x{row['ratio_vs_plain'] or '-':<6} vs plain  {row['peak_rss_mb']:>7} MiB")
    return rows


if __name__ == "__main__":
    main()
