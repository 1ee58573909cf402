"""VinDr-CXR: DICOM radiographs + the box annotations CSV -> 1-channel images, ROI from boxes.

Rules (the paper's protocol, made explicit):
- An image's class is the chosen class (``classes``) with the most boxes summed over all readers;
  a tie goes to the class listed first in ``classes``.
- ROI = union of the filled boxes of that class from all readers, scaled to the output size, clipped.
- An image with no box of a chosen class is skipped ("no box of the chosen classes"). With
  ``keep_no_finding``, images that every reader marked "No finding" are kept instead, as the extra
  class "No finding" with has_roi False; images with other findings only are still skipped.
- The split unit is the image (the public CSV carries no patient ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xal_engine.errors import XalError
from xal_engine.ingest.boxes import valid_boxes
from xal_engine.ingest.common import Item, Skip, read_table, resolve_file
from xal_engine.ingest.dicom import RadiographSource, index_dicoms

DEFAULT_CLASSES = ("Nodule/Mass", "Pulmonary fibrosis", "Lung Opacity")
NO_FINDING = "No finding"
KNOWN_CLASSES = frozenset({
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", NO_FINDING})
COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")


@dataclass(frozen=True)
class VindrSettings:
    classes: tuple[str, ...] = DEFAULT_CLASSES
    keep_no_finding: bool = False
    dtype: str = "uint8"            # or "uint16"
    window: bool = True             # apply the DICOM window / VOI LUT (else min-max of the image)
    annotations: Path | None = None  # default: annotations_train.csv or train.csv under the source

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "uint16"):
            raise XalError(f"--dtype: expected uint8 or uint16 for DICOM, got {self.dtype!r}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise XalError(f"--classes: expected distinct class names, got {list(self.classes)}")


def _coord(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")  # empty ("No finding") or damaged: dropped by valid_boxes


class VindrSource(RadiographSource):
    name = "vindr"
    modality = "DX"

    def __init__(self, root: Path, size: int, settings: VindrSettings = VindrSettings()) -> None:
        super().__init__(root, size, settings.dtype, settings.window)
        self.opts = settings
        self.classes = [*settings.classes, *([NO_FINDING] if settings.keep_no_finding else [])]

    def settings(self) -> dict[str, Any]:
        return {"classes": list(self.opts.classes), "keep_no_finding": self.opts.keep_no_finding,
                "dtype": self.opts.dtype, "window": self.opts.window,
                "class_rule": "most boxes over all readers; tie = first in classes",
                "roi": "union of the class's boxes from all readers, scaled and clipped"}

    def scan(self) -> tuple[list[Item], list[Skip]]:
        if not self.root.is_dir():
            raise XalError(f"{self.root}: expected a folder with VinDr-CXR DICOMs and the annotations CSV")
        csv_path = resolve_file(self.root, self.opts.annotations,
                                ("annotations_train.csv", "train.csv"), "--annotations")
        rows = read_table(csv_path, COLUMNS)
        unknown = [c for c in self.opts.classes
                   if c not in KNOWN_CLASSES and c not in {r["class_name"] for r in rows}]
        if unknown:
            raise XalError(f"--classes: unknown class name(s) {unknown} (not in {csv_path.name} "
                           f"nor among VinDr-CXR's classes)")
        per_image: dict[str, list[dict[str, str]]] = {}
        for r in rows:
            per_image.setdefault(r["image_id"], []).append(r)
        files, skipped = index_dicoms(self.root, (".dicom", ".dcm"))
        items = []
        for image_id in sorted(per_image.keys() | files.keys()):
            if image_id not in files:
                skipped.append(Skip(image_id, "DICOM file missing (<image_id>.dicom or .dcm)"))
            elif image_id not in per_image:
                skipped.append(Skip(image_id, f"not in {csv_path.name}"))
            else:
                chosen = self._choose(per_image[image_id])
                if isinstance(chosen, str):
                    skipped.append(Skip(image_id, chosen))
                else:
                    label, boxes = chosen
                    items.append(Item(image_id, image_id, (files[image_id], label, boxes,
                                                           label < len(self.opts.classes))))
        return items, skipped

    def _choose(self, rows: list[dict[str, str]]) -> tuple[int, np.ndarray] | str:
        """(class index, its boxes (nb, 4)) for one image's rows, or the reason to skip it."""
        boxes = {c: valid_boxes(np.array([[_coord(r[k]) for k in COLUMNS[2:]] for r in rows
                                          if r["class_name"] == c])) for c in self.opts.classes}
        counts = np.array([len(boxes[c]) for c in self.opts.classes])
        if counts.max() > 0:
            best = int(counts.argmax())                                   # first max = tie rule
            return best, boxes[self.opts.classes[best]]
        if self.opts.keep_no_finding and all(r["class_name"] == NO_FINDING for r in rows):
            return len(self.opts.classes), np.empty((0, 4))
        return "no box of the chosen classes"
