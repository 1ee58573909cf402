"""The scoring pass that local and Ray scoring share: model and run set-up, per-batch scoring, the
device feed, the asynchronous result copies and the writer thread.

Data path: loader items (``UnitRanges``: a chunk-aligned range of about ``--batch-size`` images inside
one work unit, only the arrays scoring reads; on CUDA pinned by the loader, in blocks that torch's
caching host allocator reuses) → copied to the GPU on a side stream while the previous batch computes → forward, partial backward, fused kernel →
every result packed into one (B, F) tensor, copied to a pinned host slot without waiting
(:class:`ResultCopies`; read two batches later, once its event has fired) → a unit's rows gathered
(:class:`UnitAssembler`) → a writer thread stores each complete unit and marks it done. No step
waits on the device within a batch; memory is bounded by the prefetch depth, the copy ring and one
unit's rows, not by the pool size.
"""

from __future__ import annotations

import collections
import hashlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from xal_engine import __version__
from xal_engine.core import fields
from xal_engine.core.cam_methods import DEFAULT_CAM_METHOD, check_cam_method
from xal_engine.core.capture import GradCamCapture
from xal_engine.core.fields import BatchScores
from xal_engine.core.inputs import ModelInputs, channels_last
from xal_engine.core.models import (
    Checkpoint,
    check_layer_name,
    choose_target_layer,
    feature_map_sizes,
    head_layer,
    layer_choice,
    load_checkpoint,
    parse_arch,
    parse_head_dropout,
)
from xal_engine.core.scoring import McDropout, score_batch
from xal_engine.errors import XalError
from xal_engine.jobs.runtime import default_loader_workers
from xal_engine.ops import BACKENDS
from xal_engine.store import Pool
from xal_engine.store.al_state import pool_generation
from xal_engine.store.score_run import GENERATION_KEY, ScoreRun, UnitResult, check_run_name, unit_size_for

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RULES = ("pred", "label")


