"""``report RUN_DIR``: tables against hand-computed statistics, one line per strategy per panel, one
contact-sheet panel per selected image with pytorch-grad-cam's map, and clear errors for a broken
run directory (a run in progress is reported as far as it got)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as RefGradCAM

from xal_engine.cli import main
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, create_synthetic_pool
from xal_engine.jobs.overlay import Panel, contact_sheet, display_image
from xal_engine.jobs.report import (
    CURVE_METRICS,
    FIGURE_METRICS,
    ReportConfig,
    batch_panels,
    last_batch,
    learning_curve_figure,
    load_run,
    make_report,
    summarise,
    write_report,
)
from xal_engine.store import Pool

# metrics.csv by hand: random has seeds 0 and 1 at rounds 0-1; dual's seed 1 is still at round 0
# (a run in progress), so dual's final round is 0.
HEADER = ("strategy,seed,round,n_labelled,accuracy,balanced_accuracy,macro_f1,auroc,test_dice,"
          "test_soft_dice,test_energy,test_hit_rate,train_seconds,score_seconds")
ROWS = [
    "random,0,0,10,0.5,0.4,0.3,0.6,0.10,0.2,0.3,0.0,1.0,1.0",
    "random,0,1,20,0.6,0.5,0.4,0.7,0.20,0.2,0.3,0.5,1.0,1.0",
    "random,1,0,10,0.4,0.4,0.2,0.6,0.30,0.2,0.3,0.0,1.0,1.0",
    "random,1,1,20,0.8,0.7,0.6,0.9,nan,0.2,0.3,1.0,1.0,1.0",
    "dual,0,0,10,0.5,0.5,0.5,0.5,0.25,0.2,0.3,0.0,1.0,1.0",
    "dual,0,1,20,0.9,0.9,0.9,0.9,0.75,0.2,0.3,1.0,1.0,1.0",
    "dual,1,0,10,0.7,0.6,0.5,0.5,0.35,0.2,0.3,0.0,1.0,1.0",
]
SIZE = 64  # resnet18's layer4 is 2x2 here: a CAM with structure
SELECTED_FIELDS = ("rank", "index", "id", "score", "pred", "pred_class", "entropy", "margin",
                   "least_confidence", "dice", "soft_dice", "energy", "hit", "has_roi")


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "p.zarr"
    create_synthetic_pool(SyntheticConfig(n=24, size=SIZE, classes=3, seed=2, roi_fraction=0.7), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1).eval()
    info = Checkpoint(arch="resnet18", num_classes=3, in_channels=1,
                      classes=("round", "rim_ellipse", "stippled"), target_layer="layer4",
                      config={"normalize_mean": [0.5], "normalize_std": [0.25]})
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", model, info)


def write_selected(path: Path, pool: Pool, index: list[int]) -> None:
    ids = pool.read(0, pool.n).ids
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SELECTED_FIELDS)
        w.writeheader()
        for rank, i in enumerate(index, 1):
            w.writerow({"rank": rank, "index": i, "id": ids[i], "score": 0.5, "pred": 0, "pred_class": "round",
                        "entropy": 1.0, "margin": 0.1, "least_confidence": 0.5, "dice": 0.1,
                        "soft_dice": 0.1, "energy": 0.1, "hit": False, "has_roi": True})


def make_run(root: Path, pool_path: Path, checkpoint: Path) -> Path:
    """A run directory in the format `xal-engine loop` writes."""
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "format": 1, "pool": str(pool_path), "strategies": ["random", "dual"], "seeds": [0, 1],
        "rounds": 1, "arch": "resnet18", "loop": {"threshold": 0.5}}))
    (run / "metrics.csv").write_text("\n".join([HEADER, *ROWS]) + "\n")
    pool = Pool.open(pool_path)
    batches = {"random": [[0, 1, 2], [3, 4, 5, 6, 7]], "dual": [[8, 9, 10], [11, 12, 13, 14]]}
    for strategy, rounds in batches.items():
        for r, index in enumerate(rounds):
            folder = run / strategy / "seed0" / f"round{r}"
            write_selected(folder / "selected.csv", pool, index)
            (folder / "model.pt").symlink_to(checkpoint)  # 45 MB: link, do not copy
    return run


@pytest.fixture
def run_dir(tmp_path: Path, pool_path: Path, checkpoint: Path) -> Path:
    return make_run(tmp_path, pool_path, checkpoint)


def test_final_round_and_alc_statistics_by_hand(run_dir: Path) -> None:
    by = {s.strategy: s for s in summarise(load_run(run_dir))}
    r, d = by["random"], by["dual"]
    assert (r.seeds, r.final_round, r.n_labelled) == ([0, 1], 1, 20.0)
    assert (d.seeds, d.final_round, d.n_labelled) == ([0, 1], 0, 10.0)
    # random, round 1 accuracy: 0.6 and 0.8 -> mean 0.7, sample std sqrt(2 * 0.1^2 / 1)
    assert r.final["accuracy"].mean == pytest.approx(0.7)
    assert r.final["accuracy"].std == pytest.approx(math.sqrt(0.02))
    # test_dice of seed 1 is NaN: left out, one value, no std
    assert (r.final["test_dice"].mean, r.final["test_dice"].count) == (pytest.approx(0.2), 1)
    assert math.isnan(r.final["test_dice"].std)
    # ALC over 10..20 labels: seed 0 (0.5 + 0.6) / 2 = 0.55, seed 1 (0.4 + 0.8) / 2 = 0.6
    assert r.alc["accuracy"].mean == pytest.approx(0.575)
    assert r.alc["accuracy"].std == pytest.approx(math.sqrt(2 * 0.025 ** 2))
    # dual at its final round 0: 0.5 and 0.7; the ALC of a single point is the point
    assert (d.final["accuracy"].mean, d.final["accuracy"].std) == (pytest.approx(0.6),
                                                                    pytest.approx(math.sqrt(0.02)))
    assert d.alc["balanced_accuracy"].mean == pytest.approx(0.55)


def test_learning_curves_have_one_line_per_strategy(run_dir: Path) -> None:
    fig = learning_curve_figure(load_run(run_dir))
    assert [ax.get_title() for ax in fig.axes] == list(FIGURE_METRICS.values())
    assert not fig.axes[-1].lines  # a metrics.csv from before the stopping signal: no κ column
    for ax, metric in zip(fig.axes, CURVE_METRICS):
        assert [line.get_label() for line in ax.lines] == ["random", "dual"]
        assert ax.lines[0].get_xdata().tolist() == [10.0, 20.0]
    acc = fig.axes[0]
    np.testing.assert_allclose(acc.lines[0].get_ydata(), [0.45, 0.7])
    np.testing.assert_allclose(acc.lines[1].get_ydata(), [0.6, 0.9])
    # the band of random at 20 labels spans mean ± std: 0.7 ± sqrt(0.02)
    band = acc.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(0.7 + math.sqrt(0.02))
    dice = fig.axes[3]  # random at round 1 has one finite Dice: the mean of what is there
    np.testing.assert_allclose(dice.lines[0].get_ydata(), [0.2, 0.2])


def test_the_stopping_signal_is_plotted_per_strategy(run_dir: Path) -> None:
    rows = [f"{row},{kappa}" for row, kappa in zip(ROWS, ["nan", "0.5", "nan", "0.7", "nan", "0.9", "nan"])]
    (run_dir / "metrics.csv").write_text("\n".join([HEADER + ",pred_kappa", *rows]) + "\n")
    kappa = learning_curve_figure(load_run(run_dir)).axes[-1]
    assert kappa.get_title().startswith("Prediction κ")
    assert [line.get_label() for line in kappa.lines] == ["random", "dual"]
    np.testing.assert_allclose(kappa.lines[0].get_ydata(), [np.nan, 0.6])  # round 1: mean of 0.5, 0.7
    np.testing.assert_allclose(kappa.lines[1].get_ydata(), [np.nan, 0.9])


def test_report_files_tables_and_sheets(run_dir: Path) -> None:
    files = make_report(run_dir, config=ReportConfig(device="cpu"))
    out = run_dir / "report"
    assert files.html == out / "report.html" and files.notes == []
    assert [p.name for p in files.sheets] == ["contact_random.png", "contact_dual.png"]
    assert all(p.stat().st_size > 1000 for p in [files.curves, *files.sheets])
    md = files.markdown.read_text()
    assert "| random | 2 | 1 | 20 | 0.700 ± 0.141 | 0.600 ± 0.141 | 0.500 ± 0.141 | 0.200 | 0.800 ± 0.141 |" in md
    assert "| random | 2 | 1 | 20 | 0.575 ± 0.035 |" in md
    assert "| dual | 2 | 0 | 10 | 0.600 ± 0.141 |" in md
    assert "round 1 batch (5 images), Grad-CAM of the round-0 model" in md
    page = files.html.read_text()
    for name in ("learning_curves.png", "contact_random.png", "contact_dual.png"):
        assert f'src="{name}"' in page
    assert "<td>0.700 ± 0.141</td>" in page


def test_contact_sheet_panels_match_pytorch_grad_cam(run_dir: Path, pool_path: Path) -> None:
    run = load_run(run_dir)
    source = last_batch(run, "random", 0)
    assert source is not None and (source.round, source.model.parent.name) == (1, "round0")
    panels = batch_panels(pool_path, source, ReportConfig(device="cpu", batch_size=3), threshold=0.5)
    assert len(panels) == 5 and len(contact_sheet(panels).axes) == 5
    batch = Pool.open(pool_path).read(3, 8)
    x = (torch.from_numpy(batch.images).float() / 255.0 - 0.5) / 0.25  # the checkpoint's scaling
    model = build_model("resnet18", 3, 1)
    model.load_state_dict(torch.load(source.model, weights_only=True)["state_dict"])
    with RefGradCAM(model.eval(), [model.layer4]) as cam:
        expected = cam(input_tensor=x, targets=None)  # (5, H, W), predicted classes
    np.testing.assert_allclose(np.stack([p.cam for p in panels]), expected, atol=1e-5)
    for p, i, roi, has in zip(panels, range(3, 8), batch.rois, batch.has_roi):
        assert p.caption.startswith(f"phantom_{i:06d}\npred ")
        assert ("Dice n/a (no ROI)" in p.caption) == (not has)
        assert p.roi is None if not has else np.array_equal(p.roi, roi)
    assert not batch.has_roi.all() and batch.has_roi.any()  # both caption kinds were exercised
    limited = batch_panels(pool_path, source, ReportConfig(device="cpu", max_images=2), threshold=0.5)
    assert len(limited) == 2


def test_captions_name_the_true_class_where_the_pool_knows_it(run_dir: Path, pool_path: Path,
                                                              tmp_path: Path) -> None:
    copy = tmp_path / "p.zarr"
    shutil.copytree(pool_path, copy)
    Pool.open(copy, mode="r+").group["labels"][4] = -1  # image 4 of the batch 3..7: class unknown
    source = last_batch(load_run(run_dir), "random", 0)
    assert source is not None
    panels = batch_panels(copy, source, ReportConfig(device="cpu"), threshold=0.5)
    pool = Pool.open(copy)
    labels = pool.read(3, 8).labels
    classes = ("round", "rim_ellipse", "stippled")  # the checkpoint's, for the predicted class
    for p, i, label in zip(panels, range(3, 8), labels):
        pred = p.caption.split("\n")[1].split(",")[0].removeprefix("pred ")
        assert pred in classes
        true = "" if i == 4 else f", true {pool.classes[int(label)]}"
        assert p.caption.split("\n")[1] == f"pred {pred}{true}"
    assert labels[1] == -1 and all(labels[k] >= 0 for k in (0, 2, 3, 4))


@pytest.mark.parametrize(("seeds", "line"), [([0], "- 1 seed (0)"), ([0, 1, 2], "- 3 seeds (0, 1, 2)")])
def test_the_report_header_counts_the_seeds(tmp_path: Path, seeds: list[int], line: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"format": 1, "pool": str(tmp_path / "none.zarr"),
                                                 "strategies": ["random"], "seeds": seeds, "rounds": 1}))
    (run / "metrics.csv").write_text("\n".join([HEADER, *(r for r in ROWS if r.startswith("random,0,"))]) + "\n")
    md = make_report(run, config=ReportConfig(device="cpu")).markdown.read_text().splitlines()
    assert line in md and not any(m.startswith("- seeds:") for m in md)


def test_display_image_scales_and_keeps_rgb() -> None:
    grey = display_image(np.array([[[10, 20], [30, 50]]], dtype=np.uint8))
    np.testing.assert_allclose(grey, [[0.0, 0.25], [0.5, 1.0]])
    rgb = display_image(np.stack([np.zeros((2, 2)), np.ones((2, 2)), 2 * np.ones((2, 2))]))
    assert rgb.shape == (2, 2, 3) and rgb[0, 0].tolist() == [0.0, 0.5, 1.0]
    fig = contact_sheet([Panel(np.zeros((1, 4, 4)), None, None, "a")] * 7)
    assert len(fig.axes) == 7


def test_run_in_progress_and_missing_pool(run_dir: Path, tmp_path: Path) -> None:
    # dual's round-2 batch is written but its selecting model (round 1) is not: the sheet shows the
    # batch before it; random has no folders at all for now
    dual = run_dir / "dual" / "seed0"
    (dual / "round2").mkdir()
    (dual / "round2" / "selected.csv").write_bytes((dual / "round1" / "selected.csv").read_bytes())
    (dual / "round1" / "model.pt").unlink()
    for p in sorted((run_dir / "random").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    files = make_report(run_dir, out=tmp_path / "rep", config=ReportConfig(device="cpu"))
    assert files.notes == ["random: no selected batch with its checkpoint yet"]
    assert [p.name for p in files.sheets] == ["contact_dual.png"]
    assert "dual, seed 0: round 1 batch (4 images), Grad-CAM of the round-0 model" in \
        files.markdown.read_text()
    # the pool moved away: curves and tables still, sheets skipped with a note
    files = make_report(run_dir, out=tmp_path / "rep2", pool=tmp_path / "gone.zarr",
                        config=ReportConfig(device="cpu"))
    assert files.sheets == [] and files.notes[1] == (f"dual: contact sheet skipped, pool {tmp_path / 'gone.zarr'} "
                                                     "not found (pass --pool)")
    assert (tmp_path / "rep2" / "report.md").is_file()


def test_header_only_metrics_still_reports(run_dir: Path) -> None:
    (run_dir / "metrics.csv").write_text(HEADER + "\n")
    path = write_report(run_dir, pool=run_dir / "none")
    assert path.is_file() and "_no rounds completed yet_" in (path.parent / "report.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("no config", "config.json not found"),
    ("no metrics", "metrics.csv not found"),
    ("missing column", "missing column(s) n_labelled"),
    ("bad number", "line 3: column accuracy is 'high', expected a number"),
    ("not a folder", "run directory"),
])
def test_broken_run_dirs_give_one_clear_error(case: str, message: str, run_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    target = run_dir
    if case == "no config":
        (run_dir / "config.json").unlink()
    elif case == "no metrics":
        (run_dir / "metrics.csv").unlink()
    elif case == "missing column":
        (run_dir / "metrics.csv").write_text("strategy,seed,round,accuracy\nrandom,0,0,0.5\n")
    elif case == "bad number":
        (run_dir / "metrics.csv").write_text("\n".join([HEADER, ROWS[0], ROWS[1].replace("0.6", "high")]))
    else:
        target = run_dir / "nothing"
    with pytest.raises(XalError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run(target)
    assert main(["report", str(target), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xal-engine report: error: ")


def test_cli_writes_the_report(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["report", str(run_dir), "--out", str(out), "--device", "cpu", "--max-images", "2"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {out / 'report.html'}: 2 contact sheet(s), "
                                               "report.md and learning_curves.png beside it")
    assert "round 1 batch (the first 2 of 5 images in rank order)" in (out / "report.md").read_text()


def test_the_cam_method_comes_from_the_run_or_the_flag(run_dir: Path, tmp_path: Path) -> None:
    from dataclasses import fields

    from xal_engine.cli import build_parser
    from xal_engine.jobs.report import run_cam_method
    from xal_engine.jobs.streaming import ScoreConfig

    assert run_cam_method(load_run(run_dir)) == "gradcam"  # config.json without the field: Grad-CAM
    config = json.loads((run_dir / "config.json").read_text())
    config["loop"]["cam_method"] = "layercam"
    (run_dir / "config.json").write_text(json.dumps(config))
    assert run_cam_method(load_run(run_dir)) == "layercam"
    args = build_parser().parse_args(["report", str(run_dir), "--cam-method", "xgradcam"])
    assert args.cam_method == "xgradcam"
    if "cam_method" in {f.name for f in fields(ScoreConfig)}:
        files = make_report(run_dir, tmp_path / "out", config=ReportConfig(device="cpu", max_images=2))
        assert "LayerCAM of the round-0 model" in (tmp_path / "out" / "report.md").read_text()
        assert len(files.sheets) == 2
