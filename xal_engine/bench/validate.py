"""One-command GPU validation: the CUDA-relevant tests, kernel parity and device time at real shapes,
batch and pool throughput against plain inference and pytorch-grad-cam, and the GPU goals of the
"million images in a minute" issue, all written under one folder.

    python benchmarks/gpu_validate.py                          # one H100/H200, < 8 min -> benchmarks/results/gpu/
    python benchmarks/gpu_validate.py --tiny --device cpu --out DIR   # the same steps at tiny sizes (CI)

Steps, in order; each has a time budget (``--budget-scale`` scales them), prints a progress line per
case, writes a CSV and a section of ``summary.md``. A failing step (an exception, a failed test, a
parity miss, its budget spent before its last case) is recorded as failed and the next one runs; the
exit code is 1 when any step failed. The goals are measurements: a missed goal is reported as FAIL
in summary.md and goals.csv, and does not by itself fail the run.

    environment  device, driver (nvidia-smi, else torch's CUDA build and device properties), versions,
                 git commit                                                   environment.csv
    tests        pytest tests/kernels tests/ops tests/core/test_scoring.py tests/jobs/test_score.py in
                 a subprocess (TRITON_INTERPRET unset on CUDA, =1 on CPU), junit xml, counts per file
                                                                              tests.csv, tests_junit.xml, tests.log
    parity       gradcam_dice, backend "triton" on the device vs "torch" on the CPU from the same
                 inputs (fp32 and bf16, NCHW and channels-last): resnet18/50 layer4 and densenet121 at
                 224^2, 14^2 -> 512^2, 32^2 -> 1024^2; max |diff| of the map N and of Dice, soft Dice,
                 energy against docs/gradcam-reference.md (maps 1e-5, Dice 1e-4)   parity.csv
    kernel_time  device time per call from CUDA events (triton.testing.do_bench, L2 flushed) of both
                 backends, and GB/s of the bytes the kernel must read (A + G + ROI); the kernel also
                 in its earlier work layout ("triton-old-layout": one program per image, a min/max
                 pass over every pixel, 8 x 128 tiles), the before/after of the CAM-family issue's
                 kernel-speed item                                            kernel_time.csv
    methods      every CAM method (gradcam, gradcam++, xgradcam, hirescam, layercam, eigencam) at
                 resnet50 layer4 224^2, B = 256, bf16 and fp32: the kernel's parity with the torch
                 reference and both device times, the kernel's speedup          methods.csv
    volumes      the 3-D kernel vs the 3-D reference (8^3 -> 64^3 and 128^3 volumes): parity, device
                 times, speedup                                                   volumes.csv
    batch        xal_engine.bench.batch.run_case: score_batch vs plain inference vs pytorch-grad-cam,
                 B = 64 and 256, resnet18/resnet50/densenet121, 3x224x224, fp32 and bf16   batch.csv
    pool         score_pool vs plain inference (and the loader alone) through the same loader over a
                 >= 32k-image 3x224x224 pool of repeated chunks (bench.pools), bf16 and fp32, each after
                 a warm-up pass; ratio and the projected time for 1M images          pool.csv
    goals        pool scoring >= 0.95x plain; resnet18 224^2 bf16 >= 16.7k img/s; >= 20x
                 pytorch-grad-cam at resnet50 224^2 fp32; every method's kernel >= 10x the torch
                 reference (bf16); the 3-D kernel >= 10x the 3-D reference           goals.csv

Everything that runs on CUDA runs in ``--tiny`` on the CPU too: the same functions, branching only
on the device (the Triton backend runs in Triton's interpreter there; CUDA events become host timers),
the sizes (:data:`TINY`: resnet18 at 64^2, pools of a few hundred images, tiny kernel shapes) and the precision.
TF32 is off in every step (timing.no_tf32): results are compared with CPU/fp32 references.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from xal_engine import __version__
from xal_engine.bench import checkout
from xal_engine.bench.compare import near_tie_hits
from xal_engine.bench.timing import device_name, device_times_ms, no_tf32, provenance, summarise
from xal_engine.core.cam_methods import CAM_METHOD_NAMES
from xal_engine.core.inputs import resolve_device
from xal_engine.errors import XalError
from xal_engine.ops import gradcam_dice, reference, reference3d
from xal_engine.ops.cam_methods import get_cam_method

# Parity of the kernel with the reference (docs/gradcam-reference.md): maps 1e-5, Dice 1e-4; soft Dice
# and energy are held to the Dice tolerance. bf16 inputs are compared with the reference run on the SAME
# bf16 inputs (the rounding happened before either backend saw them), so the fp32 tolerances hold.
TOLERANCES = {"cam": 1e-5, "dice": 1e-4, "soft_dice": 1e-4, "energy": 1e-4}
TIE_TOL = 1e-5  # |S_ref - tau| (or distance to max S) below which a pixel (or the hit) is float noise
THRESHOLD = 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class KernelCase:
    name: str
    batch: int
    channels: int
    feature: int  # h = w (= d for a volume)
    image: int  # H = W (= D for a volume)
    method: str = "gradcam"  # the CAM method (ops.cam_methods)
    volume: bool = False  # (B, C, d, h, w) -> (B, D, H, W): the 3-D kernel

    @property
    def sizes(self) -> str:
        side = 3 if self.volume else 2
        return (f"B={self.batch} C={self.channels} {'x'.join([str(self.feature)] * side)}->"
                f"{'x'.join([str(self.image)] * side)}")


@dataclass(frozen=True)
class Goal:
    name: str
    source: str  # the step whose rows hold the value
    find: Mapping[str, str]  # column -> value of the row to read
    column: str
    threshold: float
    unit: str


@dataclass(frozen=True)
class Profile:
    """Every size of a validation run: FULL on one H100/H200, TINY on a CPU (CI)."""

    name: str
    tests: tuple[str, ...]  # pytest paths (and options) from the checkout root
    parity: tuple[KernelCase, ...]
    timing: tuple[KernelCase, ...]
    timing_rep_ms: float
    batch_archs: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    batch_image: int
    batch_warmup: int  # untimed rounds of every provider
    batch_repeats: int  # timed rounds (median, p20, p80)
    pool_arch: str
    pool_images: int
    pool_image: int
    pool_batch: int
    pool_warmup: int  # images of the warm-up pool, passed over untimed before each timed pass
    pool_workers: int | None  # None: from the host's cores
    pool_precisions: tuple[str, ...]
    methods: tuple[KernelCase, ...]  # every CAM method at one shape: kernel vs the torch reference
    volumes: tuple[KernelCase, ...]  # the 3-D kernel vs the 3-D reference
    budgets_s: Mapping[str, float]
    goals: tuple[Goal, ...]
    goals_apply: bool  # False: the goals are for full sizes on a GPU; tiny values are reported as n/a


def _goals(pool_arch: str, batch_arch: str, image: int, batch_sizes: Sequence[int]) -> tuple[Goal, ...]:
    return (
        Goal("pool scoring >= 0.95x plain inference (bf16)", "pool",
             {"arch": pool_arch, "precision": "bf16", "provider": "xal-engine"}, "ratio_vs_plain", 0.95, "x"),
        Goal("pool scoring >= 0.95x plain inference (fp32)", "pool",
             {"arch": pool_arch, "precision": "fp32", "provider": "xal-engine"}, "ratio_vs_plain", 0.95, "x"),
        Goal(f"{pool_arch} {image}^2 bf16 pool scoring >= 16.7k img/s (1M images in a minute)", "pool",
             {"arch": pool_arch, "precision": "bf16", "provider": "xal-engine"}, "images_per_s", 16_700.0, "img/s"),
        *(Goal(f">= 20x pytorch-grad-cam, {batch_arch} {image}^2 fp32, B={b}", "batch",
               {"arch": batch_arch, "batch": str(b), "dtype": "fp32", "provider": "xal-engine"},
               "speedup_vs_grad_cam", 20.0, "x") for b in batch_sizes),
        *(Goal(f"kernel >= 10x the torch reference, {m} bf16", "methods", {"method": m, "dtype": "bf16"},
               "speedup_vs_torch", 10.0, "x") for m in CAM_METHOD_NAMES),
        Goal("3-D kernel >= 10x the 3-D torch reference (largest case, bf16)", "volumes",
             {"dtype": "bf16", "largest": "yes"}, "speedup_vs_torch", 10.0, "x"),
    )


TESTS = ("tests/kernels", "tests/ops", "tests/core/test_scoring.py", "tests/jobs/test_score.py")
FULL = Profile(
    name="full",
    tests=TESTS,
    parity=(KernelCase("resnet18_layer4_224", 32, 512, 7, 224), KernelCase("resnet50_layer4_224", 32, 2048, 7, 224),
            KernelCase("densenet121_224", 32, 1024, 7, 224), KernelCase("up_14_to_512", 16, 1024, 14, 512),
            KernelCase("up_32_to_1024", 8, 512, 32, 1024)),
    timing=(KernelCase("resnet18_layer4_224", 256, 512, 7, 224), KernelCase("resnet50_layer4_224", 256, 2048, 7, 224),
            KernelCase("densenet121_224", 256, 1024, 7, 224), KernelCase("up_14_to_512", 256, 1024, 14, 512),
            KernelCase("up_32_to_1024", 64, 512, 32, 1024)),
    timing_rep_ms=100.0,
    batch_archs=("resnet18", "resnet50", "densenet121"), batch_sizes=(64, 256), batch_image=224, batch_warmup=2, batch_repeats=10,
    pool_arch="resnet18", pool_images=32_768, pool_image=224, pool_batch=256, pool_warmup=512, pool_workers=None,
    pool_precisions=("bf16", "fp32"),
    methods=tuple(KernelCase("resnet50_layer4_224", 256, 2048, 7, 224, method=m) for m in CAM_METHOD_NAMES),
    volumes=(KernelCase("vol_8_to_64", 8, 256, 8, 64, volume=True), KernelCase("vol_8_to_128", 4, 256, 8, 128, volume=True)),
    budgets_s={"environment": 10, "tests": 150, "parity": 40, "kernel_time": 35, "methods": 30, "volumes": 20,
               "batch": 85, "pool": 95, "goals": 5},
    goals=_goals("resnet18", "resnet50", 224, (64, 256)),
    goals_apply=True,
)
TINY = Profile(
    name="tiny",
    tests=("tests/ops/test_dispatch.py", "tests/kernels", "-k", "test_dispatch or channels_last or empty_batch"),
    parity=(KernelCase("tiny_7_to_32", 3, 8, 7, 32), KernelCase("tiny_4_to_20", 2, 16, 4, 20)),
    timing=(KernelCase("tiny_7_to_32", 3, 8, 7, 32),),
    timing_rep_ms=20.0,
    batch_archs=("resnet18",), batch_sizes=(2, 4), batch_image=64, batch_warmup=1, batch_repeats=1,
    pool_arch="resnet18", pool_images=128, pool_image=64, pool_batch=64, pool_warmup=64, pool_workers=1,
    pool_precisions=("bf16", "fp32"),
    methods=tuple(KernelCase("tiny_4_to_16", 2, 4, 4, 16, method=m) for m in CAM_METHOD_NAMES),
    volumes=(KernelCase("vol_3_to_8", 2, 4, 3, 8, volume=True),),
    budgets_s={"environment": 15, "tests": 60, "parity": 40, "kernel_time": 30, "methods": 40, "volumes": 30,
               "batch": 40, "pool": 60, "goals": 5},
    goals=_goals("resnet18", "resnet18", 64, (2, 4)),
    goals_apply=False,
)
PROFILES = {"full": FULL, "tiny": TINY}


@dataclass
class StepOutput:
    """What a step produced: its CSV rows, whether it passed, one line of detail."""

    rows: list[dict]
    columns: list[str]
    ok: bool
    detail: str


@dataclass
class StepRecord:
    name: str
    status: str
    seconds: float
    budget_s: float
    detail: str
    files: list[str] = field(default_factory=list)
    output: StepOutput | None = None


@dataclass
class Context:
    out: Path
    device: torch.device
    profile: Profile
    workdir: str | None
    deadline: float = 0.0  # perf_counter of the running step's budget end
    results: dict[str, StepOutput] = field(default_factory=dict)

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- environment


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def _run_text(cmd: Sequence[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20, cwd=cwd, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> str:
    """Full commit of the checkout, ``+dirty`` when the tree has uncommitted changes; "-" outside git."""
    here = Path(__file__).resolve().parent
    commit = _run_text(["git", "rev-parse", "HEAD"], here)
    if not commit:
        return "-"
    return commit + ("+dirty" if _run_text(["git", "status", "--porcelain", "--untracked-files=no"], here) else "")


def environment(device: torch.device, profile: Profile) -> dict[str, str]:
    """Device, driver and versions as strings (driver from nvidia-smi where it exists)."""
    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "profile": profile.name,
           "device": device_name(device), "device_type": device.type}
    smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                     "--format=csv,noheader"]) if shutil.which("nvidia-smi") else ""
    gpus = smi.splitlines()
    index = (device.index or 0) if device.type == "cuda" else 0
    env["driver"] = (f"nvidia-smi: {gpus[min(index, len(gpus) - 1)]}" if gpus
                     else f"nvidia-smi not found (torch built for CUDA {torch.version.cuda or '-'})")
    env["cuda_runtime"] = str(torch.version.cuda or "-")
    env["cudnn"] = str(torch.backends.cudnn.version() or "-")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", multiprocessors=str(props.multi_processor_count),
                   memory_gib=f"{props.total_memory / 2**30:.1f}")
    env.update(python=platform.python_version(), torch=torch.__version__, torchvision=_version("torchvision"),
               triton=_version("triton"), zarr=_version("zarr"), numpy=np.__version__,
               grad_cam=_version("grad-cam"), xal_engine=__version__, git_commit=git_state(),
               cores=str(os.cpu_count()), tf32="off (timing.no_tf32) in every step")
    return env


def step_environment(ctx: Context) -> StepOutput:
    env = environment(ctx.device, ctx.profile)
    rows = [{"key": k, "value": v} for k, v in env.items()]
    return StepOutput(rows, ["key", "value"], True, f"{env['device']}; {env['driver']}")


# ---------------------------------------------------------------- tests

TEST_COLUMNS = ["file", "tests", "passed", "failed", "errors", "skipped", "seconds"]


def test_file(classname: str) -> str:
    """``tests/ops/test_dispatch.py`` of a junit classname ``tests.ops.test_dispatch[.TestClass]``."""
    parts = classname.split(".")
    last = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
    return "/".join(parts[:last + 1]) + ".py" if classname else "?"


def junit_counts(path: Path) -> list[dict]:
    """Counts per test file from a pytest junit xml, then an "all" row."""
    per: dict[str, dict] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = test_file(case.get("classname", ""))
        row = per.setdefault(name, dict.fromkeys(TEST_COLUMNS[1:], 0) | {"file": name})
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        row["tests"] += 1
        row[{"failure": "failed", "error": "errors"}.get(kind, kind)] += 1
        row["seconds"] += float(case.get("time", 0.0) or 0.0)
    rows = sorted(per.values(), key=lambda r: r["file"])
    total = {"file": "all", **{k: sum(r[k] for r in rows) for k in TEST_COLUMNS[1:]}}
    return [{**r, "seconds": round(r["seconds"], 2)} for r in [*rows, total]]


TEST_RUNNER = "pytest"  # the module the tests step runs, with this interpreter


def step_tests(ctx: Context) -> StepOutput:
    root = checkout.benchmarks_dir("the tests step runs the checkout's tests/").parent
    junit, log = ctx.out / "tests_junit.xml", ctx.out / "tests.log"
    if importlib.util.find_spec(TEST_RUNNER) is None:  # a `[cpu]`-only install: say so, not "no junit xml"
        detail = (f"{TEST_RUNNER} is not installed for {sys.executable}: install the dev extra "
                  "(pip install -e '.[cpu,dev]') and run again")
        log.write_text(detail + "\n")
        return StepOutput([], TEST_COLUMNS, False, detail)
    env = dict(os.environ)
    if ctx.device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)  # the kernel compiled for the GPU, not interpreted
    else:  # the tests pick CUDA where they see it: on the CPU they must not, and Triton is interpreted
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", *ctx.profile.tests, "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    say(f"  $ {' '.join(cmd[2:])}  (TRITON_INTERPRET={env.get('TRITON_INTERPRET', 'unset')})")
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False,
                              timeout=max(1.0, ctx.left()))
        log.write_text(proc.stdout + proc.stderr)
        code, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {err.timeout:.0f} s]\n")
        code, timed_out = -1, True
    if not junit.exists():
        return StepOutput([], TEST_COLUMNS, False, f"no junit xml (exit code {code}"
                          + (", timed out" if timed_out else "") + "); see tests.log")
    rows = junit_counts(junit)
    total = rows[-1]
    ok = code == 0 and not timed_out and total["failed"] == total["errors"] == 0 and total["tests"] > 0
    detail = (f"{total['passed']} passed, {total['failed']} failed, {total['errors']} errors, "
              f"{total['skipped']} skipped (pytest exit code {code}{', timed out' if timed_out else ''})")
    return StepOutput(rows, TEST_COLUMNS, ok, detail)


# ---------------------------------------------------------------- kernel inputs, parity and time


def kernel_inputs(case: KernelCase, dtype: str, channels_last: bool, device: torch.device, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (post-ReLU), G (B, C, h, w) in ``dtype`` and disc-shaped ROIs (B, H, W) bool, made on ``device``.

    Activations are rectified, as at resnet's layer4; gradients are signed, so about half of each
    weighted map is positive; ROIs are discs of radius 0.1-0.35 H at random centres (a lesion mask).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    side = 3 if case.volume else 2
    shape = (case.batch, case.channels, *([case.feature] * side))
    a = torch.randn(shape, generator=gen, device=device).clamp_min(0.0).to(DTYPES[dtype])
    g = (1e-2 * torch.randn(shape, generator=gen, device=device)).to(DTYPES[dtype])
    if channels_last:
        layout = torch.channels_last_3d if case.volume else torch.channels_last
        a, g = a.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
    centre = torch.rand(case.batch, side, generator=gen, device=device) * case.image  # [B, side]
    radius = (0.1 + 0.25 * torch.rand(case.batch, generator=gen, device=device)) * case.image  # [B]
    pos = torch.arange(case.image, dtype=torch.float32, device=device) + 0.5
    dist = torch.zeros((case.batch, *([1] * side)), device=device)
    for k in range(side):  # squared distance to the centre along each axis, broadcast: [B, H, W(, ...)]
        axis = [1] * side
        axis[k] = case.image
        dist = dist + (pos.view(1, *axis) - centre[:, k].view(-1, *([1] * side))) ** 2
    rois = dist <= radius.view(-1, *([1] * side)) ** 2  # discs (balls for a volume) of radius 0.1-0.35 H
    return a, g, rois


def kernel_backend(device: torch.device) -> str:
    """"triton" on CUDA and on a CPU whose Triton runs interpreted (TRITON_INTERPRET=1), else "torch"."""
    return "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"


PARITY_COLUMNS = ["case", "method", "sizes", "dtype", "layout", "backend", "reference", "max_cam_diff", "max_dice_diff",
                  "max_soft_dice_diff", "max_energy_diff", "hit_mismatches", "near_tau_images", "near_tie_hits",
                  "tol_cam", "tol_dice", "status"]


def parity_row(case: KernelCase, dtype: str, channels_last: bool, device: torch.device) -> dict:
    """The kernel on ``device`` vs the torch reference on the CPU, from the same inputs (made on
    ``device``, copied to the CPU with their layout)."""
    a_dev, g_dev, rois_dev = kernel_inputs(case, dtype, channels_last, device)
    a, g, rois = a_dev.cpu(), g_dev.cpu(), rois_dev.cpu()
    backend = kernel_backend(device)
    ref = gradcam_dice(a, g, rois, THRESHOLD, return_cam=True, backend="torch", method=case.method)
    got = gradcam_dice(a_dev, g_dev, rois_dev, THRESHOLD, return_cam=True, backend=backend, method=case.method)
    got = type(got)(*(t.cpu() for t in got))
    if case.volume:  # S_ref (B, D, H, W)
        maps = reference3d.upsample_normalise_3d(ref.cam, (case.image,) * 3).numpy()
    else:  # S_ref (B, H, W)
        maps = reference.upsample_normalise(ref.cam, (case.image, case.image)).numpy()
    near_tau = (np.abs(maps - THRESHOLD) < TIE_TOL).reshape(len(maps), -1).any(1)  # a pixel may flip Dice
    ties = near_tie_hits(maps, rois.numpy(), TIE_TOL)

    def diff(name: str, keep: np.ndarray | None = None) -> float:
        x, y = getattr(got, name).double().numpy(), getattr(ref, name).double().numpy()
        if keep is not None:
            x, y = x[keep], y[keep]
        if not np.isfinite(x).all() or not np.isfinite(y).all():
            return float("inf") if (np.isfinite(x) != np.isfinite(y)).any() else float(
                np.abs(np.nan_to_num(x) - np.nan_to_num(y)).max(initial=0.0))
        return float(np.abs(x - y).max(initial=0.0))

    errors = {"cam": diff("cam"), "dice": diff("dice", ~near_tau), "soft_dice": diff("soft_dice"),
              "energy": diff("energy")}
    hits = int(((got.hit.numpy() != ref.hit.numpy()) & ~ties).sum())
    ok = all(errors[k] <= TOLERANCES[k] for k in TOLERANCES) and hits == 0
    return {"case": case.name, "method": case.method, "sizes": case.sizes, "dtype": dtype,
            "layout": "channels_last" if channels_last
            else "nchw", "backend": f"{backend} ({device.type})", "reference": "torch (cpu)",
            "max_cam_diff": f"{errors['cam']:.3g}", "max_dice_diff": f"{errors['dice']:.3g}",
            "max_soft_dice_diff": f"{errors['soft_dice']:.3g}", "max_energy_diff": f"{errors['energy']:.3g}",
            "hit_mismatches": hits, "near_tau_images": int(near_tau.sum()), "near_tie_hits": int(ties.sum()),
            "tol_cam": TOLERANCES["cam"], "tol_dice": TOLERANCES["dice"], "status": PASSED if ok else FAILED}


def step_parity(ctx: Context) -> StepOutput:
    rows: list[dict] = []
    with no_tf32():
        for case in ctx.profile.parity:
            for dtype in DTYPES:
                for channels_last in (True, False):
                    if ctx.over_budget():
                        rows.append({"case": case.name, "sizes": case.sizes, "dtype": dtype,
                                     "layout": "channels_last" if channels_last else "nchw",
                                     "status": f"{SKIPPED} (budget)"})
                        continue
                    row = parity_row(case, dtype, channels_last, ctx.device)
                    rows.append(row)
                    say(f"  parity {case.name} {dtype} {row['layout']}: cam {row['max_cam_diff']}, "
                        f"dice {row['max_dice_diff']}, soft {row['max_soft_dice_diff']}, energy "
                        f"{row['max_energy_diff']}, hits {row['hit_mismatches']} -> {row['status']}")
    bad = [r for r in rows if r["status"] != PASSED]
    return StepOutput(rows, PARITY_COLUMNS, not bad and bool(rows),
                      f"{len(rows) - len(bad)}/{len(rows)} cases within tolerance, backend "
                      f"{kernel_backend(ctx.device)} on {ctx.device.type}")


def kernel_call(a: torch.Tensor, g: torch.Tensor, rois: torch.Tensor, backend: str,
                method: str = "gradcam") -> Callable[[], object]:
    """One ``gradcam_dice`` call of ``backend`` on these inputs (what the timer repeats);
    ``"triton-old-layout"``: Grad-CAM through the kernel in its earlier layout (``OLD_LAYOUT``)."""
    if backend == OLD_LAYOUT_PROVIDER:
        from xal_engine.kernels.gradcam_dice import gradcam_dice_triton

        def old_layout() -> object:  # the weights as the dispatcher computes them, then the launch
            weights = get_cam_method("gradcam").weights(a, g).float()
            return gradcam_dice_triton(a, rois, THRESHOLD, weights=weights, **OLD_LAYOUT)

        return old_layout
    return lambda: gradcam_dice(a, g, rois, THRESHOLD, backend=backend, method=method)


OLD_LAYOUT_PROVIDER = "triton-old-layout"
OLD_LAYOUT = {"programs_per_image": 1, "scan_extremes": True, "tile": (8, 128)}  # before the kernel-speed item


TIME_COLUMNS = ["case", "sizes", "dtype", "layout", "provider", "timer", "calls", "median_ms", "p20_ms", "p80_ms",
                "images_per_s", "bytes_read", "gb_per_s", "status"]


def step_kernel_time(ctx: Context) -> StepOutput:
    rows: list[dict] = []
    providers = sorted({kernel_backend(ctx.device), "torch"}, reverse=True)  # triton first
    if providers[0] == "triton":
        providers.insert(1, OLD_LAYOUT_PROVIDER)
    with no_tf32():
        for case in ctx.profile.timing:
            for dtype in DTYPES:
                a, g, rois = kernel_inputs(case, dtype, True, ctx.device)
                moved = a.numel() * a.element_size() + g.numel() * g.element_size() + rois.numel()  # bytes read
                for provider in providers:
                    base = {"case": case.name, "sizes": case.sizes, "dtype": dtype, "layout": "channels_last",
                            "provider": provider, "bytes_read": moved}
                    if ctx.over_budget():
                        rows.append({**base, "status": f"{SKIPPED} (budget)"})
                        continue
                    times, timer = device_times_ms(kernel_call(a, g, rois, provider), ctx.device,
                                                   rep_ms=ctx.profile.timing_rep_ms, cpu_repeats=3)
                    stats = summarise([t / 1e3 for t in times])
                    median_s = stats["median_ms"] / 1e3
                    rows.append({**base, "timer": timer, "calls": len(times),
                                 **{k: round(v, 4) for k, v in stats.items()},
                                 "images_per_s": round(case.batch / median_s, 1),
                                 "gb_per_s": round(moved / median_s / 1e9, 2), "status": PASSED})
                    say(f"  kernel {case.name} {dtype} {provider}: {stats['median_ms']:.3f} ms, "
                        f"{moved / median_s / 1e9:.1f} GB/s ({timer})")
    bad = [r for r in rows if r["status"] != PASSED]
    return StepOutput(rows, TIME_COLUMNS, not bad and bool(rows), f"{len(rows) - len(bad)}/{len(rows)} timings")


KERNEL_VS_TORCH_COLUMNS = [*PARITY_COLUMNS[:-1], "largest", "timer", "kernel_ms", "torch_ms",
                           "speedup_vs_torch", "status"]


def kernel_vs_torch(ctx: Context, cases: Sequence[KernelCase], dtypes: Sequence[str]) -> StepOutput:
    """Each case (a CAM method, a volume): the kernel's parity with the torch reference and both
    device times on the same inputs (channels-last), the kernel's speedup over the reference."""
    rows: list[dict] = []
    kernel = kernel_backend(ctx.device)
    largest = max(cases, key=lambda c: c.batch * c.image ** (3 if c.volume else 2))
    with no_tf32():
        for case in cases:
            for dtype in dtypes:
                base = {"case": case.name, "method": case.method, "sizes": case.sizes, "dtype": dtype,
                        "layout": "channels_last", "largest": "yes" if case is largest else "no"}
                if ctx.over_budget():
                    rows.append({**base, "status": f"{SKIPPED} (budget)"})
                    continue
                parity = parity_row(case, dtype, True, ctx.device)
                a, g, rois = kernel_inputs(case, dtype, True, ctx.device)
                ms = {}
                for provider in (kernel, "torch"):
                    times, timer = device_times_ms(kernel_call(a, g, rois, provider, case.method), ctx.device,
                                                   rep_ms=ctx.profile.timing_rep_ms, cpu_repeats=3)
                    ms[provider] = summarise([t / 1e3 for t in times])["median_ms"]
                rows.append({**parity, **base, "timer": timer, "kernel_ms": round(ms[kernel], 4),
                             "torch_ms": round(ms["torch"], 4),
                             "speedup_vs_torch": round(ms["torch"] / ms[kernel], 3)})
                say(f"  {case.name} {case.method} {dtype}: cam {parity['max_cam_diff']}, dice "
                    f"{parity['max_dice_diff']}; {kernel} {ms[kernel]:.3f} ms vs torch {ms['torch']:.3f} ms "
                    f"-> {rows[-1]['status']}")
    bad = [r for r in rows if r["status"] != PASSED]
    return StepOutput(rows, KERNEL_VS_TORCH_COLUMNS, not bad and bool(rows),
                      f"{len(rows) - len(bad)}/{len(rows)} cases within tolerance, {kernel} vs torch on {ctx.device.type}")


