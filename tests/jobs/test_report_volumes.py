"""``report`` on volume pools: the two axial slices per volume (largest ROI area, CAM peak) on hand-built
volumes, the panels' CAM against the 3-D reference, the sheet's pixel size, and a whole report of a
run on a volume phantom pool with a ``tiny3d`` checkpoint."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from xal_engine.core.capture import capture
from xal_engine.core.models import Checkpoint, build_model, save_checkpoint
from xal_engine.ingest.volume_phantom import VolumePhantomConfig, create_volume_phantom_pool
from xal_engine.jobs import report
from xal_engine.jobs.batch_sheet import BatchCams, BatchImages
from xal_engine.jobs.overlay import OverlayStyle, contact_sheet, save_figure
from xal_engine.jobs.report import (
    VOLUME_SHEETS_KEY,
    ReportConfig,
    batch_panels,
    cam_peak_slice,
    last_batch,
    learning_curve_figure,
    load_run,
    make_report,
    roi_slice,
    volume_panels,
    volume_sheet_style,
    volume_slices,
)
from xal_engine.ops.reference3d import gradcam_maps_3d
from xal_engine.store import Pool

D, H, W = 6, 8, 8


def hand_volume() -> tuple[np.ndarray, np.ndarray]:
    """ROI areas per slice 0, 4, 0, 9, 9, 1 (largest: z 3, the first of the tie with z 4); CAM maximum
    1.0 at z 2 and z 5 (first in (z, y, x) order: z 2), 0.9 on the ROI's slices."""
    roi = np.zeros((D, H, W), dtype=bool)
    roi[1, 2:4, 2:4] = True
    roi[3, 1:4, 1:4] = True
    roi[4, 4:7, 4:7] = True
    roi[5, 0, 0] = True
    cam = np.zeros((D, H, W), dtype=np.float32)
    cam[3, 2, 2] = cam[4, 5, 5] = 0.9
    cam[2, 7, 7] = cam[5, 0, 1] = 1.0
    return roi, cam


def test_slice_choice_on_a_hand_built_volume() -> None:
    roi, cam = hand_volume()
    assert roi_slice(roi) == 3 and cam_peak_slice(cam) == 2
    assert volume_slices(roi, cam).roi == 3 and volume_slices(roi, cam).cam == 2
    assert roi_slice(None) is None and roi_slice(np.zeros((D, H, W), dtype=bool)) is None
    assert cam_peak_slice(np.zeros((D, H, W), np.float32)) is None  # an all-zero CAM has no peak
    cam[0, 0, 0] = np.nan
    assert cam_peak_slice(cam) is None  # a non-finite map has no peak to show


def batch_of(images: np.ndarray, rois: np.ndarray, has_roi: list[bool]) -> BatchImages:
    n = len(images)
    return BatchImages(index=np.arange(n), ids=[f"vol{i}" for i in range(n)], images=images, rois=rois,
                       has_roi=np.asarray(has_roi), labels=np.asarray([1, -1, 0, 0][:n]))


def test_volume_panels_show_the_chosen_slices_with_the_volumes_own_scale() -> None:
    roi, cam = hand_volume()
    images = np.arange(4 * 2 * D * H * W, dtype=np.float32).reshape(4, 2, D, H, W)  # each slice distinct
    rois = np.stack([roi, roi, np.zeros_like(roi), roi])
    low = np.stack([cam, cam, np.full_like(cam, np.nan), np.zeros_like(cam)])  # full size: trilinear = id
    cams = BatchCams(cam=low, pred=np.array([0, 1, 0, 1]),
                     entropy=np.array([0.5, 0.25, 0.125, 1.0], np.float32),
                     dice=np.array([0.75, np.nan, np.nan, 0.0], dtype=np.float32))
    panels = volume_panels(batch_of(images, rois, [True, False, False, True]), cams, ["sphere", "rim"],
                           ["sphere", "rim"])
    assert len(panels) == 8
    first, peak = panels[0], panels[1]
    np.testing.assert_array_equal(first.image, images[0][:, 3])
    np.testing.assert_array_equal(peak.image, images[0][:, 2])
    np.testing.assert_array_equal(first.roi, roi[3])
    np.testing.assert_array_equal(peak.roi, roi[2])
    assert first.cam is not None and peak.cam is not None
    np.testing.assert_allclose(first.cam, cam[3] / (1.0 + 1e-7), rtol=1e-6)  # min 0, max 1: S = N
    assert peak.cam.max() == pytest.approx(1.0) and first.cam.max() == pytest.approx(0.9)
    assert first.caption == "vol0\npred sphere, true rim\nH 0.50  Dice 0.75\nz 3 of 6: largest ROI area"
    assert peak.caption == "vol0\nz 2 of 6: CAM peak\nROI here: 0 of 9 px"
    # no ROI (has_roi False): the centre slice, no contour; the CAM peak still at z 2
    assert panels[2].caption.endswith("Dice n/a (no ROI)\nz 3 of 6: centre (no ROI)") and panels[2].roi is None
    assert panels[3].caption == "vol1\nz 2 of 6: CAM peak"
    assert "pred rim\n" in panels[2].caption  # the label -1: no true class shown
    # a CAM that is not finite: the centre slice, no overlay drawn
    assert panels[5].caption == "vol2\nz 3 of 6: centre (no CAM)" and not np.isfinite(panels[5].cam).any()
    # an all-zero CAM: no peak either; the ROI's slice still chosen by area
    assert panels[6].caption.endswith("z 3 of 6: largest ROI area")
    assert panels[7].caption == "vol3\nz 3 of 6: centre (CAM flat)\nROI here: 9 of 9 px"


