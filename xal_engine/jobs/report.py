"""``xal-engine report RUN_DIR``: learning curves, summary tables and CAM contact sheets of a loop run.

Reads the run folder that ``xal-engine loop`` writes (its format: :mod:`xal_engine.store.run_folder`;
config.json, metrics.csv, per round selected.csv and model.pt) and writes, to RUN_DIR/report/ (or
``out``): ``learning_curves.png`` (metric vs labels, mean ± std band across seeds, one line per
strategy), ``contact_<strategy>.png`` (the last selected batch of the strategy's first seed with the
Grad-CAM of the model that selected it), ``report.md`` and ``report.html`` (the tables, images by
relative path).

Volume pools (format v2, images (C, D, H, W)): each shown volume gets two axial panels, the slice of
largest ROI area and the slice holding the CAM's peak voxel, each with the ROI contour and the CAM
S at the volume's own scale (the full-resolution map the scorer derives, trilinear, min-max over the
whole volume; not re-normalised per slice). Why these two rather than an orthogonal triplet through
the ROI centre: a triplet through the ROI shows the CAM only where the lesion is, so a CAM that peaks
elsewhere (a shortcut, the case a reviewer must see) stays hidden; the peak slice shows it, and it is
the voxel the ``hit`` metric tests. Both are axial (H x W) like the 2-D panels, so anisotropic
volumes (coarse D) are not shown stretched. ``max_images`` counts volumes (two panels each).

Statistics across seeds: mean and sample standard deviation (ddof = 1; none with one seed), NaN
values left out. The final round of a strategy is the last round every one of its seeds has
completed, so a run still in progress compares like with like. The area under the learning curve
(ALC) of one seed is the trapezoid area of metric vs number of labels up to that round, divided by
the label range: the mean metric over the labelling budget, on the metric's own scale.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xal_engine.core import curves
from xal_engine.core.cam_methods import DEFAULT_CAM_METHOD, check_cam_method
from xal_engine.errors import XalError
from xal_engine.jobs.overlay import OverlayStyle, Panel, contact_sheet, save_figure
from xal_engine.progress import plural
from xal_engine.store import Pool
from xal_engine.store.location import Location, parse_location
from xal_engine.store.location import exists as location_exists
from xal_engine.store.run_folder import RunFolder, count_selected, read_selected

if TYPE_CHECKING:
    from xal_engine.jobs.batch_sheet import BatchCams, BatchImages

CURVE_METRICS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
                 "macro_f1": "Macro-F1", "test_dice": "Test Dice"}
TABLE_METRICS = {**CURVE_METRICS, "auroc": "AUROC", "test_soft_dice": "Test soft Dice",
                 "test_energy": "Test energy", "test_hit_rate": "Test hit rate"}
# the stopping signal (xal_engine.core.stopping): plotted beside the learning curves, not summarised
STOPPING_METRICS = {"pred_kappa": "Prediction κ, round r-1 vs r (stop ≥ 0.99)"}
FIGURE_METRICS = {**CURVE_METRICS, **STOPPING_METRICS}
CURVES_PNG = "learning_curves.png"
SHEETS_TITLE = "Last selected batches"
SHEETS_KEY = ("Grad-CAM (jet) over each image, the expert ROI's contour in magenta; captions: id, predicted "
              "class and true class (where the pool knows it), H = predictive entropy (nats), Dice of the CAM "
              "thresholded at the run's threshold with the ROI.")
VOLUME_SHEETS_KEY = ("Volumes: two axial slices per volume, side by side: the slice of largest ROI area (the "
                     "centre slice without an ROI) and the slice of the CAM's peak voxel (the voxel the hit "
                     "metric tests; the centre slice when the CAM is flat or not finite); the CAM at the "
                     "volume's own scale (min-max over the whole volume), the Dice that of the whole volume.")
PANELS_PER_VOLUME = 2


@dataclass(frozen=True)
class ReportConfig:
    """Defaults of ``xal-engine report``."""

    device: str = "auto"  # where CAMs are recomputed
    max_images: int = 36  # panels per contact sheet (the batch's top ranks)
    batch_size: int = 16  # images per CAM forward/backward
    cam_method: str | None = None  # CAM method of the contact sheets; None: the one the run scored with
    style: OverlayStyle = field(default_factory=OverlayStyle)


@dataclass(frozen=True)
class RunData:
    """A run directory's config and metrics, one numpy column per metrics.csv field."""

    path: Path
    config: dict[str, Any]
    strategies: list[str]  # config order, then any other strategy found in metrics.csv
    strategy: np.ndarray  # (n,) str
    seed: np.ndarray  # (n,) int64
    round: np.ndarray  # (n,) int64
    n_labelled: np.ndarray  # (n,) float64
    metrics: dict[str, np.ndarray]  # name -> (n,) float64, NaN where missing


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # NaN with fewer than two finite values
    count: int  # finite values


