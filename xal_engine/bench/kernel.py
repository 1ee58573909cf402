"""Benchmark gradcam_dice: fused Triton kernel vs torch reference vs pytorch-grad-cam's post-processing.

    python -m xal_engine.bench.kernel             # CUDA: B=256, C=512 7x7->224^2 and C=2048 14x14->512^2
    python -m xal_engine.bench.kernel --quick     # small CPU sizes: torch reference vs pytorch-grad-cam
    TRITON_INTERPRET=1 python -m xal_engine.bench.kernel --quick --triton-cpu   # + kernel, interpreted
    python -m xal_engine.bench.kernel --quick --methods gradcam,gradcam++,eigencam   # a method axis

Each provider gets warm-up runs, then timed repeats (synchronised on CUDA); the rows (median, p20, p80
ms, images/s, GB/s of the bytes the kernel must read: A + G + ROI, speedup vs grad-cam) are appended
to benchmarks/results/kernel.csv (--out). Every provider's outputs are checked against the reference first.

Providers, all from (B, C, h, w) A and G and (B, H, W) ROIs on the benchmark device to per-image results:
    triton       the method's weights or map in torch, then one fused launch (xal_engine.kernels.gradcam_dice)
    torch        the pure-torch reference (materialises S (B, H, W)); the CPU path of the engine
    grad-cam     what pytorch-grad-cam 1.5.7 does after its hooks: host copies, the method's numpy code
                 (its class's get_cam_weights / get_cam_image), ReLU, per-image min-max + cv2.resize +
                 min-max, then a numpy Dice/soft Dice/energy/hit

The method axis (``--methods``, default gradcam): each CAM method (xal_engine.ops.cam_methods) is a
case of its own, named ``<case>`` for gradcam and ``<case>_<method>`` for the others, timed against
its own pytorch-grad-cam class. Methods other than gradcam read post-ReLU activations (a stage
output), where gradcam++'s and xgradcam's ΣA denominators are well conditioned; EigenCAM's grad-cam
row uses 1.5.7's ``get_2d_projection_with_sign_correction`` (the engine's sign convention, the same
cost as its plain projection) and both are checked with EigenCAM's looser map tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xal_engine.bench import baseline
from xal_engine.bench.compare import (
    CHECK_PASS,
    CHECK_REFERENCE,
    GRAD_CAM,
    BenchError,
    add_ratios,
    check,
    near_tie_hits,
)
from xal_engine.bench.table import add_run_args, interleaved_times, run_and_finish
from xal_engine.bench.timing import provenance, summarise
from xal_engine.core.cam_methods import CAM_METHOD_NAMES, REFERENCE_CLASSES, check_cam_method
from xal_engine.core.inputs import resolve_device
from xal_engine.ops import reference

LEVEL = "kernel"
COLUMNS = ["benchmark", "provider", "sizes", "dtype", "median_ms", "p20_ms", "p80_ms", "images_per_s",
           "gb_per_s", "speedup_vs_grad_cam", "ratio_vs_plain", "check", "device", "xal_engine", "torch",
           "triton", "date", "git_commit"]
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
QUICK_CASES = (Case("quick_7x7_64", 16, 64, 7, 64), Case("quick_14x14_128", 8, 128, 14, 128),
               Case("quick_7x7_224", 16, 512, 7, 224))  # resnet18/34 layer4 at the usual input size


def as_numpy(result: reference.RoiAgreement) -> dict[str, np.ndarray]:
    return {k: getattr(result, k).cpu().numpy() for k in ("dice", "soft_dice", "energy", "hit")}


class _NoHooks:  # what a hook-less pytorch-grad-cam object releases in its __del__
    def release(self) -> None:
        return None


def library_cam(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam 1.5.7's pre-ReLU map (B, h, w) of ``method`` from numpy A, G: its class's own
    ``get_cam_image`` (weights methods through its ``get_cam_weights``). EigenCAM: the projection with
    1.5.7's sign correction (the engine's convention, see ops.cam_methods)."""
    if check_cam_method(method) == "eigencam":
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

        return get_2d_projection_with_sign_correction(a)
    import pytorch_grad_cam

    cls = getattr(pytorch_grad_cam, REFERENCE_CLASSES[method])
    obj = object.__new__(cls)  # no model, no hooks: only the method's arithmetic runs
    obj.activations_and_grads = _NoHooks()
    return cls.get_cam_image(obj, None, None, None, a, g, False)