def test_panel_cams_are_the_3d_reference_maps() -> None:
    torch.manual_seed(1)
    a, g = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)
    from xal_engine.ops.reference3d import low_res_cam_3d

    low = low_res_cam_3d(a, g).numpy()  # (2, 2, 3, 3)
    expected = gradcam_maps_3d(a, g, (D, H, W)).numpy()  # (2, D, H, W)
    roi, _ = hand_volume()
    cams = BatchCams(cam=low, pred=np.zeros(2, dtype=np.int64), entropy=np.zeros(2, dtype=np.float32),
                     dice=np.zeros(2, dtype=np.float32))
    panels = volume_panels(batch_of(np.zeros((2, 1, D, H, W), np.uint8), np.stack([roi, roi]), [True, True]),
                           cams, ["a", "b"], ["a", "b"])
    for i in range(2):
        z = int(np.argmax(expected[i])) // (H * W)
        np.testing.assert_allclose(panels[2 * i].cam, expected[i][3], atol=1e-6)  # the ROI's slice
        np.testing.assert_allclose(panels[2 * i + 1].cam, expected[i][z], atol=1e-6)
        assert panels[2 * i + 1].cam.max() == pytest.approx(1.0, abs=1e-6)


def test_sheet_png_has_the_expected_pixel_size(tmp_path: Path) -> None:
    roi, cam = hand_volume()
    cams = BatchCams(cam=np.stack([cam] * 3), pred=np.zeros(3, dtype=np.int64),
                     entropy=np.zeros(3, dtype=np.float32), dice=np.zeros(3, dtype=np.float32))
    panels = volume_panels(batch_of(np.zeros((3, 1, D, H, W), np.uint8), np.stack([roi] * 3), [True] * 3),
                           cams, ["a"], ["a"])
    style = volume_sheet_style(OverlayStyle(columns=5, panel_inches=2.0, caption_inches=0.6, dpi=40))
    assert (style.columns, style.caption_inches) == (4, pytest.approx(0.8))  # pairs stay side by side
    png = save_figure(contact_sheet(panels, "three volumes", style), tmp_path / "sheet.png")
    # 6 panels in rows of 4: 2 rows of (2.0 + 0.8) in, plus 0.45 in of title; 4 x 2.0 in wide; at 40 dpi
    assert imread(png).shape[:2] == (round((2 * 2.8 + 0.45) * 40), 4 * 2 * 40)