@dataclass(frozen=True)
class ScoreConfig:
    run: str = "default"
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threshold: float = 0.5
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    num_workers: int = field(default_factory=default_loader_workers)  # loader processes (0: a read-ahead thread)
    shard_id: int = 0
    num_shards: int = 1
    targets: str = "pred"  # Grad-CAM target: predicted class, or the known label where there is one
    overwrite: bool = False
    kernel: str = "auto"  # gradcam_dice implementation: auto | triton | torch (not the execution backend)
    save_cams: bool = False  # also store the low-resolution CAM N (h, w) per image as scores/<run>/cam
    target_layer: str | None = None  # Grad-CAM layer in place of the checkpoint's (--target-layer)
    threads: int | None = None  # torch intra-op threads of a local run; None: the process's setting
    embeddings: bool = False  # also store the head's input (pooled features, fp16 (D,)) as scores/<run>/embedding
    mc_samples: int = 0  # T >= 2: MC-dropout passes of the head (bald, mc_entropy, variation_ratio); 0: off
    mc_dropout: float | None = None  # dropout p of the MC passes; None: the checkpoint's head_dropout
    mc_seed: int = 0  # keys the MC dropout masks (with each image's pool index: see core.scoring)
    unit_size: int | None = None  # images per work unit of a new run (whole pool chunks); None: 4096
    cam_method: str = DEFAULT_CAM_METHOD  # the map Dice and the pointing game measure (--cam-method)

    def __post_init__(self) -> None:
        check_run_name(self.run)
        if self.mc_samples == 1 or self.mc_samples < 0:
            raise XalError(f"--mc-samples must be 0 (off) or at least 2, got {self.mc_samples}")
        parse_head_dropout(self.mc_dropout, "--mc-dropout")
        if self.mc_dropout is not None and not self.mc_samples:
            raise XalError("--mc-dropout needs --mc-samples T (T >= 2)")
        if not 0 <= self.mc_seed < 2 ** 32:
            raise XalError(f"--mc-seed must lie in [0, 2**32), got {self.mc_seed}")
        if self.threads is not None and self.threads < 1:
            raise XalError(f"--threads must be at least 1, got {self.threads}")
        if self.batch_size < 1:
            raise XalError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_cam_method(self.cam_method)
        if self.unit_size is not None and self.unit_size < 1:
            raise XalError(f"--unit-size must be at least 1 image, got {self.unit_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise XalError(f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.precision not in PRECISIONS:
            raise XalError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.num_workers < 0:
            raise XalError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.num_shards < 1:
            raise XalError(f"--num-shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.shard_id < self.num_shards:
            raise XalError(
                f"--shard-id must lie in [0, --num-shards), got {self.shard_id} of {self.num_shards}"
            )
        if self.kernel not in BACKENDS:
            raise XalError(f"--kernel must be one of {', '.join(BACKENDS)}, got {self.kernel!r}")
        if self.targets not in TARGET_RULES:
            raise XalError(f"--targets must be one of {', '.join(TARGET_RULES)}, got {self.targets!r}")


@contextmanager
def worker_errors() -> Iterator[None]:
    """An XalError raised in a DataLoader worker (a chunk that fails to decode) ends as its own one-line
    message: the loader re-raises it with the worker's whole traceback as the message (as a
    RuntimeError when its type cannot be built from one string). Other exceptions pass unchanged."""
    try:
        yield
    except Exception as err:
        original = _worker_xal_error(err)
        if original is None:
            raise
        raise original from None


def _worker_xal_error(err: Exception) -> XalError | None:
    """The worker's XalError, rebuilt from the last ``module.Type: message`` line of the traceback in
    ``err``'s message; None when ``err`` is not a re-raised worker exception or not an XalError."""
    text = str(err)
    if not (text.startswith("Caught ") and "in DataLoader worker process" in text.split("\n", 1)[0]):
        return None
    for line in reversed(text.splitlines()):
        name, sep, message = line.partition(": ")
        module, _, cls_name = name.rpartition(".")
        if not sep or not module or not name.replace(".", "").replace("_", "").isalnum():
            continue  # a source line, an indented frame or the continuation of a message
        cls = getattr(sys.modules.get(module), cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        if not issubclass(cls, XalError):
            return None  # the worker's final exception is not one of ours: keep the traceback
        try:
            return cls(message.strip())
        except Exception:  # noqa: BLE001  (a subclass with another signature)
            return XalError(message.strip())
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


Item = tuple[int, int, int]  # (unit, start, stop): a chunk-aligned range of images inside one unit


def unit_items(run: ScoreRun, units: Iterable[int], chunk_size: int, batch_size: int) -> list[Item]:
    """The loader items of ``units``: each unit cut into chunk-aligned ranges of about ``batch_size``
    images (whole pool chunks, at least one), in pool order; no item crosses a unit."""
    return _cut(units, run.unit_size, run.n, chunk_size, batch_size)


def all_items(pool: Pool, batch_size: int, unit_size: int | None = None) -> list[Item]:
    """Every loader item of a new run over ``pool`` (its default unit size unless ``unit_size``):
    what the benchmarks feed through the scorer's loader."""
    size = unit_size_for(pool.chunk_size, pool.n, unit_size)
    return _cut(range(-(-pool.n // size)), size, pool.n, pool.chunk_size, batch_size)


def _cut(units: Iterable[int], unit_size: int, n: int, chunk_size: int, batch_size: int) -> list[Item]:
    step = chunk_size * max(1, batch_size // chunk_size)
    items: list[Item] = []
    for u in units:
        start, stop = u * unit_size, min((u + 1) * unit_size, n)
        items.extend((u, a, min(a + step, stop)) for a in range(start, stop, step))
    return items


def to_device(loader: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """Move loader items to `device`; on CUDA the copy of item i+1 (on a side stream, from the pinned
    memory the loader put it in) overlaps the compute of item i. On the CPU items pass as they are."""
    if device.type != "cuda":
        yield from loader
        return
    copy_stream = torch.cuda.Stream(device)

    def start_copy(item: dict[str, Any]) -> dict[str, Any]:
        with torch.cuda.stream(copy_stream):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in item.items()}

    pending = None
    for item in loader:
        nxt = start_copy(item)
        if pending is not None:
            yield pending
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        for v in nxt.values():
            if isinstance(v, torch.Tensor) and v.is_cuda:
                v.record_stream(torch.cuda.current_stream(device))
        pending = nxt
    if pending is not None:
        yield pending


class ResultCopies:
    """Batch results to the host without waiting for the device: each batch's fields packed into one
    (B, F) fp32 tensor (:func:`fields.pack`) and copied into a reused host slot (pinned on CUDA) with
    ``non_blocking``; an event marks the copy, and the batch is read ``lag`` batches later, when its
    event has long fired, so the host never stalls the GPU within a batch. On the CPU the copy is
    synchronous and the events are absent; the ring and the order are the same code."""

    def __init__(self, device: torch.device, lag: int = 2) -> None:
        self.device, self.lag = device, lag
        self.cuda = device.type == "cuda"
        self.slots: list[torch.Tensor | None] = [None] * (lag + 1)
        self.pending: collections.deque[tuple[Any, torch.Tensor, fields.Layout, Any]] = collections.deque()
        self.count = 0

    def put(self, scores: BatchScores, tag: Any) -> list[tuple[Any, UnitResult]]:
        """Queue one batch's copy, tagged ``tag``; returns the (tag, host results) now ready, oldest first."""
        ready: list[tuple[Any, UnitResult]] = []
        packed = fields.pack(scores)  # (B, F) fp32 on the device
        k = self.count % len(self.slots)  # its last batch was read above: len(pending) <= lag < slots
        self.count += 1
        slot = self.slots[k]
        if slot is None or slot.shape[0] < packed.shape[0] or slot.shape[1] != packed.shape[1]:
            slot = self.slots[k] = torch.empty(packed.shape, dtype=torch.float32, pin_memory=self.cuda)
        view = slot[:packed.shape[0]]
        view.copy_(packed, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self.pending.append((event, view, fields.Layout.of(scores), tag))
        while len(self.pending) > self.lag:
            ready.append(self._finish())
        return ready

    def drain(self) -> list[tuple[Any, UnitResult]]:
        """Every batch still in flight, oldest first."""
        return [self._finish() for _ in range(len(self.pending))]

    def _finish(self) -> tuple[Any, UnitResult]:
        event, view, layout, tag = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return tag, fields.unpack(view.numpy(), layout)  # unpack copies: the slot can be reused


class UnitAssembler:
    """Host rows of a run's units gathered in order until a unit is complete."""

    def __init__(self, run: ScoreRun) -> None:
        self.run = run
        self.parts: dict[int, list[UnitResult]] = {}
        self.filled: dict[int, int] = {}

    def add(self, unit: int, rows: UnitResult) -> UnitResult | None:
        """Add the next rows of ``unit`` (in pool order); returns the unit's results once complete."""
        self.parts.setdefault(unit, []).append(rows)
        self.filled[unit] = self.filled.get(unit, 0) + rows.pred.shape[0]
        start, stop = self.run.unit_range(unit)
        if self.filled[unit] < stop - start:
            return None
        del self.filled[unit]
        return fields.concat(self.parts.pop(unit))


class UnitWriter:
    """A background thread storing unit results, so Zarr encoding overlaps the next batch."""

    def __init__(self, run: ScoreRun, depth: int = 4) -> None:
        self.run = run
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="xal-unit-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.run.write_unit(*job)
                except BaseException as err:  # noqa: BLE001 - any failure, surfaced in put()/close()
                    self.error = err

    def put(self, unit: int, result: UnitResult) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((unit, result))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def load_scoring_model(model_path: Path, device: torch.device) -> tuple[torch.nn.Module, Checkpoint]:
    """The checkpoint's model on `device`, channels-last: NHWC convolutions (tensor cores on CUDA;
    on CPU the forward measured 18 % faster for resnet18, 33 % for densenet121 at 128²); a 3-D
    backbone NDHWC (``channels_last_3d``)."""
    model, ckpt = load_checkpoint(model_path, device=device)
    return model.to(memory_format=channels_last(model_rank(model))), ckpt


def model_rank(model: torch.nn.Module) -> int:
    """5 for a model of 3-D convolutions (it reads volumes (B, C, D, H, W)), else 4."""
    return 5 if any(isinstance(m, torch.nn.Conv3d) for m in model.modules()) else 4


def mc_dropout(ckpt: Checkpoint, config: ScoreConfig, model_path: Path | None = None) -> McDropout | None:
    """The MC-dropout passes a run makes: None without ``--mc-samples``; p is ``--mc-dropout``, else the
    checkpoint's ``head_dropout``; an XalError naming both flags when that is 0."""
    if not config.mc_samples:
        return None
    p = config.mc_dropout if config.mc_dropout is not None else ckpt.head_dropout
    if p == 0.0:
        model = f"model {model_path}" if model_path is not None else "the model"
        raise XalError(f"--mc-samples needs dropout: {model} has no head dropout (head_dropout 0); pass "
                       "--mc-dropout P (0 < P < 1) or train with --head-dropout P")
    return McDropout(samples=config.mc_samples, p=p, seed=config.mc_seed)


def with_target_layer(ckpt: Checkpoint, config: ScoreConfig) -> Checkpoint:
    """``ckpt`` with ``config.target_layer`` (when set) as its Grad-CAM layer: the layer a run scores at."""
    return ckpt if config.target_layer is None else replace(ckpt, target_layer=config.target_layer)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fit_target_layer(model: torch.nn.Module, ckpt: Checkpoint, pool: Pool, model_path: Path,
                     config: ScoreConfig, log: Callable[[str], None] = _stderr) -> Checkpoint:
    """The checkpoint as the run scores with it (:func:`with_target_layer`), its layer's map at the
    pool's (C, H, W) (volumes: (C, D, H, W)) read off a shape probe of ``model``.

    A line to ``log`` names an overriding layer and its map; a warning when the pool's image size is
    not the training size (both sizes, the map at each) or when the map is 1x1 (a constant Grad-CAM);
    an XalError when both: a model trained at another size whose layer collapses to 1x1 here.
    """
    check_model_fits_pool(ckpt, pool, model_path)  # the channel count, before a probe at that count
    mc_dropout(ckpt, config, model_path)  # --mc-samples without any dropout: refused before any warning
    if config.target_layer is not None:
        check_layer_name(model, ckpt.arch, config.target_layer)
    scored = with_target_layer(ckpt, config)
    shape = (pool.channels, *pool.spatial)
    here = layer_choice(model, scored.target_layer, shape)
    at = f"{'x'.join(map(str, shape))} {pool.kind}s"
    single = tuple(1 for _ in pool.spatial)  # a one-cell map: a constant Grad-CAM
    cell = "x".join("1" for _ in single)  # "1x1", volumes "1x1x1"
    if config.target_layer is not None:
        log(f"target layer {here.describe()} at {at} (--target-layer; the checkpoint's is {ckpt.target_layer})")
    trained = ckpt.image_size
    if trained is not None and trained != shape:
        was = f"{'x'.join(map(str, trained))} {pool.kind}s"
        if tuple(here.size) == single:
            best = choose_target_layer(model, ckpt.arch, shape)
            hint = (f"pass --target-layer {best.name} ({'x'.join(map(str, best.size))} map here)"
                    if tuple(best.size) != single else "score a pool of the training size")
            raise XalError(f"model {model_path} was trained on {was}; at pool {pool.path}'s {at} its target "
                           f"layer {scored.target_layer} gives a {cell} map (a constant Grad-CAM, every hard Dice "
                           f"0); {hint}")
        then = (f", {'x'.join(map(str, ckpt.target_map))} map"
                if ckpt.target_map is not None and scored.target_layer == ckpt.target_layer else "")
        log(f"warning: model {model_path} was trained on {was} ({ckpt.target_layer}{then}); pool "
            f"{pool.path} has {at}: target layer {here.describe()}")
    elif tuple(here.size) == single:
        log(f"warning: target layer {scored.target_layer} gives a {cell} map at {at}: its Grad-CAM is constant "
            "and every hard Dice 0; pass --target-layer with a shallower layer")
    return scored


def open_run(pool: Pool, model_path: Path, ckpt: Checkpoint, config: ScoreConfig) -> ScoreRun:
    """Check the model against the pool, then create or resume run `config.run`.

    The fingerprint decides whether two invocations (local, sharded or distributed) are the same run.
    Its ``target_layer`` is the layer scored at (``ckpt`` as :func:`fit_target_layer` returns it): a
    ``--target-layer`` other than the checkpoint's makes another run; without one it is unchanged.
    Its ``pool_generation`` (only once labels were imported or undone) makes a run scored before a
    label change stale.
    """
    check_model_fits_pool(ckpt, pool, model_path)
    if config.targets == "label" and len(pool.classes) != ckpt.num_classes:
        raise XalError("--targets label needs the model's classes to equal the pool's")
    mc = mc_dropout(ckpt, config, model_path)
    fingerprint = {
        "model_sha256": file_sha256(model_path),
        "arch": ckpt.arch,
        "target_layer": ckpt.target_layer,
        "threshold": config.threshold,
        "precision": config.precision,
        "targets": config.targets,
        "n_images": pool.n,
    }
    if config.cam_method != DEFAULT_CAM_METHOD:  # only then: Grad-CAM runs keep their fingerprint
        fingerprint["cam_method"] = config.cam_method
    if config.save_cams:  # only when set, so that runs made without it keep their fingerprint
        fingerprint["save_cams"] = True
    if config.embeddings:  # likewise
        fingerprint["embeddings"] = True
    if mc is not None:  # likewise; p as used (the flag or the checkpoint's)
        fingerprint.update(mc_samples=mc.samples, mc_dropout=mc.p, mc_seed=mc.seed)
    if generation := pool_generation(pool):  # labels changed: ROI metrics of another generation are stale
        fingerprint[GENERATION_KEY] = generation
    attrs = {
        "model": str(model_path),
        "classes": list(ckpt.classes),
        "config": asdict(config),
        "versions": {"xal_engine": __version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    layout = run_layout(model_path, ckpt, pool, config)
    unit_size = unit_size_for(pool.chunk_size, pool.n, config.unit_size)
    run = ScoreRun.create_or_resume(
        pool.group, config.run, n=pool.n, n_classes=ckpt.num_classes, unit_size=unit_size,
        fingerprint=fingerprint, attrs=attrs, overwrite=config.overwrite, cam_shape=layout.cam_shape,
        embedding_dim=layout.embedding_dim, mc=layout.mc,
    )
    if config.unit_size is not None and run.unit_size != unit_size:  # an existing run keeps its layout
        _stderr(f"note: run '{config.run}' keeps its {run.unit_size}-image work units; --unit-size "
                f"{config.unit_size} applies to a new run (another --run, or --overwrite)")
    return run


def run_layout(model_path: Path, ckpt: Checkpoint, pool: Pool, config: ScoreConfig) -> fields.Layout:
    """The fields run ``config.run`` stores and their sizes; the model is loaded on the CPU only when
    an optional field needs a size (a run's arrays are created before any batch)."""
    model = load_checkpoint(model_path, device="cpu")[0] if config.save_cams or config.embeddings else None
    return fields.Layout(
        n_classes=ckpt.num_classes,
        cam_shape=cam_shape(model_path, ckpt, pool, model) if config.save_cams else None,
        embedding_dim=head_layer(model, ckpt.arch).in_features if model is not None and config.embeddings else None,
        mc=bool(config.mc_samples),
    )


def cam_shape(model_path: Path, ckpt: Checkpoint, pool: Pool,
              model: torch.nn.Module | None = None) -> tuple[int, ...]:
    """(h, w) (volumes: (d, h, w)) of the low-resolution CAM of this model on the pool's images: the target layer's
    feature map, probed on the CPU (a run's arrays are created before any batch)."""
    if model is None:
        model, _ = load_checkpoint(model_path, device="cpu")
    shape = (pool.channels, *pool.spatial)
    return feature_map_sizes(model, [ckpt.target_layer], shape)[ckpt.target_layer]


@dataclass(frozen=True)
class RunPlan:
    """What one invocation of a run (this shard) has to do."""

    run: ScoreRun
    pending: list[int]  # this shard's units not marked done
    already_done: int  # this shard's units done before this invocation
    items: list[Item]  # the pending units' loader items (unit_items)
    n_images: int  # images in the pending units


def plan_run(pool: Pool, model_path: Path, ckpt: Checkpoint, config: ScoreConfig) -> RunPlan:
    """Create or resume the run (``open_run``) and cut this shard's pending units into loader items."""
    run = open_run(pool, model_path, ckpt, config)
    if not run.shard_units(config.shard_id, config.num_shards):  # more shards than units: say why it idles
        _stderr(f"note: run '{config.run}' has {run.n_units} work unit{'s' * (run.n_units != 1)} of "
                f"{run.unit_size} images, fewer than {config.num_shards} shards: shard {config.shard_id} "
                f"has nothing to score; a new run with a smaller --unit-size (whole pool chunks of "
                f"{pool.chunk_size} images) gives every shard work")
    if run.created:  # made just now: nothing done, no half-written chunk to clean
        pending = list(run.shard_units(config.shard_id, config.num_shards))
    else:
        run.clean_partial_files(run.shard_units(config.shard_id, config.num_shards))  # this shard's own
        pending = run.pending_units(config.shard_id, config.num_shards)
    items = unit_items(run, pending, pool.chunk_size, config.batch_size)
    return RunPlan(run=run, pending=pending,
                   already_done=len(run.shard_units(config.shard_id, config.num_shards)) - len(pending),
                   items=items, n_images=sum(b - a for _, a, b in items))


BATCH_KEYS = ("images", "rois", "has_roi", "labels")


class Scorer:
    """One run's per-batch scoring on one device, set up once: the model frozen and in eval with its
    Grad-CAM hooks registered (one :class:`GradCamCapture` for every batch), the input conversion
    with its constants on the device and one reused buffer (:class:`ModelInputs`), the MC-dropout
    passes and the head resolved. Use as a context manager;
    ``scorer(batch)`` returns the batch's results on the device, with no host synchronisation."""

    def __init__(self, model: torch.nn.Module, ckpt: Checkpoint, config: ScoreConfig,
                 device: torch.device) -> None:
        self.model, self.ckpt, self.config, self.device = model, ckpt, config, device
        self.inputs = ModelInputs(ckpt.config.get("normalize_mean"), ckpt.config.get("normalize_std"),
                                  device)  # as in training
        self.mc = mc_dropout(ckpt, config)
        self.head = parse_arch(ckpt.arch).head if config.embeddings or self.mc is not None else None
        self.capturer = GradCamCapture(model, ckpt.target_layer, feature_layer=self.head, share_outputs=True)
        self.autocast = PRECISIONS[config.precision]

    def __enter__(self) -> Scorer:  # noqa: PYI034  (typing.Self needs Python 3.11)
        self.capturer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capturer.__exit__(None, None, None)

    def __call__(self, batch: dict[str, Any]) -> BatchScores:
        """One batch's results on the device, the low-resolution CAM (B, h, w) fp32 among them with
        ``config.save_cams``, the embedding (B, D) with ``config.embeddings``, the MC fields with
        ``config.mc_samples`` where the batch has ``index`` (B,), its pool positions (a batch without it,
        such as a sheet's recomputed CAMs, gets no MC fields)."""
        config = self.config
        targets = _label_or_prediction(batch["labels"]) if config.targets == "label" else None
        images = self.inputs(batch["images"])
        mc = self.mc if "index" in batch else None
        extra: dict[str, Any] = {}
        if config.embeddings or mc is not None:  # only then: a plain run calls score_batch as it always did
            extra = {"head": self.head, "return_embedding": config.embeddings, "mc": mc,
                     "index": batch.get("index")}
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return score_batch(
                self.model, self.ckpt.target_layer, images, rois=batch["rois"], has_roi=batch["has_roi"],
                targets=targets, threshold=config.threshold, backend=config.kernel,
                return_cam=config.save_cams, capturer=self.capturer, cam_method=config.cam_method, **extra,
            )


def score_and_store(scorer: Scorer, items: Iterable[dict[str, Any]], writer: UnitWriter,
                    on_batch: Callable[[int], object] | None = None) -> Iterator[tuple[int, UnitResult]]:
    """Score loader items (``UnitRanges`` items, in unit order) ``scorer.config.batch_size`` images at
    a time and queue each complete unit on ``writer``.

    Yields (unit, host results) per unit once it is queued; the caller closes the writer, after which
    every yielded unit is stored and marked done (a unit cut short by an interrupt is not, and is
    scored again on resume). ``on_batch(n)`` follows each batch of n images sent to the device: a
    progress bar's ``update``. Results reach the host through :class:`ResultCopies`: the host waits
    for nothing but a batch two behind the one the device is computing.
    """
    device, size = scorer.device, scorer.config.batch_size
    copies, assembler = ResultCopies(device), UnitAssembler(writer.run)

    def finished(ready: list[tuple[Any, UnitResult]]) -> Iterator[tuple[int, UnitResult]]:
        for unit, rows in ready:
            result = assembler.add(unit, rows)
            if result is not None:
                writer.put(unit, result)
                yield unit, result

    try:
        for item in to_device(items, device):
            unit, start, n = item["unit"], item["start"], item["images"].shape[0]
            for a in range(0, n, size):
                b = min(a + size, n)
                batch = {k: item[k][a:b] for k in BATCH_KEYS if k in item}
                if scorer.mc is not None:
                    batch["index"] = torch.arange(start + a, start + b, device=device)  # keys the MC masks
                yield from finished(copies.put(scorer(batch), unit))
                if on_batch is not None:
                    on_batch(b - a)
    except BaseException:  # an unreadable chunk, an interrupt: the batches computed still count
        _store_in_flight(copies, assembler, writer)
        raise
    yield from finished(copies.drain())


def _store_in_flight(copies: ResultCopies, assembler: UnitAssembler, writer: UnitWriter) -> None:
    """Queue the units that the batches still in flight complete (the pass is ending on an error)."""
    try:
        for unit, rows in copies.drain():
            result = assembler.add(unit, rows)
            if result is not None:
                writer.put(unit, result)
    except Exception:  # noqa: BLE001, S110 - the device failed too: the original error is the one to report
        pass


def device_scores(model: torch.nn.Module, ckpt: Checkpoint, batch: dict[str, Any], config: ScoreConfig,
                  device: torch.device) -> BatchScores:
    """One batch scored one-shot (a :class:`Scorer` entered for it): what a run computes for it."""
    with Scorer(model, ckpt, config, device) as scorer:
        return scorer(batch)


def check_model_fits_pool(ckpt: Any, pool: Pool, model_path: Path) -> None:
    dims = parse_arch(ckpt.arch).spatial_dims
    if dims != len(pool.spatial):  # a 2-D backbone on volumes, or a 3-D one on images
        raise XalError(f"model {model_path} is a {dims}-D {ckpt.arch}; pool {pool.path} holds "
                       f"{'volumes' if pool.is_volume else '2-D images'} {(pool.channels, *pool.spatial)}")
    if ckpt.in_channels != pool.channels:
        raise XalError(
            f"model {model_path} expects {ckpt.in_channels}-channel images, pool {pool.path} has "
            f"{pool.channels} channels"
        )
    if ckpt.num_classes != len(pool.classes):
        raise XalError(
            f"model {model_path} has {ckpt.num_classes} classes, pool {pool.path} has "
            f"{len(pool.classes)} ({', '.join(pool.classes)})"
        )
    if list(ckpt.classes) != list(pool.classes):
        raise XalError(
            f"model {model_path} classes {list(ckpt.classes)} differ from the pool's {pool.classes}"
        )


def _label_or_prediction(labels: torch.Tensor):
    """Grad-CAM target: the known label where there is one (>= 0), else the predicted class."""

    def target(logits: torch.Tensor) -> torch.Tensor:
        lab = labels.to(logits.device)
        cls = torch.where(lab >= 0, lab, logits.argmax(dim=1))
        return logits.gather(1, cls[:, None])[:, 0]

    return target
