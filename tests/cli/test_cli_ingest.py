"""`xal-engine ingest`: flags reach the settings, one summary line, one error line for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.ingest.samples import write_brats_case, write_csv
from xal_engine.store import Pool


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    seg = np.zeros((16, 16, 4), np.uint8)
    seg[2:14, 2:14, 1] = 2
    seg[4:8, 4:8, 1] = 4
    for i in range(3):
        write_brats_case(root, f"BraTS20_Training_{i:03d}", seg)
    return root


def test_brats_command(brats_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.zarr"
    code = main(["ingest", "brats", str(brats_src), "--out", str(out), "--size", "8", "--min-tumour-voxels", "140",
                 "--roi", "whole-tumour", "--test-fraction", "0.34", "--val-fraction", "0", "--seed", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith("ingest brats: 3 images from 3 items (0 skipped) -> ") and "[train 2 / val 0 / test 1]" in lines[0]
    pool = Pool.open(out)
    assert (pool.height, pool.width, pool.n) == (8, 8, 3)
    settings = pool.attrs["ingest"]
    assert (settings["min_tumour_voxels"], settings["roi"], settings["seed"]) == (140, "whole-tumour", 3)
    assert main(["ingest", "brats", str(brats_src), "--out", str(out), "--size", "8", "--overwrite", "--json",
                 "--min-tumour-voxels", "1000"]) == 2
    assert "no usable brats images" in capsys.readouterr().err


def test_folder_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cv2 = pytest.importorskip("cv2")
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.full((6, 6), 7, np.uint8))
    write_csv(tmp_path / "labels.csv", ("id", "class"), [("a", "ill")])
    code = main(["ingest", "folder", str(tmp_path / "img"), "--out", str(tmp_path / "p.zarr"), "--size", "6",
                 "--labels", str(tmp_path / "labels.csv"), "--classes", "well,ill", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["per_class"] == {"well": 0, "ill": 1} and report["images"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "--size: expected a positive number of pixels, got 0"),
    (["--test-fraction", "0.8", "--val-fraction", "0.3"], "--test-fraction + --val-fraction"),
    (["--workers", "0"], "--workers: expected at least 1"),
])
def test_user_mistakes_are_one_line(brats_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    argv: list[str], message: str) -> None:
    assert main(["ingest", "brats", str(brats_src), "--out", str(tmp_path / "p.zarr"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_existing_pool_and_missing_source(brats_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.zarr"
    assert main(["ingest", "brats", str(brats_src), "--out", str(out), "--size", "8"]) == 0
    assert main(["ingest", "brats", str(brats_src), "--out", str(out), "--size", "8"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["ingest", "vindr", str(tmp_path / "nope"), "--out", str(tmp_path / "q.zarr")]) == 2
    assert "expected a folder with VinDr-CXR DICOMs" in capsys.readouterr().err


def _folder(tmp_path: Path) -> Path:
    cv2 = pytest.importorskip("cv2")
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.full((6, 6), 7, np.uint8))
    return tmp_path / "img"


@pytest.mark.parametrize("argv, message", [
    (["--classes", "a,a,b"], "--classes: expected distinct class names, got a more than once"),
    (["--classes", "a", "--chunk-size", "0"], "--chunk-size: must be at least 1, got 0"),
    (["--classes", "a", "--max-megapixels", "0"], "--max-megapixels: expected a positive number, got 0"),
])
def test_folder_user_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    out = tmp_path / "p.zarr"
    assert main(["ingest", "folder", str(_folder(tmp_path)), "--out", str(out), "--size", "6", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_fifo_report_is_refused_before_ingesting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    out = tmp_path / "p.zarr"
    os.mkfifo(tmp_path / "p.zarr.ingest.json")
    argv = ["ingest", "folder", str(_folder(tmp_path)), "--out", str(out), "--size", "6", "--classes", "a"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.zarr.ingest.json is a FIFO" in err
    assert not out.exists()


def test_a_huge_png_is_a_skipped_item(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cv2 = pytest.importorskip("cv2")
    src = _folder(tmp_path)
    cv2.imwrite(str(src / "huge.png"), np.zeros((3000, 3000), np.uint8))  # 9 megapixels, a few KB on disk
    out = tmp_path / "p.zarr"
    assert main(["ingest", "folder", str(src), "--out", str(out), "--size", "6", "--classes", "a",
                 "--max-megapixels", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and report["skipped"][0]["item"] == "huge"
    assert "3000x3000 pixels by its header" in json.loads(out.with_name("p.zarr.ingest.json").read_text())[
        "skipped"][0]["reason"]
