"""DICOM SEG: pools ingested from DICOM keep the UIDs; ROIs round trip ROI -> SEG -> ROI on the pool grid;
SEGs over images that are not in the pool are refused with the pool byte-identical; export-seg writes
SEGs that highdicom and pydicom read back over the sources, at the sources' resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xal_engine.cli import main
from xal_engine.errors import XalError
from xal_engine.exchange.dicom_seg import build_seg, to_pool_grid, to_source_grid, write_seg
from xal_engine.ingest import IngestConfig, ingest
from xal_engine.ingest.samples import make_siim, make_vindr, write_dicom
from xal_engine.ingest.siim import SiimSource
from xal_engine.ingest.vindr import VindrSource
from xal_engine.jobs.label import ImportConfig, import_labels, undo_import
from xal_engine.store import Pool

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

SIZE = 32
SHAPE = (100, 75)  # source Rows x Columns: not square, not a multiple of the pool size


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def vindr(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vindr")
    src = make_vindr(root / "src", 8, shape=SHAPE)
    ingest(VindrSource(src, SIZE), root / "p.zarr", IngestConfig(test_fraction=0, val_fraction=0, chunk_size=4))
    return src, root / "p.zarr"


def source_of(src: Path, image_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(next(src.rglob(f"{image_id}.dicom")))


def seg_of(pool: Pool, src: Path, i: int, mask: np.ndarray, roi: bool = True) -> hd.seg.Segmentation:
    """A SEG over image i's source whose ROI segment is ``mask`` (pool grid) at the source's size."""
    ds = source_of(src, str(pool.take("ids", np.array([i]))[0]))
    big = to_source_grid(mask, int(ds.Rows), int(ds.Columns))
    cam = np.zeros_like(big)
    cam[:10, :10] = True  # a Grad-CAM segment: never imported by default
    return build_seg(ds, big if roi else None, cam, hd.UID())


def test_pool_keeps_the_sources_uids_and_shapes(vindr: tuple[Path, Path]) -> None:
    src, path = vindr
    pool = Pool.open(path)
    assert sorted(pool.optional) == ["series_instance_uid", "sop_instance_uid", "source_shape",
                                     "study_instance_uid"]
    for i, image_id in enumerate(pool.column("ids")):
        ds = source_of(src, str(image_id))
        assert pool.column("sop_instance_uid")[i] == ds.SOPInstanceUID
        assert pool.column("series_instance_uid")[i] == ds.SeriesInstanceUID
        assert pool.column("study_instance_uid")[i] == ds.StudyInstanceUID
        assert pool.take("source_shape", np.array([i]))[0].tolist() == list(SHAPE)
    assert pool.validate() == []
    assert pool.info()["optional_arrays"] == sorted(pool.optional)


def test_siim_pool_keeps_uids(tmp_path: Path) -> None:
    src = make_siim(tmp_path / "src", 4, shape=(64, 48))
    ingest(SiimSource(src, SIZE), tmp_path / "p.zarr", IngestConfig(test_fraction=0, val_fraction=0))
    pool = Pool.open(tmp_path / "p.zarr")
    expected = {str(p.stem): str(pydicom.dcmread(p).SOPInstanceUID) for p in src.rglob("*.dcm")}
    assert dict(zip(pool.column("ids").tolist(), pool.column("sop_instance_uid").tolist())) == expected
    assert (pool.take("source_shape", np.arange(pool.n)) == [64, 48]).all()


def test_geometry_pool_source_pool_is_exact() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((SIZE, SIZE)) > 0.5
    for rows, cols in ((100, 75), (32, 32), (33, 500), (1024, 768)):
        big = to_source_grid(mask, rows, cols)
        assert big.shape == (rows, cols)
        np.testing.assert_array_equal(to_pool_grid(big, SIZE, SIZE), mask)
    # hand-computed: source row j of 100 takes pool row floor((j + 0.5) * 32 / 100)
    one = np.zeros((SIZE, SIZE), bool)
    one[5, 0] = True
    big = to_source_grid(one, 100, 75)
    rows = np.flatnonzero(big[:, 0])
    assert rows.tolist() == [j for j in range(100) if int((j + 0.5) * 32 / 100) == 5]


def test_roundtrip_roi_seg_roi(vindr: tuple[Path, Path], tmp_path: Path) -> None:
    src, path = vindr
    work = tmp_path / "p.zarr"
    import shutil

    shutil.copytree(path, work)
    pool = Pool.open(work)
    labels_before = pool.column("labels").copy()
    masks = {}
    segs = tmp_path / "segs"
    segs.mkdir()
    rng = np.random.default_rng(1)
    for i in (1, 2, 6):
        mask = np.zeros((SIZE, SIZE), bool)
        r, c = rng.integers(0, SIZE - 12, 2)
        mask[r:r + 9, c:c + 12] = True
        mask[r + 2, c + 3] = False  # a hole: pixel exact, not just a box
        masks[i] = mask
        write_seg(segs / f"{i}.dcm", seg_of(pool, src, i, mask))
    dry = import_labels(work, segs, ImportConfig(format="dicom-seg", dry_run=True))
    assert dry.n_rois == 3 and dry.n_rois_replaced == 3
    summary = import_labels(work, segs, ImportConfig(format="dicom-seg"))
    assert summary.n_rois == 3 and summary.n_unchanged == 3
    pool = Pool.open(work)
    for i, mask in masks.items():
        np.testing.assert_array_equal(pool.take("rois", np.array([i]))[0], mask)
    np.testing.assert_array_equal(pool.column("labels"), labels_before)  # classes kept
    assert pool.validate() == []
    before = Pool.open(path)
    undo_import(work)
    np.testing.assert_array_equal(Pool.open(work).take("rois", np.arange(8)), before.take("rois", np.arange(8)))


def test_segment_choice_and_cli(vindr: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, path = vindr
    import shutil

    work = tmp_path / "p.zarr"
    shutil.copytree(path, work)
    pool = Pool.open(work)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[3:20, 4:9] = True
    write_seg(tmp_path / "one.dcm", seg_of(pool, src, 0, mask))
    assert main(["label", "--pool", str(work), "--import", str(tmp_path / "one.dcm"), "--format", "dicom-seg",
                 "--segment", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_rois"] == 1
    cam = to_pool_grid(np.pad(np.ones((10, 10), bool), ((0, SHAPE[0] - 10), (0, SHAPE[1] - 10))), SIZE, SIZE)
    np.testing.assert_array_equal(Pool.open(work).take("rois", np.array([0]))[0], cam)  # segment 2 = Grad-CAM
    assert main(["label", "--pool", str(work), "--import", str(tmp_path / "one.dcm"), "--format", "dicom-seg",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"dry run: would import 1 ROI mask (classes kept) into {work}")


def test_seg_over_an_image_not_in_the_pool_is_refused(vindr: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    src, path = vindr
    pool = Pool.open(path)
    stranger = write_dicom(tmp_path / "other.dcm", np.zeros(SHAPE, np.uint16))
    ds = pydicom.dcmread(stranger)
    segs = tmp_path / "segs"
    segs.mkdir()
    mask = np.zeros((SIZE, SIZE), bool)
    mask[2:5, 2:5] = True
    write_seg(segs / "a_good.dcm", seg_of(pool, src, 0, mask))  # a good one beside it: nothing written either
    write_seg(segs / "b_bad.dcm", build_seg(ds, to_source_grid(mask, *SHAPE), to_source_grid(mask, *SHAPE),
                                            hd.UID()))
    before = snapshot(path)
    with pytest.raises(XalError) as err:
        import_labels(path, segs, ImportConfig(format="dicom-seg"))
    message = str(err.value)
    assert "\n" not in message and "nothing imported" in message
    assert str(ds.SOPInstanceUID) in message and "b_bad.dcm" in message and "not an image of pool" in message
    assert main(["label", "--pool", str(path), "--import", str(segs), "--format", "dicom-seg"]) == 2
    assert str(ds.SOPInstanceUID) in capsys.readouterr().err
    assert snapshot(path) == before


def test_seg_of_another_size_than_its_source_is_refused(vindr: tuple[Path, Path], tmp_path: Path) -> None:
    src, path = vindr
    pool = Pool.open(path)
    ds = source_of(src, str(pool.take("ids", np.array([3]))[0]))
    fake = pydicom.dcmread(write_dicom(tmp_path / "src.dcm", np.zeros((50, 40), np.uint16),
                                       uids=(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)))
    write_seg(tmp_path / "s.dcm", build_seg(fake, np.ones((50, 40), bool), np.zeros((50, 40), bool), hd.UID()))
    before = snapshot(path)
    with pytest.raises(XalError, match=r"frames are 50x40, its source .* is 100x75"):
        import_labels(path, tmp_path / "s.dcm", ImportConfig(format="dicom-seg"))
    assert snapshot(path) == before


def test_pool_without_uids_is_refused(tmp_path: Path) -> None:
    from xal_engine.store import PoolWriter

    src = tmp_path / "src"
    src.mkdir()
    with PoolWriter(tmp_path / "p.zarr", channels=1, height=SIZE, width=SIZE, dtype=np.uint8,
                    classes=["a", "b"]) as w:  # an old pool: no optional arrays
        w.append(np.zeros((4, 1, SIZE, SIZE), np.uint8), np.zeros((4, SIZE, SIZE), bool), np.zeros(4, bool),
                 np.zeros(4, np.int16), [f"im{i:05d}" for i in range(4)], np.zeros(4, np.uint8))
    pool = Pool.open(tmp_path / "p.zarr")
    assert pool.optional == {} and pool.validate() == [] and pool.info()["optional_arrays"] == []
    (tmp_path / "b.csv").write_text("id\nim00000\n")
    with pytest.raises(XalError, match=r"^export-seg: pool .* has no DICOM UIDs \(arrays sop_instance_uid, "
                                       r"series_instance_uid, study_instance_uid, source_shape missing\)"):
        from xal_engine.jobs.export_seg import export_seg

        export_seg(tmp_path / "p.zarr", "run", tmp_path / "b.csv", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    seg = tmp_path / "x.dcm"
    seg.write_bytes(b"")
    with pytest.raises(XalError, match="has no DICOM UIDs"):
        import_labels(tmp_path / "p.zarr", seg, ImportConfig(format="dicom-seg"))


# ------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def scored(vindr: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    import torch

    from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
    from xal_engine.jobs.score import ScoreConfig, score_pool

    src, path = vindr
    root = tmp_path_factory.mktemp("scored")
    import shutil

    shutil.copytree(path, root / "p.zarr")
    classes = Pool.open(path).classes
    torch.manual_seed(0)
    model = build_model("resnet18", len(classes), 1)
    save_checkpoint(root / "m.pt", model, Checkpoint(arch="resnet18", num_classes=len(classes), in_channels=1,
                                                     classes=classes, target_layer="layer2"))
    score_pool(root / "p.zarr", root / "m.pt", ScoreConfig(run="cams", batch_size=4, num_workers=0,
                                                             save_cams=True, device="cpu"), show_progress=False)
    return src, root / "p.zarr", root


def test_export_seg_reads_back_over_the_sources(scored: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import torch

    from xal_engine.ops.reference import upsample_normalise
    from xal_engine.store.score_run import ScoreRun

    src, path, _ = scored
    pool = Pool.open(path)
    ids = ["img00005", "img00002", "img00007"]
    (tmp_path / "batch.csv").write_text("rank,id\n" + "".join(f"{k},{i}\n" for k, i in enumerate(ids)))
    out = tmp_path / "segs"
    assert main(["export-seg", "--pool", str(path), "--run", "cams", "--ids-from", str(tmp_path / "batch.csv"),
                 "--sources", str(src), "--out", str(out), "--device", "cpu"]) == 0
    index = pool.find_ids(ids)
    low = ScoreRun.open(pool.group, "cams").take("cam", index).astype(np.float32)
    cams = upsample_normalise(torch.from_numpy(low), (SIZE, SIZE)).numpy() >= 0.5  # (n, H, W) the run's set
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.seg.dcm" for i in ids)  # no temp file left
    for k, image_id in enumerate(ids):
        source = source_of(src, image_id)
        uid = str(source.SOPInstanceUID)
        roi = pool.take("rois", index[k:k + 1])[0]
        seg = hd.seg.segread(out / f"{image_id}.seg.dcm")
        assert [u[2] for u in seg.get_source_image_uids()] == [uid]
        assert seg.get_source_image_uids()[0][:2] == (source.StudyInstanceUID, source.SeriesInstanceUID)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["ROI", "Grad-CAM"]
        px = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[1, 2])[0]
        assert px.shape == (*SHAPE, 2)
        np.testing.assert_array_equal(px[..., 0] > 0, to_source_grid(roi, *SHAPE))
        np.testing.assert_array_equal(px[..., 1] > 0, to_source_grid(cams[k], *SHAPE))
        np.testing.assert_array_equal(to_pool_grid(px[..., 0] > 0, SIZE, SIZE), roi)  # back on the pool grid
        raw = pydicom.dcmread(out / f"{image_id}.seg.dcm")
        assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and raw.SegmentationType == "BINARY"
        assert raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == uid
        assert (raw.Rows, raw.Columns) == SHAPE
        frames = raw.pixel_array.reshape(-1, *SHAPE)  # one frame per non-empty segment
        numbers = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for f in raw.PerFrameFunctionalGroupsSequence]
        for frame, number in zip(frames, numbers):
            expected = to_source_grid(roi if number == 1 else cams[k], *SHAPE)
            np.testing.assert_array_equal(frame > 0, expected)


def test_export_seg_refuses_missing_sources(scored: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, path, _ = scored
    (tmp_path / "b.csv").write_text("id\nimg00001\n")
    (tmp_path / "empty").mkdir()
    write_dicom(tmp_path / "empty" / "x.dcm", np.zeros((4, 4), np.uint16))
    uid = Pool.open(path).take("sop_instance_uid", Pool.open(path).find_ids(["img00001"]))[0]
    with pytest.raises(XalError, match=f"no DICOM with SOP Instance UID {uid}"):
        from xal_engine.jobs.export_seg import export_seg

        export_seg(path, "cams", tmp_path / "b.csv", tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
