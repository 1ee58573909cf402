"""Label Studio files: tasks with pre-annotations for a batch (export) and its JSON export (import).

Formats (what Label Studio reads and writes; checked against label_studio_sdk.converter.brush):

- **Brush RLE** (``brushlabels`` results, ``value.rle``): the frontend's ``@thi.ng/rle-pack`` of the
  mask as an RGBA uint8 image (H, W, 4) flattened row-major (values 0/255). Bit stream, MSB first:
  32 bits ``num`` (= H*W*4), 5 bits word size - 1 (7: 8-bit words), 4 x 4 bits run-length field
  sizes - 1 (3, 4, 8, 16 bits); then chunks ``flag(1) size-index(2) length-1(size bits)``, followed by
  one word repeated ``length`` times (flag 1) or ``length`` literal words (flag 0); zero bits pad the
  end to a whole byte (a whole extra byte when already aligned, as the sdk's ``encode_rle``).
  :func:`rle_encode` writes exactly the bytes of the sdk's ``mask2rle(mask * 255)`` (every channel =
  the mask); :func:`rle_decode` reads any word size and run sizes, and a pixel is ROI when its alpha
  byte (channel 3) is nonzero.
- **Polygons** (``polygonlabels``, ``value.points`` = [[x%, y%], ...] of the image's width and height,
  (0, 0) the top-left corner of the image, (100, 100) its bottom-right corner): rasterised at the pool's
  H x W by :func:`rasterise_polygon`: pixel (row r, col c) is ROI when its centre
  (x = (c + 0.5) / W * 100, y = (r + 0.5) / H * 100) lies inside the polygon by the even-odd rule
  (a centre exactly on an edge: inside for left/top edges, outside for right/bottom ones, so two
  polygons sharing an edge never share a pixel).
- **Masks at another size** than the pool's (``original_width`` x ``original_height`` of a brush result)
  are resized by :func:`resize_mask`, the rule of the CSV import's PNG masks: nearest neighbour with
  half-pixel centres (``cv2.INTER_NEAREST_EXACT``).
- **Several annotators** per task (:func:`read_export`): cancelled (skipped) annotations and empty ones
  are ignored; the class is the strict majority (most votes) of the annotations that chose one, a tie
  for the most votes is a problem naming the task and the tied classes (never resolved silently); the
  ROI is the pixel-wise strict majority (> half) of the masks of the annotations that drew one (one
  annotator: the mask; two: their intersection), an annotation's brush strokes and polygons being
  united first. A task without any usable annotation is skipped and counted. ``predictions`` (the
  pre-annotations this module wrote) and ``drafts`` are never read.

Export (:func:`build_tasks`, :func:`labelling_config`, :func:`export_tasks`): one task per image,
``data`` = {image, xal_id, xal_index, score, entropy, dice}, one prediction {model_version, score,
result: [choices (predicted class), brushlabels (thresholded Grad-CAM, label ``ROI``)]}; the names
match :func:`labelling_config` (``image``, ``class``, ``roi``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xal_engine.errors import XalError

IMAGE, CLASS, ROI, ROI_LABEL = "image", "class", "roi", "ROI"  # names in the labelling config
TASKS_JSON, CONFIG_XML, IMAGES_DIR = "tasks.json", "config.xml", "images"
WORD_SIZE, RLE_SIZES = 8, (3, 4, 8, 16)  # what the sdk's encode_rle (and the frontend) write


# ---------------------------------------------------------------------------------------- brush RLE
def rle_encode(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio brush RLE (a list of bytes), byte-identical to the sdk's
    ``mask2rle(mask.astype(uint8) * 255)``: the RGBA image with every channel 0 or 255."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise XalError(f"rle_encode: expected an (H, W) mask, got shape {mask.shape}")
    values = np.repeat(mask.reshape(-1).astype(bool).astype(np.uint8) * 255, 4)  # (H*W*4,) RGBA
    num = values.size
    if num >= 2 ** 32:
        raise XalError(f"rle_encode: a {mask.shape} mask has more than 2^32 RGBA values")
    bits = [f"{num:032b}", f"{WORD_SIZE - 1:05b}", *(f"{s - 1:04b}" for s in RLE_SIZES)]
    if num:
        ends = np.append(np.flatnonzero(values[1:] != values[:-1]), num - 1)  # (runs,) last index of a run
        lengths = np.diff(np.append(-1, ends))  # (runs,)
        for length, value in zip(lengths.tolist(), values[ends].tolist()):  # runs: ~4 per mask row edge
            word = f"{value:08b}"
            if length == 1:
                bits.append("000000" + word)  # a literal chunk of one word (size index 0, length 1)
                continue
            if length > 256:  # 16-bit run lengths, several chunks beyond 2^16 (as the sdk writes them)
                while length > 2 ** 16:
                    bits.append("111" + f"{2 ** 16 - 1:016b}" + word)
                    length -= 2 ** 16
                bits.append(f"111{length - 1:016b}" + word)
                continue
            index = 0 if length <= 8 else 1 if length <= 16 else 2
            bits.append(f"1{index:02b}{length - 1:0{RLE_SIZES[index]}b}" + word)
    text = "".join(bits)
    text += "0" * (8 - len(text) % 8)
    return np.packbits(np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")).tolist()


def rle_decode(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (H, W) bool: a pixel is ROI when its alpha byte is nonzero. An
    XalError when the stream is not RLE or does not hold H*W*4 values."""
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError):
        raise XalError("the brush RLE is not a list of integers") from None
    if data.ndim != 1 or data.size < 7 or data.min() < 0 or data.max() > 255:
        raise XalError("the brush RLE is not a list of bytes (integers 0..255) holding a header")
    bits = np.unpackbits(data.astype(np.uint8))  # (8 * bytes,) 0/1
    weights = 1 << np.arange(63, -1, -1, dtype=np.uint64)
    position = 0

    def read(n: int) -> int:
        nonlocal position
        if position + n > bits.size:
            raise XalError("the brush RLE ends before its last value (truncated)")
        chunk = bits[position:position + n].astype(np.uint64)
        position += n
        return int((chunk * weights[64 - n:]).sum()) if n else 0

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if num != height * width * 4:
        raise XalError(f"the brush RLE holds {num} values, not {height}x{width}x4 = {height * width * 4} "
                       "(original_height x original_width x RGBA)")
    out = np.zeros(num, dtype=np.uint32)  # (H*W*4,)
    i = 0
    while i < num:  # chunks: runs, a few per mask row edge
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise XalError(f"the brush RLE writes past its {num} values")
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] != 0


