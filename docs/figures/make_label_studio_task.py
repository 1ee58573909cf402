"""The README's picture of a Label Studio task as xal-engine exports it: read back from tasks.json.

    python docs/figures/make_label_studio_task.py [--out docs/figures/label_studio_task.png]

Builds a small phantom pool, trains resnet18 for a few epochs (CPU, about a minute), scores it with
stored CAMs, runs `select --format label-studio`, and draws the first four tasks the way Label Studio
shows them: the image with the brush pre-annotation (the thresholded Grad-CAM, decoded from the
task's RLE) in the label's colour, and beside it the class choices with the predicted one ticked and
the task data (acquisition score, entropy, Dice) annotators sort by. Nothing here is drawn from the
model directly: every pixel and number comes from the exported files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xal_engine.cli import main as cli
from xal_engine.exchange.label_studio import rle_decode

HERE = Path(__file__).resolve().parent


def run(root: Path) -> Path:
    pool, model, out = root / "pool.zarr", root / "model.pt", root / "round1"
    steps = [
        ["pool", "create", "--synthetic", "--n", "400", "--size", "96", "--classes", "3", "--seed", "0",
         "--out", str(pool)],
        ["train", "--pool", str(pool), "--epochs", "4", "--out", str(model), "--device", "cpu", "--quiet"],
        ["score", "--pool", str(pool), "--model", str(model), "--run", "r1", "--save-cams", "--device", "cpu",
         "--quiet"],
        ["select", "--pool", str(pool), "--run", "r1", "--budget", "4", "--format", "label-studio",
         "--out", str(out)],
    ]
    for argv in steps:
        if cli(argv) != 0:
            raise SystemExit(f"xal-engine {' '.join(argv[:2])} failed")
    return out


def draw(folder: Path, path: Path) -> None:
    tasks = json.loads((folder / "tasks.json").read_text())[:4]
    classes = [line.split('"')[1] for line in (folder / "config.xml").read_text().splitlines()
               if "<Choice " in line]
    fig = Figure(figsize=(12, 3.4 * len(tasks) / 2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks) // 2, 4, squeeze=False, gridspec_kw={"width_ratios": [1, 0.9, 1, 0.9]})
    for k, task in enumerate(tasks):
        ax_img, ax_txt = axes[k // 2][2 * (k % 2)], axes[k // 2][2 * (k % 2) + 1]
        image = cv2.imread(str(folder / task["data"]["image"]), cv2.IMREAD_GRAYSCALE)
        result = {r["type"]: r for r in task["predictions"][0]["result"]}
        brush = result["brushlabels"]
        mask = rle_decode(brush["value"]["rle"], brush["original_height"], brush["original_width"])
        rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32) / 255
        colour = np.array([1.0, 0.2, 0.2])  # Label Studio's default label colour, at its overlay opacity
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
        ax_img.imshow(rgb, interpolation="nearest")
        ax_img.set_title(f"task {k + 1}: {task['data']['xal_id']}", fontsize=9)
        ax_img.axis("off")
        predicted = result["choices"]["value"]["choices"][0]
        lines = ["class (pre-annotated)"]
        lines += [f"  {'[x]' if c == predicted else '[ ]'} {c}" for c in classes]
        lines += ["", "ROI brush: Grad-CAM >= threshold", f"  {int(mask.sum())} px",
                  "", "task data (sortable)",
                  f"  score    {task['data']['score']:.3f}", f"  entropy  {task['data']['entropy']:.3f}",
                  f"  Dice     {task['data']['dice']:.3f}" if task["data"]["dice"] is not None else "  Dice     -",
                  f"  p(pred)  {task['predictions'][0]['score']:.2f}"]
        ax_txt.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
                    transform=ax_txt.transAxes)
        ax_txt.axis("off")
    fig.suptitle("What an annotator opens: xal-engine's Label Studio tasks with their pre-annotations "
                 "(decoded from tasks.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "label_studio_task.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        draw(run(Path(tmp)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
