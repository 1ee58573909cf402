"""The active-learning driver behind ``xal-engine loop``: simulated labelling rounds on a pool.

For each seed and strategy one experiment ``<strategy>-seed<k>`` runs rounds 0..R:

    round 0   label the initial set: N0 train-split images drawn by the SEED only (stratified by
              true label: per-class quotas proportional to the class sizes, largest remainder), so
              every strategy of a seed starts from the same set
    round r   select B images with the strategy over round r-1's scores (train split, not yet
              labelled; predicted-class balance by default) and reveal their labels (the pool's)
    each      train (seeded per (seed, round); model selection on the validation split), save the
              checkpoint, score the whole pool (run ``<experiment>-r<r>``, Grad-CAM target = the
              predicted class), evaluate on the test split

The labelled set lives in the pool, ``al/<experiment>/labelled_round`` (N,) int16, -1 = not
labelled; its attributes hold the loop config. Test images are never candidates nor trained on;
validation images only select the epoch. An experiment stops early when no candidate is left.
An experiment of the same name that ``label --import`` made or wrote to is refused (its labelled set
and import history would no longer match); ``take_over_experiments`` replaces its labelled set,
first detaching its imports (:meth:`ALExperiment.take_over`: an undo then puts back labels and masks
only).

The run folder (config.json, metrics.csv/json, per round selected.csv and model.pt) is the format
of :mod:`xal_engine.store.run_folder`, which ``xal-engine report`` reads. A round is complete when
its metrics row is written (last). A rerun continues after the last complete round; a half-done
round restarts from its beginning (its labelled_round entries are reset first), and gives the same
numbers as an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from xal_engine.core import strategies
from xal_engine.core.acquisition import (
    BALANCES,
    MISSING_ROI_RULES,
    STRATEGIES,
    RunScores,
    SelectConfig,
    select,
)
from xal_engine.core.cam_methods import DEFAULT_CAM_METHOD, check_cam_method
from xal_engine.core.fields import REQUIRED_NAMES
from xal_engine.core.models import DEFAULT_TARGET_LAYERS, load_checkpoint, save_checkpoint
from xal_engine.core.stopping import cohen_kappa, stop_suggested
from xal_engine.errors import XalError
from xal_engine.jobs.label import complete_pending
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.jobs.select import BatchSelection, select_batch, write_batch
from xal_engine.jobs.streaming import file_sha256
from xal_engine.jobs.train import TrainConfig, check_inputs, check_target_layer, resolve_target_layer, train
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, Pool
from xal_engine.store.files import jsonable as _jsonable
from xal_engine.store.location import parse_location
from xal_engine.store.run_folder import RunFolder, RunWriter, run_config
from xal_engine.store.score_run import ScoreRun

RETRAIN_MODES = ("scratch", "finetune")
INITIAL_STRATEGIES = ("stratified", "typiclust")
SEED_STRIDE = 1000  # training / selection seed of (seed, round) = seed * SEED_STRIDE + round


@dataclass(frozen=True)
class LoopConfig:
    """Defaults of ``xal-engine loop``. ``train`` holds arch, epochs, batch size, device, … for every
    round (its ``seed`` and ``labelled_only`` are set per round)."""

    strategies: tuple[str, ...] = ("random", "dual")
    seeds: int = 1  # seeds 0..seeds-1
    initial: int = 150  # N0: images labelled in round 0
    per_round: int = 120  # B: images selected per round
    rounds: int = 6  # R: selection rounds after round 0
    lam: float = 0.3  # dual: λ·entropy + (1 − λ)·(1 − Dice)
    dice: str = "hard"  # "hard" (thresholded CAM) or "soft"
    balance: str = "predicted"  # class balance of each batch: predicted | none | oracle (TRUE labels)
    missing_roi: str = "mean"  # acquisition rule for images without an ROI
    retrain: str = "scratch"  # scratch: fresh init each round; finetune: from the previous round
    threshold: float = 0.5  # CAM threshold of the hard Dice
    score_batch_size: int = 64
    mc_samples: int = 20  # T MC-dropout passes of the head, for strategies that rank by them (bald)
    mc_dropout: float | None = None  # their dropout p; None: the checkpoints' --head-dropout
    initial_strategy: str = "stratified"  # round 0: stratified (by true label, random) | typiclust
    initial_model: str | None = None  # typiclust: the checkpoint whose embeddings cluster the pool
    # CAM method of every round's scoring (the Dice the acquisition reads) and of the explanation loss
    cam_method: str = "gradcam"
    pretrained: str | None = None  # every round's model starts from these weights (e.g. `xal-engine pretrain`)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.strategies:
            raise XalError("--strategy: give at least one strategy")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise XalError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {s!r}")
        if len(set(self.strategies)) != len(self.strategies):
            raise XalError(f"--strategy lists a strategy twice: {', '.join(self.strategies)}")
        checks = [("--seeds", self.seeds >= 1, ">= 1"), ("--initial", self.initial >= 1, ">= 1"),
                  ("--per-round", self.per_round >= 1, ">= 1"), ("--rounds", self.rounds >= 0, ">= 0"),
                  ("--lambda", 0.0 <= self.lam <= 1.0, "in [0, 1]"),
                  ("--threshold", 0.0 <= self.threshold <= 1.0, "in [0, 1]"),
                  ("--score-batch-size", self.score_batch_size >= 1, ">= 1")]
        for flag, ok, expected in checks:
            if not ok:
                raise XalError(f"{flag} must be {expected}")
        if "bald" in self.strategies and not self.train.head_dropout and self.mc_dropout is None:
            raise XalError("--strategy bald needs dropout before the classifier: --head-dropout P (trained "
                           "in) or --mc-dropout P (at scoring)")
        if self.mc_samples < 2:
            raise XalError(f"--mc-samples must be at least 2, got {self.mc_samples}")
        try:
            check_cam_method(self.cam_method)
        except XalError as err:
            raise XalError(f"--cam-method: {str(err).removeprefix('cam method: ')}") from None
        if (self.initial_strategy == "typiclust") != (self.initial_model is not None):
            raise XalError("--initial-strategy typiclust needs --initial-model CKPT (a checkpoint whose "
                           "embeddings cluster the pool), and --initial-model needs typiclust")
        for flag, value, choices in (("--initial-strategy", self.initial_strategy, INITIAL_STRATEGIES),
                                     ("--dice", self.dice, ("hard", "soft")),
                                     ("--balance", self.balance, BALANCES),
                                     ("--missing-roi", self.missing_roi, MISSING_ROI_RULES),
                                     ("--retrain", self.retrain, RETRAIN_MODES)):
            if value not in choices:
                raise XalError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def experiment_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


# ---------------------------------------------------------------------------------------- metrics
def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)  # 1-based, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, pred: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy (mean recall over true classes), macro-F1 (over classes in labels
    or predictions, as scikit-learn) and one-vs-rest macro AUROC (over classes with positives and
    negatives) of labels (n,), pred (n,) and probs (n, K)."""
    k = probs.shape[1]
    if labels.size == 0:
        return dict.fromkeys(("accuracy", "balanced_accuracy", "macro_f1", "auroc"), math.nan)
    confusion = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)  # (K,) each
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    aucs = [binary_auroc(probs[:, c].astype(np.float64), labels == c) for c in range(k)]  # K classes
    finite = [a for a in aucs if not math.isnan(a)]
    return {"accuracy": float(tp.sum() / labels.size),
            "balanced_accuracy": float(recall[support > 0].mean()),
            "macro_f1": float(f1[(support > 0) | (predicted > 0)].mean()),
            "auroc": float(np.mean(finite)) if finite else math.nan}