@dataclass(frozen=True)
class Curve:
    """One strategy's learning curve of one metric: one point per round."""

    strategy: str
    rounds: np.ndarray  # (r,) int64
    n_labelled: np.ndarray  # (r,) mean over seeds
    mean: np.ndarray  # (r,)
    std: np.ndarray  # (r,) NaN where fewer than two seeds


@dataclass(frozen=True)
class StrategySummary:
    strategy: str
    seeds: list[int]
    final_round: int
    n_labelled: float  # mean over seeds at the final round
    final: dict[str, Stat]  # metric -> across seeds at the final round
    alc: dict[str, Stat]  # curve metric -> across seeds, rounds 0..final_round


def stat(values: np.ndarray) -> Stat:
    """Mean and sample std (ddof = 1) of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if v.size else math.nan
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return Stat(mean, std, int(v.size))


def load_run(run_dir: str | Path) -> RunData:
    """config.json and metrics.csv of ``run_dir``; an XalError names a missing file or bad value."""
    folder = RunFolder.open(run_dir)
    config = folder.read_config()
    table = folder.read_metrics({**TABLE_METRICS, **STOPPING_METRICS})
    listed = [str(s) for s in config.get("strategies", [])]
    strategies = listed + sorted(set(table.strategy) - set(listed))
    return RunData(path=folder.path, config=config, strategies=strategies,
                   strategy=np.asarray(table.strategy, dtype=np.str_), seed=table.seed, round=table.round,
                   n_labelled=table.n_labelled, metrics=table.values)


def learning_curve(run: RunData, strategy: str, metric: str) -> Curve:
    """Mean ± std across seeds per round (rounds in order)."""
    mine = run.strategy == strategy
    rounds = np.unique(run.round[mine])
    stats = [stat(run.metrics[metric][mine & (run.round == r)]) for r in rounds]  # one per round
    labels = [float(run.n_labelled[mine & (run.round == r)].mean()) for r in rounds]
    return Curve(strategy, rounds, np.asarray(labels), np.asarray([s.mean for s in stats]),
                 np.asarray([s.std for s in stats]))


def learning_curve_figure(run: RunData, metrics: dict[str, str] = FIGURE_METRICS,
                          kind: str = "image") -> Figure:
    """One panel per metric; per strategy a line (mean) with a band (± std) over labels (``kind``: what
    a pool row is, "image" or "volume", for the axis label)."""
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = {s: f"C{i % 10}" for i, s in enumerate(run.strategies)}
    for ax, (metric, title) in zip(axes, metrics.items()):
        for strategy in run.strategies:
            c = learning_curve(run, strategy, metric)
            if not len(c.rounds) or not np.isfinite(c.mean).any():
                continue
            ax.plot(c.n_labelled, c.mean, marker="o", markersize=3, color=colours[strategy], label=strategy)
            band = np.isfinite(c.std)
            if band.any():
                ax.fill_between(c.n_labelled, c.mean - np.where(band, c.std, 0.0),
                                c.mean + np.where(band, c.std, 0.0), color=colours[strategy], alpha=0.2,
                                linewidth=0)
        ax.set_title(title)
        ax.set_xlabel(f"labelled {kind}s")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def summarise(run: RunData) -> list[StrategySummary]:
    """Per strategy with any row: final-round statistics and ALC across seeds."""
    out = []
    for strategy in run.strategies:
        mine = run.strategy == strategy
        seeds = sorted({int(s) for s in run.seed[mine]})
        if not seeds:
            continue
        final = min(int(run.round[mine & (run.seed == s)].max()) for s in seeds)
        at_final = mine & (run.round == final)
        alc: dict[str, Stat] = {}
        for metric in CURVE_METRICS:
            per_seed = []
            for s in seeds:
                rows = mine & (run.seed == s) & (run.round <= final)
                order = np.argsort(run.round[rows])
                per_seed.append(curves.alc(run.n_labelled[rows][order], run.metrics[metric][rows][order]))
            alc[metric] = stat(np.asarray(per_seed))
        out.append(StrategySummary(
            strategy=strategy, seeds=seeds, final_round=final,
            n_labelled=float(run.n_labelled[at_final].mean()),
            final={m: stat(run.metrics[m][at_final]) for m in TABLE_METRICS}, alc=alc))
    return out


def format_stat(s: Stat, digits: int = 3) -> str:
    if not s.count:
        return "n/a"
    if math.isnan(s.std):
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def summary_tables(summaries: list[StrategySummary]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the final-round table and the ALC table."""
    key = ["strategy", "seeds", "round", "labels"]
    final_rows, alc_rows = [], []
    for s in summaries:
        lead = [s.strategy, str(len(s.seeds)), str(s.final_round), f"{s.n_labelled:g}"]
        final_rows.append(lead + [format_stat(s.final[m]) for m in TABLE_METRICS])
        alc_rows.append(lead + [format_stat(s.alc[m]) for m in CURVE_METRICS])
    return [("Final round (mean ± std across seeds)", key + list(TABLE_METRICS.values()), final_rows),
            ("Area under the learning curve (normalised by the label range, rounds 0..final)",
             key + list(CURVE_METRICS.values()), alc_rows)]