def step_methods(ctx: Context) -> StepOutput:
    """Every CAM method (issue: the CAM family) at one real shape, bf16 and fp32."""
    return kernel_vs_torch(ctx, ctx.profile.methods, ("bf16", "fp32"))


def step_volumes(ctx: Context) -> StepOutput:
    """The 3-D kernel against the 3-D reference."""
    return kernel_vs_torch(ctx, ctx.profile.volumes, ("bf16", "fp32"))


# ---------------------------------------------------------------- batch level


MISMATCHED = "precision-mismatched: no ratio vs fp32 pytorch-grad-cam"


def precision_matched(row: dict) -> dict:
    """A batch-level row with its speedup vs grad-cam kept only where grad-cam ran at the row's
    precision: the batch level divides by the fp32 grad-cam time for bf16 rows too (pytorch-grad-cam
    has no bf16), and a bf16-vs-fp32 ratio is not a like-for-like figure."""
    if row.get("dtype") == "fp32" or row.get("speedup_vs_grad_cam") in (None, ""):
        return row
    note = "; ".join(n for n in (row.get("note", ""), MISMATCHED) if n)
    return {**row, "speedup_vs_grad_cam": "", "note": note}


def step_batch(ctx: Context) -> StepOutput:
    from xal_engine.bench import batch as level

    p = ctx.profile
    args = level.parse_args(["--device", str(ctx.device), "--channels", "3", "--image-size", str(p.batch_image),
                             "--dtypes", "fp32,bf16", "--warmup", str(p.batch_warmup), "--repeats", str(p.batch_repeats),
                             "--budget-s", "2", "--no-write"])
    meta = provenance(ctx.device)
    columns = ["arch", "batch", *level.COLUMNS]
    rows: list[dict] = []
    failed = 0
    for arch in p.batch_archs:
        for b in p.batch_sizes:
            case = level.Case(arch, b, p.batch_image, 3)
            base = {"arch": arch, "batch": b, "benchmark": case.name, "sizes": case.sizes, **meta}
            if ctx.over_budget():
                rows.append({**base, "provider": "-", "note": f"{SKIPPED} (budget)"})
                failed += 1
                continue
            try:
                with no_tf32():
                    case_rows = level.run_case(case, args, ctx.device, meta)
            except Exception as err:  # noqa: BLE001 - a parity miss or a crash fails this case only
                rows.append({**base, "provider": "-", "note": f"failed: {type(err).__name__}: {err}"})
                failed += 1
                say(f"  batch {arch} B={b}: FAILED {type(err).__name__}: {err}")
                continue
            rows += [{"arch": arch, "batch": b, **precision_matched(r)} for r in case_rows]
            say(f"  batch {arch} B={b}: " + ", ".join(
                f"{r['provider']} {r['dtype']} {r['images_per_s']} img/s" for r in case_rows if r.get("images_per_s")))
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    n_cases = len(p.batch_archs) * len(p.batch_sizes)
    return StepOutput(rows, columns, failed == 0, f"{n_cases - failed}/{n_cases} cases checked and timed")


