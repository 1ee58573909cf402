"""`xal-engine score --backend ray`: the same scoring pass, spread over a Ray cluster's actors.

How it works
    The driver opens the pool, checks the model against it and creates (or resumes) run
    ``scores/<run>/`` with the local scorer's fingerprint, so a run started by ``score`` on one machine
    can be finished on Ray and the other way round. The run's pending work units (whole units, at
    least 4096 images each by default: ``--unit-size``), ``--units-per-call`` consecutive ones per
    call, become a Ray Dataset of unit ranges. ``map_batches(ScorerActor, compute=ActorPoolStrategy(size=N))`` streams
    those ranges into N actors. Each actor loads the checkpoint once, opens the pool by path, scores
    its ranges through the pass the local scorer runs (``UnitRanges`` reads with a read-ahead thread,
    ``score_and_store``) and writes
    its units into ``scores/<run>/`` itself; only small per-unit statistics travel back to the driver,
    which draws the progress bar and the summary (with per-worker throughput in ``--json``).

Fault tolerance
    A unit is marked done only after all its arrays are written, and it is given to one actor at a
    time (to another only after that one died). Actors run with ``max_restarts=-1`` and ``max_task_retries=-1``: a worker process that
    dies is restarted and its unfinished calls are retried, and a retried call rewrites the same chunks
    with the same values (idempotent). If the driver dies, rerunning the same command scores only the
    units not marked done, like the local scorer. The driver holds the shard's lock file, as the local
    scorer does, so a second scorer of the shard is refused while it runs; actors on the driver's host
    exit within 0.2 s of its end, and the processes of a local instance are killed by a reaper when the
    driver ends, however it ends (:mod:`xal_engine.jobs.reaper`). On a cluster, Ray ends a lost
    driver's actors itself; one still finishing a unit meanwhile writes the same bytes as its retry.

Running it
    Local machine (starts a private Ray instance with ``--workers`` CPUs, one actor per CPU)::

        xal-engine score --pool pool.zarr --model model.pt --backend ray --workers 2 --device cpu

    A running cluster (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the
    others; xal-engine and the same torch installed on every node)::

        xal-engine score --pool /shared/pool.zarr --model /shared/model.pt --backend ray \\
            --address HEAD:6379 --workers 8 --num-gpus-per-worker 1

    ``--num-gpus-per-worker`` defaults to 1 when the cluster has GPUs and ``--device`` is not ``cpu``,
    else 0; fractions (0.5) put two actors on one GPU; Ray picks the GPU (``cuda:N`` means any).
    Actors read their chunks in-process, so ``--num-workers`` (loader processes) does not apply;
    ``--units-per-call`` sets how many work units one actor call scores (default 1): a unit is the
    grain of retries and of the work spread over actors, so a pool of few units needs a smaller
    ``--unit-size`` to keep every actor busy.

Where the pool must live
    Every actor opens the pool by the driver's absolute path or URL and the checkpoint by its absolute
    path. A local pool must be on a filesystem that all nodes mount at the same path (NFS, Lustre,
    GPFS, FUSE); a pool in an object store (``s3://bucket/prefix/pool.zarr``, see
    :mod:`xal_engine.store.location`) needs no shared filesystem: each actor opens the store itself
    with the credentials of its node's environment (``AWS_*``, ``XAL_STORAGE_OPTIONS``; a local Ray
    instance inherits the driver's) and writes its own units. Only the checkpoint must still be
    readable at the same path on every node.

Without Ray (Slurm, torchrun, plain processes)
    ``--shard-id I --num-shards S`` gives process I a contiguous, disjoint range of work units; e.g.
    a Slurm array ``sbatch --array=0-7`` running
    ``xal-engine score --pool /shared/pool.zarr --model m.pt --shard-id $SLURM_ARRAY_TASK_ID
    --num-shards 8``. Each shard resumes on its own; the run is complete when every shard is.

Measured (benchmarks/scripts/bench_score_ray.py, CPU, resnet18 at 128x128, batch 32, median of 3; a shared
2-core VM whose load average was 7-9 from other work, so these are contention figures, not limits)

    | images | backend        | wall s | img/s end to end | img/s busy (actors) |
    |--------|----------------|--------|------------------|---------------------|
    | 256    | local          | 10.2   | 25.1             |                     |
    | 256    | ray, 1 worker  | 11.4   | 22.5             | 53.0                |
    | 256    | ray, 2 workers | 17.0   | 15.1             | 39.3                |
    | 512    | local          | 24.1   | 21.3             |                     |
    | 512    | ray, 1 worker  | 15.4   | 33.3             | 55.8                |
    | 512    | ray, 2 workers | 18.2   | 28.1             | 68.0                |

    A second actor adds little throughput on two already oversubscribed cores (x1.22 busy at 512
    images, less at 256), and its start-up (importing torch, loading the model: about 6 s here)
    costs more wall time than it saves; Ray pays off with free cores or one GPU per actor. Wall time
    includes actor start-up, not ray.init. One actor beat the local scorer at 512 images because
    actors run torch with one thread (Ray sets OMP_NUM_THREADS to the actor's CPUs) while the local
    scorer used two intra-op threads on busy cores.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from xal_engine.core.inputs import resolve_device
from xal_engine.core.models import load_checkpoint
from xal_engine.errors import XalError
from xal_engine.jobs.reaper import Reaper, exit_with_driver
from xal_engine.jobs.score import ScoreSummary, shard_lock
from xal_engine.jobs.streaming import (
    ScoreConfig,
    Scorer,
    UnitWriter,
    fit_target_layer,
    load_scoring_model,
    plan_run,
    score_and_store,
    unit_items,
    with_target_layer,
)
from xal_engine.progress import plural, progress
from xal_engine.store import Pool
from xal_engine.store.dataset import UnitRanges, read_ahead
from xal_engine.store.location import absolute
from xal_engine.store.score_run import ScoreRun

MISSING_RAY = "--backend ray needs the 'ray' extra: pip install 'xal-engine[ray]'"
STAT_FIELDS = ("unit", "images", "seconds", "dice_sum", "dice_count", "worker", "error")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # a running cluster ("auto", "HOST:6379", "ray://…"); None: local instance
    workers: int = 2  # actors in the pool (fixed size)
    num_gpus_per_worker: float | None = None  # None: 1 on a cluster with GPUs unless --device cpu, else 0
    num_cpus_per_worker: float = 1.0
    units_per_call: int = 1  # whole work units per actor call

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise XalError(f"--workers must be at least 1, got {self.workers}")
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            raise XalError(f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}")
        if self.num_cpus_per_worker <= 0:
            raise XalError(f"--num-cpus-per-worker must be > 0, got {self.num_cpus_per_worker}")
        if self.units_per_call < 1:
            raise XalError(f"--units-per-call must be at least 1, got {self.units_per_call}")


@dataclass(frozen=True)
class WorkerStats:
    worker: str  # host:pid of the actor process (a restarted actor is a new process)
    units: int
    images: int
    busy_seconds: float  # time inside actor calls
    images_per_s: float  # images / busy_seconds


@dataclass(frozen=True)
class RayScoreSummary(ScoreSummary):
    workers: tuple[WorkerStats, ...] = field(default_factory=tuple)

    def line(self) -> str:
        rates = ", ".join(f"{w.images_per_s:.1f}" for w in self.workers)
        return super().line() + (f"; {plural(len(self.workers), 'worker')} at {rates} img/s" if self.workers else "")


class ScorerActor:
    """One Ray actor: the model loaded once, the pool opened once; scores batches of unit ranges."""

    def __init__(self, pool_path: str, model_path: str, config: ScoreConfig, device: str,
                 driver: tuple[int, str] | None = None) -> None:
        if driver is not None:  # (pid, host): no unit is written for a driver that has died
            exit_with_driver(*driver)
        self.config = config
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # A user error (a pool this node cannot see, say) travels back as data: Ray would retry a
        # failing __init__ and then report the error without its type.
        self.error = ""
        try:
            self.device = resolve_device(device)
            self.model, ckpt = load_scoring_model(Path(model_path), self.device)
            self.ckpt = with_target_layer(ckpt, config)  # checked by the driver (fit_target_layer)
            pool = Pool.open(pool_path, mode="r+")
            self.run = ScoreRun.open(pool.group, config.run)
            self.chunk_size = pool.chunk_size
            self.blocks = UnitRanges(pool, [], with_labels=config.targets == "label")
            self.scorer = Scorer(self.model, self.ckpt, config, self.device).__enter__()  # for the actor's life
        except XalError as err:
            self.error = f"worker {self.worker}: {err}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch: {"first_unit", "stop_unit"} (R,) int64 rows of consecutive units -> one row per unit
        with the STAT_FIELDS, or a single row whose "error" is set."""
        if not self.error:
            try:
                return self._score(batch)
            except XalError as err:  # e.g. a corrupted chunk: that unit stays pending
                return self._error_row(f"worker {self.worker}: {err}")
        return self._error_row(self.error)

    def _error_row(self, message: str) -> dict[str, np.ndarray]:
        row = {f: np.zeros(1, dtype=np.int64) for f in STAT_FIELDS}
        return {**row, "unit": np.full(1, -1), "worker": np.asarray([self.worker]),
                "error": np.asarray([message])}

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        units = [u for a, b in zip(batch["first_unit"], batch["stop_unit"]) for u in range(int(a), int(b))]
        self.blocks.items = unit_items(self.run, units, self.chunk_size, self.config.batch_size)
        done: list[int] = []
        images: list[int] = []
        dice_sum: list[float] = []
        dice_count: list[int] = []
        writer = UnitWriter(self.run)  # Zarr encoding of unit i overlaps the compute of unit i+1
        try:
            items = read_ahead(self.blocks, pin=self.device.type == "cuda")
            for unit, part in score_and_store(self.scorer, items, writer):
                finite = np.isfinite(part.dice)
                done.append(unit)
                images.append(part.pred.shape[0])
                dice_sum.append(float(part.dice[finite].sum()))
                dice_count.append(int(finite.sum()))
        finally:
            writer.close()  # the call returns only once its units are durable and marked done
        seconds = time.perf_counter() - t0
        n = np.asarray(images, dtype=np.int64)
        return {
            "unit": np.asarray(done, dtype=np.int64),
            "images": n,
            "seconds": seconds * n / max(int(n.sum()), 1),  # the call's time, shared by image count
            "dice_sum": np.asarray(dice_sum, dtype=np.float64),
            "dice_count": np.asarray(dice_count, dtype=np.int64),
            "worker": np.asarray([self.worker] * len(done)),
            "error": np.asarray([""] * len(done)),
        }


