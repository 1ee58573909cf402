"""A pool whose array metadata or checksummed chunks are damaged: every command that opens or reads it
ends with one error line naming the pool and the array (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from xal_engine.cli import main
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.synthetic import SyntheticConfig, assign_splits, class_names, generate_block
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import PoolWriter

N, SIZE, CHUNK = 24, 32, 8


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small pool scored as run 'ref', and the model that scored it."""
    root = tmp_path_factory.mktemp("corrupt")
    cfg = SyntheticConfig(n=N, size=SIZE, classes=3, channels=1, seed=1, roi_fraction=0.7)
    g = generate_block(cfg, 0, assign_splits(N, cfg.test_fraction, cfg.val_fraction, cfg.seed))
    pool = root / "pool.zarr"
    with PoolWriter(pool, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=class_names(3),
                    chunk_size=CHUNK) as w:
        w.append(g.images, g.rois, g.has_roi, g.labels, g.ids, g.split)
    torch.manual_seed(0)
    model = root / "model.pt"
    save_checkpoint(model, build_model("resnet18", 3, 1),
                    Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=tuple(class_names(3)),
                               target_layer="layer4"))
    score_pool(pool, model, ScoreConfig(run="ref", batch_size=CHUNK, num_workers=0))
    return pool, model


def copy_pool(scored: tuple[Path, Path], tmp_path: Path) -> Path:
    pool = tmp_path / "pool.zarr"
    shutil.copytree(scored[0], pool)
    return pool


def commands(pool: Path, model: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "pool": ["pool", "info", str(pool)],
        "score": ["score", "--pool", str(pool), "--model", str(model), "--run", "again", "--num-workers", "0"],
        "select": ["select", "--pool", str(pool), "--run", "ref", "--budget", "2",
                   "--out", str(tmp_path / "batch.csv")],
        "train": ["train", "--pool", str(pool), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                  "--num-workers", "0"],
    }


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith(f"xal-engine {command}: error: "), err
    return err[0]


def edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    return apply


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def not_json(path: Path) -> None:
    path.write_text(path.read_text().replace('"shape"', "shape", 1))


def chunk_shape(shape: list[int]) -> Callable[[Path], None]:
    return edit_json(lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", shape))


def zero_dim(meta: dict) -> None:
    meta["shape"] = []
    meta["chunk_grid"]["configuration"]["chunk_shape"] = []


CORRUPTIONS = {
    "truncated": ("images", truncate, "JSONDecodeError"),
    "invalid JSON": ("images", not_json, "JSONDecodeError"),
    "chunk grid of another rank": ("images", chunk_shape([CHUNK, 1, SIZE]), "same number of dimensions"),
    "shape of another rank": ("images", edit_json(lambda m: m.__setitem__("shape", [N, SIZE])),
                              "same number of dimensions"),
    "0-d split": ("split", edit_json(zero_dim), "has shape ()"),
}


@pytest.mark.parametrize("command", ["pool", "score", "select", "train"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_array_metadata_is_one_line(scored, tmp_path, capsys, command, corruption) -> None:
    pool = copy_pool(scored, tmp_path)
    name, corrupt, needle = CORRUPTIONS[corruption]
    corrupt(pool / name / "zarr.json")
    assert main(commands(pool, scored[1], tmp_path)[command]) == 2
    line = one_error_line(capsys, command)
    assert str(pool) in line and f"array '{name}'" in line and needle in line, line


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the chunk's CRC32C no longer matches
    path.write_bytes(bytes(data))


def test_select_with_a_flipped_split_chunk_is_one_line(scored, tmp_path, capsys) -> None:
    pool = copy_pool(scored, tmp_path)
    flip_byte(pool / "split" / "c" / "1")
    assert main(commands(pool, scored[1], tmp_path)["select"]) == 2
    line = one_error_line(capsys, "select")
    assert str(pool) in line and "'split'" in line, line
    assert not (tmp_path / "batch.csv").exists()


def test_label_with_a_flipped_labelled_round_chunk_is_one_line(scored, tmp_path, capsys) -> None:
    pool = copy_pool(scored, tmp_path)
    first = tmp_path / "first.csv"
    first.write_text("id,class\nphantom_000001,round\n")
    assert main(["label", "--pool", str(pool), "--import", str(first), "--experiment", "e"]) == 0
    capsys.readouterr()
    flip_byte(pool / "al" / "e" / "labelled_round" / "c" / "0")
    second = tmp_path / "second.csv"
    second.write_text("id,class\nphantom_000002,round\n")
    assert main(["label", "--pool", str(pool), "--import", str(second), "--experiment", "e"]) == 2
    line = one_error_line(capsys, "label")
    assert str(pool) in line and "labelled_round" in line, line