# ---------------------------------------------------------------- pool level

POOL_COLUMNS = ["arch", "precision", "provider", "n_images", "image", "batch_size", "workers", "warmup_images",
                "seconds", "images_per_s", "ratio_vs_plain", "projected_1m_s", "peak_gpu_mb", "check", "errors",
                "status"]
POOL_PROVIDERS = ("loader", "plain", "xal-engine")
CHECK_IMAGES = 64  # images of the pool's first batch compared with pytorch-grad-cam (on the CPU: seconds)


def pool_workers(profile: Profile) -> int:
    """Loader workers: the profile's, else all cores but 4 (the main thread, the writer, the
    GPU feed), between 2 and 12."""
    if profile.pool_workers is not None:
        return profile.pool_workers
    return max(2, min(12, (os.cpu_count() or 4) - 4))


def step_pool(ctx: Context) -> StepOutput:
    from xal_engine.bench import pool as level
    from xal_engine.bench.pools import repeated_pool

    p = ctx.profile
    workers = pool_workers(p)
    rows: list[dict] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="xal-validate-", dir=ctx.workdir) as tmp:
        t0 = time.perf_counter()
        pool_path = str(Path(tmp) / "pool.zarr")
        repeated_pool(pool_path, p.pool_images, size=p.pool_image, channels=3)
        warmup_path = str(Path(tmp) / "warmup.zarr")
        repeated_pool(warmup_path, p.pool_warmup, size=p.pool_image, channels=3)
        say(f"  pool: {p.pool_images} images 3x{p.pool_image}x{p.pool_image} uint8 built in "
            f"{time.perf_counter() - t0:.1f} s; {workers} loader workers, batch {p.pool_batch}")
        model_path = None
        for precision in p.pool_precisions:
            args = level.parse_args(["--device", str(ctx.device), "--arch", p.pool_arch, "--image-size",
                                     str(p.pool_image), "--channels", "3", "--batch-size", str(p.pool_batch),
                                     "--precision", precision, "--workers", str(workers), "--threads", "0",
                                     "--warmup-images", str(p.pool_warmup), "--in-process", "--no-write"])
            model_path = model_path or level.save_model(Path(tmp) / "model.pt", args)
            base = {"arch": p.pool_arch, "precision": precision, "n_images": p.pool_images, "image": p.pool_image,
                    "batch_size": p.pool_batch, "workers": workers, "warmup_images": args.warmup_images}
            case: dict[str, dict] = {}
            try:
                for provider in POOL_PROVIDERS:
                    if ctx.over_budget():
                        raise TimeoutError("budget spent")
                    r = level.measure(provider, pool_path, model_path, args, warmup_path)
                    case[provider] = r
                    say(f"  pool {precision} {provider}: {p.pool_images / r['seconds']:.1f} img/s "
                        f"({r['seconds']:.2f} s)")
                errors = level.check_agreement(pool_path, model_path, args, images=CHECK_IMAGES)
                check, error_text, status = "pass", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), PASSED
            except Exception as err:  # noqa: BLE001 - recorded, the other precision still runs
                check, error_text, status = "-", f"{type(err).__name__}: {err}", FAILED
                failed += 1
                say(f"  pool {precision}: FAILED {error_text}")
            plain = case.get("plain")
            for provider in POOL_PROVIDERS:
                r = case.get(provider)
                if r is None:
                    rows.append({**base, "provider": provider, "check": "-", "errors": error_text, "status": status})
                    continue
                ips = p.pool_images / r["seconds"]
                rows.append({**base, "provider": provider, "seconds": round(r["seconds"], 3),
                             "images_per_s": round(ips, 1),
                             "ratio_vs_plain": round(plain["seconds"] / r["seconds"], 3) if plain else "",
                             "projected_1m_s": round(1e6 / ips, 1), "peak_gpu_mb": round(r["peak_gpu_mb"], 1),
                             "check": check if provider == "xal-engine" else "-",
                             "errors": error_text if provider == "xal-engine" else "", "status": status})
    n = len(p.pool_precisions)
    return StepOutput(rows, POOL_COLUMNS, failed == 0, f"{n - failed}/{n} precisions scored, checked and timed")


