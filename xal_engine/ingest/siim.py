"""SIIM-FISABIO-RSNA COVID-19: DICOMs (study/series/image.dcm) + study and image label CSVs.

Each image takes the label of its study (train_study_level.csv, one-hot over the four appearance
columns, in the order of CLASSES). ROI = union of its opacity boxes (train_image_level.csv
``boxes``, x/y/width/height in original pixels; when ``boxes`` is empty, the opacity entries of
``label``), scaled and clipped. An image without a box is kept with has_roi False. The split unit is
the study.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.ingest.common import Item, Skip, read_table, resolve_file
from xal_engine.ingest.dicom import RadiographSource, index_dicoms

STUDY_COLUMNS = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance",
                 "Atypical Appearance")
CLASSES = ["negative", "typical", "indeterminate", "atypical"]   # = STUDY_COLUMNS in order
IMAGE_COLUMNS = ("id", "boxes", "label", "StudyInstanceUID")


@dataclass(frozen=True)
class SiimSettings:
    dtype: str = "uint8"            # or "uint16"
    window: bool = True
    study_csv: Path | None = None   # default: train_study_level.csv under the source
    image_csv: Path | None = None   # default: train_image_level.csv under the source

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "uint16"):
            raise XalError(f"--dtype: expected uint8 or uint16 for DICOM, got {self.dtype!r}")


def parse_boxes(boxes: str, label: str) -> np.ndarray:
    """(nb, 4) x_min, y_min, x_max, y_max from the stringified ``boxes`` list, else from the
    ``label`` string's "opacity conf x0 y0 x1 y1" groups. Raises ValueError when damaged."""
    text = boxes.strip()
    if text and text.lower() != "nan":
        parsed = ast.literal_eval(text)
        if not isinstance(parsed, list) or not all(isinstance(b, dict) for b in parsed):
            raise ValueError(f"expected a list of {{x, y, width, height}}, got {text[:60]!r}")
        xywh = np.array([[float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"])]
                         for b in parsed]).reshape(-1, 4)
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    tokens = label.split()
    if len(tokens) % 6:
        raise ValueError(f"expected groups of 6 tokens in label, got {label[:60]!r}")
    groups = [tokens[i:i + 6] for i in range(0, len(tokens), 6)]
    return np.array([[float(v) for v in g[2:]] for g in groups if g[0] == "opacity"]).reshape(-1, 4)


def study_labels(path: Path) -> dict[str, int | str]:
    """Study id -> class index, or the reason its one-hot row is unusable."""
    out: dict[str, int | str] = {}
    for r in read_table(path, ("id", *STUDY_COLUMNS)):
        try:
            onehot = np.array([float(r[c]) for c in STUDY_COLUMNS])
        except ValueError:
            onehot = np.zeros(len(STUDY_COLUMNS))
        hot = np.flatnonzero(onehot == 1)
        out[r["id"].removesuffix("_study")] = (int(hot[0]) if hot.size == 1 and onehot.sum() == 1 else
                                               f"study label in {path.name} is not one-hot ({onehot.tolist()})")
    return out


class SiimSource(RadiographSource):
    name = "siim"
    modality = "CR/DX"

    def __init__(self, root: Path, size: int, settings: SiimSettings = SiimSettings()) -> None:
        super().__init__(root, size, settings.dtype, settings.window)
        self.opts = settings
        self.classes = list(CLASSES)

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.opts.dtype, "window": self.opts.window,
                "classes_from": list(STUDY_COLUMNS), "roi": "union of opacity boxes; none -> has_roi False"}

    def scan(self) -> tuple[list[Item], list[Skip]]:
        if not self.root.is_dir():
            raise XalError(f"{self.root}: expected a folder with SIIM-COVID DICOMs and label CSVs")
        studies = study_labels(resolve_file(self.root, self.opts.study_csv,
                                            ("train_study_level.csv",), "--study-csv"))
        image_csv = resolve_file(self.root, self.opts.image_csv, ("train_image_level.csv",), "--image-csv")
        rows = {r["id"].removesuffix("_image"): r for r in read_table(image_csv, IMAGE_COLUMNS)}
        files, skipped = index_dicoms(self.root, (".dcm", ".dicom"))
        items = []
        for image_id in sorted(rows.keys() | files.keys()):
            reason, row = None, rows.get(image_id)
            if image_id not in files:
                reason = "DICOM file missing (<study>/<series>/<image>.dcm)"
            elif row is None:
                reason = f"not in {image_csv.name}"
            elif row["StudyInstanceUID"] not in studies:
                reason = f"study {row['StudyInstanceUID']} not in train_study_level.csv"
            elif isinstance(label := studies[row["StudyInstanceUID"]], str):
                reason = label
            else:
                try:
                    boxes = parse_boxes(row["boxes"], row["label"])
                except (ValueError, SyntaxError, KeyError, TypeError) as err:
                    reason = f"unparsable boxes in {image_csv.name}: {err}"
            if reason is None:
                items.append(Item(image_id, row["StudyInstanceUID"], (files[image_id], label, boxes, False)))
            else:
                skipped.append(Skip(image_id, reason))
        return items, skipped
