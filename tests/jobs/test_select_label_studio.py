"""select --format label-studio writes tasks whose pre-annotations are the run's thresholded Grad-CAM;
an annotator's Label Studio export of them imports back pixel for pixel; malformed exports change nothing."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_batch_sheet import make_model
from test_score import UNIT, make_pool

from xal_engine.cli import main
from xal_engine.exchange.label_studio import rle_decode, rle_encode
from xal_engine.jobs.score import ScoreConfig, score_pool
from xal_engine.ops.reference import upsample_normalise
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, Pool
from xal_engine.store.score_run import ScoreRun

SIZE, BUDGET = 32, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    pool = make_pool(root / "pool.zarr", n=24, size=SIZE)
    model = make_model(root / "model.pt")  # Grad-CAM at layer2: 4x4 maps at 32x32
    for run, save in (("cams", True), ("plain", False)):
        score_pool(pool, model, ScoreConfig(run=run, batch_size=UNIT, num_workers=0, save_cams=save))
    return root, pool


def export(setup, out: Path, run: str = "cams", *extra: str) -> list[dict]:
    _, pool = setup
    assert main(["select", "--pool", str(pool), "--run", run, "--budget", str(BUDGET), "--format",
                 "label-studio", "--out", str(out), "--device", "cpu", *extra]) == 0
    return json.loads((out / "tasks.json").read_text())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tasks_carry_the_batch_its_images_and_the_thresholded_cam(setup, tmp_path):
    _, pool_path = setup
    out = tmp_path / "batch"
    tasks = export(setup, out)
    pool = Pool.open(pool_path)
    run = ScoreRun.open(pool.group, "cams")
    rows = list(csv.DictReader((out / "batch.csv").open()))
    assert len(tasks) == len(rows) == BUDGET and (out / "batch.csv.json").is_file()
    config = (out / "config.xml").read_text()
    for name in pool.classes:
        assert f'<Choice value="{name}"/>' in config
    assert '<BrushLabels name="roi" toName="image">' in config and '<Image name="image" value="$image"' in config
    index = np.asarray([t["data"]["xal_index"] for t in tasks])
    assert [int(r["index"]) for r in rows] == index.tolist()
    # the CAM mask, independently: S = upsample_normalise(N) at 32x32, S >= the run's threshold 0.5
    low = run.take("cam", index).astype(np.float32)
    expected = upsample_normalise(torch.from_numpy(low), (SIZE, SIZE)).numpy() >= 0.5  # (n, H, W)
    probs = run.take("probs", index).astype(np.float32)
    images = pool.take("images", index)
    for i, (task, row) in enumerate(zip(tasks, rows)):
        data = task["data"]
        assert data["xal_id"] == row["id"] and data["image"] == f"images/{row['rank']}_{row['id']}.png"
        assert data["score"] == pytest.approx(float(row["score"]))
        assert data["entropy"] == pytest.approx(float(row["entropy"]))
        png = cv2.imread(str(out / data["image"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, images[i, 0])
        pred = task["predictions"][0]
        choice, roi = pred["result"]
        assert choice["value"]["choices"] == [row["pred_class"]] and (choice["from_name"], choice["to_name"]) == \
            ("class", "image")
        assert pred["score"] == pytest.approx(float(probs[i, int(row["pred"])]), abs=1e-6)
        assert (roi["type"], roi["from_name"], roi["original_width"], roi["original_height"],
                roi["image_rotation"], roi["value"]["brushlabels"]) == ("brushlabels", "roi", SIZE, SIZE, 0, ["ROI"])
        mask = rle_decode(roi["value"]["rle"], SIZE, SIZE)
        np.testing.assert_array_equal(mask, expected[i])
        assert 0 < mask.sum() < SIZE * SIZE


def test_recomputed_cams_agree_with_stored_ones_and_url_prefix(setup, tmp_path):
    stored = export(setup, tmp_path / "a")
    recomputed = export(setup, tmp_path / "b", "plain", "--image-url-prefix", "http://host/x/")
    assert [t["data"]["xal_id"] for t in stored] == [t["data"]["xal_id"] for t in recomputed]
    assert recomputed[0]["data"]["image"].startswith("http://host/x/1_")
    for s, r in zip(stored, recomputed):
        a = rle_decode(s["predictions"][0]["result"][1]["value"]["rle"], SIZE, SIZE)
        b = rle_decode(r["predictions"][0]["result"][1]["value"]["rle"], SIZE, SIZE)
        assert (a == b).mean() >= 0.99  # fp16-stored N vs fp32 recomputed: at most a few threshold pixels


def test_out_must_be_a_new_or_empty_folder(setup, tmp_path, capsys):
    _, pool = setup
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["select", "--pool", str(pool), "--run", "cams", "--budget", "2", "--format", "label-studio",
                 "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x"]


def test_a_failure_while_writing_leaves_no_half_folder(setup, tmp_path, monkeypatch, capsys):
    """The folder is built in a hidden sibling and renamed at the end: a failure mid-way (here the task
    writer) leaves neither --out nor the staging folder, so the same command can simply be rerun."""
    from xal_engine.errors import XalError
    from xal_engine.jobs import label_studio_export

    _, pool = setup

    def broken(*args, **kwargs):
        raise XalError("disk full")

    monkeypatch.setattr(label_studio_export, "export_tasks", broken)
    out = tmp_path / "round"
    assert main(["select", "--pool", str(pool), "--run", "cams", "--budget", "2", "--format", "label-studio",
                 "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no --out, no staging folder
    monkeypatch.undo()
    assert main(["select", "--pool", str(pool), "--run", "cams", "--budget", "2", "--format", "label-studio",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["batch.csv", "batch.csv.json", "config.xml", "images",
                                                     "tasks.json"]


def annotate(tasks: list[dict], classes: list[str]) -> tuple[list[dict], dict[str, tuple[str, np.ndarray]]]:
    """An annotator's export: task i gets class i % K and a box drawn on a 64x64 canvas (twice the pool's
    size); the last task is skipped (cancelled). Returns the export and id -> (class, expected 32x32 ROI)."""
    done, expected = [], {}
    for i, task in enumerate(tasks):
        drawn = np.zeros((64, 64), dtype=bool)
        drawn[4 * i + 2:4 * i + 30, 10:41] = True  # rows 4i+2..4i+29, cols 10..40
        roi = np.zeros((SIZE, SIZE), dtype=bool)
        roi[2 * i + 1:2 * i + 15, 5:20] = True  # halved, nearest at half-pixel centres: k reads source 2k+1
        cls = classes[i % len(classes)]
        result = [{"type": "choices", "from_name": "class", "to_name": "image", "value": {"choices": [cls]}},
                  {"type": "brushlabels", "from_name": "roi", "to_name": "image", "original_width": 64,
                   "original_height": 64, "image_rotation": 0,
                   "value": {"format": "rle", "rle": rle_encode(drawn), "brushlabels": ["ROI"]}}]
        cancelled = i == len(tasks) - 1
        done.append({"id": 100 + i, "data": task["data"], "predictions": task["predictions"],
                     "annotations": [{"id": 7 + i, "result": result, "was_cancelled": cancelled}]})
        if not cancelled:
            expected[task["data"]["xal_id"]] = (cls, roi)
    return done, expected


def test_round_trip_labels_and_rois_pixel_for_pixel_then_undo(setup, tmp_path, capsys):
    _, pool_src = setup
    pool_path = tmp_path / "pool.zarr"
    shutil.copytree(pool_src, pool_path)
    tasks = export(setup, tmp_path / "batch")
    classes = Pool.open(pool_path).classes
    exported, expected = annotate(tasks, classes)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported))
    before = Pool.open(pool_path).read(0, 24)
    argv = ["label", "--pool", str(pool_path), "--import", str(path), "--format", "label-studio"]
    capsys.readouterr()
    assert main([*argv, "--experiment", "e", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_imported"], summary["n_rois"], summary["n_skipped"]) == (BUDGET - 1, BUDGET - 1, 1)
    pool = Pool.open(pool_path)
    after = pool.read(0, 24)
    index = pool.find_ids(list(expected))
    for i, (cls, roi) in zip(index, expected.values()):
        assert after.labels[i] == classes.index(cls) and after.has_roi[i]
        np.testing.assert_array_equal(after.rois[i], roi)
    others = np.setdiff1d(np.arange(24), index)
    np.testing.assert_array_equal(after.labels[others], before.labels[others])
    np.testing.assert_array_equal(after.rois[others], before.rois[others])
    rounds = pool.group["al/e/labelled_round"][:]
    assert sorted(np.flatnonzero(rounds == 0).tolist()) == sorted(index.tolist())
    assert main(["label", "--pool", str(pool_path), "--undo"]) == 0
    undone = Pool.open(pool_path).read(0, 24)
    np.testing.assert_array_equal(undone.labels, before.labels)
    np.testing.assert_array_equal(undone.rois, before.rois)
    np.testing.assert_array_equal(undone.has_roi, before.has_roi)


def _malformed(case: str, exported: list[dict], pool: Pool) -> str:
    """Spoil one task of the export the way ``case`` names; returns the JSON text."""
    task = exported[0]["annotations"][0]["result"]
    if case == "unknown id":
        exported[0]["data"]["xal_id"] = "nobody"
    elif case == "unknown class":
        task[0]["value"]["choices"] = ["giraffe"]
    elif case == "wrong mask size":
        task[1]["original_height"] = 63
    elif case == "test split":
        split = pool.column("split")
        exported[0]["data"]["xal_id"] = str(pool.column("ids")[np.flatnonzero(split == SPLIT_TEST)[0]])
    text = json.dumps(exported)
    return text[:len(text) // 2] if case == "truncated json" else text


@pytest.mark.parametrize("case, needle", [
    ("unknown id", r"task 1: unknown id 'nobody' \(not in the pool\)"),
    ("unknown class", r"task 1: unknown class 'giraffe'"),
    ("wrong mask size", r"task 1: task '.*': annotation 1: the brush RLE holds 16384 values, not 63x64x4"),
    ("truncated json", r"invalid JSON at line 1 column \d+"),
    ("test split", r"task 1: id '.*' is in the test split"),
])
def test_malformed_exports_are_refused_in_one_line_and_change_nothing(setup, tmp_path, capsys, case, needle):
    _, pool_src = setup
    pool_path = tmp_path / "pool.zarr"
    shutil.copytree(pool_src, pool_path)
    tasks = export(setup, tmp_path / "batch")
    pool = Pool.open(pool_path)
    assert (pool.column("split")[[t["data"]["xal_index"] for t in tasks]] == SPLIT_TRAIN).all()
    exported, _ = annotate(tasks, pool.classes)
    path = tmp_path / "export.json"
    path.write_text(_malformed(case, exported, pool))
    old = snapshot(pool_path)
    capsys.readouterr()
    assert main(["label", "--pool", str(pool_path), "--import", str(path), "--format", "label-studio",
                 "--experiment", "e"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert re.search(needle, err), err
    assert snapshot(pool_path) == old
