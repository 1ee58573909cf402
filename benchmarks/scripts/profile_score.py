"""Where the time of `xal-engine score` goes: a wall-clock breakdown of score_pool over a small pool.

    python benchmarks/scripts/profile_score.py               # CPU: N=512 1x64x64, resnet18, loader in-process
    python benchmarks/scripts/profile_score.py --device cuda --n 8192 --image-size 224 --workers 4
    python benchmarks/scripts/profile_score.py --arch tiny --n 4096 --image-size 224 --channels 3 --threads 2
    python benchmarks/scripts/profile_score.py --cprofile 25 # + the 25 costliest functions (main thread)

The scorer's stages are wrapped with timers (synchronised on CUDA, so a stage holds its own kernels):
    loader      Zarr read + decode of one item (UnitRanges.__getitem__; in-process with --workers 0)
    forward     the model's forward inside the Grad-CAM capture
    backward    torch.autograd.grad down to the target layer
    gradcam     gradcam_dice (map, upsample, normalise, Dice, soft Dice, energy, hit)
    to_host     packing the per-image results and the one device->host copy
    writes      Zarr writes of the score run (a writer thread: overlaps the others)
The rest of the wall time (softmax and uncertainty, the loop, the progress bar) is "other".
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from xal_engine.bench.timing import synchronize
from xal_engine.core import capture as cam
from xal_engine.core import scoring
from xal_engine.core.inputs import resolve_device
from xal_engine.core.models import Checkpoint, build_model, parse_arch, save_checkpoint
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, class_names, create_synthetic_pool
from xal_engine.jobs import score as scorer
from xal_engine.jobs import streaming
from xal_engine.store.dataset import UnitRanges
from xal_engine.store.score_run import ScoreRun

STAGES = ("loader", "forward", "backward", "gradcam", "to_host", "writes")


class Timers:
    """Seconds per stage, summed over calls and threads."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            synchronize(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            with self.lock:
                self.seconds[stage] += time.perf_counter() - t0
            return out

        return timed


@contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Wrap the scorer's stages with ``timers`` (module attributes patched, restored on exit)."""
    load = scorer.load_scoring_model

    def load_timed(*args, **kwargs):
        model, ckpt = load(*args, **kwargs)
        model.forward = timers.wrap("forward", model.forward)  # the instance's forward: one per batch
        return model, ckpt

    patches = [(UnitRanges, "__getitem__", timers.wrap("loader", UnitRanges.__getitem__)),
               (scorer, "load_scoring_model", load_timed),
               (cam.torch.autograd, "grad", timers.wrap("backward", torch.autograd.grad)),
               (scoring, "gradcam_dice", timers.wrap("gradcam", scoring.gradcam_dice)),
               (streaming.ResultCopies, "put", timers.wrap("to_host", streaming.ResultCopies.put)),
               (ScoreRun, "write_unit", timers.wrap("writes", ScoreRun.write_unit))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def build(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """A synthetic pool and a random-init checkpoint for it."""
    pool_path, model_path = folder / "pool.zarr", folder / "model.pt"
    create_synthetic_pool(SyntheticConfig(n=args.n, size=args.image_size, classes=3, channels=args.channels,
                                          seed=0),
                          pool_path, show_progress=False)
    torch.manual_seed(0)
    save_checkpoint(model_path, build_model(args.arch, 3, args.channels),
                    Checkpoint(arch=args.arch, num_classes=3, in_channels=args.channels, classes=tuple(class_names(3)),
                               target_layer=parse_arch(args.arch).target_layer))
    return pool_path, model_path


def profile(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per stage plus "wall" and "other" for one scoring pass (after a warm-up pass)."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    with tempfile.TemporaryDirectory() as tmp:
        pool_path, model_path = build(args, Path(tmp))
        config = scorer.ScoreConfig(run="profile", batch_size=args.batch_size, device=str(device),
                                    num_workers=args.workers, overwrite=True, precision=args.precision)
        scorer.score_pool(pool_path, model_path, config, show_progress=False)  # warm-up (allocator, caches)
        timers = Timers(device)
        profiler = cProfile.Profile() if args.cprofile else None
        with instrumented(timers):
            t0 = time.perf_counter()
            profiler.enable() if profiler else None
            scorer.score_pool(pool_path, model_path, config, show_progress=False)
            profiler.disable() if profiler else None
            wall = time.perf_counter() - t0
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.cprofile)
    stages = {s: timers.seconds[s] for s in STAGES}
    main_thread = sum(v for k, v in stages.items() if k != "writes" and not (k == "loader" and args.workers))
    return {**stages, "other": max(0.0, wall - main_thread), "wall": wall}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="pool size")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1, help="image channels (3: RGB)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="loader processes (0: in-process, so it is timed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cprofile", type=int, default=0, help="also print the N costliest functions")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads: expected 0 (torch's default) or more, got {args.threads}")
    try:
        result = profile(args)
    except XalError as err:  # a bad --n, --arch, --device ...: one line, as the CLI gives it
        p.error(str(err))
    print(f"score_pool N={args.n} {args.channels}x{args.image_size}x{args.image_size} {args.arch} batch={args.batch_size} "
          f"workers={args.workers} {args.precision}: {result['wall']:.2f} s, {args.n / result['wall']:.0f} img/s")
    for stage in (*STAGES, "other"):
        note = "  (writer thread, overlapped)" if stage == "writes" else ""
        print(f"  {stage:<9} {result[stage]:7.3f} s  {100 * result[stage] / result['wall']:5.1f} %  "
              f"{1e3 * result[stage] / args.n:7.3f} ms/img{note}")
    return result


if __name__ == "__main__":
    main()
