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
from xal_engine.jobs.label import ImportConfig, UndoConfig, import_labels, undo_import
from xal_engine.store import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, Pool, PoolWriter
from xal_engine.store.al_state import GENERATION_ATTR

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
    if "zarr.json" in changed:  # the pool's attributes: only its generation may have changed
        root_old, root_new = json.loads(old["zarr.json"]), json.loads(new["zarr.json"])
        root_new["attributes"].pop(GENERATION_ATTR)
        root_old["attributes"].pop(GENERATION_ATTR, None)
        assert root_new == root_old
        changed.remove("zarr.json")
    assert changed <= {"labels/c/0", "labels/c/1", "labels/c/2", "rois/c/0/0/0", "rois/c/1/0/0",
                       "has_roi/c/0", "has_roi/c/1"}
    assert {"labels/c/0", "labels/c/1", "labels/c/2", "rois/c/0/0/0", "rois/c/1/0/0"} <= changed
    # ... besides the import's record of the values it replaced, under labels_history/
    assert {k for k in set(new) - set(old) if not k.startswith("labels_history/")} == {
                                   "al/zarr.json", "al/e1/zarr.json", "al/e1/labelled_round/zarr.json",
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
    assert capsys.readouterr().out.strip() == (f"imported 3 labels into {pool_path} (experiment e, "
                                               "round 0): round 2, rim_ellipse 1; 0 ROI masks")
    assert main(["label", "--pool", str(pool_path), "--import", str(ok), "--experiment", "e",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["round"], out["n_relabelled"], out["per_class"]["round"]) == (1, 3, 2)
    bad = write_csv(tmp_path / "bad.csv", "id,class\nnobody,round\n")
    assert main(["label", "--pool", str(pool_path), "--import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xal-engine label: error: ") and "line 2" in err


# --- dry run and undo -------------------------------------------------------------------------------
# Rows of the fixture pool with an ROI among those given a mask below: 2, 3 (rows 1 and 9 have none).
RESTORED = ("labels/", "has_roi/", "rois/", "al/e/labelled_round/")


def sha256s(root: Path) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in snapshot(root).items()}


def arrays_of(root: Path, under: tuple[str, ...] = RESTORED) -> dict[str, bytes]:
    """The files (metadata and chunks) of the arrays an undo puts back."""
    return {k: v for k, v in snapshot(root).items() if k.startswith(under)}


def state(path: Path) -> tuple[np.ndarray, ...]:
    pool = Pool.open(path)
    rounds = pool.experiment("e").read_labelled_round(missing_ok=True)
    return pool.column("labels"), pool.column("has_roi"), pool.arrays["rois"][:], rounds


def assert_state(got: tuple[np.ndarray, ...], expected: tuple[np.ndarray, ...]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def first_import(pool_path: Path, tmp_path: Path) -> None:
    """Import 1, experiment e, round 0: rows 1 (new mask), 2 (mask replaced), 17."""
    square_png(tmp_path / "m1.png", SIZE, (4, 9, 4, 9))
    square_png(tmp_path / "m2.png", SIZE, (20, 30, 0, 5))
    import_labels(pool_path, write_csv(tmp_path / "one.csv", f"id,class,roi\n{ident(1)},round,m1.png\n"
                                                             f"{ident(2)},round,m2.png\n{ident(17)},2,\n"),
                  ImportConfig(experiment="e"))


def second_csv(tmp_path: Path) -> Path:
    """Row 1 relabelled, 17 unchanged, 9 set with a new mask, 3 set with its mask replaced, 33 set."""
    square_png(tmp_path / "m9.png", SIZE, (0, 5, 0, 5))
    square_png(tmp_path / "m3.png", SIZE, (10, 12, 10, 30))
    return write_csv(tmp_path / "two.csv", f"id,class,roi\n{ident(1)},rim_ellipse,\n{ident(17)},stippled,\n"
                                           f"{ident(9)},0,m9.png\n{ident(3)},2,m3.png\n{ident(33)},1,\n")


def test_dry_run_counts_every_change_and_writes_nothing(pool_path: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert Pool.open(pool_path).column("has_roi")[[1, 2, 3, 9, 17]].tolist() == [0, 1, 1, 0, 0]
    first_import(pool_path, tmp_path)
    csv_path = second_csv(tmp_path)
    before = sha256s(pool_path)
    summary = import_labels(pool_path, csv_path, ImportConfig(experiment="e", dry_run=True))
    assert sha256s(pool_path) == before
    assert (summary.dry_run, summary.import_number, summary.round, summary.n_imported) == (True, 2, 1, 5)
    assert summary.per_class == {"round": 1, "rim_ellipse": 2, "stippled": 2}
    assert summary.set_per_class == {"round": 1, "rim_ellipse": 1, "stippled": 1}
    assert summary.changed_per_class == {"round": 0, "rim_ellipse": 1, "stippled": 0}
    assert (summary.n_unchanged, summary.n_relabelled, summary.n_rois, summary.n_rois_added,
            summary.n_rois_replaced, summary.n_new, summary.chunks_written) == (1, 2, 2, 1, 1, 3, 4)
    args = ["label", "--pool", str(pool_path), "--import", str(csv_path), "--experiment", "e", "--dry-run"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (
        f"dry run: would import 5 labels into {pool_path} as import 2 (experiment e, round 1); labels set: "
        "round 1, rim_ellipse 1, stippled 1; changed: rim_ellipse 1; unchanged: 1; ROI masks: 1 added "
        "(has_roi False -> True), 1 replaced; 3 newly labelled by the experiment; nothing written")
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["dry_run"], out["import_number"], out["n_rois_added"], out["set_per_class"]["round"]) == \
        (True, 2, 1, 1)
    assert sha256s(pool_path) == before
    # the same checks as a real import: a bad file is refused with the same message
    bad = write_csv(tmp_path / "bad.csv", "id,class\nnobody,round\n")
    with pytest.raises(XalError, match="line 2: unknown id 'nobody'"):
        import_labels(pool_path, bad, ImportConfig(experiment="e", dry_run=True))
    assert sha256s(pool_path) == before


def test_undo_puts_back_byte_identical_arrays_newest_first(pool_path: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    pristine, pristine_state = arrays_of(pool_path), state(pool_path)
    first_import(pool_path, tmp_path)
    after_one, one_state = arrays_of(pool_path), state(pool_path)
    summary = import_labels(pool_path, second_csv(tmp_path), ImportConfig(experiment="e"))
    assert (summary.import_number, summary.round) == (2, 1)
    # import 2 created labelled_round chunks 1 and 4 (rows 9 and 33); row 3 shares chunk 0 with 1 and 2
    assert "al/e/labelled_round/c/4" in arrays_of(pool_path) and "al/e/labelled_round/c/4" not in after_one
    history = Pool.open(pool_path).group["labels_history/2"]
    assert history["index"][:].tolist() == [1, 3, 9, 17, 33]
    assert history["labels"][:].tolist() == [0, -1, -1, 2, -1]
    assert history["roi_index"][:].tolist() == [3, 9] and history["has_roi"][:].tolist() == [True, False]
    assert history["round_index"][:].tolist() == [1, 3, 9, 17, 33]
    assert history["labelled_round"][:].tolist() == [0, -1, -1, 0, -1]
    assert history.attrs["round_chunks_created"] == [1, 4]
    assert [type(c).__name__ for c in history["rois"].compressors] == ["BloscCodec", "Crc32cCodec"]

    assert main(["label", "--pool", str(pool_path), "--undo"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"undid import 2 of {pool_path} ({tmp_path / 'two.csv'}; experiment e, round 1): put back "
        "5 labels, 2 ROI masks and 5 AL rounds")
    assert arrays_of(pool_path) == after_one
    assert_state(state(pool_path), one_state)
    assert main(["label", "--pool", str(pool_path), "--undo", "1", "--experiment", "e", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_rois"] == 2
    # the experiment's array stays (metadata only, no chunk): every value -1 as before its first import
    restored = arrays_of(pool_path)
    assert {k: v for k, v in restored.items() if not k.startswith("al/")} == pristine
    assert sorted(k for k in restored if k.startswith("al/")) == ["al/e/labelled_round/zarr.json"]
    assert_state(state(pool_path), pristine_state)
    assert Pool.open(pool_path).validate() == []
    pool = Pool.open(pool_path)
    records = pool.group["labels_history"].attrs["imports"]
    assert [(r["number"], r["experiment"], r["round"], bool(r["undone"])) for r in records] == \
        [(1, "e", 0, True), (2, "e", 1, True)]
    assert [(r["import"], bool(r["undone"])) for r in pool.group["al/e"].attrs["imports"]] == \
        [(1, True), (2, True)]
    # the experiment starts over at round 0; numbers go on
    again = import_labels(pool_path, write_csv(tmp_path / "3.csv", f"id,class\n{ident(4)},0\n"),
                          ImportConfig(experiment="e"))
    assert (again.import_number, again.round) == (3, 0)


def test_undo_refuses_when_a_later_import_wrote_the_same_rows(pool_path: Path, tmp_path: Path) -> None:
    import_labels(pool_path, write_csv(tmp_path / "a.csv", f"id,class\n{ident(1)},0\n{ident(2)},0\n"),
                  ImportConfig(experiment="e"))
    import_labels(pool_path, write_csv(tmp_path / "b.csv", f"id,class\n{ident(2)},1\n{ident(3)},1\n"))
    import_labels(pool_path, write_csv(tmp_path / "c.csv", f"id,class\n{ident(10)},2\n"),
                  ImportConfig(experiment="f"))
    before = snapshot(pool_path)
    with pytest.raises(XalError) as err:
        undo_import(pool_path, UndoConfig(number=1))
    assert str(err.value) == (f"--undo 1: import 2 ({tmp_path / 'b.csv'}) later wrote 1 of the same rows "
                              f"(first: {ident(2)}); undo newest first (--undo 2)")
    with pytest.raises(XalError, match=r"^--undo 1: import 2 .* undo newest first \(--undo 2\)$"):
        undo_import(pool_path, UndoConfig(experiment="e"))  # e's last import is 1
    assert snapshot(pool_path) == before
    # import 3 wrote other rows: import 2 can go first, then 1
    assert undo_import(pool_path, UndoConfig(number=2)).n_labels == 2
    assert undo_import(pool_path, UndoConfig(experiment="e", round=0)).import_number == 1
    pool = Pool.open(pool_path)
    assert pool.column("labels")[[1, 2, 3, 10]].tolist() == [-1, -1, -1, 2]
    assert pool.read_labelled_round("e")[[1, 2]].tolist() == [-1, -1]


def test_nothing_to_undo_and_bad_undo_targets(pool_path: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(pool_path)
    assert main(["label", "--pool", str(pool_path), "--undo", "last"]) == 2
    assert capsys.readouterr().err == (f"xal-engine label: error: pool {pool_path}: nothing to undo (no label "
                                       "import is recorded in labels_history)\n")
    assert snapshot(pool_path) == before
    import_labels(pool_path, write_csv(tmp_path / "a.csv", f"id,class\n{ident(1)},0\n"))
    cases = {
        UndoConfig(number=2): "--undo 2: pool .* has imports 1..1$",
        UndoConfig(experiment="e"): "nothing to undo \\(no import of experiment 'e' is left",
        UndoConfig(number=1, experiment="e"): "import 1 of pool .* is not of experiment 'e' \\(it is of None\\)",
        UndoConfig(round=0): "^--round needs --experiment",
    }
    for config, message in cases.items():
        with pytest.raises(XalError, match=message):
            undo_import(pool_path, config)
    summary = undo_import(pool_path, UndoConfig(dry_run=True))
    assert (summary.dry_run, summary.import_number, summary.experiment, summary.n_labels) == (True, 1, None, 1)
    assert Pool.open(pool_path).column("labels")[1] == 0  # the dry run put nothing back
    undo_import(pool_path)
    assert snapshot(pool_path)["labels/c/0"] == before["labels/c/0"]
    with pytest.raises(XalError, match="nothing to undo \\(no import is left that is not already undone\\)"):
        undo_import(pool_path)
    with pytest.raises(XalError, match="^--undo 1: import 1 of pool .* is already undone \\(20"):
        undo_import(pool_path, UndoConfig(number=1))


def test_undo_checks_the_history_before_writing(pool_path: Path, tmp_path: Path) -> None:
    import_labels(pool_path, write_csv(tmp_path / "a.csv", f"id,class\n{ident(1)},0\n{ident(9)},1\n"),
                  ImportConfig(experiment="e"))
    chunk = pool_path / "labels_history" / "1" / "labels" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))  # a broken checksum
    before = snapshot(pool_path)
    with pytest.raises(XalError, match=r"labels_history/1/labels cannot be decoded"):
        undo_import(pool_path)
    assert snapshot(pool_path) == before


def test_label_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--import LABELS.csv", "--undo [NUMBER|last]", "--complete", "--dry-run", "labels_history/NUMBER/",
                 "newest first"):
        assert flag in text
    assert main(["label", "--pool", "p.zarr"]) == 2
    assert "one of the arguments --import --undo --complete is required" in capsys.readouterr().err


# --- ROI paths stay in the CSV's folder ---------------------------------------------------------------
def _outside_layout(tmp_path: Path) -> tuple[Path, Path]:
    """batch/ (the CSV's folder, with a symlink out) and outside/m.png beside it."""
    (tmp_path / "batch").mkdir()
    (tmp_path / "outside").mkdir()
    outside = square_png(tmp_path / "outside" / "m.png", SIZE, (2, 9, 3, 7))
    (tmp_path / "batch" / "link.png").symlink_to(outside)
    square_png(tmp_path / "batch" / "in.png", SIZE, (1, 4, 1, 4))
    return tmp_path / "batch", outside


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_roi_paths_leaving_the_csv_folder_are_refused_unless_allowed(pool_path: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     kind: str) -> None:
    folder, outside = _outside_layout(tmp_path)
    roi = {"dotdot": "../outside/m.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    csv_path = write_csv(folder / "labels.csv",
                         f"id,class,roi\n{ident(1)},round,in.png\n{ident(2)},round,{roi}\n")
    before = snapshot(pool_path)
    read = []
    real_imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda p, *a: (read.append(Path(p).name), real_imread(p, *a))[1])
    argv = ["label", "--pool", str(pool_path), "--import", str(csv_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3: ROI path" in err and "leads outside the CSV's folder" in err
    assert "--allow-outside-rois" in err
    assert snapshot(pool_path) == before and "m.png" not in read and "link.png" not in read  # never opened
    assert main([*argv, "--allow-outside-rois"]) == 0
    rois = Pool.open(pool_path).arrays["rois"][2]
    assert rois[2:9, 3:7].all() and rois.sum() == 7 * 4


def test_an_roi_absolute_path_into_the_csv_folder_is_accepted(pool_path: Path, tmp_path: Path) -> None:
    folder, _ = _outside_layout(tmp_path)
    csv_path = write_csv(folder / "labels.csv", f"id,class,roi\n{ident(1)},round,{folder / 'in.png'}\n")
    assert import_labels(pool_path, csv_path).n_rois == 1


# --- an import killed part-way ---------------------------------------------------------------------
KILLED_IMPORT = """
import os, sys
from xal_engine.jobs.label import ImportConfig, import_labels
from xal_engine.store import Pool
writes = [0]
original = Pool.write_rows
def write_rows(self, name, index, values):
    done = original(self, name, index, values)
    writes[0] += 1
    if str(writes[0]) == sys.argv[3]:
        os.kill(os.getpid(), 9)
    return done
def partly(array, index, values):
    first = index // array.chunks[0] == index[0] // array.chunks[0]
    original_rows(array, index[first], values[first])
    os.kill(os.getpid(), 9)
if sys.argv[3] == "rounds":
    import xal_engine.store.al_state as al_state
    original_rows = al_state.write_rows
    al_state.write_rows = partly
Pool.write_rows = write_rows
import_labels(sys.argv[1], sys.argv[2], ImportConfig(experiment="e"))
"""


def kill_import(pool_path: Path, csv_path: Path, after_writes: int | str) -> None:
    """Run the import in a subprocess that SIGKILLs itself after its ``after_writes``-th row write
    ("rounds": once the first chunk of the experiment's rounds is written)."""
    import signal
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(pool_path), str(csv_path),
                           str(after_writes)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("after_writes", [1, 3, "rounds"])
def test_a_killed_import_rerun_equals_an_uninterrupted_one(pool_path: Path, tmp_path: Path,
                                                           after_writes: int | str) -> None:
    import shutil

    first_import(pool_path, tmp_path)
    reference = tmp_path / "reference.zarr"
    shutil.copytree(pool_path, reference)
    csv_path = second_csv(tmp_path)
    expected = import_labels(reference, csv_path, ImportConfig(experiment="e"))
    kill_import(pool_path, csv_path, after_writes)

    pending = Pool.open(pool_path).labels_history().pending()
    assert pending is not None and (pending["number"], pending["round"]) == (2, 1)
    with pytest.raises(XalError, match=r"label import 2 \(.*two.csv\) was interrupted") as err:
        import_labels(pool_path, write_csv(tmp_path / "other.csv", f"id,class\n{ident(4)},0\n"),
                      ImportConfig(experiment="e", dry_run=True))
    assert "\n" not in str(err.value)
    assert import_labels(pool_path, csv_path, ImportConfig(experiment="e", dry_run=True)).resumed

    got = import_labels(pool_path, csv_path, ImportConfig(experiment="e"))
    assert got.resumed and not expected.resumed
    assert {**vars(got), "resumed": False, "pool": ""} == {**vars(expected), "pool": ""}
    assert_state(state(pool_path), state(reference))
    pool, ref = Pool.open(pool_path), Pool.open(reference)
    assert without_times(pool.labels_history().records()) == without_times(ref.labels_history().records())
    assert without_times(pool.experiment("e").imports()) == without_times(ref.experiment("e").imports())
    assert pool.labels_history().pending() is None
    undo_import(pool_path)
    undo_import(reference)
    assert_state(state(pool_path), state(reference))


def test_a_killed_import_is_completed_before_another_import_or_an_undo(pool_path: Path,
                                                                      tmp_path: Path) -> None:
    import shutil

    first_import(pool_path, tmp_path)
    after_first = state(pool_path)
    reference = tmp_path / "reference.zarr"
    shutil.copytree(pool_path, reference)
    csv_path = second_csv(tmp_path)
    import_labels(reference, csv_path, ImportConfig(experiment="e"))
    kill_import(pool_path, csv_path, 1)
    killed = tmp_path / "killed.zarr"
    shutil.copytree(pool_path, killed)

    other = write_csv(tmp_path / "other.csv", f"id,class\n{ident(4)},0\n")
    summary = import_labels(pool_path, other, ImportConfig(experiment="e"))
    assert (summary.import_number, summary.round, summary.resumed) == (3, 2, False)
    import_labels(reference, other, ImportConfig(experiment="e"))
    assert_state(state(pool_path), state(reference))

    undone = undo_import(killed)  # completes import 2, then undoes it
    assert undone.import_number == 2
    assert_state(state(killed), after_first)
    assert Pool.open(killed).labels_history().pending() is None


def test_a_pending_import_stops_every_job_until_label_complete(pool_path: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Killed mid-import, the pool is part old, part new: score, select, train and loop refuse it with
    one line (before loading anything), validate reports it, and ``label --complete`` finishes it to
    the state of an uninterrupted import."""
    import shutil

    first_import(pool_path, tmp_path)
    reference = tmp_path / "reference.zarr"
    shutil.copytree(pool_path, reference)
    csv_path = second_csv(tmp_path)
    import_labels(reference, csv_path, ImportConfig(experiment="e"))
    kill_import(pool_path, csv_path, 1)
    before = snapshot(pool_path)

    p, model = str(pool_path), str(tmp_path / "absent.pt")  # refused before the model is read
    for argv in (["score", "--pool", p, "--model", model, "--run", "r"],
                 ["select", "--pool", p, "--run", "r", "--budget", "2", "--out", str(tmp_path / "b.csv")],
                 ["train", "--pool", p, "--out", str(tmp_path / "m.pt"), "--epochs", "1"],
                 ["loop", "--pool", p, "--out", str(tmp_path / "runs"), "--rounds", "1", "--strategy", "random",
                  "--initial", "4", "--per-round", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "label import 2 (" in err and f"label --pool {p} --complete" in err, err
    assert snapshot(pool_path) == before  # and nothing written
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "m.pt").exists()

    assert main(["pool", "validate", p]) == 1
    assert "label import 2 (" in capsys.readouterr().out
    assert main(["label", "--pool", p, "--complete", "--round", "1"]) == 2
    assert "--round does not go with --complete" in capsys.readouterr().err

    assert main(["label", "--pool", p, "--complete"]) == 0
    assert capsys.readouterr().out.strip() == (f"completed label import 2 ({csv_path}) of {p} "
                                               "(experiment e, round 1)")
    assert_state(state(pool_path), state(reference))
    pool, ref = Pool.open(pool_path), Pool.open(reference)
    assert without_times(pool.labels_history().records()) == without_times(ref.labels_history().records())
    assert without_times(pool.experiment("e").imports()) == without_times(ref.experiment("e").imports())
    assert pool.validate() == []
    assert main(["label", "--pool", p, "--complete"]) == 2
    assert "no label import is pending" in capsys.readouterr().err


def test_label_studio_export_dry_run_then_import_with_a_polygon(pool_path: Path, tmp_path: Path) -> None:
    # A polygon 25%..50% of the 32x32 image: pixel centres (c + 0.5) / 32 in [0.25, 0.5) -> rows/cols 8..15.
    poly = {"type": "polygonlabels", "from_name": "roi", "to_name": "image",
            "value": {"points": [[25, 25], [50, 25], [50, 50], [25, 50]], "polygonlabels": ["ROI"]}}
    choice = {"type": "choices", "from_name": "class", "to_name": "image", "value": {"choices": ["stippled"]}}
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"data": {"xal_id": ident(3)}, "annotations": [
        {"result": [choice, poly], "was_cancelled": False}]}]))
    old = snapshot(pool_path)
    dry = import_labels(pool_path, path, ImportConfig(format="label-studio", dry_run=True))
    assert (dry.n_imported, dry.n_rois, dry.set_per_class["stippled"]) == (1, 1, 1)
    assert snapshot(pool_path) == old
    import_labels(pool_path, path, ImportConfig(format="label-studio"))
    after = Pool.open(pool_path).read(0, N)
    expected = np.zeros((SIZE, SIZE), dtype=bool)
    expected[8:16, 8:16] = True
    assert after.labels[3] == 2 and after.has_roi[3]
    np.testing.assert_array_equal(after.rois[3], expected)
    with pytest.raises(XalError, match="--format 'xml': expected one of csv, label-studio"):
        import_labels(pool_path, path, ImportConfig(format="xml"))
