"""Training, model selection, split hygiene and `xal-engine train` (xal_engine.jobs.train, cli.train)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine import cli
from xal_engine.core.inputs import imagenet_normalization
from xal_engine.core.models import load_checkpoint, save_checkpoint
from xal_engine.errors import XalError
from xal_engine.jobs.train import TrainConfig, class_weights, confusion_metrics, train
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool, PoolWriter
from xal_engine.store.dataset import BlockDataset

N, SIDE, K = 96, 32, 3
FAST = TrainConfig(arch="resnet18", epochs=3, batch_size=16, lr=3e-3, num_workers=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pool(path: Path, splits: np.ndarray | None = None, seed: int = 0) -> Pool:
    """96 one-channel 32x32 images; class k = a bright 8x8 square in corner k, noise elsewhere."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % K
    images = rng.integers(0, 60, (N, 1, SIDE, SIDE)).astype(np.uint8)
    rois = np.zeros((N, SIDE, SIDE), dtype=bool)
    corners = [(2, 2), (2, 22), (22, 12)]
    for i, k in enumerate(labels):
        y, x = corners[k]
        images[i, 0, y:y + 8, x:x + 8] = 220
        rois[i, y:y + 8, x:x + 8] = True
    if splits is None:  # 60 train, 18 val, 18 test, interleaved across chunks
        splits = np.array([SPLIT_TRAIN] * 10 + [SPLIT_VAL] * 3 + [SPLIT_TEST] * 3, dtype=np.uint8)
        splits = np.tile(splits, N // 16)
    with PoolWriter(path, channels=1, height=SIDE, width=SIDE, dtype="uint8",
                    classes=["a", "b", "c"], chunk_size=16) as w:
        w.append(images, rois, np.ones(N, bool), labels.astype(np.int16),
                 np.array([f"img{i}" for i in range(N)]), splits.astype(np.uint8))
    return Pool.open(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    return make_pool(tmp_path_factory.mktemp("pool") / "pool.zarr")


@pytest.fixture
def yielded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[np.ndarray]]:
    """Records the pool indices of every block the datasets hand out (num_workers=0: in process)."""
    seen: list[np.ndarray] = []
    original = BlockDataset.__getitem__

    def spy(self: BlockDataset, i: int) -> dict[str, torch.Tensor]:
        block = original(self, i)
        seen.append(block["index"].numpy().copy())
        return block

    monkeypatch.setattr(BlockDataset, "__getitem__", spy)
    yield seen


def test_confusion_metrics_hand_case() -> None:
    # true 0: 3 right, 1 wrong; true 1: 1 right, 1 wrong; true 2: absent.
    conf = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    acc, bal = confusion_metrics(conf)
    assert acc == pytest.approx(4 / 6) and bal == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_class_weights_inverse_frequency() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)  # n=4, K=3: 4/(3*3), 4/(3*1), absent -> 1
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])


def test_training_reduces_loss_deterministically_and_never_reads_test(
        pool: Pool, yielded: list[np.ndarray]) -> None:
    logs: list[str] = []
    first = train(pool, FAST, log=logs.append)
    losses = [row["train_loss"] for row in first.history]
    assert losses[-1] < 0.7 * losses[0]
    assert len(logs) == 3 and logs[0].startswith("epoch 1/3  train loss") and "val bal acc" in logs[0]
    # Only train and val images were ever handed out; each epoch read every training image twice
    # (the training pass, then the batch-norm recalibration pass) and every validation image once.
    split = np.asarray(pool.group["split"][:])
    seen = np.concatenate(yielded)
    assert not np.any(split[seen] == SPLIT_TEST)
    train_idx = np.flatnonzero(split == SPLIT_TRAIN)
    counts = np.bincount(seen, minlength=N)
    assert np.all(counts[train_idx] == 2 * 3) and np.all(counts[split == SPLIT_VAL] == 3)
    # Same seed => same weights, same history (CPU).
    second = train(pool, FAST, log=lambda _: None)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in second.history] == losses
    m = first.metrics
    best = max(first.history, key=lambda r: (r["val_balanced_accuracy"], -r["val_loss"]))
    assert m["selected_by"] == "val_balanced_accuracy" and m["best_epoch"] == best["epoch"]
    assert m["n_train"] == 60 and m["n_val"] == 18 and m["train_class_counts"] == [20, 20, 20]
    # the default Grad-CAM layer fits the 32x32 pool: layer1 (8x8), not layer4 (1x1)
    assert first.checkpoint.target_layer == "layer1" and first.checkpoint.classes == ("a", "b", "c")


