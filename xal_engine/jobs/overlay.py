"""Drawing Grad-CAM overlays: one panel per image (greyscale image, CAM colour map over it, ROI
contour, caption) and contact sheets of such panels. Pure matplotlib on the Agg canvas: no pyplot,
no global state, so figures can be built in tests and worker processes alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class OverlayStyle:
    """How panels look."""

    cmap: str = "jet"  # CAM colour map (pytorch-grad-cam's default)
    alpha: float = 0.4  # CAM opacity over the image
    contour_color: str = "#ff00ff"  # magenta: absent from jet, visible on every part of it
    contour_width: float = 1.2
    columns: int = 6
    panel_inches: float = 2.2  # side of one image
    caption_inches: float = 0.45  # room under each image for its caption (3 short lines)
    caption_size: float = 7.0
    dpi: int = 120


@dataclass(frozen=True)
class Panel:
    """One image of a sheet."""

    image: np.ndarray  # (C, H, W) any dtype; shown as grey (RGB when C == 3)
    cam: np.ndarray | None  # (H, W) float in [0, 1] at image resolution; NaN or None: not shown
    roi: np.ndarray | None  # (H, W) bool, or None
    caption: str


def display_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) grey or (H, W, 3) RGB in [0, 1]: channels averaged (kept for C == 3),
    then min-max over the image (float pools have no fixed range)."""
    x = np.asarray(image, dtype=np.float32)
    x = np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x.mean(axis=0)  # (H, W, 3) | (H, W)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def draw_panel(ax: Axes, panel: Panel, style: OverlayStyle = OverlayStyle()) -> None:
    """Image, CAM overlay and ROI contour on ``ax``, all in pixel coordinates (pixel centres at
    integers, origin top left), so map and contour line up with the image exactly."""
    img = display_image(panel.image)
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if panel.cam is not None and np.isfinite(panel.cam).all():
        ax.imshow(panel.cam, cmap=style.cmap, vmin=0.0, vmax=1.0, alpha=style.alpha,
                  interpolation="nearest")
    if panel.roi is not None and panel.roi.any():
        # The 0.5 level of the 0/1 mask runs half a pixel outside the ROI's edge pixels.
        ax.contour(panel.roi.astype(np.float32), levels=[0.5], colors=style.contour_color,
                   linewidths=style.contour_width)
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(panel.caption, fontsize=style.caption_size, linespacing=1.15)


def contact_sheet(panels: list[Panel], title: str = "", style: OverlayStyle = OverlayStyle()) -> Figure:
    """A figure with one axes per panel (rows of ``style.columns``), on an Agg canvas."""
    n = max(len(panels), 1)
    columns = min(style.columns, n)
    rows = -(-n // columns)
    cell_h = style.panel_inches + style.caption_inches
    top = 0.45 if title else 0.1  # inches reserved for the title
    fig = Figure(figsize=(columns * style.panel_inches, rows * cell_h + top), dpi=style.dpi)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        draw_panel(ax, panel, style)
    if title:
        fig.suptitle(title, fontsize=style.caption_size + 2)
    height = rows * cell_h + top
    fig.subplots_adjust(left=0.02, right=0.98, bottom=style.caption_inches / height,
                        top=1.0 - top / height, wspace=0.06, hspace=style.caption_inches / style.panel_inches)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at its own dpi."""
    path = Path(path)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path