# --------------------------------------------------------------------------------- contact sheets
@dataclass(frozen=True)
class SheetSource:
    """The batch a contact sheet shows and the checkpoint that selected it."""

    strategy: str
    seed: int
    round: int
    selected: Path  # round<r>/selected.csv
    model: Path  # round<r-1>/model.pt (round 0: its own model, nothing selected it)


def last_batch(run: RunData, strategy: str, seed: int) -> SheetSource | None:
    """The latest round of (strategy, seed) with a selected.csv and the checkpoint that chose it."""
    folder = RunFolder(run.path)
    for r, selected in reversed(folder.batches(strategy, seed)):
        model = folder.selecting_model_pt(strategy, seed, r)
        if model.is_file():
            return SheetSource(strategy, seed, r, selected, model)
    return None


def run_cam_method(run: RunData) -> str:
    """The CAM method a loop run scored with (config.json ``loop.cam_method``; absent: Grad-CAM)."""
    return check_cam_method(run.config.get("loop", {}).get("cam_method", DEFAULT_CAM_METHOD))


def batch_panels(pool_path: Location, source: SheetSource, config: ReportConfig,
                 threshold: float, cam_method: str = DEFAULT_CAM_METHOD) -> list[Panel]:
    """Recompute the selecting model's CAM (``cam_method``) of the batch images; one captioned panel each."""
    from xal_engine.jobs.batch_sheet import cam_panels, read_images, recompute_cams
    from xal_engine.jobs.loop import cam_method_field
    from xal_engine.jobs.streaming import ScoreConfig
    from xal_engine.store import Pool

    index, ids = read_selected(source.selected, config.max_images)
    if not len(index):
        return []
    pool = Pool.open(pool_path)
    if index.min() < 0 or index.max() >= pool.n:
        raise XalError(f"{source.selected}: index outside pool {pool.path} of {pool.n} images")
    batch = read_images(pool, index)
    if batch.ids != ids:
        raise XalError(f"{source.selected}: ids differ from pool {pool.path} at the listed indices "
                       "(was the pool rebuilt? pass the run's pool with --pool)")
    scoring = ScoreConfig(threshold=threshold, batch_size=config.batch_size, device=config.device, num_workers=0,
                          **cam_method_field(cam_method))
    cams, ckpt = recompute_cams(source.model, pool, batch, scoring)
    if pool.is_volume:  # cams.cam (n, d, h, w): two axial panels per volume
        return volume_panels(batch, cams, ckpt.classes, pool.classes)
    return cam_panels(batch, cams, ckpt.classes, pool.classes)


