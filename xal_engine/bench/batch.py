"""Batch-level benchmark: `score_batch` vs pytorch-grad-cam's `GradCAM` + numpy metrics vs plain inference.

    python -m xal_engine.bench.batch                  # CUDA: B=64 1x224x224, resnet18/50, densenet121
    python -m xal_engine.bench.batch --quick          # CPU: B=8 1x64x64, the same three models
    python -m xal_engine.bench.batch --archs resnet18 --batch-size 4 --image-size 32 --no-write
    python -m xal_engine.bench.batch --quick --methods gradcam,layercam,eigencam      # a method axis

Same model (random init: speed does not depend on the weights), same images and ROIs (synthetic
phantoms, ROI = lesion) and same batch for every provider, in one run:
    xal-engine  score_batch (forward, backward to the target layer only, gradcam_dice) and one host copy
                of the per-image results; fp32 and bf16 autocast
    grad-cam    pytorch_grad_cam.GradCAM (full backward, host copies, cv2 per image) + numpy softmax,
                entropy and Dice; bf16 is tried once and fails in its .numpy(): a row with that note, no number
    plain       forward only under torch.no_grad, softmax, argmax to the host; fp32 and bf16
Before timing, the engine's fp32 maps and metrics are checked against pytorch-grad-cam's (parity
tolerances of docs/gradcam-reference.md); bf16 is checked against the same fp32 reference, loosely,
on images whose predicted class is unchanged. Rows (median/p20/p80 ms, images/s, speedup vs grad-cam,
ratio vs plain) go to benchmarks/results/batch.csv (--out).

The method axis (``--methods``, default gradcam): each CAM method is a case of its own (``<arch>_<size>``
for gradcam, ``<arch>_<size>_<method>`` otherwise): ``score_batch(cam_method=...)`` against
pytorch-grad-cam's class of that method (GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM);
EigenCAM runs with 1.5.7's ``get_2d_projection_with_sign_correction`` in place of its plain
projection (the engine's sign convention, the same cost) and is checked at maps 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam import GradCAM

from xal_engine.bench import baseline
from xal_engine.bench.compare import (
    CHECK_NONE,
    CHECK_PASS,
    CHECK_REFERENCE,
    GRAD_CAM,
    PLAIN,
    ParityError,
    add_ratios,
    check,
    near_tie_hits,
)
from xal_engine.bench.kernel import parse_methods
from xal_engine.bench.table import add_run_args, interleaved_times, run_and_finish
from xal_engine.bench.timing import provenance, summarise, synchronize
from xal_engine.core.cam_methods import CAM_METHOD_NAMES, REFERENCE_CLASSES
from xal_engine.core.inputs import resolve_device, to_unit_float
from xal_engine.core.models import build_model, parse_arch, resolve_layer
from xal_engine.core.scoring import BatchScores, score_batch
from xal_engine.ingest.synthetic import SyntheticConfig, generate_block
from xal_engine.ops import reference

LEVEL = "batch"
COLUMNS = ["benchmark", "provider", "sizes", "dtype", "median_ms", "p20_ms", "p80_ms", "images_per_s",
           "speedup_vs_grad_cam", "ratio_vs_plain", "check", "note", "device", "xal_engine", "torch", "triton",
           "date", "git_commit"]
ARCHS = ("resnet18", "resnet50", "densenet121")
ENGINE = "xal-engine"
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
CLASSES = 3
# Parity with pytorch-grad-cam in fp32 (docs/gradcam-reference.md), and the loose bf16 bound.
FP32_TOLERANCES = {"maps": 1e-5, "dice": 1e-4, "soft_dice": 1e-4, "energy": 1e-4, "entropy": 1e-4}
BF16_TOLERANCES = {"soft_dice": 0.05, "energy": 0.05}
TIE_TOL = 1e-5  # |S_ref - tau| below which a thresholded pixel may flip


@dataclass(frozen=True)
class Case:
    arch: str
    batch: int
    image: int  # H = W
    channels: int
    method: str = "gradcam"  # CAM method (xal_engine.core.cam_methods)

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.image}" + ("" if self.method == "gradcam" else f"_{self.method}")

    @property
    def sizes(self) -> str:
        return f"B={self.batch} {self.channels}x{self.image}x{self.image} {self.arch}"


@dataclass(frozen=True)
class Inputs:
    model: torch.nn.Module  # eval mode, on the device
    layer: str  # dotted target layer name
    images: torch.Tensor  # (B, C, H, W) fp32 on the device
    rois: torch.Tensor  # (B, H, W) bool on the device
    rois_host: np.ndarray  # the same, numpy


def make_inputs(case: Case, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    model = build_model(case.arch, CLASSES, case.channels).to(device).eval()
    block = generate_block(SyntheticConfig(n=case.batch, size=case.image, classes=CLASSES,
                                           channels=case.channels, seed=0), 0, np.zeros(case.batch, np.uint8))
    images = to_unit_float(torch.from_numpy(block.images)).to(device)
    rois = torch.from_numpy(block.lesions).to(device)
    return Inputs(model, parse_arch(case.arch).target_layer, images, rois, block.lesions)


def engine(inputs: Inputs, dtype: str, return_cam: bool = False,
           method: str = "gradcam") -> tuple[BatchScores, torch.Tensor]:
    """score_batch under autocast, then the one device->host copy of the per-image results (B, 6)."""
    with torch.autocast(inputs.images.device.type, dtype=AUTOCAST[dtype], enabled=AUTOCAST[dtype] is not None):
        s = score_batch(inputs.model, inputs.layer, inputs.images, inputs.rois, return_cam=return_cam,
                        cam_method=method)
    host = torch.stack([s.entropy, s.dice, s.soft_dice, s.energy, s.pred.float(), s.hit.float()], 1).cpu()
    return s, host


def plain(inputs: Inputs, dtype: str) -> torch.Tensor:
    """Forward only: softmax, and the predicted class copied to the host."""
    with torch.no_grad(), torch.autocast(inputs.images.device.type, dtype=AUTOCAST[dtype],
                                         enabled=AUTOCAST[dtype] is not None):
        return inputs.model(inputs.images).float().softmax(1).argmax(1).cpu()


def engine_results(inputs: Inputs, dtype: str, method: str = "gradcam") -> dict[str, np.ndarray]:
    s, _ = engine(inputs, dtype, return_cam=True, method=method)
    maps = reference.upsample_normalise(s.cam, tuple(inputs.rois.shape[1:]))  # S (B, H, W)
    out = {k: getattr(s, k).float().cpu().numpy() for k in ("entropy", "dice", "soft_dice", "energy", "hit")}
    return {**out, "maps": maps.cpu().numpy(), "pred": s.pred.cpu().numpy()}


@contextmanager
def sign_corrected(method: str) -> Iterator[None]:
    """EigenCAM only: 1.5.7's sign-corrected projection in place of its plain one (the engine's sign
    convention, see ops.cam_methods); nothing for the other methods."""
    if method != "eigencam":
        yield
        return
    import pytorch_grad_cam.eigen_cam as eigen_module
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    plain_projection = eigen_module.get_2d_projection
    eigen_module.get_2d_projection = get_2d_projection_with_sign_correction
    try:
        yield
    finally:
        eigen_module.get_2d_projection = plain_projection


def grad_cam_call(cam: GradCAM, inputs: Inputs, dtype: str, threshold: float,
                  method: str = "gradcam") -> Callable[[], object] | str:
    """The grad-cam pipeline under autocast ``dtype``; for a reduced dtype it is tried once first, and
    its failure (bf16 tensors cannot become numpy arrays) is returned as the row's note instead."""

    def call() -> object:
        with torch.autocast(inputs.images.device.type, dtype=AUTOCAST[dtype], enabled=AUTOCAST[dtype] is not None), \
                sign_corrected(method):
            return baseline.pipeline(cam, inputs.images, inputs.rois_host, threshold)

    if dtype != "fp32":
        try:
            call()
        except (TypeError, RuntimeError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return f"not supported by pytorch-grad-cam {version('grad-cam')} ({reason})"
    return call


def check_fp32(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rois: np.ndarray,
               threshold: float, method: str = "gradcam") -> dict[str, float]:
    """Maps, Dice, soft Dice, energy, entropy and hit of the engine vs pytorch-grad-cam (fp32).
    EigenCAM's SVD gets maps 1e-4 and the metrics 10x the tolerances (ops.cam_methods says why)."""
    if (got["pred"] != ref["logits"].argmax(1)).any():
        raise ParityError(f"{ENGINE} fp32: predicted class differs from pytorch-grad-cam's")
    loose = 10.0 if method == "eigencam" else 1.0
    tie_tol = TIE_TOL * loose
    flips = (got["maps"] >= threshold) != (ref["maps"] >= threshold)  # [B, H, W]
    if (flips & (np.abs(ref["maps"] - threshold) >= tie_tol)).any():
        raise ParityError(f"{ENGINE} fp32: thresholded maps differ away from tau +- {tie_tol:g}")
    # An image with a pixel flipped at tau has a Dice off by up to 2/(|S>=tau| + |R|): compare the others.
    ref = {**ref, "dice": np.where(flips.any((1, 2)), np.nan, ref["dice"])}
    tolerances = {k: v * (loose if k != "entropy" else 1.0) for k, v in FP32_TOLERANCES.items()}
    return check(f"{ENGINE} fp32", got, ref, tolerances, near_tie_hits(ref["maps"], rois, tie_tol))


def check_bf16(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """bf16 vs the fp32 reference where the predicted class is unchanged (elsewhere the map is another)."""
    same = got["pred"] == ref["logits"].argmax(1)
    keep = {k: np.where(same, ref[k], np.nan) for k in BF16_TOLERANCES}
    return check(f"{ENGINE} bf16", got, keep, BF16_TOLERANCES)


def run_case(case: Case, args: argparse.Namespace, device: torch.device, meta: dict[str, str]) -> list[dict]:
    inputs = make_inputs(case, device)
    method = case.method
    # pytorch-grad-cam keeps its hooks (host copies) on the model it wraps: give it its own copy.
    gc_model = copy.deepcopy(inputs.model)
    cam_class = getattr(pytorch_grad_cam, REFERENCE_CLASSES[method])  # GradCAM for gradcam
    cam = cam_class(model=gc_model, target_layers=[resolve_layer(gc_model, inputs.layer)])
    with sign_corrected(method):
        ref = baseline.pipeline(cam, inputs.images, inputs.rois_host, args.threshold)
    errors = check_fp32(engine_results(inputs, "fp32", method), ref, inputs.rois_host, args.threshold, method)
    checks = {(ENGINE, "fp32"): CHECK_PASS, (GRAD_CAM, "fp32"): CHECK_REFERENCE}
    print(f"{case.name}: {ENGINE} fp32 vs {GRAD_CAM}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
          file=sys.stderr)
    if "bf16" in args.dtypes:
        errors = check_bf16(engine_results(inputs, "bf16", method), ref)
        checks[(ENGINE, "bf16")] = CHECK_PASS
        print(f"{case.name}: {ENGINE} bf16 vs {GRAD_CAM} fp32: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), file=sys.stderr)

    providers: dict[tuple[str, str], Callable[[], object] | str] = {}
    for dtype in args.dtypes:
        providers[(ENGINE, dtype)] = lambda dtype=dtype: engine(inputs, dtype, method=method)
        providers[(GRAD_CAM, dtype)] = grad_cam_call(cam, inputs, dtype, args.threshold, method)
        providers[(PLAIN, dtype)] = lambda dtype=dtype: plain(inputs, dtype)
    times = interleaved_times({k: fn for k, fn in providers.items() if not isinstance(fn, str)}, device,
                              args.warmup, args.repeats, args.budget_s)
    rows = []
    for (provider, dtype), fn in providers.items():
        row = {"benchmark": case.name, "provider": provider, "sizes": case.sizes, "dtype": dtype,
               "check": checks.get((provider, dtype), CHECK_NONE), "note": "", **meta}
        if isinstance(fn, str):
            row["note"] = fn
        else:
            stats = summarise(times[(provider, dtype)])
            row.update({k: round(v, 3) for k, v in stats.items()},
                       images_per_s=round(case.batch / stats["median_ms"] * 1e3, 1))
        rows.append(row)
    synchronize(device)
    add_ratios(rows, "median_ms")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU sizes: B=8 1x64x64 (unless given below)")
    p.add_argument("--archs", default=",".join(ARCHS), help="models, comma-separated")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64, quick 8)")
    p.add_argument("--image-size", type=int, default=None, help="H = W (default 224, quick 64)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast), comma-separated")
    p.add_argument("--methods", default="gradcam",
                   help=f"CAM methods, comma-separated, each a case of its own: {', '.join(CAM_METHOD_NAMES)} "
                        "(default: %(default)s)")
    add_run_args(p, warmup=2, repeats=10)
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if "fp32" not in args.dtypes or not set(args.dtypes) <= set(AUTOCAST):
        p.error(f"--dtypes: fp32 (the checked reference) plus optionally bf16, got {','.join(args.dtypes)}")
    args.batch_size = args.batch_size or (8 if args.quick else 64)
    args.image_size = args.image_size or (64 if args.quick else 224)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Check, then time every provider on every case; the rows (check results go to stderr)."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    meta = provenance(device)
    methods = parse_methods(getattr(args, "methods", "gradcam"))
    cases = [Case(arch, args.batch_size, args.image_size, args.channels, method)
             for method in methods for arch in args.archs.split(",") if arch]
    return [row for case in cases for row in run_case(case, args, device, meta)]


def main(argv: list[str] | None = None) -> list[dict]:
    return run_and_finish(LEVEL, parse_args(argv), run, COLUMNS)


if __name__ == "__main__":
    main()
