"""Benchmark gradcam_dice: fused Triton kernel vs torch reference vs pytorch-grad-cam's post-processing.

    python benchmarks/bench_kernel.py                 # CUDA: B=256, C=512 7x7->224^2 and C=2048 14x14->512^2
    python benchmarks/bench_kernel.py --quick         # small CPU sizes: torch reference vs pytorch-grad-cam
    TRITON_INTERPRET=1 python benchmarks/bench_kernel.py --quick --triton-cpu   # + kernel, interpreted

Each provider gets warm-up runs, then timed repeats (torch.cuda.synchronize around each); the rows
(median, p20, p80 ms, images/s, GB/s of the bytes the kernel must read: A + G + ROI) are appended to
benchmarks/results/kernel.csv. The kernel's outputs are checked against the reference first.

Providers, all from (B, C, h, w) A and G and (B, H, W) ROIs on the benchmark device to per-image results:
    triton       one fused launch (xal_engine.kernels.gradcam_dice)
    torch        the pure-torch reference (materialises S (B, H, W))
    grad-cam     what pytorch-grad-cam 1.5.7 does after its hooks: host copies, numpy weights, ReLU,
                 per-image min-max + cv2.resize + min-max, then a numpy Dice/soft Dice/energy/hit
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.utils.image import scale_cam_image

from xal_engine import reference

RESULTS = Path(__file__).resolve().parent / "results" / "kernel.csv"
COLUMNS = ["benchmark", "provider", "sizes", "dtype", "median_ms", "p20_ms", "p80_ms", "images_per_s",
           "gb_per_s", "device", "torch", "triton", "date", "git_commit"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    feature: int  # h = w
    image: int  # H = W

    @property
    def sizes(self) -> str:
        return f"B={self.batch} C={self.channels} {self.feature}x{self.feature}->{self.image}x{self.image}"


FULL_CASES = (Case("resnet_7x7_224", 256, 512, 7, 224), Case("resnet50_14x14_512", 256, 2048, 14, 512))
QUICK_CASES = (Case("quick_7x7_64", 16, 64, 7, 64), Case("quick_14x14_128", 8, 128, 14, 128))


def gradcam_numpy(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, threshold: float) -> tuple:
    """pytorch-grad-cam's post-processing (its own scale_cam_image, twice) and a numpy Dice."""
    a_np, g_np, r_np = a.float().cpu().numpy(), g.float().cpu().numpy(), rois.cpu().numpy()
    weights = np.mean(g_np, axis=(2, 3))  # GradCAM.get_cam_weights
    cam = np.maximum((weights[:, :, None, None] * a_np).sum(axis=1), 0)  # get_cam_image, then ReLU
    maps = scale_cam_image(scale_cam_image(cam, (r_np.shape[2], r_np.shape[1])))  # per-image cv2 loops
    s = maps.reshape(len(maps), -1)
    r = r_np.reshape(len(maps), -1)
    att = s >= threshold
    s_roi, s_sum, n_roi = (s * r).sum(1), s.sum(1), r.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * (att & r).sum(1) / (att.sum(1) + n_roi)
        soft = 2 * s_roi / (s_sum + n_roi)
        energy = s_roi / s_sum
    hit = r[np.arange(len(r)), s.argmax(1)]
    return dice, soft, energy, hit


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` calls; at least 3 once ``budget_s`` is spent."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def near_tie_hits(maps: torch.Tensor, rois: torch.Tensor, tol: float = 1e-5) -> np.ndarray:
    """(B,) True where pixels within ``tol`` of max S lie both inside and outside the ROI: there the
    first maximum, and so ``hit``, is float noise."""
    s, r = maps.flatten(1), rois.flatten(1)
    near = s >= s.amax(1, keepdim=True) - tol
    return ((near & r).any(1) & (near & ~r).any(1)).cpu().numpy()


def check(name: str, got: tuple, ref: reference.RoiAgreement, ties: np.ndarray, dice_atol: float,
          value_atol: float) -> None:
    """Refuse to report a provider whose results differ from the reference's."""
    ref_np = [t.cpu().numpy() for t in ref[:4]]
    got_np = [t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in got[:4]]
    for label, x, y, tol in zip(("dice", "soft_dice", "energy"), got_np, ref_np, (dice_atol, value_atol, value_atol)):
        err = float(np.nanmax(np.abs(x.astype(np.float64) - y))) if len(y) else 0.0
        if not err <= tol:
            raise SystemExit(f"{name}: {label} differs from the reference by {err:.3g} (> {tol})")
    if ((got_np[3] != ref_np[3]) & ~ties).any():
        raise SystemExit(f"{name}: hit differs from the reference away from near-ties of max S")


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton_version, "git_commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_case(case: Case, args: argparse.Namespace, device: torch.device, meta: dict[str, str]) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.channels, case.feature, case.feature)
    dtype = DTYPES[args.dtype]
    a = torch.randn(shape, generator=gen, device=device).to(dtype)
    g = torch.randn(shape, generator=gen, device=device).to(dtype)
    rois = torch.rand(case.batch, case.image, case.image, generator=gen, device=device) > 0.7
    ref = reference.gradcam_dice(a, g, rois, args.threshold)
    ties = near_tie_hits(reference.gradcam_maps(a, g, (case.image, case.image)), rois)

    providers: dict[str, Callable[[], object]] = {}
    if device.type == "cuda" or args.triton_cpu:
        from xal_engine.kernels.gradcam_dice import gradcam_dice_triton

        providers["triton"] = lambda: gradcam_dice_triton(a, g, rois, args.threshold)
        check("triton", providers["triton"](), ref, ties, dice_atol=1e-4, value_atol=1e-5)
    providers["torch"] = lambda: reference.gradcam_dice(a, g, rois, args.threshold)
    providers["grad-cam"] = lambda: gradcam_numpy(a, g, rois, args.threshold)
    check("grad-cam", providers["grad-cam"](), ref, ties, dice_atol=1e-3, value_atol=1e-4)

    moved = a.numel() * a.element_size() + g.numel() * g.element_size() + rois.numel()  # bytes read
    rows = []
    for provider, fn in providers.items():
        ms = timeit(fn, device, args.warmup, args.repeats, args.budget_s)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        median = statistics.median(ms)
        rows.append({"benchmark": case.name, "provider": provider, "sizes": case.sizes, "dtype": args.dtype,
                     "median_ms": f"{median:.4f}", "p20_ms": f"{q[1]:.4f}", "p80_ms": f"{q[7]:.4f}",
                     "images_per_s": f"{case.batch / median * 1e3:.1f}",
                     "gb_per_s": f"{moved / median / 1e6:.3f}", "device": device_name(device), **meta})
    base = float(rows[-1]["median_ms"])  # grad-cam
    for row in rows:
        print(f"{case.name:20s} {row['provider']:9s} median {float(row['median_ms']):10.3f} ms  "
              f"{float(row['images_per_s']):10.1f} img/s  {float(row['gb_per_s']):8.2f} GB/s  "
              f"x{base / float(row['median_ms']):.2f} vs grad-cam")
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes that run on a CPU in seconds")
    parser.add_argument("--triton-cpu", action="store_true",
                        help="on a CPU, also time the kernel in Triton's interpreter (needs TRITON_INTERPRET=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of A and G")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=10.0, help="time budget per provider and case")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: numpy/cv2 are single-threaded too, and a shared CPU "
                             "makes multi-threaded timings erratic)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="CSV the rows are appended to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.triton_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads it when torch/triton are first imported, before this script can set it.
        raise SystemExit("--triton-cpu: run with TRITON_INTERPRET=1 in the environment")
    torch.set_num_threads(args.threads)
    meta = versions()
    rows = [row for case in (QUICK_CASES if args.quick else FULL_CASES) for row in run_case(case, args, device, meta)]
    append_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
