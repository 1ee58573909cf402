"""What sm_90 makes of the fused 2-D kernel, without a GPU: registers, spills and programs per SM.

    python benchmarks/scripts/kernel_registers.py [--kernel kernels/gradcam_dice.py] [--label NAME]

Compiles ``_gradcam_dice_kernel`` (bf16 A, channel weights) with Triton for sm_90 at the shapes
users run and runs Triton's bundled ``ptxas -v`` on the PTX. ``--kernel`` takes another copy of the
kernel module (e.g. ``git show REV:kernels/gradcam_dice.py > /tmp/old.py``) so two versions compare
in one run; launch parameters the old copy lacks are left out. Per shape it also counts the bilinear
evaluations per image: H * W for the agreement pass plus the extremes pass (H * W when every pixel
is scanned, at most min(H, 2h + 2) * min(W, 2w + 2) on the candidate grid).

Appends to benchmarks/results/kernel_registers.csv: label, shape, blocks, warps, registers, spill
bytes, programs per SM by registers (65536 per SM, 64 warps at most), evaluations, Triton version.
These are static facts of the compiled code, not timings; device time needs a GPU
(``benchmarks/gpu_validate.py``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "kernel_registers.csv"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# (name, channels, h, w, H, W): resnet50 / resnet18 layer4 at 224^2, resnet layer1 at 224^2, 14^2 -> 512^2
SHAPES = [("resnet50_layer4_224", 2048, 7, 7, 224, 224), ("resnet18_layer4_224", 512, 7, 7, 224, 224),
          ("layer1_56_to_224", 64, 56, 56, 224, 224), ("14_to_512", 2048, 14, 14, 512, 512),
          ("32_to_1024", 1024, 32, 32, 1024, 1024)]
COLUMNS = ["label", "case", "split", "blocks", "num_warps", "registers", "spill_bytes", "programs_per_sm",
           "evaluations_per_image", "triton", "date"]
POINTERS = {"a_ptr": "*bf16", "roi_ptr": "*u8", "hit_ptr": "*u8", "part_ptr": "*i32", "count_ptr": "*i32",
            "layer_ptr": "*i32"}
FLOATS = ("scale_y", "scale_x", "threshold")


def load_kernel_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"kernel_copy_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) that ptxas reports for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(PTXAS), "--gpu-name", "sm_90a", "-v", str(src), "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))
    return regs, spills


def compile_case(module, channels: int, h: int, w: int, height: int, width: int, split: bool) -> dict:
    fn = module._gradcam_dice_kernel
    cfg = module._launch_config(channels=channels, pixels=h * w, height=height, width=width)
    warps = cfg.pop("num_warps")
    consts = {**cfg, "MAP_GIVEN": False, "SCAN_EXTREMES": False, "SPLIT": split, "BLOCK_P": 4, "LAYERS": 1}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "*fp32" if n.endswith("_ptr") else
                                                           "fp32" if n in FLOATS else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    regs, spills = ptxas_usage(ptx)
    threads = 32 * warps
    scans_all = "SCAN_EXTREMES" not in fn.arg_names
    extremes = height * width if scans_all else min(height, 2 * h + 2) * min(width, 2 * w + 2)
    return {"blocks": " ".join(f"{k}={v}" for k, v in cfg.items()), "num_warps": warps, "registers": regs,
            "spill_bytes": spills, "programs_per_sm": min(65536 // (regs * threads), 64 // warps),
            "evaluations_per_image": height * width + extremes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", type=Path, default=ROOT / "kernels" / "gradcam_dice.py",
                        help="the kernel module to compile (default: this tree's)")
    parser.add_argument("--label", default="current", help="the label of its rows (default: current)")
    args = parser.parse_args(argv)
    module = load_kernel_module(args.kernel)
    splits = (False, True) if "SPLIT" in inspect.signature(module._gradcam_dice_kernel.fn).parameters else (False,)
    rows = []
    for name, c, h, w, height, width in SHAPES:
        for split in splits:
            row = {"label": args.label, "case": name, "split": split,
                   **compile_case(module, c, h, w, height, width, split),
                   "triton": triton.__version__, "date": datetime.date.today().isoformat()}
            rows.append(row)
            print(" ".join(f"{k}={row[k]}" for k in COLUMNS[:-2]), flush=True)
    new_file = not OUT.exists()
    with OUT.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
