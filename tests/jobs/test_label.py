"""``label --import``: labels, rounds and ROI masks written to the touched chunks only; every refusal
leaves the pool byte-for-byte unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.errors import XalError
from xal_engine.ingest.synthetic import SyntheticConfig, class_names, generate_block
from xal_engine.jobs.label import ImportConfig, import_labels
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool, PoolWriter

N, SIZE, CHUNK = 40, 32, 8
# Image i: split fixed by hand so tests can name train/val/test ids; labels start unknown.
SPLIT = np.full(N, SPLIT_TRAIN, dtype=np.uint8)
SPLIT[[5, 6]] = SPLIT_VAL
SPLIT[[7, 30]] = SPLIT_TEST


def ident(i: int) -> str:
    return f"phantom_{i:06d}"


@pytest.fixture
def pool_path(tmp_path: Path) -> Path:
    g = generate_block(SyntheticConfig(n=N, size=SIZE, classes=3, seed=3, roi_fraction=0.5), 0, SPLIT)
    path = tmp_path / "p.zarr"
    with PoolWriter(path, channels=1, height=SIZE, width=SIZE, dtype=np.uint8, classes=class_names(3),
                    chunk_size=CHUNK) as w:
        w.append(g.images, g.rois, g.has_roi, np.full(N, -1, dtype=np.int16), g.ids, g.split)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the pool: relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def square_png(path: Path, side: int, box: tuple[int, int, int, int], value: int = 255) -> Path:
    mask = np.zeros((side, side), dtype=np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = value
    assert cv2.imwrite(str(path), mask)
    return path


def test_import_writes_labels_rounds_and_masks(pool_path: Path, tmp_path: Path) -> None:
    # A 64x64 mask with the box rows 10..29, cols 20..39 is, halved by nearest (half-pixel centres),
    # rows 5..14, cols 10..19 of the 32x32 pool image.
    (tmp_path / "masks").mkdir()
    square_png(tmp_path / "masks" / "a.png", 64, (10, 30, 20, 40), value=1)
    square_png(tmp_path / "b.png", SIZE, (0, 3, 0, 2))
    before = Pool.open(pool_path).read(0, N)
    csv_path = write_csv(tmp_path / "batch.csv",
                         "id,class,roi,notes\n"
                         f"{ident(2)},rim_ellipse,masks/a.png,x\n"
                         f"{ident(17)}, 2 ,,\n"
                         "\n"
                         f"{ident(9)},round,b.png,y\n")
    old = snapshot(pool_path)
    summary = import_labels(pool_path, csv_path, ImportConfig(experiment="e1"))

    assert (summary.n_imported, summary.round, summary.n_rois, summary.chunks_written) == (3, 0, 2, 3)
    assert summary.per_class == {"round": 1, "rim_ellipse": 1, "stippled": 1}
    assert summary.ignored_columns == ["notes"]
    pool = Pool.open(pool_path)
    after = pool.read(0, N)
    expected_labels = np.full(N, -1, dtype=np.int16)
    expected_labels[[2, 17, 9]] = [1, 2, 0]
    np.testing.assert_array_equal(after.labels, expected_labels)
    expected_rounds = np.full(N, -1, dtype=np.int16)
    expected_rounds[[2, 17, 9]] = 0
    np.testing.assert_array_equal(pool.group["al/e1/labelled_round"][:], expected_rounds)
    roi2 = np.zeros((SIZE, SIZE), dtype=bool)
    roi2[5:15, 10:20] = True
    roi9 = np.zeros((SIZE, SIZE), dtype=bool)
    roi9[0:3, 0:2] = True
    np.testing.assert_array_equal(after.rois[2], roi2)
    np.testing.assert_array_equal(after.rois[9], roi9)
    untouched = np.setdiff1d(np.arange(N), [2, 9])
    np.testing.assert_array_equal(after.rois[untouched], before.rois[untouched])
    np.testing.assert_array_equal(after.has_roi[untouched], before.has_roi[untouched])
    assert after.has_roi[2] and after.has_roi[9]
    np.testing.assert_array_equal(after.images, before.images)
    assert pool.validate() == []
    # Only the chunks holding rows 2, 9 and 17 (chunks 0, 1, 2) changed; no other file did.
    new = snapshot(pool_path)
    changed = {k for k in old if old[k] != new.get(k)}  # chunk keys: labels/c/1, rois/c/1/0/0
    assert changed <= {"labels/c/0", "labels/c/1", "labels/c/2", "rois/c/0/0/0", "rois/c/1/0/0",
                       "has_roi/c/0", "has_roi/c/1"}
    assert {"labels/c/0", "labels/c/1", "labels/c/2", "rois/c/0/0/0", "rois/c/1/0/0"} <= changed
    assert set(new) - set(old) == {"al/zarr.json", "al/e1/zarr.json", "al/e1/labelled_round/zarr.json",
                                   "al/e1/labelled_round/c/0", "al/e1/labelled_round/c/1",
                                   "al/e1/labelled_round/c/2"}


def test_next_import_is_the_next_round_and_keeps_first_rounds(pool_path: Path, tmp_path: Path) -> None:
    import_labels(pool_path, write_csv(tmp_path / "r0.csv", f"id,class\n{ident(0)},round\n"),
                  ImportConfig(experiment="e1"))
    summary = import_labels(pool_path, write_csv(tmp_path / "r1.csv",
                                                 f"id,class\n{ident(0)},stippled\n{ident(33)},1\n"),
                            ImportConfig(experiment="e1"))
    assert (summary.round, summary.n_relabelled) == (1, 1)
    pool = Pool.open(pool_path)
    rounds = pool.group["al/e1/labelled_round"][:]
    assert (rounds[0], rounds[33], pool.arrays["labels"][0], pool.arrays["labels"][33]) == (0, 1, 2, 1)
    summary = import_labels(pool_path, write_csv(tmp_path / "r7.csv", f"id,class\n{ident(34)},0\n"),
                            ImportConfig(experiment="e1", round=7))
    assert summary.round == 7 and pool.group["al/e1/labelled_round"][34] == 7
    assert [i["n_new"] for i in pool.group["al/e1"].attrs["imports"]] == [1, 1, 1]


def test_allow_any_split_labels_but_never_marks_val_or_test(pool_path: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "l.csv", f"id,class\n{ident(7)},round\n{ident(5)},1\n{ident(1)},2\n")
    summary = import_labels(pool_path, csv_path, ImportConfig(experiment="e", allow_any_split=True))
    assert summary.n_outside_train == 2
    pool = Pool.open(pool_path)
    assert pool.arrays["labels"][:8].tolist() == [-1, 2, -1, -1, -1, 1, -1, 0]
    assert pool.group["al/e/labelled_round"][:8].tolist() == [-1, 0, -1, -1, -1, -1, -1, -1]


def test_without_experiment_only_labels_are_written(pool_path: Path, tmp_path: Path) -> None:
    import_labels(pool_path, write_csv(tmp_path / "l.csv", f"id,class\n{ident(3)},round\n"))
    pool = Pool.open(pool_path)
    assert pool.arrays["labels"][3] == 0 and pool.subgroups("al") == []


REFUSALS = {
    "unknown id": ("id,class\nphantom_000001,round\nnobody,round\n", "line 3: unknown id 'nobody'"),
    "unknown class": ("id,class\nphantom_000001,round\nphantom_000002,oval\n",
                      "line 3: unknown class 'oval'"),
    "class index out of range": ("id,class\nphantom_000001,3\n", "line 2: unknown class '3'"),
    "duplicate id": ("id,class\nphantom_000001,round\nphantom_000002,0\nphantom_000001,1\n",
                     "line 4: duplicate id 'phantom_000001' (also on line 2)"),
    "short row": ("id,class\nphantom_000001\n", "line 2: expected 2 fields, found 1"),
    "long row": ("id,class\nphantom_000001,round,extra\n", "line 2: expected 2 fields, found 3"),
    "empty class": ("id,class\nphantom_000001,\n", "line 2: empty class"),
    "missing column": ("id,label\nphantom_000001,round\n", "line 1: header 'id,label' lacks column(s) class"),
    "empty file": ("", "the file is empty"),
    "header only": ("id,class\n", "no data rows"),
    "test split": ("id,class\nphantom_000030,round\n", "line 2: id 'phantom_000030' is in the test split"),
    "val split": ("id,class\nphantom_000001,0\nphantom_000006,round\n",
                  "line 3: id 'phantom_000006' is in the val split"),
    "missing roi": ("id,class,roi\nphantom_000001,round,gone.png\n", "line 2: ROI file"),
    "unreadable roi": ("id,class,roi\nphantom_000001,round,junk.png\n", "cannot be read as an image"),
    "empty roi": ("id,class,roi\nphantom_000001,round,blank.png\n", "is empty (no nonzero pixel)"),
    "roi vanishing when resized": ("id,class,roi\nphantom_000001,round,speck.png\n",
                                   "is empty once resized to 32x32"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_line_and_write_nothing(case: str, pool_path: Path, tmp_path: Path) -> None:
    text, message = REFUSALS[case]
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    square_png(tmp_path / "blank.png", SIZE, (0, 0, 0, 0))
    square_png(tmp_path / "speck.png", 256, (1, 2, 1, 2))  # one pixel between sampled centres
    # an earlier import, so that a refused one must also leave al/ alone
    import_labels(pool_path, write_csv(tmp_path / "first.csv", f"id,class\n{ident(20)},1\n"),
                  ImportConfig(experiment="e"))
    before = snapshot(pool_path)
    csv_path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(XalError) as err:
        import_labels(pool_path, csv_path, ImportConfig(experiment="e"))
    assert message in str(err.value) and str(csv_path) in str(err.value)
    assert "\n" not in str(err.value)
    assert snapshot(pool_path) == before


def test_many_problems_are_counted_in_one_line(pool_path: Path, tmp_path: Path) -> None:
    rows = "".join(f"ghost{i},round\n" for i in range(9))
    before = snapshot(pool_path)
    expected = (r"9 problem\(s\), nothing imported: line 2: unknown id 'ghost0' .*; "
                r"line 6: unknown id 'ghost4' \(not in the pool\); and 4 more$")
    with pytest.raises(XalError, match=expected):
        import_labels(pool_path, write_csv(tmp_path / "l.csv", "id,class\n" + rows))
    assert snapshot(pool_path) == before


def test_not_utf8_and_bad_flags_are_refused(pool_path: Path, tmp_path: Path) -> None:
    (tmp_path / "latin.csv").write_bytes("id,class\nélan,round\n".encode("latin-1"))
    with pytest.raises(XalError, match="not UTF-8 text"):
        import_labels(pool_path, tmp_path / "latin.csv")
    ok = write_csv(tmp_path / "ok.csv", f"id,class\n{ident(1)},round\n")
    with pytest.raises(XalError, match="--round needs --experiment"):
        import_labels(pool_path, ok, ImportConfig(round=2))
    with pytest.raises(XalError, match="--experiment 'a/b' is not a valid name"):
        import_labels(pool_path, ok, ImportConfig(experiment="a/b"))


def test_cli_summary_json_and_one_line_error(pool_path: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ok = write_csv(tmp_path / "ok.csv", f"id,class\n{ident(1)},round\n{ident(2)},round\n{ident(3)},1\n")
    assert main(["label", "--pool", str(pool_path), "--import", str(ok), "--experiment", "e"]) == 0
    assert capsys.readouterr().out.strip() == (f"imported 3 label(s) into {pool_path} (experiment e, "
                                               "round 0): round 2, rim_ellipse 1; 0 ROI mask(s)")
    assert main(["label", "--pool", str(pool_path), "--import", str(ok), "--experiment", "e",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["round"], out["n_relabelled"], out["per_class"]["round"]) == (1, 3, 2)
    bad = write_csv(tmp_path / "bad.csv", "id,class\nnobody,round\n")
    assert main(["label", "--pool", str(pool_path), "--import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xal-engine label: error: ") and "line 2" in err
