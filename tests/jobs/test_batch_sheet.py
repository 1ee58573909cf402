"""score --save-cams stores each image's low-resolution CAM; select --overlays draws the selected batch
from it, or from the run's model, or refuses."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from test_score import THREE_CLASSES, UNIT, make_pool

from xal_engine.cli import main
from xal_engine.core.fields import REQUIRED_NAMES
from xal_engine.core.inputs import to_unit_float
from xal_engine.core.models import Checkpoint, build_model, load_checkpoint, save_checkpoint
from xal_engine.core.scoring import score_batch
from xal_engine.errors import XalError
from xal_engine.jobs.batch_sheet import SHEET_PNG, cam_source, file_stem, read_images, recompute_cams
from xal_engine.jobs.overlay import OverlayStyle
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.store import Pool
from xal_engine.store.score_run import ScoreRun

N = 20  # 3 work units of 8, 8 and 4 images
CAM_HW = (4, 4)  # resnet18 layer2 on 32 x 32 images


def make_model(path: Path) -> Path:
    """A random-init resnet18 whose Grad-CAM layer (layer2) gives 4 x 4 maps at 32 x 32."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1)
    save_checkpoint(path, model, Checkpoint(arch="resnet18", num_classes=3, in_channels=1,
                                            classes=THREE_CLASSES, target_layer="layer2"))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cams")
    pool, model = make_pool(root / "pool.zarr", n=N), make_model(root / "model.pt")
    for run, save in (("plain", False), ("cams", True)):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run=run, batch_size=UNIT, num_workers=0, save_cams=save),
                   show_progress=False)
    return root, pool, model


def chunk_files(pool: Path, run: str) -> dict[str, bytes]:
    """Every file of the run but the group's own metadata (its attrs hold the config and the time)."""
    top = pool / "scores" / run
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*"))
            if p.is_file() and p != top / "zarr.json"}


def test_stored_cam_equals_score_batch_map_in_fp16(setup):
    _, pool_path, model_path = setup
    run = ScoreRun.open(Pool.open(pool_path).group, "cams")
    cam = run.group["cam"]
    assert (cam.shape, cam.chunks, cam.dtype) == ((N, *CAM_HW), (UNIT, *CAM_HW), np.float16)
    assert run.group.attrs["fingerprint"]["save_cams"] is True
    pool = Pool.open(pool_path)
    batch = pool.read(0, N)
    model, ckpt = load_checkpoint(model_path)
    want = score_batch(model, ckpt.target_layer, to_unit_float(torch.from_numpy(batch.images)),
                       rois=torch.from_numpy(batch.rois), has_roi=torch.from_numpy(batch.has_roi),
                       return_cam=True).cam
    assert want is not None and want.shape == (N, *CAM_HW)
    got = np.asarray(cam[:]).astype(np.float32)
    # fp16 keeps 11 significant bits: N lies in [0, 1], so the rounding error is at most 2^-11
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2.0 ** -11 + 1e-6)
    assert got.min() == 0.0 and got.max() == 1.0 and np.isfinite(got).all()
    assert not np.array_equal(got[0], got[1])  # one map per image, not a broadcast


def test_without_the_flag_no_cam_and_the_same_bytes(setup):
    _, pool, _ = setup
    plain, cams = chunk_files(pool, "plain"), chunk_files(pool, "cams")
    assert not any(name.startswith("cam/") for name in plain)
    assert {n for n in cams if n.startswith("cam/")} == {"cam/zarr.json", "cam/c/0/0/0", "cam/c/1/0/0",
                                                         "cam/c/2/0/0"}
    shared = {n: b for n, b in cams.items() if not n.startswith("cam/")}
    assert {n.split("/")[0] for n in plain} == {*REQUIRED_NAMES, "done"}
    assert len(plain) > 30 and plain == shared  # every chunk and array metadata file, byte for byte
    run = ScoreRun.open(Pool.open(pool).group, "plain")
    assert not run.has("cam") and "save_cams" not in run.group.attrs["fingerprint"]
    with pytest.raises(XalError, match=r"score run 'plain' stores no 'cam'"):
        run.take("cam", np.arange(2))


def test_the_flag_is_part_of_the_fingerprint_only_when_set(setup):
    _, pool, model = setup
    again = score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="plain", batch_size=UNIT, num_workers=0),
                       show_progress=False)
    assert again.images == 0 and again.complete  # resumed: nothing left to do
    with pytest.raises(XalError, match=r"run 'plain' exists .* different configuration \(save_cams\)"):
        score_pool(pool, model, ScoreConfig(unit_size=UNIT, run="plain", num_workers=0, save_cams=True), show_progress=False)
    assert main(["score", "--pool", str(pool), "--model", str(model), "--run", "cli", "--save-cams",
                 "--num-workers", "0", "--json"]) == 0
    runs = Pool.open(pool).group["scores"]  # batches of 64, not 8: equal up to one fp16 step
    np.testing.assert_allclose(np.asarray(runs["cli"]["cam"][:], dtype=np.float32),
                               np.asarray(runs["cams"]["cam"][:], dtype=np.float32), rtol=0, atol=2.0 ** -11)