def test_poisoned_test_labels_do_not_matter(tmp_path: Path) -> None:
    path = tmp_path / "p.zarr"
    clean = make_pool(path)
    test = np.flatnonzero(np.asarray(clean.group["split"][:]) == SPLIT_TEST)
    one = replace(FAST, epochs=1)
    before = train(clean, one, log=lambda _: None)
    group = Pool.open(path, "r+").group
    labels = np.asarray(group["labels"][:])
    labels[test] = 99  # out of range: any use in a loss would raise
    group["labels"][:] = labels
    after = train(Pool.open(path), one, log=lambda _: None)
    assert after.history == [{**before.history[0], "seconds": after.history[0]["seconds"]}]
    assert after.checkpoint.pool["fingerprint"] != before.checkpoint.pool["fingerprint"]


def test_labelled_only_uses_exactly_the_labelled_images(tmp_path: Path, yielded: list[np.ndarray]) -> None:
    path = tmp_path / "p.zarr"
    make_pool(path)
    split = np.asarray(Pool.open(path).group["split"][:])
    rounds = np.full(N, -1, dtype=np.int16)
    chosen = np.flatnonzero(split == SPLIT_TRAIN)[::3]  # 20 images
    rounds[chosen] = 0
    group = Pool.open(path, "r+").group
    group.create_array("al/exp1/labelled_round", data=rounds)
    cfg = replace(FAST, epochs=1, labelled_only="exp1")
    result = train(Pool.open(path), cfg, log=lambda _: None)
    seen = np.unique(np.concatenate(yielded))
    assert np.array_equal(seen[split[seen] == SPLIT_TRAIN], chosen)
    assert set(split[seen]) == {SPLIT_TRAIN, SPLIT_VAL}
    assert result.metrics["n_train"] == len(chosen)
    with pytest.raises(XalError, match="no AL experiment 'missing'"):
        train(Pool.open(path), replace(cfg, labelled_only="missing"))
    rounds[np.flatnonzero(split == SPLIT_TEST)[0]] = 1
    group["al/exp1/labelled_round"][:] = rounds
    with pytest.raises(XalError, match="marks 1 image.* outside the train split"):
        train(Pool.open(path), cfg)
    rounds[np.flatnonzero(split == SPLIT_TEST)[0]] = -1
    group["al/exp1/labelled_round"][:] = rounds
    labels = np.asarray(group["labels"][:])
    labels[chosen[:2]] = -1
    group["labels"][:] = labels
    with pytest.raises(XalError, match=r"marks 2 image\(s\) whose label is -1"):
        train(Pool.open(path), cfg)


def test_without_validation_selects_on_training_loss(tmp_path: Path) -> None:
    splits = np.where(np.arange(N) % 8 == 0, SPLIT_TEST, SPLIT_TRAIN)
    pool = make_pool(tmp_path / "p.zarr", splits=splits)
    logs: list[str] = []
    cfg = replace(FAST, epochs=2, augment=False)
    result = train(pool, cfg, log=logs.append)
    assert logs[0].startswith("warning:") and "no labelled validation images" in logs[0]
    best = min(result.history, key=lambda r: r["train_loss"])
    assert result.metrics["selected_by"] == "train_loss" and result.metrics["best_epoch"] == best["epoch"]
    assert "val_accuracy" not in result.metrics