# ----------------------------------------------------------------------------------------- polygons
def rasterise_polygon(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Polygon vertices in percent of the width/height (Label Studio's ``polygonlabels`` points) ->
    (H, W) bool: pixels whose centre lies inside by the even-odd rule (see the module doc)."""
    p = np.asarray(points, dtype=np.float64)  # (V, 2) x%, y%
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3 or not np.isfinite(p).all():
        raise XalError("a polygon needs at least 3 finite [x, y] points (percent of the image)")
    x = (np.arange(width) + 0.5) / width * 100.0  # (W,) pixel-centre x in percent
    y = (np.arange(height) + 0.5) / height * 100.0  # (H,)
    inside = np.zeros((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):  # edges: a few dozen
        if y0 == y1:
            continue
        rows = (y >= min(y0, y1)) & (y < max(y0, y1))  # (H,) half-open: a shared vertex counts once
        xc = x0 + (y[rows] - y0) * (x1 - x0) / (y1 - y0)  # (h,) the edge's x at those rows
        inside[rows] ^= x[None, :] >= xc[:, None]  # (h, W) centres right of the edge cross it once
    return inside


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) bool -> (H, W) bool by nearest neighbour with half-pixel centres (the pool's rule for
    ROI masks of another size, PNG or Label Studio); the mask itself when the size already matches."""
    import cv2

    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT) > 0


# ------------------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class BatchTasks:
    """One batch as Label Studio tasks, rank order; n images of H x W."""

    ids: list[str]
    indices: np.ndarray  # (n,) int64 pool positions
    files: list[str]  # PNG file name of each image (written under images/)
    images: np.ndarray  # (n, H, W) or (n, H, W, 3) uint8, what the annotator sees
    pred_class: list[str]  # predicted class names
    pred_prob: np.ndarray  # (n,) float, the predicted class's probability
    score: np.ndarray  # (n,) float, acquisition score
    entropy: np.ndarray  # (n,) float, nats
    dice: np.ndarray  # (n,) float, NaN without an ROI
    cam_masks: np.ndarray  # (n, H, W) bool, {S >= threshold}: the thresholded Grad-CAM at image size


def labelling_config(classes: Sequence[str]) -> str:
    """The Label Studio labelling config (XML) the tasks and the import expect."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>\n'
            f'  <Choices name="{CLASS}" toName="{IMAGE}" choice="single" showInLine="true">\n{choices}\n'
            f'  </Choices>\n  <BrushLabels name="{ROI}" toName="{IMAGE}">\n'
            f'    <Label value="{ROI_LABEL}"/>\n  </BrushLabels>\n</View>\n')


def _number(value: float) -> float | None:
    """A float for JSON (NaN -> null: Label Studio's JSON parser refuses NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def build_tasks(batch: BatchTasks, image_urls: Sequence[str], model_version: str) -> list[dict[str, Any]]:
    """Label Studio import tasks (JSON-ready dicts), one per image with ``data.image = image_urls[i]``
    and one prediction: the predicted class (``choices``, scored by its probability) and, when the
    thresholded CAM is not empty, the CAM as a ``brushlabels`` ROI."""
    n = len(batch.ids)
    height, width = int(batch.images.shape[1]), int(batch.images.shape[2])
    tasks = []
    for i in range(n):  # one dict per image of a batch: tens to hundreds
        result: list[dict[str, Any]] = [{
            "id": f"xal-{int(batch.indices[i])}-class", "from_name": CLASS, "to_name": IMAGE,
            "type": "choices", "value": {"choices": [batch.pred_class[i]]},
            "score": _number(batch.pred_prob[i]),
        }]
        if batch.cam_masks[i].any():
            result.append({
                "id": f"xal-{int(batch.indices[i])}-roi", "from_name": ROI, "to_name": IMAGE,
                "type": "brushlabels", "original_width": width, "original_height": height,
                "image_rotation": 0,
                "value": {"format": "rle", "rle": rle_encode(batch.cam_masks[i]), "brushlabels": [ROI_LABEL]},
            })
        tasks.append({
            "data": {IMAGE: image_urls[i], "xal_id": batch.ids[i], "xal_index": int(batch.indices[i]),
                     "score": _number(batch.score[i]), "entropy": _number(batch.entropy[i]),
                     "dice": _number(batch.dice[i])},
            "predictions": [{"model_version": model_version, "score": _number(batch.pred_prob[i]),
                             "result": result}],
        })
    return tasks


def export_tasks(out: str | Path, batch: BatchTasks, classes: Sequence[str], model_version: str,
                 image_url_prefix: str | None = None) -> Path:
    """Write ``out/tasks.json`` (import it in Label Studio), ``out/config.xml`` (the project's labelling
    config) and ``out/images/<file>``. Image URLs are ``image_url_prefix + file`` (files served
    elsewhere), else relative ``images/<file>``. ``out`` must exist; returns tasks.json's path."""
    import cv2

    out = Path(out)
    folder = out / IMAGES_DIR
    folder.mkdir(exist_ok=True)
    for name, image in zip(batch.files, batch.images):
        bgr = image[..., ::-1] if image.ndim == 3 else image  # cv2 writes BGR
        if not cv2.imwrite(str(folder / name), np.ascontiguousarray(bgr)):
            raise XalError(f"cannot write {folder / name}")
    urls = [(image_url_prefix + f) if image_url_prefix is not None else f"{IMAGES_DIR}/{f}" for f in batch.files]
    (out / CONFIG_XML).write_text(labelling_config(classes))
    path = out / TASKS_JSON
    path.write_text(json.dumps(build_tasks(batch, urls, model_version), indent=1, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------- import
class ProblemSink(Protocol):
    """Where row problems go (``xal_engine.jobs.label.Problems``): collected, raised together."""

    def add(self, line: int, message: str) -> None: ...


@dataclass(frozen=True)
class ExportRows:
    """The usable tasks of a Label Studio export, in file order."""

    tasks: list[int]  # the task's position in the export, 1-based (what problems name)
    ids: list[str]  # data.xal_id
    classes: list[str]  # the majority class as written in the choices
    masks: list[np.ndarray | None]  # (H, W) bool at the pool's size, None: no annotator drew an ROI
    n_skipped: int  # tasks without a usable annotation (none, or all cancelled / empty)
    n_annotations: int  # usable annotations read


def _annotation_mask(results: list[dict[str, Any]], height: int, width: int) -> np.ndarray | None:
    """The union of an annotation's brush and polygon ROIs at H x W; None when it drew none. Raises
    XalError (the message of a problem) for a malformed one."""
    mask = None
    for r in results:
        kind = r.get("type")
        if kind not in ("brushlabels", "polygonlabels"):
            continue
        value = r.get("value") or {}
        if kind == "brushlabels":
            if value.get("format", "rle") != "rle" or "rle" not in value:
                raise XalError("a brushlabels result without value.rle (format 'rle')")
            w, h = r.get("original_width"), r.get("original_height")
            if not isinstance(w, int) or not isinstance(h, int) or w < 1 or h < 1:
                raise XalError("a brushlabels result without integer original_width/original_height")
            if r.get("image_rotation", 0) not in (0, None):
                raise XalError(f"a brushlabels result on a rotated image ({r['image_rotation']} degrees)")
            drawn = resize_mask(rle_decode(value["rle"], h, w), height, width)
        else:
            drawn = rasterise_polygon(value.get("points") or [], height, width)
        mask = drawn if mask is None else mask | drawn
    return mask


def read_export(path: str | Path, pool: Any, problems: ProblemSink) -> ExportRows:
    """Parse Label Studio's JSON export (a list of tasks with ``data.xal_id`` and ``annotations``) for
    ``pool`` (its ``height``/``width``; ids, splits and classes are checked by the import). A file that
    is not such JSON raises XalError at once; a task's problems go to ``problems`` (line = the task's
    1-based position). The rules are the module doc's."""
    path = Path(path)
    if not path.is_file():
        raise XalError(f"Label Studio export {path} not found")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise XalError(f"{path}: not UTF-8 text (byte {err.start}); expected Label Studio's JSON export") from None
    except json.JSONDecodeError as err:
        raise XalError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); expected "
                       "Label Studio's JSON export (a list of tasks)") from None
    if isinstance(tasks, dict):
        tasks = [tasks]  # a single exported task
    if not isinstance(tasks, list) or not tasks:
        raise XalError(f"{path}: expected Label Studio's JSON export, a non-empty list of tasks")
    height, width = int(pool.height), int(pool.width)
    rows = ExportRows([], [], [], [], 0, 0)
    skipped = used = 0
    for t, task in enumerate(tasks, start=1):
        data = task.get("data") if isinstance(task, dict) else None
        id_ = data.get("xal_id") if isinstance(data, dict) else None
        if not isinstance(id_, str) or not id_:
            problems.add(t, "no data.xal_id (was the task exported by xal-engine select --format label-studio?)")
            continue
        where = f"task {id_!r}"
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            problems.add(t, f"{where}: 'annotations' is not a list")
            continue
        votes: list[str] = []
        masks: list[np.ndarray] = []
        bad = False
        for a, ann in enumerate(annotations, start=1):
            if not isinstance(ann, dict) or ann.get("was_cancelled") or not ann.get("result"):
                continue  # skipped, cancelled or empty
            results = ann["result"]
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                problems.add(t, f"{where}: annotation {a}'s result is not a list of results")
                bad = True
                continue
            chosen = [c for r in results if r.get("type") == "choices"
                      for c in ((r.get("value") or {}).get("choices") or [])]
            if len(chosen) > 1:
                problems.add(t, f"{where}: annotation {a} chose {len(chosen)} classes ({', '.join(map(str, chosen))})")
                bad = True
            elif chosen:
                votes.append(str(chosen[0]))
            try:
                mask = _annotation_mask(results, height, width)
            except XalError as err:
                problems.add(t, f"{where}: annotation {a}: {err}")
                bad = True
                continue
            if mask is not None:
                masks.append(mask)
            used += 1
        if bad:
            continue
        if not votes and not masks:
            skipped += 1
            continue
        if not votes:
            problems.add(t, f"{where}: an ROI was drawn but no annotator chose a class")
            continue
        counts = Counter(votes).most_common()
        top = [c for c, n in counts if n == counts[0][1]]
        if len(top) > 1:
            problems.add(t, f"{where}: the annotators' classes tie ({', '.join(sorted(top))}, "
                            f"{counts[0][1]} each); resolve it in Label Studio")
            continue
        roi = None
        if masks:
            roi = np.sum(masks, axis=0) * 2 > len(masks)  # (H, W) strict majority of the drawn masks
            if not roi.any():
                problems.add(t, f"{where}: the {len(masks)} annotators' ROIs share no majority pixel")
                continue
        rows.tasks.append(t)
        rows.ids.append(id_)
        rows.classes.append(top[0])
        rows.masks.append(roi)
    return ExportRows(rows.tasks, rows.ids, rows.classes, rows.masks, skipped, used)