def library_postprocess(method: str, a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor,
                        threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``baseline.postprocess`` for any method: host copies, the method's numpy code, ReLU, min-max,
    cv2.resize, min-max, numpy metrics (gradcam: ``baseline.postprocess`` itself)."""
    if method == "gradcam":
        return baseline.postprocess(a, g, rois, threshold)
    from pytorch_grad_cam.utils.image import scale_cam_image

    a_np, g_np, r_np = a.float().cpu().numpy(), g.float().cpu().numpy(), rois.cpu().numpy()
    cam = np.maximum(library_cam(method, a_np, g_np), 0)  # [B, h, w]
    maps = scale_cam_image(scale_cam_image(cam, (r_np.shape[2], r_np.shape[1])))
    return {"maps": maps, **baseline.roi_agreement(maps, r_np, threshold)}


def parse_methods(text: str) -> tuple[str, ...]:
    """Comma-separated CAM method names, each checked (BenchError naming --methods otherwise)."""
    names = tuple(m for m in text.split(",") if m)
    bad = [m for m in names if m not in CAM_METHOD_NAMES]
    if bad or not names:
        raise BenchError(f"--methods: expected some of {', '.join(CAM_METHOD_NAMES)}, got {text!r}")
    return names


def run_case(case: Case, args: argparse.Namespace, device: torch.device, meta: dict[str, str],
             method: str = "gradcam") -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.channels, case.feature, case.feature)
    dtype = DTYPES[args.dtype]
    a = torch.randn(shape, generator=gen, device=device).to(dtype)
    g = torch.randn(shape, generator=gen, device=device).to(dtype)
    if method != "gradcam":  # a stage output (post-ReLU): see the module docstring
        a = a.clamp_min(0)
    rois = torch.rand(case.batch, case.image, case.image, generator=gen, device=device) > 0.7
    ref = as_numpy(reference.gradcam_dice(a, g, rois, args.threshold, method=method))
    ties = near_tie_hits(reference.gradcam_maps(a, g, (case.image, case.image), method).cpu().numpy(),
                         rois.cpu().numpy())
    loose = 10.0 if method == "eigencam" else 1.0  # EigenCAM's SVD: maps agree to 1e-4, not 1e-5

    providers: dict[str, Callable[[], object]] = {}
    checks = {"torch": CHECK_REFERENCE}
    if device.type == "cuda" or args.triton_cpu:
        from xal_engine.ops.dispatch import triton_backend

        providers["triton"] = lambda: triton_backend(a, g, rois, args.threshold, method=method)
        check("triton", as_numpy(providers["triton"]()), ref, {"dice": 1e-4, "soft_dice": 1e-5, "energy": 1e-5},
              ties)
        checks["triton"] = CHECK_PASS
    providers["torch"] = lambda: reference.gradcam_dice(a, g, rois, args.threshold, method=method)
    providers[GRAD_CAM] = lambda: library_postprocess(method, a, g, rois, args.threshold)
    check(GRAD_CAM, providers[GRAD_CAM](), ref,
          {"dice": 1e-3 * loose, "soft_dice": 1e-4 * loose, "energy": 1e-4 * loose}, ties)
    checks[GRAD_CAM] = CHECK_PASS
    name = case.name if method == "gradcam" else f"{case.name}_{method}"

    moved = a.numel() * a.element_size() + g.numel() * g.element_size() + rois.numel()  # bytes read
    rows = []
    times = interleaved_times(providers, device, args.warmup, args.repeats, args.budget_s)
    for provider in providers:
        stats = summarise(times[provider])
        median_s = stats["median_ms"] / 1e3
        rows.append({"benchmark": name, "provider": provider, "sizes": case.sizes, "dtype": args.dtype,
                     **{k: round(v, 4) for k, v in stats.items()},
                     "images_per_s": round(case.batch / median_s, 1), "gb_per_s": round(moved / median_s / 1e9, 3),
                     "check": checks[provider], **meta})
    add_ratios(rows, "median_ms")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes that run on a CPU in seconds")
    parser.add_argument("--triton-cpu", action="store_true",
                        help="on a CPU, also time the kernel in Triton's interpreter (needs TRITON_INTERPRET=1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of A and G")
    parser.add_argument("--methods", default="gradcam",
                        help=f"CAM methods, comma-separated, each a case of its own: {', '.join(CAM_METHOD_NAMES)} "
                             "(default: %(default)s)")
    add_run_args(parser, warmup=3, repeats=20)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Check, then time every provider on every case; the rows (nothing printed or written)."""
    device = resolve_device(args.device)
    if device.type == "cpu" and args.triton_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads it when torch/triton are first imported, before this script can set it.
        raise BenchError("--triton-cpu: run with TRITON_INTERPRET=1 in the environment")
    torch.set_num_threads(args.threads) if args.threads else None
    meta = provenance(device)
    methods = parse_methods(getattr(args, "methods", "gradcam"))
    return [row for method in methods for case in (QUICK_CASES if args.quick else FULL_CASES)
            for row in run_case(case, args, device, meta, method)]


def main(argv: list[str] | None = None) -> list[dict]:
    return run_and_finish(LEVEL, parse_args(argv), run, COLUMNS)


if __name__ == "__main__":
    main()
