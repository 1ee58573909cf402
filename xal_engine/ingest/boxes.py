"""Boxes in original pixel coordinates -> a filled ROI mask at the output size."""

from __future__ import annotations

import numpy as np


def valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """Keep (x_min, y_min, x_max, y_max) rows that are finite and have positive width and height."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ok = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[ok]


def boxes_mask(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Union of filled rectangles, (size, size) bool.

    ``boxes`` (nb, 4) are x_min, y_min, x_max, y_max on an original ``height`` x ``width`` image,
    x = column, edges in pixel units. Scaled by size/width (x) and size/height (y); an output pixel
    belongs to a box when it overlaps it: columns floor(x_min') .. ceil(x_max') - 1, clipped to the
    image, so a box partly outside keeps its inside part and one wholly outside adds nothing.
    """
    boxes = valid_boxes(boxes)
    scale = np.array([size / width, size / height, size / width, size / height])
    b = boxes * scale                                              # (nb, 4) output pixels
    lo = np.clip(np.floor(b[:, :2]), 0, size).astype(np.int64)     # (nb, 2) first col, row
    hi = np.clip(np.ceil(b[:, 2:]), 0, size).astype(np.int64)      # (nb, 2) one past last
    idx = np.arange(size)
    cols = (idx >= lo[:, :1]) & (idx < hi[:, :1])                  # (nb, size)
    rows = (idx >= lo[:, 1:]) & (idx < hi[:, 1:])                  # (nb, size)
    return (rows[:, :, None] & cols[:, None, :]).any(axis=0)       # (size, size)