def select_argv(pool: Path, run: str, out: Path, overlays: Path) -> list[str]:
    return ["select", "--pool", str(pool), "--run", run, "--budget", "4", "--balance", "none",
            "--out", str(out), "--overlays", str(overlays), "--json"]


def png_size(path: Path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


def test_select_overlays_from_stored_cams(setup, tmp_path, capsys):
    _, pool, _ = setup
    out, overlays = tmp_path / "batch.csv", tmp_path / "overlays"
    assert main(select_argv(pool, "cams", out, overlays)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["overlays"] == str(overlays) and summary["overlay_cams"] == "stored"
    rows = list(csv.DictReader(out.open()))
    expected = {SHEET_PNG} | {f"{r['rank']}_{file_stem(r['id'])}.png" for r in rows}
    assert len(rows) == 4 and {p.name for p in overlays.iterdir()} == expected
    s = OverlayStyle()
    one = (round(s.panel_inches * s.dpi), round((s.panel_inches + s.caption_inches + 0.1) * s.dpi))
    assert one == (264, 330)
    for r in rows:
        assert png_size(overlays / f"{r['rank']}_{file_stem(r['id'])}.png") == one
    # 4 panels in one row of 4, plus the title band
    sheet = (round(4 * s.panel_inches * s.dpi), round((s.panel_inches + s.caption_inches + 0.45) * s.dpi))
    assert png_size(overlays / SHEET_PNG) == sheet == (1056, 372)


def test_recomputed_cams_equal_the_stored_ones(setup):
    _, pool_path, _ = setup
    pool = Pool.open(pool_path)
    plain = cam_source(ScoreRun.open(pool.group, "plain"))
    assert not plain.stored and plain.model is not None
    assert (plain.config.threshold, plain.config.targets, plain.config.precision) == (0.5, "pred", "fp32")
    assert plain.target_layer == "layer2"
    index = np.asarray([13, 2, 7])  # any order: rank order of a batch
    cams, _ = recompute_cams(plain.model, pool, read_images(pool, index), plain.config, plain.target_layer)
    stored = ScoreRun.open(pool.group, "cams").take("cam", index).astype(np.float32)
    assert cams.cam.shape == (3, *CAM_HW)
    np.testing.assert_allclose(cams.cam, stored, rtol=0, atol=2.0 ** -11 + 1e-5)
    run = ScoreRun.open(pool.group, "plain").read(("pred", "entropy"))
    np.testing.assert_array_equal(cams.pred, run["pred"][index])
    np.testing.assert_allclose(cams.entropy, run["entropy"][index], rtol=1e-5)


def test_select_overlays_recomputes_with_the_runs_model(setup, tmp_path, capsys):
    _, pool, _ = setup
    overlays = tmp_path / "o"
    assert main(select_argv(pool, "plain", tmp_path / "b.csv", overlays)) == 0
    assert json.loads(capsys.readouterr().out)["overlay_cams"] == "recomputed"
    assert len(list(overlays.glob("*.png"))) == 5 and (overlays / SHEET_PNG).is_file()


def test_select_overlays_refuses_without_cams_or_model(setup, tmp_path, capsys):
    root, pool, model = setup
    moved = tmp_path / "model.pt"
    shutil.copy(model, moved)
    score_pool(pool, moved, ScoreConfig(unit_size=UNIT, run="gone", batch_size=UNIT, num_workers=0), show_progress=False)
    moved.unlink()
    out = tmp_path / "b.csv"
    assert main(select_argv(pool, "gone", out, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"score run 'gone' stored no CAMs and its model {moved} is not found" in err
    assert "`xal-engine score --save-cams`" in err
    assert not out.exists() and not (tmp_path / "o").exists()  # refused before anything was written
    torch.manual_seed(1)  # a file at the recorded path that did not score the run
    save_checkpoint(moved, build_model("resnet18", 3, 1),
                    Checkpoint(arch="resnet18", num_classes=3, in_channels=1, classes=THREE_CLASSES,
                               target_layer="layer2"))
    assert main(select_argv(pool, "gone", out, tmp_path / "o")) == 2
    assert f"{moved} is no longer the model that scored it" in capsys.readouterr().err
    assert root.is_dir()