def score_pool_ray(pool_path: str | Path, model_path: str | Path, config: ScoreConfig,
                   ray_config: RayConfig, show_progress: bool | None = None,
                   actor: type[ScorerActor] = ScorerActor) -> RayScoreSummary:
    """Score every pending unit of this shard of run `config.run` on Ray actors; returns the summary.

    ``actor``: the actor class (a subclass of ScorerActor may add instrumentation).
    """
    ray = import_ray()
    model_path = Path(model_path).resolve()
    pool = Pool.open(absolute(pool_path), mode="r+")  # actors open it by this path or URL
    pool.require_settled("before scoring")
    with shard_lock(pool, config):  # the driver holds it for its actors, which end with it
        return _score_ray_locked(ray, pool, model_path, config, ray_config, show_progress, actor)


def _score_ray_locked(ray: ModuleType, pool: Pool, model_path: Path, config: ScoreConfig,
                      ray_config: RayConfig, show_progress: bool | None,
                      actor: type[ScorerActor]) -> RayScoreSummary:
    model, ckpt = load_checkpoint(model_path)  # metadata and a shape probe for the checks, the fingerprint
    ckpt = fit_target_layer(model, ckpt, pool, model_path, config)
    plan = plan_run(pool, model_path, ckpt, config)  # the run exists before any actor starts
    run, n_images = plan.run, plan.n_images
    t0 = time.perf_counter()
    stats: dict[str, list[np.ndarray]] = {f: [] for f in STAT_FIELDS}
    device = "ray"
    if plan.pending:  # a finished run starts no cluster
        started, reaper = _init_ray(ray, ray_config)
        try:
            gpus = _gpus_per_worker(ray, config, ray_config)
            actor_device = "cuda" if gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
            rows = [{"first_unit": u, "stop_unit": u + 1} for u in plan.pending]
            # fewer units per call when there are few, so that every actor gets some
            per_call = min(ray_config.units_per_call, math.ceil(len(rows) / ray_config.workers))
            n_calls = math.ceil(len(rows) / per_call)
            actors = min(ray_config.workers, n_calls)
            device = f"ray:{actors}x{actor_device}"
            ds = ray.data.from_items(rows, override_num_blocks=n_calls)  # one block = one call
            ds = ds.map_batches(
                actor,
                fn_constructor_kwargs={"pool_path": str(pool.path), "model_path": str(model_path),
                                       "config": config, "device": actor_device,
                                       "driver": (os.getpid(), socket.gethostname())},
                compute=ray.data.ActorPoolStrategy(size=actors),
                batch_size=per_call, batch_format="numpy",
                num_cpus=ray_config.num_cpus_per_worker, num_gpus=gpus,
            )  # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: dead actors
            #    are restarted and their calls retried (passing them again is deprecated since 2.5x)
            bar = progress(n_images, desc=f"score {config.run} (ray)", enabled=show_progress)
            try:
                seen: set[str] = set()  # actor processes (host:pid) the reaper has listed
                for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    workers = set(out["worker"].tolist())
                    if reaper is not None and not workers <= seen:  # a new (or restarted) actor
                        reaper.watch()  # lists it and what Ray started for it
                        seen |= workers
                    if errors := [e for e in out["error"].tolist() if e]:
                        raise XalError(errors[0])
                    for f in STAT_FIELDS:
                        stats[f].append(out[f])
                    bar.update(int(out["images"].sum()))
            finally:
                bar.close()
        finally:
            try:
                if started:
                    ray.shutdown()
            finally:
                if reaper is not None:
                    reaper.close()
    seconds = time.perf_counter() - t0
    cols = {f: np.concatenate(v) if v else np.zeros(0) for f, v in stats.items()}
    scored = int(cols["images"].sum())
    dice_count = int(cols["dice_count"].sum())
    return RayScoreSummary(
        pool=str(pool.path), run=config.run, images=scored, units=len(plan.pending),
        units_already_done=plan.already_done, seconds=seconds,
        images_per_s=scored / seconds if seconds > 0 else math.inf,
        mean_dice=float(cols["dice_sum"].sum()) / dice_count if dice_count else math.nan,
        complete=run.is_complete(), device=device, workers=worker_stats(cols),
    )


