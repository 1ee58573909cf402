"""`xal-engine pretrain`: the rotation batch by hand, a backbone written and loaded by train/loop for
the same arch (trunk equal, fresh head), and every bad input as one line."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_pool

from xal_engine.cli import main
from xal_engine.core.models import build_model, is_backbone_file, parse_arch
from xal_engine.errors import XalError
from xal_engine.jobs.loop import LoopConfig, config_record
from xal_engine.jobs.pretrain import PretrainConfig, pretrain, rotation_batch
from xal_engine.jobs.train import TrainConfig, train
from xal_engine.store import Pool, PoolWriter


def test_the_rotation_batch_holds_each_image_at_four_rotations_with_its_label():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    rotated, labels = rotation_batch(x)
    assert rotated.shape == (8, 1, 3, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[1, 0], x[1, 0])
    assert rotated[2, 0].tolist() == [[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]  # x[0] turned 90° left
    assert torch.equal(rotated[5, 0], torch.flip(x[1, 0], dims=(0, 1)))  # 180°
    assert torch.equal(rotated[7, 0], torch.rot90(x[1, 0], -1, dims=(0, 1)))  # 270° = 90° right


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    pool = make_pool(root / "pool.zarr")
    out = root / "backbone.pt"
    result = pretrain(pool, out, PretrainConfig(arch="tiny", epochs=2, batch_size=16, device="cpu"),
                      show_progress=False, log=lambda line: None)
    return pool, out, result


def test_pretraining_writes_a_backbone_and_reports_its_rotation_accuracy(pretrained):
    _, out, result = pretrained
    assert is_backbone_file(out) and result.out == str(out)
    assert (result.n_train, result.n_val, result.arch, result.method) == (60, 18, "tiny", "rotation")
    assert result.best_epoch in (1, 2) and math.isfinite(result.train_loss)
    assert 0.0 <= result.val_rotation_accuracy <= 1.0
    payload = torch.load(out, weights_only=True)
    head = parse_arch("tiny").head + "."
    assert not any(k.startswith(head) for k in payload["state_dict"])  # the pretext head is not kept
    assert payload["in_channels"] == 1 and payload["meta"]["n_train"] == 60


def test_train_loads_the_trunk_and_gives_a_fresh_head(pretrained):
    pool, out, _ = pretrained
    saved = torch.load(out, weights_only=True)["state_dict"]
    torch.manual_seed(0)
    model = build_model("tiny", 3, 1, pretrained=out)
    for name, value in saved.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.fc.out_features == 3  # the task's classes, not the four rotations
    result = train(pool, TrainConfig(arch="tiny", epochs=1, batch_size=16, device="cpu"), pretrained=out,
                   show_progress=False, log=lambda line: None)
    assert result.checkpoint.arch == "tiny"


def test_loop_records_the_backbone_only_when_given():
    assert "pretrained" not in config_record("p.zarr", LoopConfig())["loop"]  # older folders resume
    assert config_record("p.zarr", LoopConfig(pretrained="b.pt"))["loop"]["pretrained"] == "b.pt"


def test_a_backbone_of_another_arch_or_channel_count_is_refused(pretrained, tmp_path):
    _, out, _ = pretrained
    with pytest.raises(XalError, match=r"holds a tiny trunk, not resnet18; pass --arch tiny"):
        build_model("resnet18", 3, 1, pretrained=out)
    with pytest.raises(XalError, match=r"reads 1-channel images; this pool has 3"):
        build_model("tiny", 3, 3, pretrained=out)
    damaged = tmp_path / "damaged.pt"
    payload = torch.load(out, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] + 1.0
    torch.save(payload, damaged)
    with pytest.raises(XalError, match="is damaged: its weights do not match their checksum"):
        build_model("tiny", 3, 1, pretrained=damaged)


def test_pretrain_cli_writes_the_backbone_and_bad_inputs_are_one_line(pretrained, tmp_path, capsys):
    pool, _, _ = pretrained
    out = tmp_path / "b.pt"
    argv = ["pretrain", "--pool", str(pool.path), "--out", str(out), "--arch", "tiny", "--epochs", "1",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0 and is_backbone_file(out)
    assert "pretrained tiny by rotation on 60 images" in capsys.readouterr().out
    wide = tmp_path / "wide.zarr"
    with PoolWriter(wide, channels=1, height=8, width=12, dtype="uint8", classes=["a", "b"], chunk_size=4) as w:
        w.append(np.zeros((4, 1, 8, 12), np.uint8), np.zeros((4, 8, 12), bool), np.zeros(4, bool),
                 np.array([0, 1, 0, 1], np.int16), np.array([f"i{i}" for i in range(4)]), np.zeros(4, np.uint8))
    for bad, needle in (
        ([*argv[:2], str(wide), *argv[3:]], "needs square images"),
        ([*argv[:4], str(tmp_path / "nowhere" / "b.pt"), *argv[5:]], "output directory"),
        ([*argv, "--epochs", "0"], "--epochs must be at least 1"),
    ):
        capsys.readouterr()
        assert main(bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main([*argv, "--method", "jigsaw"]) == 2
    assert not (tmp_path / "nowhere").exists() and Pool.open(wide).n == 4
    assert not list(Path(tmp_path).glob(".*.tmp"))


def test_a_loop_starts_every_round_from_the_backbone(tmp_path):
    """`loop --pretrained`: round 0's model is trained from the backbone (it differs from the same
    seed's random-init model), and a missing file is refused before any round."""
    from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
    from xal_engine.jobs.loop import run_loop

    pool_path = tmp_path / "pool.zarr"
    create_synthetic_pool(SyntheticConfig(n=60, size=32, classes=2, seed=0), pool_path)
    backbone = tmp_path / "backbone.pt"
    pretrain(Pool.open(pool_path), backbone, PretrainConfig(arch="tiny", epochs=1, batch_size=8, device="cpu"),
             show_progress=False, log=lambda line: None)
    train_config = TrainConfig(arch="tiny", epochs=1, batch_size=8, num_workers=0, device="cpu")
    base = LoopConfig(strategies=("random",), seeds=1, initial=10, per_round=5, rounds=1, train=train_config)
    weights = {}
    for name, pretrained_path in (("scratch", None), ("pretrained", str(backbone))):
        run = tmp_path / name
        run_loop(pool_path, run, LoopConfig(**{**base.__dict__, "pretrained": pretrained_path}), log=lambda line: None)
        model = next(run.rglob("model*.pt"))
        weights[name] = torch.load(model, weights_only=True)["state_dict"]["features.0.weight"]
    assert not torch.equal(weights["scratch"], weights["pretrained"])
    with pytest.raises(XalError, match="--pretrained .*missing.pt: no such weights file"):
        run_loop(pool_path, tmp_path / "x", LoopConfig(**{**base.__dict__, "pretrained": str(tmp_path / "missing.pt")}),
                 log=lambda line: None)