# ---------------------------------------------------------------- goals

GOAL_COLUMNS = ["goal", "threshold", "measured", "unit", "status", "source"]


def evaluate_goals(profile: Profile, results: Mapping[str, StepOutput]) -> list[dict]:
    """One row per goal: the measured value (from the step's rows, never estimated) and pass/fail;
    "not measured" where the step or its row is missing, "n/a" for a tiny profile."""
    rows = []
    for goal in profile.goals:
        source = results.get(goal.source)
        match = [r for r in (source.rows if source else [])
                 if all(str(r.get(k)) == v for k, v in goal.find.items()) and r.get(goal.column) not in (None, "")]
        measured = float(match[0][goal.column]) if match else None
        if measured is None:
            status = "not measured"
        elif not profile.goals_apply:
            status = "n/a (tiny sizes)"
        else:
            status = "PASS" if measured >= goal.threshold else "FAIL"
        rows.append({"goal": goal.name, "threshold": goal.threshold, "measured": "" if measured is None
                     else round(measured, 3), "unit": goal.unit, "status": status,
                     "source": f"{goal.source}.csv " + " ".join(f"{k}={v}" for k, v in goal.find.items())})
    return rows


def step_goals(ctx: Context) -> StepOutput:
    rows = evaluate_goals(ctx.profile, ctx.results)
    for r in rows:
        say(f"  goal {r['goal']}: measured {r['measured'] or '-'} {r['unit']} -> {r['status']}")
    passed = sum(r["status"] == "PASS" for r in rows)
    return StepOutput(rows, GOAL_COLUMNS, True, f"{passed}/{len(rows)} goals met"
                      + ("" if ctx.profile.goals_apply else " (tiny sizes: goals do not apply)"))