# ----------------------------------------------------------------------------- volume panels
@dataclass(frozen=True)
class VolumeSlices:
    """The two axial slices a volume's panels show (indices into D)."""

    roi: int | None  # largest ROI area (first on ties); None: no ROI voxel
    cam: int | None  # the CAM's peak voxel (first maximum in (z, y, x) order); None: not finite or flat


def roi_slice(roi: np.ndarray | None) -> int | None:
    """z of the largest ROI area of ``roi`` (D, H, W) bool, the first such z on ties; None when empty."""
    if roi is None:
        return None
    area = roi.reshape(roi.shape[0], -1).sum(axis=1)  # (D,) voxels per axial slice
    return int(area.argmax()) if area.any() else None


def cam_peak_slice(cam: np.ndarray) -> int | None:
    """z of the peak of ``cam`` (D, H, W): the first maximum in (z, y, x) row-major order, the voxel
    ``roi_agreement``'s hit tests; None when the map is not finite (no CAM to show) or constant (an
    all-zero CAM has no peak: its first voxel would be an arbitrary slice)."""
    if not np.isfinite(cam).all() or cam.max() <= cam.min():
        return None
    return int(np.argmax(cam)) // (cam.shape[1] * cam.shape[2])


def volume_slices(roi: np.ndarray | None, cam: np.ndarray) -> VolumeSlices:
    """Both slices of one volume: ``roi`` (D, H, W) bool or None, ``cam`` S (D, H, W)."""
    return VolumeSlices(roi=roi_slice(roi), cam=cam_peak_slice(cam))


def volume_cam(low: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """S (D, H, W) float32 of one volume's low-resolution map N (d, h, w): trilinear, min-max over the
    volume, exactly as the scorer derives it (``reference3d.upsample_normalise_3d``)."""
    import torch

    from xal_engine.ops.reference3d import upsample_normalise_3d

    n = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))[None]  # (1, d, h, w)
    return upsample_normalise_3d(n, size)[0].numpy()


def volume_panels(batch: BatchImages, cams: BatchCams, pred_classes: Sequence[str],
                  pool_classes: Sequence[str]) -> list[Panel]:
    """Two panels per volume of ``batch`` (images (n, C, D, H, W), rois (n, D, H, W)): the slice of
    largest ROI area, captioned as a 2-D panel plus its z, then the CAM-peak slice; ``cams.cam`` is N
    (n, d, h, w). One volume's S (D, H, W) is held at a time."""
    from xal_engine.jobs.batch_sheet import caption

    depth, height, width = (int(v) for v in batch.images.shape[-3:])
    panels = []
    for i in range(len(batch.index)):
        roi = batch.rois[i] if batch.has_roi[i] else None  # (D, H, W)
        cam = volume_cam(cams.cam[i], (depth, height, width))  # (D, H, W)
        where = volume_slices(roi, cam)
        label = int(batch.labels[i])
        true = pool_classes[label] if 0 <= label < len(pool_classes) else None
        text = caption(batch.ids[i], pred_classes[int(cams.pred[i])], true, float(cams.entropy[i]),
                       float(cams.dice[i]))
        z_roi = depth // 2 if where.roi is None else where.roi
        z_cam = depth // 2 if where.cam is None else where.cam
        area = 0 if roi is None else int(roi[z_roi].sum())
        first = f"z {z_roi} of {depth}: " + ("largest ROI area" if where.roi is not None else
                                             "centre (no ROI)")
        no_peak = "centre (no CAM)" if not np.isfinite(cam).all() else "centre (CAM flat)"
        second = f"z {z_cam} of {depth}: " + ("CAM peak" if where.cam is not None else no_peak)
        here = "" if roi is None else f"\nROI here: {int(roi[z_cam].sum())} of {area} px"
        for z, line in ((z_roi, f"{text}\n{first}"), (z_cam, f"{batch.ids[i]}\n{second}{here}")):
            panels.append(Panel(image=batch.images[i][:, z], cam=cam[z],
                                roi=None if roi is None else roi[z], caption=line))
    return panels