def attention_metrics(run: dict[str, np.ndarray], index: np.ndarray) -> dict[str, float]:
    """Mean dice, soft dice, energy and pointing-game hit rate over images ``index`` (with an ROI)."""
    if index.size == 0:
        return dict.fromkeys(("test_dice", "test_soft_dice", "test_energy", "test_hit_rate"), math.nan)
    return {"test_dice": float(np.mean(run["dice"][index])),
            "test_soft_dice": float(np.mean(run["soft_dice"][index])),
            "test_energy": float(np.mean(run["energy"][index])),
            "test_hit_rate": float(np.mean(run["hit"][index]))}


def evaluate_run(pool: Pool, run_name: str) -> dict[str, float]:
    """Test-split classification and attention metrics of one complete scoring run."""
    run = ScoreRun.open(pool.group, run_name).read()
    split = pool.column("split")
    labels = pool.column("labels").astype(np.int64)
    has_roi = pool.column("has_roi")
    test = np.flatnonzero((split == SPLIT_TEST) & (labels >= 0))
    metrics = classification_metrics(labels[test], run["pred"][test].astype(np.int64), run["probs"][test])
    return {**metrics, **attention_metrics(run, np.flatnonzero((split == SPLIT_TEST) & has_roi))}


# ---------------------------------------------------------------------------------- initial set
def initial_set(labels: np.ndarray, split: np.ndarray, n0: int, seed: int) -> np.ndarray:
    """Sorted pool positions of N0 train-split images, stratified by true label: class c gets
    floor(N0·n_c/n) plus one for the largest remainders, drawn uniformly within the class by a
    generator seeded by ``seed`` alone."""
    train = np.flatnonzero(split == SPLIT_TRAIN)
    n0 = min(n0, train.size)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[train], return_counts=True)
    exact = n0 * counts / train.size
    quota = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - quota), kind="stable")[: n0 - int(quota.sum())]
    quota[extra] += 1
    chosen = [rng.choice(train[labels[train] == c], size=q, replace=False)  # loop over K classes
              for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def initial_selection(pool: Pool, index: np.ndarray, experiment: str, seed: int) -> BatchSelection:
    """The initial set as a batch (the CSV of later rounds; no scores exist yet)."""
    ids = pool.column("ids")
    has_roi = pool.column("has_roi")
    nan = math.nan
    rows = [{"rank": rank, "index": int(i), "id": str(ids[i]), "score": nan, "pred": -1, "pred_class": "",
             "entropy": nan, "margin": nan, "least_confidence": nan, "dice": nan, "soft_dice": nan,
             "energy": nan, "hit": False, "has_roi": bool(has_roi[i])} for rank, i in enumerate(index, 1)]
    config = SelectConfig(strategy="random", budget=max(len(index), 1), balance="none", seed=seed)
    return BatchSelection(indices=index, rows=rows, config=config, run="initial", experiment=experiment,
                          n_candidates=int((pool.column("split") == SPLIT_TRAIN).sum()))


# ------------------------------------------------------------------------------------- the loop
def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ALLoop:
    """One experiment (strategy, seed); :meth:`step` runs its next round and says whether another
    round remains."""

    def __init__(self, pool_path: str | Path, run_dir: RunWriter, config: LoopConfig, strategy: str,
                 seed: int, log: Callable[[str], None] = _stderr, show_progress: bool | None = None,
                 take_over_experiments: bool = False) -> None:
        self.pool_path = parse_location(pool_path)  # a local path or an object-store URL
        self.take_over_experiments = take_over_experiments
        self.run_dir, self.config, self.strategy, self.seed = run_dir, config, strategy, seed
        self.experiment = experiment_name(strategy, seed)
        self.log, self.show_progress = log, show_progress
        self.round = run_dir.completed_rounds(strategy, seed)
        self.exhausted = False

    @property
    def finished(self) -> bool:
        return self.exhausted or self.round > self.config.rounds

    def step(self) -> bool:
        """Run round ``self.round`` (label, train, score, evaluate, record); False when done."""
        if self.finished:
            return False
        r = self.round
        self.run_dir.make_round_dir(self.strategy, self.seed, r)
        pool = Pool.open(self.pool_path, mode="r+")
        n_labelled = self._label(pool, r, self.run_dir.selected_csv(self.strategy, self.seed, r))
        if n_labelled is None:
            self.exhausted = True
            self.log(f"{self.experiment}: no unlabelled train images left; stopping after round {r - 1}")
            return False
        t0 = time.perf_counter()
        model_path = self._train(Pool.open(self.pool_path), r,
                                 self.run_dir.model_pt(self.strategy, self.seed, r))
        t1 = time.perf_counter()
        run_name = f"{self.experiment}-r{r}"
        c, tc = self.config, self.config.train
        needs = strategies.get(self.strategy).needs  # what this experiment's next selection reads
        score_pool(self.pool_path, model_path, ScoreConfig(
            run=run_name, batch_size=c.score_batch_size, device=tc.device, threshold=c.threshold,
            num_workers=tc.num_workers, targets="pred", overwrite=True, threads=tc.threads,
            embeddings="embedding" in needs, mc_samples=c.mc_samples if "bald" in needs else 0,
            mc_dropout=c.mc_dropout if "bald" in needs else None, **cam_method_field(c.cam_method)),
            show_progress=self.show_progress)
        t2 = time.perf_counter()
        pool = Pool.open(self.pool_path)
        row: dict[str, Any] = {"strategy": self.strategy, "seed": self.seed, "round": r,
                               "n_labelled": n_labelled, **evaluate_run(pool, run_name),
                               **self._stability(pool, r), "train_seconds": t1 - t0, "score_seconds": t2 - t1}
        self.run_dir.add_row(row)
        self.log(f"{self.experiment} round {r}/{c.rounds}: {n_labelled} labelled, test acc "
                 f"{row['accuracy']:.3f}, bal acc {row['balanced_accuracy']:.3f}, AUROC {row['auroc']:.3f}, "
                 f"Dice {row['test_dice']:.3f}, hit {row['test_hit_rate']:.3f}")
        self.round += 1
        return not self.finished

    def _stability(self, pool: Pool, r: int) -> dict[str, float]:
        """The stopping signal of round r (:mod:`xal_engine.core.stopping`): κ between rounds r-1 and r's
        predictions on the train split, and whether the last rounds' κ suggests stopping (1.0) or not."""
        if r == 0:
            return {"pred_kappa": math.nan, "stop_suggested": 0.0}
        train = np.flatnonzero(pool.column("split") == SPLIT_TRAIN)
        before, now = (ScoreRun.open(pool.group, f"{self.experiment}-r{k}").take("pred", train) for k in (r - 1, r))
        kappa = cohen_kappa(before, now)
        mine = sorted((row for row in self.run_dir.rows
                       if row["strategy"] == self.strategy and int(row["seed"]) == self.seed
                       and int(row["round"]) < r), key=lambda row: int(row["round"]))
        earlier = [math.nan if row.get("pred_kappa") is None else float(row["pred_kappa"]) for row in mine]
        return {"pred_kappa": kappa, "stop_suggested": float(stop_suggested([*earlier, kappa]))}

    def _label(self, pool: Pool, r: int, selected: Path) -> int | None:
        """Reveal round r's images (their batch CSV to ``selected``); the labelled count, or None when
        no candidate is left."""
        self._check_imports(pool)
        if r > 0:
            self._check_owner(pool)
        labelled = self._round_array(pool, fresh=r == 0)
        rounds = np.asarray(labelled[:])
        rounds[rounds >= r] = -1  # a half-done round (or a later one) is undone
        split = pool.column("split")
        if r == 0:
            if self.config.initial_strategy == "typiclust":
                chosen = self._typiclust_initial(pool)
            else:
                chosen = initial_set(pool.column("labels"), split, self.config.initial, self.seed)
            selection = initial_selection(pool, chosen, self.experiment, self.seed)
        else:
            labelled[:] = rounds  # candidates exclude exactly rounds 0..r-1
            if not np.any((split == SPLIT_TRAIN) & (rounds < 0)):
                return None
            c = self.config
            select = SelectConfig(strategy=self.strategy, budget=c.per_round, lam=c.lam, dice=c.dice,
                                  balance=c.balance, missing_roi=c.missing_roi,
                                  seed=self.seed * SEED_STRIDE + r, device=c.train.device)
            selection = select_batch(self.pool_path, f"{self.experiment}-r{r - 1}", select, self.experiment)
            chosen = selection.indices
        write_batch(selection, selected, self.pool_path)
        rounds[chosen] = r
        labelled[:] = rounds
        return int((rounds >= 0).sum())

    def _typiclust_initial(self, pool: Pool) -> np.ndarray:
        """Round 0 without labels: TypiClust over the train split's embeddings by ``initial_model``
        (scored once per model into run ``initial-<sha256[:12]>``, shared by every experiment), seeded
        by the seed alone, so every strategy of a seed starts from the same set."""
        c, tc = self.config, self.config.train
        model = Path(str(c.initial_model))
        run_name = f"initial-{file_sha256(model)[:12]}"
        score_pool(self.pool_path, model, ScoreConfig(
            run=run_name, batch_size=c.score_batch_size, device=tc.device, num_workers=tc.num_workers,
            targets="pred", threads=tc.threads, embeddings=True), show_progress=self.show_progress)
        train = np.flatnonzero(pool.column("split") == SPLIT_TRAIN)
        fields = ScoreRun.open(Pool.open(self.pool_path).group, run_name).read(("embedding", *REQUIRED_NAMES))
        scores = RunScores(**{k: v[train] for k, v in fields.items()})
        config = SelectConfig(strategy="typiclust", budget=min(c.initial, train.size), balance="none",
                              seed=self.seed, device=tc.device)
        return np.sort(train[select(scores, config).order]).astype(np.int64)

    def _check_owner(self, pool: Pool) -> None:
        """A resumed experiment must still be this run's: another run folder on the same pool reuses
        the experiment name and rewrites its labelled set."""
        owner = pool.experiment(self.experiment).attrs().get("run_dir")
        if owner != str(self.run_dir.path.resolve()):
            raise XalError(f"pool {pool.path}: AL experiment {self.experiment!r} now belongs to run folder "
                           f"{owner}, not {self.run_dir.path}; pass --overwrite to restart this run")

    def _check_imports(self, pool: Pool) -> None:
        """The experiment must hold only this loop's labelled set: one made by ``label --import`` (or
        with imports not undone) is refused, or with ``take_over_experiments`` detached from its imports
        (their labels and masks stay undoable) so that the loop's rounds replace it."""
        experiment = pool.experiment(self.experiment)
        attrs = experiment.attrs()
        imports = [r for r in experiment.imports() if not r.get("undone")]
        if (not attrs and experiment.labelled_round_array() is None) or ("run_dir" in attrs and not imports):
            return
        if not self.take_over_experiments:
            what = f"holds {len(imports)} label import(s)" if imports else "was not created by `xal-engine loop`"
            raise XalError(f"pool {pool.path}: AL experiment {self.experiment!r} {what}; pass "
                           "--take-over-experiments to replace its labelled set with this run's, or import "
                           "labels under another --experiment name")
        complete_pending(pool)
        experiment.take_over(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.log(f"{self.experiment}: took over AL experiment {self.experiment!r} "
                 f"({len(imports)} label import(s) detached)")

    def _round_array(self, pool: Pool, fresh: bool) -> Any:
        """al/<experiment>/labelled_round, created (all -1) when ``fresh``; the config in its attrs."""
        rounds = None if fresh else pool.labelled_round_array(self.experiment)
        if rounds is None:
            rounds = pool.create_labelled_round(self.experiment)
            pool.experiment(self.experiment).update_attrs({
                "strategy": self.strategy, "seed": self.seed, "run_dir": str(self.run_dir.path.resolve()),
                "loop": _jsonable(asdict(self.config))})
        return rounds

    def _train(self, pool: Pool, r: int, model_path: Path) -> Path:
        config = replace(self.config.train, seed=self.seed * SEED_STRIDE + r, labelled_only=self.experiment,
                         cam_method=self.config.cam_method)
        initial_state = None
        if self.config.retrain == "finetune" and r > 0:
            previous = self.run_dir.model_pt(self.strategy, self.seed, r - 1)
            initial_state = load_checkpoint(previous)[0].state_dict()
        result = train(pool, config, pretrained=self.config.pretrained if initial_state is None else None,
                       initial_state=initial_state, show_progress=self.show_progress, log=self.log)
        return save_checkpoint(model_path, result.model, result.checkpoint)


def cam_method_field(method: str) -> dict[str, str]:
    """``ScoreConfig``'s ``cam_method`` keyword for ``method``: empty for the default (Grad-CAM), so
    that a default run's score configuration, and its fingerprint, stay as they were."""
    if method == DEFAULT_CAM_METHOD:
        return {}
    if "cam_method" not in {f.name for f in dataclass_fields(ScoreConfig)}:
        raise XalError(f"--cam-method {method}: this build's scoring takes no CAM method yet")
    return {"cam_method": method}


def config_record(pool_path: str | Path, config: LoopConfig) -> dict[str, Any]:
    """What config.json holds for ``config``. The CAM method is recorded only when it is not the
    default: run folders begun before it existed (Grad-CAM) then resume, and a run of another method
    is refused by a folder of Grad-CAM rounds, and the other way round."""
    record = asdict(config)
    if config.cam_method == DEFAULT_CAM_METHOD:
        del record["cam_method"]
    if record["train"].get("cam_method") == DEFAULT_CAM_METHOD:
        del record["train"]["cam_method"]
    if config.pretrained is None:  # likewise: run folders begun before the flag resume
        del record["pretrained"]
    return run_config(pool_path, config.strategies, config.seeds, config.rounds, config.train.arch, record)


def check_pool(pool: Pool, config: LoopConfig) -> None:
    """A simulation reveals labels from the pool: every train image needs one; test images are needed;
    the initial set must fit in the train split. Then the training settings, so that a bad flag is
    refused before the run folder is written (a corrected rerun would otherwise meet a stale config)."""
    split = pool.column("split")
    labels = pool.column("labels")
    unknown = int(((split == SPLIT_TRAIN) & (labels < 0)).sum())
    if unknown:
        raise XalError(f"pool {pool.path}: {unknown} train-split image(s) have label -1; the loop reveals "
                       "labels from the pool, so every train image needs one")
    if not np.any(split == SPLIT_TRAIN):
        raise XalError(f"pool {pool.path} has no train-split images (split 0)")
    if not np.any((split == SPLIT_TEST) & (labels >= 0)):
        raise XalError(f"pool {pool.path} has no labelled test images (split 2) to evaluate on")
    n_train = int((split == SPLIT_TRAIN).sum())
    if config.initial > n_train:
        raise XalError(f"--initial {config.initial} is more than the {n_train} train-split images of pool "
                       f"{pool.path}")
    check_inputs(pool, config.train)
    check_target_layer(config.train)
    if config.initial_model is not None and not Path(config.initial_model).is_file():
        raise XalError(f"--initial-model {config.initial_model}: no such checkpoint file")
    if config.pretrained is not None and config.pretrained != "imagenet" and not Path(config.pretrained).is_file():
        raise XalError(f"--pretrained {config.pretrained}: no such weights file")


def run_loop(pool_path: str | Path, out: str | Path, config: LoopConfig = LoopConfig(), *,
             overwrite: bool = False, log: Callable[[str], None] = _stderr,
             show_progress: bool | None = None, take_over_experiments: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) every experiment of ``config`` into run directory ``out``; the metrics rows.
    RUN_DIR/.lock is held throughout: a second process on the same run folder is refused."""
    pool = Pool.open(pool_path)
    pool.require_settled("before the loop")
    check_pool(pool, config)
    with RunFolder(out).lock():  # one process writes a run folder; released however the loop ends
        recorded, config = _fix_target_layer(pool, out, config, overwrite)
        return _run_experiments(pool_path, out, config, recorded, overwrite, log, show_progress,
                                take_over_experiments)


def _fix_target_layer(pool: Pool, out: str | Path, config: LoopConfig,
                      overwrite: bool) -> tuple[LoopConfig, LoopConfig]:
    """(the configuration config.json records, the one the rounds run with).

    The Grad-CAM layer is fixed once per run from the pool's image size and recorded in config.json,
    so every round (and a resumed run) uses the same one. A run folder begun before the layer was
    recorded (``target_layer: null`` without --target-layer) used the architecture's last stage: it
    resumes with that layer, and its config.json stays as it is.
    """
    if config.train.target_layer is not None:
        return config, config
    folder = RunFolder(out)
    if not overwrite and folder.config_json.is_file():
        train = folder.read_config().get("loop", {}).get("train", {})
        if isinstance(train, dict) and "target_layer" in train and train["target_layer"] is None:
            return config, replace(config, train=replace(config.train,
                                                         target_layer=DEFAULT_TARGET_LAYERS[config.train.arch]))
    layer = resolve_target_layer(pool, config.train, lambda _: None)
    fixed = replace(config, train=replace(config.train, target_layer=layer.name))
    return fixed, fixed


def _run_experiments(pool_path: str | Path, out: str | Path, config: LoopConfig, recorded: LoopConfig,
                     overwrite: bool, log: Callable[[str], None],
                     show_progress: bool | None, take_over_experiments: bool = False) -> list[dict[str, Any]]:
    """The body of :func:`run_loop`, run folder locked; ``recorded`` is what config.json holds."""
    run_dir = RunWriter.prepare(out, config_record(pool_path, recorded), overwrite)
    for seed in range(config.seeds):
        for strategy in config.strategies:
            loop = ALLoop(pool_path, run_dir, config, strategy, seed, log=log, show_progress=show_progress,
                          take_over_experiments=take_over_experiments)
            if loop.finished:  # a rerun of a finished run: nothing is recomputed
                log(f"{loop.experiment}: already complete (rounds 0..{config.rounds} recorded); nothing to run")
            elif loop.round:
                log(f"{loop.experiment}: resuming at round {loop.round} ({loop.round} complete)")
            while loop.step():
                pass
    return run_dir.rows