# ------------------------------------------------------------------------- a whole report, tiny3d
@pytest.fixture(scope="module")
def volume_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("volume_run")
    pool = create_volume_phantom_pool(VolumePhantomConfig(n=12, depth=24, size=32, seed=1, roi_fraction=0.7),
                                      root / "v.zarr")
    torch.manual_seed(0)
    model = build_model("tiny3d", 2, 1).eval()
    info = Checkpoint(arch="tiny3d", num_classes=2, in_channels=1, classes=tuple(pool.classes),
                      target_layer="features", config={"normalize_mean": [0.5], "normalize_std": [0.25]})
    checkpoint = save_checkpoint(root / "model.pt", model, info)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "format": 1, "pool": str(pool.path), "strategies": ["random"], "seeds": [0], "rounds": 1,
        "arch": "tiny3d", "loop": {"threshold": 0.5}}))
    header = ("strategy,seed,round,n_labelled,accuracy,balanced_accuracy,macro_f1,auroc,test_dice,"
              "test_soft_dice,test_energy,test_hit_rate,train_seconds,score_seconds")
    (run / "metrics.csv").write_text(f"{header}\nrandom,0,0,4,0.5,0.5,0.5,0.5,0.1,0.1,0.1,0.0,1,1\n"
                                     "random,0,1,9,0.75,0.7,0.7,0.8,0.2,0.1,0.1,0.5,1,1\n")
    ids = pool.read(0, pool.n).ids
    for r, index in enumerate([[0, 1, 2, 3], [4, 5, 6, 7, 8]]):
        folder = run / "random" / "seed0" / f"round{r}"
        folder.mkdir(parents=True)
        with open(folder / "selected.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "index", "id"])
            writer.writerows([rank, i, ids[i]] for rank, i in enumerate(index, 1))
        (folder / "model.pt").symlink_to(checkpoint)
    return run, pool.path


def test_report_of_a_volume_run_draws_two_slices_per_volume(volume_run: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = volume_run[0]
    kinds: list[str] = []

    def curves(*args: object, kind: str = "image") -> object:
        kinds.append(kind)
        return learning_curve_figure(*args, kind=kind)  # type: ignore[arg-type]

    monkeypatch.setattr(report, "learning_curve_figure", curves)
    files = make_report(run, config=ReportConfig(device="cpu"))
    assert kinds == ["volume"]
    assert [p.name for p in files.sheets] == ["contact_random.png"] and files.notes == []
    # 5 volumes, 10 panels in rows of 6: (2 x (2.2 + 0.6) + 0.45) in x 6 x 2.2 in at 120 dpi
    assert imread(files.sheets[0]).shape[:2] == (726, 1584)
    md = files.markdown.read_text()
    assert "random, seed 0: round 1 batch (5 volumes), Grad-CAM of the round-0 model" in md
    assert VOLUME_SHEETS_KEY in md and html.escape(VOLUME_SHEETS_KEY) in files.html.read_text()
    figure = learning_curve_figure(load_run(run), kind="volume")
    assert {ax.get_xlabel() for ax in figure.axes} == {"labelled volumes"}


def test_volume_panels_match_an_independent_3d_gradcam(volume_run: tuple[Path, Path]) -> None:
    run, pool_path = volume_run
    source = last_batch(load_run(run), "random", 0)
    assert source is not None
    panels = batch_panels(pool_path, source, ReportConfig(device="cpu", batch_size=2), threshold=0.5)
    assert len(panels) == 10
    batch = Pool.open(pool_path).read(4, 9)
    model = build_model("tiny3d", 2, 1)
    model.load_state_dict(torch.load(source.model, weights_only=True)["state_dict"])
    x = (torch.from_numpy(batch.images).float() / 255.0 - 0.5) / 0.25  # the checkpoint's scaling
    out = capture(model.eval(), "features", x)  # targets: the predicted classes
    maps = gradcam_maps_3d(out.activations[0], out.gradients[0], (24, 32, 32)).numpy()  # (5, D, H, W)
    for i in range(5):
        flat = maps[i].max() <= maps[i].min()  # an all-zero CAM: the centre slice
        z_cam = 12 if flat else int(np.argmax(maps[i])) // (32 * 32)
        z_roi = int(batch.rois[i].sum(axis=(1, 2)).argmax()) if batch.has_roi[i] else 12
        np.testing.assert_allclose(panels[2 * i].cam, maps[i][z_roi], atol=1e-5)
        np.testing.assert_allclose(panels[2 * i + 1].cam, maps[i][z_cam], atol=1e-5)
        np.testing.assert_array_equal(panels[2 * i + 1].image, batch.images[i][:, z_cam])
        assert panels[2 * i].caption.startswith(f"volume_{4 + i:06d}\npred ")
        assert f"z {z_cam} of 24: {'centre (CAM flat)' if flat else 'CAM peak'}" in panels[2 * i + 1].caption
    assert not batch.has_roi.all() and batch.has_roi.any()  # both kinds of first panel exercised