def volume_sheet_style(style: OverlayStyle) -> OverlayStyle:
    """``style`` for volume sheets: an even number of columns (a volume's two panels side by side) and
    room for a fourth caption line."""
    columns = max(PANELS_PER_VOLUME, style.columns - style.columns % PANELS_PER_VOLUME)
    return replace(style, columns=columns, caption_inches=style.caption_inches * 4 / 3)


# -------------------------------------------------------------------------------------- writing
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class ReportContent:
    """What both report files show, in order."""

    title: str
    facts: list[str]
    tables: list[tuple[str, list[str], list[list[str]]]]
    curves: str  # file name of the learning curves
    sheets: list[tuple[str, str]]  # (caption, file name)
    notes: list[str]  # what could not be shown, and why
    sheets_key: str = SHEETS_KEY  # how to read the sheets (the volume paragraph added for volume pools)


def render_markdown(c: ReportContent) -> str:
    parts = [f"# {c.title}", "\n".join(f"- {f}" for f in c.facts), "## Learning curves",
             f"![learning curves]({c.curves})"]
    for title, header, rows in c.tables:
        parts += [f"## {title}", _markdown_table(header, rows) if rows else "_no rounds completed yet_"]
    if c.sheets:
        parts += [f"## {SHEETS_TITLE}", c.sheets_key]
        parts += [f"{caption}\n\n![{caption}]({name})" for caption, name in c.sheets]
    if c.notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in c.notes)]
    return "\n\n".join(parts) + "\n"


def render_html(c: ReportContent) -> str:
    e = html.escape
    parts = [f"<h1>{e(c.title)}</h1>", "<ul>" + "".join(f"<li>{e(f)}</li>" for f in c.facts) + "</ul>",
             "<h2>Learning curves</h2>", f'<img src="{e(c.curves)}" alt="learning curves">']
    for title, header, rows in c.tables:
        parts += [f"<h2>{e(title)}</h2>", _html_table(header, rows) if rows else "<p>no rounds completed yet</p>"]
    if c.sheets:
        parts += [f"<h2>{e(SHEETS_TITLE)}</h2>", f"<p>{e(c.sheets_key)}</p>"]
        parts += [f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption>'
                  "</figure>" for caption, name in c.sheets]
    if c.notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{e(n)}</li>" for n in c.notes) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(c.title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _sheets(run: RunData, pool_path: Location | None, out: Path, config: ReportConfig,
            notes: list[str]) -> list[tuple[str, str]]:
    """Draw the contact sheet of each strategy's first seed; what cannot be drawn becomes a note."""
    threshold = float(run.config.get("loop", {}).get("threshold", 0.5))
    method = check_cam_method(config.cam_method) if config.cam_method is not None else run_cam_method(run)
    from xal_engine.core.cam_methods import CAM_METHODS  # torch: only where sheets are drawn

    cam_name = CAM_METHODS[method].title
    sheets = []
    for strategy in run.strategies:
        seeds = sorted({int(s) for s in run.seed[run.strategy == strategy]}) or \
            [int(s) for s in run.config.get("seeds", [])][:1]
        source = last_batch(run, strategy, seeds[0]) if seeds else None
        if source is None:
            notes.append(f"{strategy}: no selected batch with its checkpoint yet")
            continue
        if pool_path is None or not location_exists(pool_path):
            notes.append(f"{strategy}: contact sheet skipped, pool {pool_path} not found (pass --pool)")
            continue
        panels = batch_panels(pool_path, source, config, threshold, method)
        volumes = Pool.open(pool_path).is_volume
        kind = "volume" if volumes else "image"
        count = len(panels) // PANELS_PER_VOLUME if volumes else len(panels)
        picked = "initial set" if source.round == 0 else f"round {source.round} batch"
        model = "round-0 model" if source.round == 0 else \
            f"round-{source.round - 1} model (whose scores the selection used)"
        total = count_selected(source.selected)
        shown = plural(count, kind) if count == total else \
            f"the first {count} of {total} {kind}s in rank order"
        caption = f"{strategy}, seed {source.seed}: {picked} ({shown}), {cam_name} of the {model}"
        name = f"contact_{strategy}.png"
        style = volume_sheet_style(config.style) if volumes else config.style
        save_figure(contact_sheet(panels, caption, style), out / name)
        sheets.append((caption, name))
    return sheets