def test_no_training_images_is_a_clear_error(tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "p.zarr", splits=np.full(N, SPLIT_VAL))
    with pytest.raises(XalError, match=r"has no training images \(split 0, with a label\)"):
        train(pool, FAST)
    with pytest.raises(XalError, match=r"batch_size must be >= 2 \(batch norm needs two images\), got 1"):
        train(pool, TrainConfig(batch_size=1))
    with pytest.raises(XalError, match="normalize_mean has 3 values; the pool has 1 channel"):
        train(pool, replace(FAST, normalize_mean=(0.1, 0.2, 0.3)))


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["xal_engine.cli.train"])
    code = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_writes_loadable_checkpoint(pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pt"
    code, stdout, _ = _cli(monkeypatch, capsys, "--pool", str(pool.path), "--out", str(out), "--epochs", "1",
                           "--batch-size", "16", "--device", "cpu", "--num-workers", "0", "--seed", "0",
                           "--lr", "3e-3", "--normalize", "imagenet", "--json",
                           "--threads", "1")  # as the library run below (the one_thread fixture)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["out"] == str(out) and summary["n_train"] == 60 and summary["best_epoch"] == 1
    model, info = load_checkpoint(out)
    assert (info.arch, info.num_classes, info.in_channels, info.target_layer) == ("resnet18", 3, 1, "layer1")
    assert info.config["epochs"] == 1 and info.metrics["n_val"] == 18
    mean, std = imagenet_normalization(1)
    assert tuple(info.config["normalize_mean"]) == mean and tuple(info.config["normalize_std"]) == std
    # The library run with the same config gives the very same weights.
    lib = train(pool, replace(FAST, epochs=1, normalize_mean=mean, normalize_std=std), log=lambda _: None).model
    x = torch.rand(2, 1, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(model(x), lib(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize(("args", "message"), [
    (["--pool", "{tmp}/none.zarr", "--out", "{tmp}/m.pt"], "none.zarr does not exist"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--arch", "vgg"], "unknown architecture 'vgg'; expected one of: resnet18"),
    (["--pool", "{pool}", "--out", "{tmp}/no/m.pt"], "--out .*m.pt: directory .*no does not exist"),
    (["--pool", "{pool}", "--out", "{tmp}"], "--out .* is a directory"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--device", "tpu"], "device 'tpu' is not"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--head-dropout", "1"], r"head_dropout must be in \[0, 1\), got 1.0"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--head-dropout", "-0.2"], r"head_dropout must be in \[0, 1\)"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--labelled-only", "x"], "no AL experiment 'x'"),
    (["--pool", "{pool}", "--out", "{tmp}/m.pt", "--pretrained", "{tmp}/w.pth"], "w.pth not found"),
])
def test_cli_errors_are_one_line(pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, pool=pool.path) for a in args]
    code, stdout, err = _cli(monkeypatch, capsys, "--num-workers", "0", "--epochs", "1", *argv)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("xal-engine train: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "m.pt").exists()


def test_same_weights_with_forked_loader_workers(pool: Pool) -> None:
    # Block order comes from the sampler in the main process, so workers change nothing numerically.
    cfg = replace(FAST, epochs=1)
    a = train(pool, cfg, log=lambda _: None).model.state_dict()
    b = train(pool, replace(cfg, num_workers=2), log=lambda _: None).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_norm_statistics_are_recomputed_over_the_training_set(pool: Pool) -> None:
    # 60 training images in 4 equal batches of 15: the average of the batch means that the
    # recalibration accumulates equals the per-channel mean of bn1's input over all of them.
    result = train(pool, replace(FAST, epochs=1, batch_size=15), log=lambda _: None)
    model = result.model
    split = np.asarray(pool.group["split"][:])
    images = pool.read(0, pool.n).images[split == SPLIT_TRAIN]
    with torch.no_grad():
        bn_input = model.conv1(torch.from_numpy(images).float() / 255.0)  # (60, 64, 16, 16)
    torch.testing.assert_close(model.bn1.running_mean, bn_input.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1  # the layer's own momentum is restored afterwards
    stale = train(pool, replace(FAST, epochs=1, batch_size=15, recalibrate_bn=False), log=lambda _: None)
    assert not torch.allclose(stale.model.bn1.running_mean, bn_input.mean(dim=(0, 2, 3)), atol=1e-3)


def test_default_target_layer_fits_the_pool_and_is_stored(pool: Pool, tmp_path: Path) -> None:
    # 32x32 images: resnet18's layer1 is 8x8 (>= 7x7), layer2 4x4, layer4 1x1.
    logs: list[str] = []
    result = train(pool, replace(FAST, epochs=1), log=logs.append)
    info = result.checkpoint
    assert (info.target_layer, info.target_map, info.image_size) == ("layer1", (8, 8), (1, 32, 32))
    assert not any("target layer" in line for line in logs)  # no warning: the minimum is reached
    assert load_checkpoint(save_checkpoint(tmp_path / "m.pt", result.model, info))[1].target_map == (8, 8)
    # A given layer is kept as it is; a 1x1 map is trained with, and warned about.
    logs.clear()
    given = train(pool, replace(FAST, epochs=1, target_layer="layer4"), log=logs.append).checkpoint
    assert (given.target_layer, given.target_map) == ("layer4", (1, 1))
    assert logs[0] == ("warning: target layer layer4 gives a 1x1 map at 1x32x32 images: its Grad-CAM is "
                       "constant and every hard Dice 0; choose a shallower layer")


def test_cli_train_target_layer(pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pt"
    base = ["--pool", str(pool.path), "--out", str(out), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--num-workers", "0"]
    code, stdout, _ = _cli(monkeypatch, capsys, *base, "--target-layer", "layer2", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["target_layer"] == "layer2" and summary["target_map"] == [4, 4]
    info = load_checkpoint(out)[1]
    assert (info.target_layer, info.target_map) == ("layer2", (4, 4))
    code, stdout, _ = _cli(monkeypatch, capsys, *base)  # the default, shown in the summary line
    assert code == 0 and "; Grad-CAM layer layer1 (8x8 map) -> " in stdout
    assert load_checkpoint(out)[1].target_layer == "layer1"
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--target-layer", "layer9")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "--target-layer: model has no layer 'layer9' (a dotted module name; the resnet18 stages are " \
           "layer1, layer2, layer3, layer4)" in err


def _nan_pool(path: Path) -> Pool:
    """The pool of make_pool as float16 in [0, 1], with a NaN pixel in two training images."""
    src = make_pool(path.with_name("src.zarr"))
    images = np.asarray(src.group["images"][:]).astype(np.float16) / np.float16(255)
    images[0, 0, 3, 3] = images[16, 0, 9, 1] = np.nan  # both in split 0
    g = src.group
    with PoolWriter(path, channels=1, height=SIDE, width=SIDE, dtype="float16", classes=["a", "b", "c"],
                    chunk_size=16) as w:
        w.append(images, np.asarray(g["rois"][:]), np.asarray(g["has_roi"][:]), np.asarray(g["labels"][:]),
                 np.asarray(g["ids"][:]), np.asarray(g["split"][:]))
    return Pool.open(path)


def test_cli_train_refuses_a_non_finite_loss_and_writes_no_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pool = _nan_pool(tmp_path / "nan.zarr")
    out = tmp_path / "model.pt"
    code, _, err = _cli(monkeypatch, capsys, "--pool", str(pool.path), "--out", str(out), "--epochs", "2",
                        "--batch-size", "16", "--device", "cpu", "--num-workers", "0", "--no-augment")
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert re.search(r"error: epoch 1, batch \d+: the training loss is not finite", line)
    assert f"pool validate {pool.path}" in line
    assert [ln for ln in err.splitlines() if "error" in ln] == [line] and not out.exists()


def _corrupt_images_chunk(pool_path: Path) -> None:
    """Flip a byte of the second `images` chunk: its CRC32C no longer matches, decoding fails."""
    chunks = sorted(p for p in (pool_path / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunks[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[1].write_bytes(bytes(data))


def test_cli_train_a_corrupt_chunk_in_a_loader_worker_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pool = make_pool(tmp_path / "pool.zarr")
    _corrupt_images_chunk(pool.path)
    out = tmp_path / "model.pt"
    code, _, err = _cli(monkeypatch, capsys, "--pool", str(pool.path), "--out", str(out), "--epochs", "1",
                        "--batch-size", "16", "--device", "cpu", "--num-workers", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out.exists(), err
    assert "array 'images' images 16..31 cannot be decoded" in lines[0] and "pool validate" in lines[0]


def test_head_dropout_trains_with_dropout_and_is_recorded(pool: Pool, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from xal_engine.core.models import DropoutLinear

    out = tmp_path / "drop.pt"
    code, _, _ = _cli(monkeypatch, capsys, "--pool", str(pool.path), "--out", str(out), "--epochs", "1",
                      "--batch-size", "16", "--device", "cpu", "--num-workers", "0", "--head-dropout", "0.4",
                      "--threads", "1")
    assert code == 0
    model, info = load_checkpoint(out)
    assert info.head_dropout == 0.4 and info.config["head_dropout"] == 0.4
    assert isinstance(model.fc, DropoutLinear) and model.fc.dropout.p == 0.4
    # dropout changes the training: other weights than without it, from the same seed and config
    plain = train(pool, replace(FAST, epochs=1), log=lambda _: None)
    dropped = train(pool, replace(FAST, epochs=1, head_dropout=0.4), log=lambda _: None)
    assert plain.checkpoint.head_dropout == 0.0 and type(plain.model.fc) is torch.nn.Linear
    assert dropped.checkpoint.head_dropout == 0.4
    assert not torch.equal(plain.model.fc.weight, dropped.model.fc.weight)


def test_cam_method_is_checked(pool: Pool) -> None:
    with pytest.raises(XalError, match=r"cam_method: expected one of gradcam, gradcam\+\+, .*got 'scorecam'"):
        train(pool, replace(FAST, cam_method="scorecam"))


@pytest.mark.parametrize(("arch", "method"), [("swin_t", "layercam"), ("vit_b_16", "gradcam++")])
def test_transformers_train_with_the_explanation_loss_of_a_method(pool: Pool, tmp_path: Path, arch: str,
                                                                 method: str) -> None:
    """A transformer trains end to end with W·(1 − soft Dice(CAM, ROI)) of another CAM method (second-
    order autograd through attention), and its checkpoint rebuilds at the pool's image size and scores."""
    from xal_engine.core.scoring import score_batch

    config = replace(FAST, arch=arch, epochs=1, explanation_weight=0.5, cam_method=method, augment=False)
    result = train(pool, config, log=lambda line: None)
    assert np.isfinite(result.metrics["train_loss"]) and result.checkpoint.config["cam_method"] == method
    layer = result.checkpoint.target_layer
    assert layer == {"swin_t": "features.1", "vit_b_16": "encoder.layers.encoder_layer_11.ln_1"}[arch]
    path = save_checkpoint(tmp_path / "m.pt", result.model, result.checkpoint)
    model, info = load_checkpoint(path)
    x = torch.rand(2, 1, SIDE, SIDE)
    rois = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    rois[:, 2:10, 2:10] = True
    scores = score_batch(model, info.target_layer, x, rois, cam_method=method, return_cam=True)
    assert torch.isfinite(scores.dice).all() and scores.cam.shape[0] == 2
