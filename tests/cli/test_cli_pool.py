"""``xal-engine pool create|info|validate``: outputs, exit codes, one-line errors (``demo``: test_demo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.ingest.synthetic import SyntheticConfig
from xal_engine.store import Pool, partial_path

CREATE = ["pool", "create", "--synthetic", "--n", "120", "--size", "32", "--classes", "3",
          "--seed", "1", "--shortcut", "0.5", "--roi-fraction", "0.75"]


@pytest.fixture
def pool_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "p.zarr"
    assert main([*CREATE, "--out", str(path)]) == 0
    capsys.readouterr()
    return path


def run(args: list[str]) -> int:
    """Exit code of the CLI, whether it returns it or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def test_create_writes_the_configured_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.zarr"
    assert main([*CREATE, "--out", str(path), "--test-fraction", "0.25", "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"created {path}: 120 images 1x32x32 uint8, 3 classes")
    pool = Pool.open(path)
    assert pool.attrs["synthetic"] == {**vars(SyntheticConfig(n=120, size=32, seed=1, shortcut=0.5,
                                                              roi_fraction=0.75, test_fraction=0.25,
                                                              val_fraction=0.0))}
    split = pool.read(0, 120).split
    assert (split == 2).sum() == 30 and (split == 1).sum() == 0
    assert not partial_path(path).exists()


def test_info_json_matches_the_pool(pool_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool", "info", str(pool_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    batch = Pool.open(pool_path).read(0, 120)
    assert info["n"] == 120 and info["shape"] == [1, 32, 32] and info["dtype"] == "uint8"
    assert info["classes"] == ["round", "rim_ellipse", "stippled"]
    assert [info["splits"][s]["n"] for s in ("train", "val", "test")] == [84, 12, 24]
    assert info["splits"]["test"]["per_class"]["stippled"] == int(((batch.split == 2)
                                                                   & (batch.labels == 2)).sum())
    assert info["roi_coverage"]["has_roi"] == int(batch.has_roi.sum())
    assert info["chunking"]["images_per_chunk"] == 4096
    stored = sum(f.stat().st_size for f in (pool_path / "images").rglob("*") if f.is_file())
    assert info["storage"]["images"]["stored_bytes"] == stored
    assert info["compression_ratio"] == pytest.approx(stored / (120 * 32 * 32))
    assert info["score_runs"] == [] and info["al_experiments"] == []


def test_info_text_table(pool_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Pool.open(pool_path, mode="r+").group.create_group("scores").create_group("baseline")
    assert main(["pool", "info", str(pool_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    batch = Pool.open(pool_path).read(0, 120)
    header = next(i for i, line in enumerate(lines) if line.startswith("split"))
    assert lines[header].split() == ["split", "images", "labelled", "has_roi", "round", "rim_ellipse",
                                     "stippled", "unknown"]
    train = batch.split == 0
    expected = ["train", "84", "84", str(int(batch.has_roi[train].sum())),
                *(str(int((batch.labels[train] == k).sum())) for k in range(3)), "0"]
    assert lines[header + 1].split() == expected
    assert f"ROI coverage: {int(batch.has_roi.sum())}/120 images" in "\n".join(lines)
    assert "score runs: baseline" in lines


def test_validate_exit_codes(pool_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool", "validate", str(pool_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{pool_path}: valid (120 images, 1 chunk decoded and checked)"
    chunk = pool_path / "rois" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-10] ^= 0x55
    chunk.write_bytes(bytes(raw))
    assert main(["pool", "validate", str(pool_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and len(report["problems"]) == 1
    assert report["problems"][0].startswith("array 'rois' chunk 0 (images 0..119) cannot be decoded")
    assert main(["pool", "validate", str(pool_path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{pool_path}: INVALID, 1 problem"


@pytest.mark.parametrize(("args", "message"), [
    (["pool", "create", "--n", "5", "--out", "x.zarr"], "needs --synthetic"),
    ([*CREATE[:-2], "--roi-fraction", "2", "--out", "x.zarr"], "--roi-fraction must be between 0 and 1"),
    ([*CREATE, "--out", "x.zarr", "--size", "abc"], "argument --size: invalid int value"),
    (["pool", "info", "missing.zarr"], "missing.zarr does not exist"),
    (["pool", "validate", "."], "is not a pool: no zarr.json"),
    (["pool", "frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(args) == 2
    line = error_line(capsys)
    assert line.startswith("xal-engine pool") and message in line
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def test_existing_out_is_refused_then_overwritten(pool_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = Pool.open(pool_path).read(0, 120).images
    assert main([*CREATE[:-6], "--seed", "2", "--out", str(pool_path)]) == 2
    assert "already exists (pass --overwrite to replace it)" in error_line(capsys)
    np.testing.assert_array_equal(Pool.open(pool_path).read(0, 120).images, before)
    assert main([*CREATE[:-6], "--seed", "2", "--out", str(pool_path), "--overwrite"]) == 0
    assert not np.array_equal(Pool.open(pool_path).read(0, 120).images, before)


def test_python_m_pool_info_exit_codes(pool_path: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool", "info", str(pool_path)]) == 0
    assert capsys.readouterr().err == ""
    (tmp_path / "not_a_pool").mkdir()
    bad = subprocess.run([sys.executable, "-m", "xal_engine", "pool", "info", str(tmp_path / "not_a_pool")],
                         check=False, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (f"xal-engine pool: error: {tmp_path / 'not_a_pool'} is not a pool: "
                          "no zarr.json (expected a Zarr v3 group)\n")


def test_interrupted_create_leaves_no_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from xal_engine.ingest import synthetic

    real = synthetic.generate_block

    def interrupted(config: SyntheticConfig, block: int, split: np.ndarray) -> synthetic.SyntheticBlock:
        if block == 2:
            raise KeyboardInterrupt
        return real(config, block, split)

    monkeypatch.setattr(synthetic, "generate_block", interrupted)
    path = tmp_path / "p.zarr"
    assert main([*CREATE[:2], "--synthetic", "--n", "5000", "--size", "32", "--out", str(path)]) == 130
    assert capsys.readouterr().err == "xal-engine pool: interrupted\n"
    assert not path.exists() and partial_path(path).exists()
    assert run(["pool", "info", str(path)]) == 2
    assert "unfinished pool whose writing was interrupted" in error_line(capsys)
    monkeypatch.setattr(synthetic, "generate_block", real)
    assert main([*CREATE, "--out", str(path)]) == 0  # a new create starts afresh
    assert Pool.open(path).n == 120 and not partial_path(path).exists()
