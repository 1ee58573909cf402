"""Folder ingest: 8/16-bit grey and colour files, masks by stem, labels CSV, skip reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xal_engine.errors import XalError
from xal_engine.ingest import IngestConfig, ingest
from xal_engine.ingest.folder import FolderSettings, FolderSource
from xal_engine.ingest.samples import write_csv
from xal_engine.store import Pool

cv2 = pytest.importorskip("cv2")
N = 10


def write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)


def make(root: Path) -> dict[str, np.ndarray]:
    grey8 = np.arange(N * N, dtype=np.uint8).reshape(N, N) * 2
    grey16 = (np.arange(N * N, dtype=np.uint16).reshape(N, N) * 655)
    bgr = np.zeros((N, N, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 50, 100, 200                  # B, G, R
    write(root / "images" / "a.png", grey8)
    write(root / "images" / "a.tif", grey8)                                 # duplicate id "a"
    write(root / "images" / "b.png", grey16)
    write(root / "images" / "c.png", bgr)
    write(root / "images" / "sub" / "d.tif", grey16)
    write(root / "images" / "e.png", grey8)
    write(root / "images" / "f.png", grey8)
    write(root / "images" / "g.png", grey8)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    mask = np.zeros((N, N), np.uint8)
    mask[2:5, 3:7] = 1
    write(root / "masks" / "a.png", mask)
    write(root / "masks" / "f.png", np.ones((N + 1, N), np.uint8))         # wrong shape
    write_csv(root / "labels.csv", ("id", "class"), [
        ("a", "cat"), ("b", "dog"), ("c", "dog"), ("sub/d", "cat"), ("e", "bird"), ("f", "cat"),
        ("x", "cat"), ("broken", "cat")])
    return {"grey8": grey8, "grey16": grey16, "mask": mask}


def test_depths_colours_masks_and_labels(tmp_path: Path) -> None:
    px = make(tmp_path)
    settings = FolderSettings(masks=tmp_path / "masks", labels=tmp_path / "labels.csv", classes=("cat", "dog"))
    report = ingest(FolderSource(tmp_path / "images", N, settings), tmp_path / "p.zarr",
                    IngestConfig(test_fraction=0, val_fraction=0))
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["cat", "dog"] and pool.channels == 1 and b.images.dtype == np.uint8  # as a.png
    assert list(b.ids) == ["a", "b", "c", "g", "sub/d"] and b.labels.tolist() == [0, 1, 1, -1, 0]
    np.testing.assert_array_equal(b.images[0, 0], px["grey8"])
    np.testing.assert_array_equal(b.images[1, 0], np.rint(px["grey16"] / 65535 * 255).astype(np.uint8))
    assert (b.images[2, 0] == 124).all()              # BT.601: 0.299*200 + 0.587*100 + 0.114*50 = 124.2
    np.testing.assert_array_equal(b.rois[0], px["mask"] > 0)
    assert b.has_roi.tolist() == [True, False, False, False, False]
    reasons = {s["item"].replace(str(tmp_path), "T"): s["reason"] for s in report["skipped"]}
    assert reasons == {
        "T/images/a.tif": f"duplicate id 'a' (already taken by {tmp_path}/images/a.png)",
        "x": "image file missing (listed in the labels CSV)",
        "e": "unknown class 'bird' (expected one of ['cat', 'dog'])",
        "f": f"mask f.png: shape ({N + 1}, {N}) differs from the image's ({N}, {N})",
        "broken": "broken.png: unreadable image"}


def test_sixteen_bit_rgb_output_and_sorted_classes(tmp_path: Path) -> None:
    px = make(tmp_path)
    settings = FolderSettings(labels=tmp_path / "labels.csv", channels=3, dtype="uint16")
    ingest(FolderSource(tmp_path / "images", N, settings), tmp_path / "p.zarr", IngestConfig())
    pool = Pool.open(tmp_path / "p.zarr")
    b = pool.read(0, pool.n)
    assert pool.classes == ["bird", "cat", "dog"] and pool.channels == 3
    i = list(b.ids).index("b")
    for c in range(3):                               # grey repeated; 16-bit values kept exactly
        np.testing.assert_array_equal(b.images[i, c], px["grey16"])


def test_default_dtype_follows_a_16_bit_first_image(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.png", np.full((N, N), 1000, np.uint16))
    ingest(FolderSource(tmp_path / "images", N, FolderSettings(classes=("x",))), tmp_path / "p.zarr")
    b = Pool.open(tmp_path / "p.zarr").read(0, 1)
    assert b.images.dtype == np.uint16 and (b.images == 1000).all() and b.labels.tolist() == [-1]


def test_no_classes_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.png", np.zeros((N, N), np.uint8))
    with pytest.raises(XalError, match="--classes: a pool needs class names"):
        ingest(FolderSource(tmp_path / "images", N), tmp_path / "p.zarr")


def test_masks_inside_the_image_folder_are_not_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mask = np.zeros((N, N), np.uint8)
    mask[1:3, 1:3] = 255
    write(tmp_path / "images" / "a.png", np.zeros((N, N), np.uint8))
    write(tmp_path / "images" / "masks" / "a.png", mask)
    monkeypatch.chdir(tmp_path)                                          # relative paths, as typed
    ingest(FolderSource(Path("images"), N, FolderSettings(masks=Path("images/masks"), classes=("x",))),
           Path("p.zarr"))
    b = Pool.open(tmp_path / "p.zarr").read(0, 1)
    assert Pool.open(tmp_path / "p.zarr").n == 1 and list(b.ids) == ["a"]
    np.testing.assert_array_equal(b.rois[0], mask > 0)


def _report(out: Path) -> dict:
    import json

    return json.loads(out.with_name(out.name + ".ingest.json").read_text())


def test_a_masks_folder_is_not_read_as_images_without_masks(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.png", np.zeros((N, N), np.uint8))
    write(tmp_path / "images" / "masks" / "a.png", np.ones((N, N), np.uint8))
    write(tmp_path / "images" / "sub" / "masks" / "b.png", np.ones((N, N), np.uint8))  # only the top one
    out = tmp_path / "p.zarr"
    ingest(FolderSource(tmp_path / "images", N, FolderSettings(classes=("x",))), out)
    assert list(Pool.open(out).read(0, 2).ids) == ["a", "sub/masks/b"]
    (skip,) = _report(out)["skipped"]
    assert skip["item"] == "masks/" and "(1 image files)" in skip["reason"]
    assert f"--masks {tmp_path / 'images' / 'masks'}" in skip["reason"]
    assert "--masks-folder-as-images" in skip["reason"]
    settings = FolderSettings(classes=("x",), masks_folder_as_images=True)
    ingest(FolderSource(tmp_path / "images", N, settings), out, IngestConfig(overwrite=True))
    assert sorted(Pool.open(out).read(0, 3).ids) == ["a", "masks/a", "sub/masks/b"]
    assert _report(out)["skipped"] == []


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_an_image_too_large_by_its_header_is_skipped_undecoded(tmp_path: Path, suffix: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from xal_engine.ingest import folder

    write(tmp_path / "images" / "a.png", np.zeros((N, N), np.uint8))
    write(tmp_path / "images" / f"big{suffix}", np.zeros((1100, 1000), np.uint8))  # 1.1 megapixels
    real_imread = cv2.imread

    def imread(path: str, *args: object) -> object:
        assert "big" not in path, "the oversized image was decoded"
        return real_imread(path, *args)

    monkeypatch.setattr(cv2, "imread", imread)
    assert folder.header_size(tmp_path / "images" / f"big{suffix}") == (1000, 1100)
    out = tmp_path / "p.zarr"
    ingest(FolderSource(tmp_path / "images", N, FolderSettings(classes=("x",), max_megapixels=1)), out)
    assert list(Pool.open(out).read(0, 1).ids) == ["a"]
    (skip,) = _report(out)["skipped"]
    assert skip == {"item": "big", "reason": f"big{suffix}: 1000x1100 pixels by its header, over the limit "
                                             "of 1 megapixels (--max-megapixels)"}


def test_the_first_image_probed_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "images" / "a.png", np.zeros((1100, 1000), np.uint8))  # first in id order
    write(tmp_path / "images" / "b.png", np.zeros((N, N), np.uint16))
    monkeypatch.setattr(cv2, "imread", lambda path, *a: pytest.fail(f"decoded {path}") if "a.png" in path
                        else np.zeros((N, N), np.uint16))
    out = tmp_path / "p.zarr"
    ingest(FolderSource(tmp_path / "images", N, FolderSettings(classes=("x",), max_megapixels=1)), out)
    assert Pool.open(out).read(0, 1).images.dtype == np.uint16  # as b.png, the first readable one


@pytest.mark.parametrize(("classes", "message"), [
    (("a", "a", "b"), "--classes: expected distinct class names, got a more than once"),
    ((), "--classes: expected comma-separated class names, got none"),
])
def test_repeated_or_no_class_names_are_refused(classes: tuple[str, ...], message: str) -> None:
    with pytest.raises(XalError, match=message):
        FolderSettings(classes=classes)