def worker_stats(cols: dict[str, np.ndarray]) -> tuple[WorkerStats, ...]:
    """Per-worker units, images and busy throughput from the per-unit rows the actors returned."""
    out = []
    for worker in sorted(set(cols["worker"].tolist())):
        mine = cols["worker"] == worker
        images, busy = int(cols["images"][mine].sum()), float(cols["seconds"][mine].sum())
        out.append(WorkerStats(worker=str(worker), units=int(mine.sum()), images=images, busy_seconds=busy,
                               images_per_s=images / busy if busy > 0 else math.inf))
    return tuple(out)


def import_ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError:
        raise XalError(MISSING_RAY) from None
    return ray


def _init_ray(ray: ModuleType, cfg: RayConfig) -> tuple[bool, Reaper | None]:
    """Connect to `cfg.address`, or start a local instance sized for the actors. Returns whether
    this call initialised Ray (then the caller shuts it down) and, for a local instance, the reaper
    of its processes (:class:`~xal_engine.jobs.reaper.Reaper`: they end with this process)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images
    context.print_on_execution_start = False
    if ray.is_initialized():
        return False, None
    if cfg.address is None:
        reaper = Reaper()
        try:
            ray.init(num_cpus=math.ceil(cfg.workers * cfg.num_cpus_per_worker), include_dashboard=False,
                     log_to_driver=False)
        except BaseException:
            reaper.close()
            raise
        reaper.watch()
        return True, reaper
    check_reachable(cfg.address)
    try:
        ray.init(address=cfg.address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise XalError(f"--address {cfg.address}: cannot connect to a Ray cluster "
                       f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return True, None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://…": Ray resolves these
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise XalError(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def _gpus_per_worker(ray: ModuleType, config: ScoreConfig, cfg: RayConfig) -> float:
    """GPUs each actor reserves; CUDA devices are Ray's to assign, so --device cuda:N means any GPU."""
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise XalError(f"--device {config.device!r} is not valid; expected auto, cpu, cuda or cuda:N")
    if cfg.num_gpus_per_worker is not None:
        gpus = cfg.num_gpus_per_worker
    else:
        gpus = 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if config.device.startswith("cuda") and gpus == 0:
        raise XalError(f"--device {config.device} needs GPUs on the Ray cluster and --num-gpus-per-worker > 0")
    if config.device == "cpu" and gpus > 0:
        raise XalError("--device cpu conflicts with --num-gpus-per-worker > 0")
    return gpus
