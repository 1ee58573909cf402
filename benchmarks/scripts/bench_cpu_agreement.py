"""CPU Grad-CAM -> ROI agreement at 224x224: the reference, its cache-blocked torch-op form, the compiled form.

    python benchmarks/scripts/bench_cpu_agreement.py [--batch 64] [--repeats 30] [--threads 2]

Input N (stage 2 and the agreement): per stage-1 map side (7, 14, 28, 56: the maps of
densenet121/resnet layer4, layer3, layer2 and tiny at 224x224), one batch of random maps N and ROIs:
    reference   ops.reference: roi_agreement(upsample_normalise(N, (H, W)), R, tau)
    torch-ops   ops.cpu_agreement.upsample_agreement_torch (its torch-op path)
    compiled    ops.cpu_agreement.upsample_agreement on the compiled path (ops.cpu_fused)
Input A (Grad-CAM from channels-last A and G, stages 1 and 2 and the agreement): per (side, C) of
those layers (7/512, 14/256, 28/128, 56/16):
    reference   ops.reference.gradcam_dice
    two-step    stage 1 in torch ops (cpu_agreement.low_res_cam_cpu), then the compiled stage 2
    compiled    ops.dispatch.gradcam_dice: the compiled pass from A (ops.cpu_fused.cam_agreement)
Every provider's (dice, soft_dice, energy, hit) is checked equal to the reference's bit for bit
before timing. Rounds interleave the providers; the median is reported. Rows are appended to
benchmarks/results/cpu_agreement.csv (--out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import numba
import torch

from xal_engine.bench.timing import append_rows, device_name, git_commit
from xal_engine.ops import cpu_fused, gradcam_dice
from xal_engine.ops.cpu_agreement import (
    Workspace,
    low_res_cam_cpu,
    upsample_agreement,
    upsample_agreement_torch,
)
from xal_engine.ops.reference import gradcam_dice as reference_gradcam_dice
from xal_engine.ops.reference import roi_agreement, upsample_normalise

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cpu_agreement.csv"
SIZE = 224
COLUMNS = ["provider", "input", "map_side", "channels", "batch", "size", "threads", "ms_per_batch", "min_ms", "max_ms",
           "speedup_vs_reference", "device", "torch", "numba", "date", "git_commit"]


def make_providers(cam: torch.Tensor, rois: torch.Tensor, tau: float, ws: Workspace) -> dict:
    return {
        "reference": lambda: roi_agreement(upsample_normalise(cam, (SIZE, SIZE)), rois, tau),
        "torch-ops": lambda: upsample_agreement_torch(cam, rois, tau, ws),
        "compiled": lambda: upsample_agreement(cam, rois, tau, ws),
    }


def make_providers_from_activations(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, tau: float,
                                    ws: Workspace) -> dict:
    def metrics(r):
        return r.dice, r.soft_dice, r.energy, r.hit

    return {
        "reference": lambda: metrics(reference_gradcam_dice(a, g, rois, tau)),
        "two-step": lambda: upsample_agreement(low_res_cam_cpu(a, g, "gradcam", ws), rois, tau, ws),
        "compiled": lambda: metrics(gradcam_dice(a, g, rois, tau)),
    }


def same_bits(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(torch.nan_to_num(g.float(), nan=-1), torch.nan_to_num(w.float(), nan=-1))
               for g, w in zip(got, want))


def timed(providers: dict, args: argparse.Namespace, meta: dict, case: dict) -> list[dict]:
    """One row per provider: checked against the reference, then timed in interleaved rounds."""
    want = providers["reference"]()
    for name, fn in providers.items():
        if not same_bits(fn(), want):  # also the warm-up call
            raise SystemExit(f"{name} differs from the reference at {case}")
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(args.repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    ref = statistics.median(times["reference"])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append({"provider": name, **case, "batch": args.batch, "size": SIZE, "threads": args.threads,
                     "ms_per_batch": round(ms, 3), "min_ms": round(min(ts), 3), "max_ms": round(max(ts), 3),
                     "speedup_vs_reference": round(ref / ms, 2), **meta})
        what = f"{case['map_side']}^2" + (f" x {case['channels']}" if case["channels"] else "")
        print(f"{case['input']} {what:>10} -> {SIZE}^2  {name:<10} {ms:8.2f} ms per {args.batch}  ({ref / ms:.2f}x)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    # a batch of one takes the reference path (torch splits its one row between threads): not "compiled"
    for flag, value, least in (("--batch", args.batch, 2), ("--repeats", args.repeats, 1), ("--threads", args.threads, 1)):
        if value < least:
            ap.error(f"{flag}: expected at least {least}, got {value}")
    torch.set_num_threads(args.threads)
    meta = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "numba": numba.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "git_commit": git_commit()}
    rows = []
    for side in (7, 14, 28, 56):
        g = torch.Generator().manual_seed(side)
        cam = torch.rand(args.batch, side, side, generator=g)
        rois = torch.rand(args.batch, SIZE, SIZE, generator=g) > 0.7
        if not cpu_fused.fused_matches_torch(side, side, SIZE, SIZE):
            raise SystemExit(f"the compiled path does not reproduce torch for {side}^2 -> {SIZE}^2 here")
        rows += timed(make_providers(cam, rois, 0.5, Workspace()), args, meta,
                      {"input": "N", "map_side": side, "channels": ""})
    for side, channels in ((7, 512), (14, 256), (28, 128), (56, 16)):
        g = torch.Generator().manual_seed(side)
        shape = (args.batch, channels, side, side)
        a = torch.randn(shape, generator=g).clamp_min(0).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        rois = torch.rand(args.batch, SIZE, SIZE, generator=g) > 0.7
        if not cpu_fused.cam_fused_matches_torch(channels, side, side, SIZE, SIZE):
            raise SystemExit(f"the compiled pass from A does not reproduce torch for {shape[1:]} -> {SIZE}^2 here")
        rows += timed(make_providers_from_activations(a, grad, rois, 0.5, Workspace()), args, meta,
                      {"input": "A", "map_side": side, "channels": channels})
    append_rows(args.out, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
