"""Label Studio formats: brush RLE against hand-built streams and label-studio-sdk's converter, polygons
against hand-computed masks, the mask resize rule, and the multi-annotator rules of read_export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xal_engine.errors import XalError
from xal_engine.exchange.label_studio import (
    ExportRows,
    rasterise_polygon,
    read_export,
    resize_mask,
    rle_decode,
    rle_encode,
)
from xal_engine.jobs.label import Problems

brush = pytest.importorskip("label_studio_sdk.converter.brush")

HEADER_8 = f"{8:032b}" + "00111" + "0010" + "0011" + "0111" + "1111"  # num 8, 8-bit words, sizes 3 4 8 16


def to_bytes(bits: str) -> list[int]:
    bits += "0" * (8 - len(bits) % 8)  # the sdk's padding: a whole zero byte when already aligned
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_rle_of_a_hand_built_1x2_mask() -> None:
    # [[ROI, background]] = RGBA 255,255,255,255, 0,0,0,0: two runs of 4 (size index 0, length - 1 = 3).
    stream = to_bytes(HEADER_8 + "1" + "00" + "011" + "11111111" + "1" + "00" + "011" + "00000000")
    assert len(stream) == 11
    mask = np.array([[True, False]])
    assert rle_encode(mask) == stream
    np.testing.assert_array_equal(rle_decode(stream, 1, 2), mask)


def test_rle_decode_reads_literal_chunks_and_the_alpha_byte_only() -> None:
    # One literal chunk of 8 words: pixel 0 = (0, 0, 0, 7) -> ROI (alpha 7); pixel 1 = (255, 255, 255, 0)
    # -> background (alpha 0) although its colour is white.
    words = [0, 0, 0, 7, 255, 255, 255, 0]
    stream = to_bytes(HEADER_8 + "0" + "00" + "111" + "".join(f"{w:08b}" for w in words))
    np.testing.assert_array_equal(rle_decode(stream, 1, 2), [[True, False]])
    np.testing.assert_array_equal(brush.decode_rle(stream), words)  # the sdk reads the same values


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    blob = np.zeros((37, 53), dtype=bool)
    blob[5:30, 11:40] = True
    blob[12:20, 20:25] = False
    long = np.zeros((200, 210), dtype=bool)  # runs of more than 2^16 RGBA values
    long[:90] = True
    return [blob, rng.random((37, 53)) < 0.5, rng.random((53, 37)) < 0.03, np.zeros((37, 53), dtype=bool),
            np.ones((37, 53), dtype=bool), np.ones((1, 1), dtype=bool), long, ~long]


@pytest.mark.parametrize("k", range(8))
def test_rle_equals_the_sdk_both_ways(k: int) -> None:
    mask = masks()[k]
    h, w = mask.shape
    ours = rle_encode(mask)
    sdk = brush.mask2rle(mask.astype(np.uint8) * 255)
    assert ours == list(sdk)  # byte for byte
    np.testing.assert_array_equal(brush.decode_rle(ours).reshape(h, w, 4)[:, :, 3] != 0, mask)
    np.testing.assert_array_equal(rle_decode(sdk, h, w), mask)


def test_rle_refuses_a_wrong_size_and_a_truncated_stream() -> None:
    rle = rle_encode(masks()[0])
    with pytest.raises(XalError, match=r"holds 7844 values, not 53x37x4 = 7844|not 37x52x4"):
        rle_decode(rle, 37, 52)
    with pytest.raises(XalError, match="truncated"):
        rle_decode(rle[:len(rle) // 2], 37, 53)
    with pytest.raises(XalError, match="list of bytes"):
        rle_decode([1, 2, 300, 4, 5, 6, 7, 8], 1, 2)


def test_polygons_fill_the_pixels_whose_centre_is_inside() -> None:
    # Square 10%..60% on a 10x10 image: centres (c + 0.5) * 10% lie in [10, 60) for c = 1..5.
    square = np.zeros((10, 10), dtype=bool)
    square[1:6, 1:6] = True
    np.testing.assert_array_equal(rasterise_polygon([[10, 10], [60, 10], [60, 60], [10, 60]], 10, 10), square)
    # Triangle (0,0), (100,0), (0,100) on 4x4: inside when x + y < 100, i.e. c + r < 3 (c + r = 3 puts
    # the centre on the hypotenuse, a right edge: outside).
    tri = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(rasterise_polygon([[0, 0], [100, 0], [0, 100]], 4, 4), tri)
    # A non-square image: 20%..80% of the width (W 5: centres 10, 30, 50, 70, 90) x 0..50% of H 2.
    np.testing.assert_array_equal(rasterise_polygon([[20, 0], [80, 0], [80, 50], [20, 50]], 2, 5),
                                  [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(XalError, match="at least 3"):
        rasterise_polygon([[0, 0], [10, 10]], 4, 4)


def test_resize_is_nearest_with_half_pixel_centres() -> None:
    src = np.zeros((4, 6), dtype=bool)
    src[1, 3] = src[3, 5] = src[0, 0] = True
    # 4x6 -> 2x3 samples rows 1, 3 and cols 1, 3, 5: (1,3) and (3,5) survive, (0,0) does not.
    np.testing.assert_array_equal(resize_mask(src, 2, 3), [[False, True, False], [False, False, True]])
    # 2x2 -> 4x4: each pixel becomes a 2x2 block
    np.testing.assert_array_equal(resize_mask(np.eye(2, dtype=bool), 4, 4), np.kron(np.eye(2), np.ones((2, 2))))


# ------------------------------------------------------------------------------------ read_export
H, W = 8, 10
POOL = SimpleNamespace(height=H, width=W)


def box(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def brush_result(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "roi", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle_encode(mask), "brushlabels": ["ROI"]}}


def annotation(cls: str | None, *results: dict, cancelled: bool = False) -> dict:
    choice = [{"type": "choices", "from_name": "class", "to_name": "image", "value": {"choices": [cls]}}]
    return {"result": (choice if cls else []) + list(results), "was_cancelled": cancelled}


def read(tmp_path: Path, tasks: list) -> tuple[ExportRows, Problems]:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    problems = Problems(path, 5, unit="task")
    return read_export(path, POOL, problems), problems


def test_majority_class_majority_mask_cancelled_ignored(tmp_path: Path) -> None:
    a, b, c = box(0, 4, 0, 4), box(2, 6, 2, 6), box(0, 6, 0, 3)
    tasks = [
        {"data": {"xal_id": "t1"}, "annotations": [
            annotation("round", brush_result(a)), annotation("round", brush_result(b)),
            annotation("stippled", brush_result(c)), annotation("stippled", cancelled=True),
            annotation("stippled", cancelled=True)],
         "predictions": [{"result": [{"type": "choices", "value": {"choices": ["stippled"]}}]}]},
        {"data": {"xal_id": "t2"}, "annotations": [annotation("stippled")]},
        {"data": {"xal_id": "t3"}, "annotations": [annotation("round", cancelled=True)]},
        {"data": {"xal_id": "t4"}, "annotations": []},
        {"data": {"xal_id": "t5"}, "annotations": [  # brush and polygon of one annotation are united
            annotation("rim_ellipse", brush_result(box(0, 2, 0, 2)),
                       {"type": "polygonlabels", "value": {"points": [[50, 50], [100, 50], [100, 100], [50, 100]],
                                                           "polygonlabels": ["ROI"]}})]},
    ]
    rows, problems = read(tmp_path, tasks)
    assert problems.items == []
    assert (rows.tasks, rows.ids, rows.classes) == ([1, 2, 5], ["t1", "t2", "t5"], ["round", "stippled", "rim_ellipse"])
    assert (rows.n_skipped, rows.n_annotations) == (2, 5)
    majority = (a.astype(int) + b + c) >= 2  # 2 of 3 masks
    np.testing.assert_array_equal(rows.masks[0], majority)
    # a & c: rows 0..3 x cols 0..2 (12); a & b adds (2,3), (3,3); b & c adds (4,2), (5,2)
    assert rows.masks[0].sum() == 16 and rows.masks[0][3, 3] and not rows.masks[0][0, 3]
    assert rows.masks[1] is None
    np.testing.assert_array_equal(rows.masks[2], box(0, 2, 0, 2) | box(4, 8, 5, 10))


def test_two_annotators_keep_their_intersection_and_a_mask_of_another_size_is_resized(tmp_path: Path) -> None:
    big = box(0, 8, 0, 10, h=16, w=20)  # 16x20 drawn -> 8x10: rows 0..3, cols 0..4
    rows, problems = read(tmp_path, [{"data": {"xal_id": "t"}, "annotations": [
        annotation("round", brush_result(big)), annotation("round", brush_result(box(2, 8, 3, 10)))]}])
    assert problems.items == []
    np.testing.assert_array_equal(rows.masks[0], box(2, 4, 3, 5))


@pytest.mark.parametrize("tasks, needle", [
    ([{"data": {"xal_id": "t"}, "annotations": [annotation("round"), annotation("stippled")]}],
     r"task 1: task 't': the annotators' classes tie \(round, stippled, 1 each\)"),
    ([{"data": {"xal_id": "t"}, "annotations": [annotation("round", {**brush_result(box(0, 2, 0, 2)),
                                                                      "original_width": 11})]}],
     r"task 1: task 't': annotation 1: the brush RLE holds 320 values, not 8x11x4"),
    ([{"data": {}, "annotations": [annotation("round")]}], r"task 1: no data.xal_id"),
    ([{"data": {"xal_id": "t"}, "annotations": [annotation(None, brush_result(box(0, 2, 0, 2)))]}],
     r"task 1: task 't': an ROI was drawn but no annotator chose a class"),
    ([{"data": {"xal_id": "t"}, "annotations": [annotation("round", brush_result(box(0, 2, 0, 2))),
                                                annotation("round", brush_result(box(4, 6, 4, 6)))]}],
     r"task 1: task 't': the 2 annotators' ROIs share no majority pixel"),
])
def test_task_problems_are_one_line(tmp_path: Path, tasks: list, needle: str) -> None:
    _, problems = read(tmp_path, [{"data": {"xal_id": "ok"}, "annotations": [annotation("round")]}, *tasks])
    for item in problems.items:  # the task numbers count the good first task
        assert item[0] == 2
    with pytest.raises(XalError, match=needle.replace("task 1:", "task 2:")) as err:
        problems.raise_any()
    assert "\n" not in str(err.value) and "nothing imported" in str(err.value)


def test_truncated_json_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"data": {"xal_id": "t"}, "annotations": [annotation("round")]}])[:-7])
    with pytest.raises(XalError, match=r"export.json: invalid JSON at line 1 column \d+"):
        read_export(path, POOL, Problems(path, 5, unit="task"))