# ---------------------------------------------------------------- driver

STEPS: tuple[tuple[str, Callable[[Context], StepOutput]], ...] = (
    ("environment", step_environment), ("tests", step_tests), ("parity", step_parity),
    ("kernel_time", step_kernel_time), ("methods", step_methods), ("volumes", step_volumes),
    ("batch", step_batch), ("pool", step_pool), ("goals", step_goals),
)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def md_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(path: Path, ctx: Context, records: list[StepRecord], total_s: float) -> None:
    env = ctx.results.get("environment")
    info = {r["key"]: r["value"] for r in env.rows} if env else {}
    failed = [r.name for r in records if r.status != PASSED]
    parts = [
        "# GPU validation of xal-engine",
        "",
        f"{info.get('date', '-')}, profile **{ctx.profile.name}**, device **{info.get('device', ctx.device)}**, "
        f"{info.get('driver', '-')}; torch {info.get('torch', '-')}, triton {info.get('triton', '-')}, "
        f"commit {info.get('git_commit', '-')}. Total {total_s:.0f} s. "
        + (f"**Failed steps: {', '.join(failed)}.**" if failed else "All steps passed."),
        "",
        "Command: `python benchmarks/gpu_validate.py" + (" --tiny" if ctx.profile.name == "tiny" else "")
        + f" --device {ctx.device}`. Every number below was measured in this run.",
        "",
        "## Steps",
        "",
        md_table([{"step": r.name, "status": r.status, "seconds": f"{r.seconds:.1f}", "budget_s": f"{r.budget_s:.0f}",
                   "files": ", ".join(r.files), "detail": r.detail} for r in records],
                 ["step", "status", "seconds", "budget_s", "files", "detail"]),
    ]
    goals = ctx.results.get("goals")
    if goals is not None:
        parts += ["", "## Goals (as measured)", "", goals.detail, "", md_table(goals.rows, goals.columns)]
    for r in records:
        out = r.output
        parts += ["", f"## {r.name}: {r.status}", "", r.detail, ""]
        if r.name == "goals":
            continue  # shown above
        if out is not None and out.rows:
            parts.append(md_table(out.rows, out.columns))
    path.write_text("\n".join(parts) + "\n")


