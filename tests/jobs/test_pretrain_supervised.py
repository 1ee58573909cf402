"""`xal-engine pretrain --method supervised`: a classifier trained on a labelled source pool of other
lesion types (phantom appearance classes 3-5), whose trunk (the selected epoch's) is the backbone that
`train --pretrained` loads on the target pool (classes 0-2) with a fresh head; bad inputs one line."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import xal_engine.jobs.pretrain as pretrain_module
from xal_engine.cli import main
from xal_engine.core.models import build_model, is_backbone_file, load_checkpoint
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.jobs.pretrain import PretrainConfig, pretrain
from xal_engine.store import PoolWriter

SOURCE_CLASSES = ["round_dark", "rim_ellipse_dark", "stippled_dark"]
CONFIG = PretrainConfig(arch="tiny", method="supervised", epochs=2, batch_size=16, device="cpu",
                        explanation_weight=0.5, target_layer="features")


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    """(source pool, target pool, backbone path, PretrainResult, the TrainResult pretrain kept)."""
    root = tmp_path_factory.mktemp("supervised")
    source = create_synthetic_pool(SyntheticConfig(n=80, size=32, first_class=3, seed=1), root / "source.zarr")
    target = create_synthetic_pool(SyntheticConfig(n=60, size=32, seed=2), root / "target.zarr")
    trained = []

    def recording_train(*args, **kwargs):
        trained.append(real_train(*args, **kwargs))
        return trained[-1]

    real_train = pretrain_module.train
    out = root / "backbone.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "train", recording_train)
        result = pretrain(source, out, CONFIG, show_progress=False, log=lambda line: None)
    assert len(trained) == 1
    return source, target, out, result, trained[0]


def test_the_backbone_is_the_selected_epochs_trunk_without_the_source_head(supervised):
    _, _, out, result, kept = supervised
    payload = torch.load(out, weights_only=True)
    saved = payload["state_dict"]
    model_state = kept.model.state_dict()
    assert sorted(saved) == sorted(k for k in model_state if not k.startswith("fc."))  # head dropped
    for name, value in saved.items():
        assert torch.equal(value, model_state[name].cpu()), name
    assert payload["arch"] == "tiny" and payload["in_channels"] == 1
    assert result.best_epoch == kept.metrics["best_epoch"] in (1, 2)
    best_row = kept.history[result.best_epoch - 1]
    assert best_row["val_balanced_accuracy"] == max(row["val_balanced_accuracy"] for row in kept.history)
    assert result.val_balanced_accuracy == best_row["val_balanced_accuracy"]
    assert math.isnan(result.val_rotation_accuracy) and result.classes == tuple(SOURCE_CLASSES)


def test_the_meta_records_method_source_classes_epochs_loss_layer_and_val_metrics(supervised):
    source, _, out, result, kept = supervised
    meta = torch.load(out, weights_only=True)["meta"]
    assert (meta["method"], meta["pool"], meta["classes"]) == ("supervised", str(source.path), SOURCE_CLASSES)
    assert (meta["epochs"], meta["explanation_weight"], meta["target_layer"]) == (2, 0.5, "features")
    assert kept.checkpoint.config["explanation_weight"] == 0.5  # the loss was on in train()
    assert meta["best_epoch"] == result.best_epoch and meta["selected_by"] == "val_balanced_accuracy"
    assert meta["val_metrics"] == {name: kept.metrics[name]
                                   for name in ("val_loss", "val_accuracy", "val_balanced_accuracy")}
    split = source.column("split")
    assert (meta["n_train"], meta["n_val"]) == (int((split == 0).sum()), int((split == 1).sum()))
    assert result.n_train == meta["n_train"]


def test_train_pretrained_loads_the_trunk_on_the_target_pool_with_a_fresh_head(supervised, tmp_path, capsys):
    _, target, out, _, _ = supervised
    assert target.classes == ["round", "rim_ellipse", "stippled"]  # disjoint from the source's classes
    saved = torch.load(out, weights_only=True)["state_dict"]
    torch.manual_seed(0)
    model = build_model("tiny", len(target.classes), 1, pretrained=out)
    for name, value in saved.items():
        assert torch.equal(model.state_dict()[name], value), name
    torch.manual_seed(0)
    assert torch.equal(model.fc.weight, build_model("tiny", 3, 1).fc.weight)  # the fresh head of a seed-0 init
    checkpoint = tmp_path / "target.pt"
    argv = ["train", "--pool", str(target.path), "--out", str(checkpoint), "--arch", "tiny", "--pretrained",
            str(out), "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    _, info = load_checkpoint(checkpoint)
    assert info.classes == ("round", "rim_ellipse", "stippled") and info.num_classes == 3


def test_the_cli_summary_states_the_kept_epoch_and_its_balanced_accuracy(supervised, tmp_path, capsys):
    source, _, _, _, _ = supervised
    out = tmp_path / "b.pt"
    argv = ["pretrain", "--method", "supervised", "--pool", str(source.path), "--out", str(out), "--arch", "tiny",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet"]
    assert main(argv) == 0 and is_backbone_file(out)
    meta = torch.load(out, weights_only=True)["meta"]
    acc = meta["val_metrics"]["val_balanced_accuracy"]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"pretrained tiny by supervised training on {meta['n_train']} labelled images of "
                           "3 source classes in ")
    assert f": epoch 1 kept, validation balanced accuracy {acc:.3f}; backbone {out} (source head dropped)" in line
    assert (meta["explanation_weight"], meta["epochs"]) == (0.0, 1)


def test_bad_inputs_are_one_line_and_leave_no_file(supervised, tmp_path, capsys):
    source, _, _, _, _ = supervised
    unlabelled = tmp_path / "unlabelled.zarr"
    with PoolWriter(unlabelled, channels=1, height=32, width=32, dtype="uint8", classes=["a", "b"],
                    chunk_size=4) as w:
        w.append(np.zeros((4, 1, 32, 32), np.uint8), np.zeros((4, 32, 32), bool), np.zeros(4, bool),
                 np.full(4, -1, np.int16), np.array([f"i{i}" for i in range(4)]), np.zeros(4, np.uint8))
    out = tmp_path / "b.pt"
    base = ["pretrain", "--pool", str(source.path), "--out", str(out), "--arch", "tiny", "--epochs", "1",
            "--device", "cpu", "--quiet"]
    supervised_argv = [*base, "--method", "supervised"]
    for bad, needle in (
        ([*base[:2], str(unlabelled), *base[3:], "--method", "supervised"],
         (f"source pool {unlabelled} has no labelled train-split images; --method supervised needs a labelled "
          "source pool (for an unlabelled one use --method rotation)")),
        ([*base, "--explanation-loss", "0.5"], "--explanation-loss applies only to --method supervised, not rotation"),
        ([*base, "--target-layer", "features"], "--target-layer applies only to --method supervised, not rotation"),
        ([*supervised_argv, "--batch-size", "1"], "--batch-size must be at least 2 for --method supervised"),
        ([*supervised_argv, "--explanation-loss", "-1"], "--explanation-loss must be a number >= 0, got -1.0"),
        ([*supervised_argv, "--target-layer", "nowhere"], "nowhere"),
    ):
        capsys.readouterr()
        assert main(bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not list(Path(tmp_path).glob(".*.tmp"))
    with pytest.raises(XalError, match="--target-layer applies only to --method supervised"):
        PretrainConfig(target_layer="features")