def _holds_volumes(pool_path: Location | None) -> bool:
    """Whether the run's pool holds volumes; False where it cannot be opened (the sheets say why)."""
    if pool_path is None or not location_exists(pool_path):
        return False
    try:
        return Pool.open(pool_path).is_volume
    except XalError:
        return False


@dataclass(frozen=True)
class ReportFiles:
    html: Path  # the main file
    markdown: Path
    curves: Path
    sheets: list[Path]
    notes: list[str]  # what could not be shown, and why


def make_report(run_dir: str | Path, out: str | Path | None = None, pool: str | Path | None = None,
                config: ReportConfig = ReportConfig()) -> ReportFiles:
    """Write the report of ``run_dir`` into ``out`` (default RUN_DIR/report)."""
    run = load_run(run_dir)
    out_dir = Path(out) if out is not None else RunFolder(run.path).report_dir
    if not out_dir.parent.is_dir():
        raise XalError(f"--out {out_dir}: its parent folder does not exist")
    out_dir.mkdir(exist_ok=True)
    pool_path = parse_location(pool) if pool is not None else (
        parse_location(run.config["pool"]) if "pool" in run.config else None)  # a path or an object-store URL
    volumes = _holds_volumes(pool_path)
    figure = learning_curve_figure(run, kind="volume" if volumes else "image")
    curves = save_figure(figure, out_dir / CURVES_PNG)
    notes: list[str] = []
    sheets = _sheets(run, pool_path, out_dir, config, notes)
    planned = run.config.get("rounds")
    seeds = run.config.get("seeds", sorted(set(run.seed.tolist())))
    facts = [f"run: {run.path}", f"pool: {pool_path}", f"architecture: {run.config.get('arch', '?')}",
             f"strategies: {', '.join(run.strategies)}",
             f"{plural(len(seeds), 'seed')} ({', '.join(str(s) for s in seeds)})",  # not "seeds: 0"
             f"rounds planned: {planned if planned is not None else '?'}",
             f"rows in metrics.csv: {len(run.strategy)}",
             "statistics: mean ± sample std (ddof 1) across seeds; no ± with one seed"]
    content = ReportContent(title=f"xal-engine report: {run.path.name}", facts=facts,
                            tables=summary_tables(summarise(run)), curves=CURVES_PNG, sheets=sheets,
                            notes=notes,
                            sheets_key=f"{SHEETS_KEY} {VOLUME_SHEETS_KEY}" if volumes else SHEETS_KEY)
    markdown = out_dir / "report.md"
    markdown.write_text(render_markdown(content))
    main = out_dir / "report.html"
    main.write_text(render_html(content))
    return ReportFiles(html=main, markdown=markdown, curves=curves,
                       sheets=[out_dir / name for _, name in sheets], notes=notes)


def write_report(run_dir: str | Path, out: str | Path | None = None, pool: str | Path | None = None,
                 config: ReportConfig = ReportConfig()) -> Path:
    """Write the report of ``run_dir`` (see :func:`make_report`); returns report.html."""
    return make_report(run_dir, out, pool, config).html