def run_steps(ctx: Context, only: Sequence[str], budget_scale: float) -> list[StepRecord]:
    records: list[StepRecord] = []
    chosen = [(name, fn) for name, fn in STEPS if name in only]
    for i, (name, fn) in enumerate(chosen, 1):
        budget = ctx.profile.budgets_s[name] * budget_scale
        say(f"[{i}/{len(chosen)}] {name}: start (budget {budget:.0f} s)")
        t0 = time.perf_counter()
        ctx.deadline = t0 + budget
        try:
            out = fn(ctx)
            status, detail = (PASSED if out.ok else FAILED), out.detail
        except Exception as err:  # noqa: BLE001 - a failing step is recorded; the next one runs
            out = None
            status, detail = FAILED, f"{type(err).__name__}: {err}"
            (ctx.out / f"{name}.error.txt").write_text(traceback.format_exc())
        seconds = time.perf_counter() - t0
        if status == PASSED and seconds > budget:
            status, detail = FAILED, f"{detail}; over its budget ({seconds:.0f} s > {budget:.0f} s)"
        files = []
        if out is not None:
            ctx.results[name] = out
            write_csv(ctx.out / f"{name}.csv", out.rows, out.columns)
            files.append(f"{name}.csv")
        if name == "tests":
            files += [f for f in ("tests_junit.xml", "tests.log") if (ctx.out / f).exists()]
        if (ctx.out / f"{name}.error.txt").exists():
            files.append(f"{name}.error.txt")
        records.append(StepRecord(name, status, seconds, budget, detail, files, out))
        say(f"[{i}/{len(chosen)}] {name}: {status.upper()} in {seconds:.1f} s - {detail}")
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Validate xal-engine on one GPU (tests, kernel parity and device "
                                            "time, batch and pool throughput, the GPU goals) in one command.",
                                epilog="See the module docstring of xal_engine.bench.validate for the steps.")
    p.add_argument("--tiny", action="store_true", help="tiny sizes that run on a CPU in about a minute (CI)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=None, help="folder of the results (default benchmarks/results/gpu/)")
    p.add_argument("--steps", default=",".join(name for name, _ in STEPS),
                   help="comma-separated subset of the steps, in their fixed order")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    p.add_argument("--workdir", default=None, help="where the pools are built (default: a temp dir)")
    args = p.parse_args(argv)
    names = [s for s in args.steps.split(",") if s]
    unknown = [s for s in names if s not in dict(STEPS)]
    if unknown or not names:
        p.error(f"--steps: unknown {', '.join(unknown) or '(none)'}; expected some of {', '.join(dict(STEPS))}")
    args.steps = names
    if not args.budget_scale >= 0:  # a negative factor or NaN; 0 spends no budget (every case skipped)
        p.error(f"--budget-scale: expected a factor >= 0, got {args.budget_scale}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen steps, write the CSVs and summary.md; 0 when every step passed, else 1."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    profile = TINY if args.tiny else FULL
    out = args.out if args.out is not None else checkout.results_dir("pass --out DIR") / "gpu"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise XalError(f"--out {out}: cannot create the results folder ({err.strerror})") from None
    for stale in out.glob("*.error.txt"):
        stale.unlink()
    ctx = Context(out=out, device=device, profile=profile, workdir=args.workdir)
    say(f"xal-engine GPU validation ({profile.name} profile) on {device_name(device)} -> {out}")
    t0 = time.perf_counter()
    records = run_steps(ctx, args.steps, args.budget_scale)
    total = time.perf_counter() - t0
    write_summary(out / "summary.md", ctx, records, total)
    failed = [r.name for r in records if r.status != PASSED]
    if "goals" in ctx.results:
        say("goals: " + "; ".join(f"{r['goal']}: {r['status']}" for r in ctx.results["goals"].rows))
    say(f"{'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'} in {total:.0f} s; "
        f"wrote {out / 'summary.md'}")
    return 1 if failed else 0


__all__ = ["FULL", "PROFILES", "TINY", "Profile", "evaluate_goals", "junit_counts", "main", "parity_row",
           "parse_args"]
