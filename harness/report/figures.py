"""The report's figures, each written as PNG and PDF (matplotlib's Agg and PDF backends, no display).

    trilemma          FID against sampling time per image, recall as colour: the trilemma figure of
                      Xiao et al. (2022), "Tackling the Generative Learning Trilemma with Denoising
                      Diffusion GANs", ICLR, with our measurements
    nfe               FID against the default sampler's network evaluations per sample
    profiles          small multiples, one panel per model: quality, coverage and speed as bars on
                      fixed [0, 1] scales
    scaling           cost against resolution (log-log): train step, sampling, memory
    fid_curve         FID during training against training images and seconds, from each run's ``curve``
    fid_compute       FID during training against counted training FLOPs, every family on one axis
    samples           every model's sample grid, tiled

A figure whose data no run has (FID turned off, no scaling study) is not drawn; its entry says why,
and the index page prints that instead of the image. Figures are made with ``matplotlib.figure.Figure``
directly, not pyplot, so nothing depends on (or changes) a global backend.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

matplotlib.use("Agg")  # belt and braces: Figure() needs no backend, but a stray pyplot call would

# Scales of the three corners of the triangle, fixed so that diagrams of different reports compare:
FID_WORST = 500.0  # quality 0 at FID 500 (about noise against natural images), 1 at FID 1; log scale
SPEED_DECADES = (0.0, 5.0)  # speed 0 at 1 image/s, 1 at 10^5 images/s; log scale
# Coverage is the recall itself (Kynkäänniemi et al. 2019), already in [0, 1].
COLUMN_INCHES = 3.3  # one column of a two-column paper: figures drawn at the size they are printed


@dataclass
class Figure:
    stem: str  # files <stem>.png and <stem>.pdf
    title: str
    caption: str
    written: bool
    note: str = ""  # why it was not drawn


def make_figures(models: pd.DataFrame, done: list[dict[str, Any]], grids: dict[str, Path],
                 out: Path) -> list[Figure]:
    """Draw every figure into ``out``; returns one entry per figure, drawn or not."""
    makers: list[tuple[str, str, str, Callable[[], Optional[MplFigure]], str]] = [
        ("trilemma", "The trilemma: quality against sampling time",
         "FID (lower is better) against seconds per generated image on the measurement device (default "
         "sampler, median of timed batches); colour: coverage (Stacked MNIST modes, or MNIST class "
         "coverage, where every run has it; else recall, named on the colour bar). After Xiao et al. (2022).",
         lambda: trilemma_figure(models), "no finished run measured FID"),
        ("nfe", "Quality against network evaluations per sample",
         "FID against the default sampler's network evaluations per sample (NFE, log scale): one-pass "
         "models at 1, few-step samplers (EDM, consistency, absorbing diffusion) against DDPM's 100 and "
         "the autoregressive models' one per pixel; diamonds: families the review has no row for.",
         lambda: nfe_figure(models), "no finished run measured FID and NFE"),
        ("profiles", "Quality, coverage, speed",
         f"One panel per model, three bars on fixed scales from 0 to 1: quality = 1 - ln(FID) / "
         f"ln({FID_WORST:g}) (1 at FID 1, 0 at FID {FID_WORST:g}), coverage = recall, speed = log10(sampling "
         f"images/s) / {SPEED_DECADES[1]:g} (0 at 1 image/s, 1 at 10^{SPEED_DECADES[1]:g} images/s), each "
         f"clipped to [0, 1].",
         lambda: profiles_figure(models), "no finished run measured FID"),
        ("scaling", "Cost against resolution",
         "Train-step time, sampling time and memory against pixel count (log-log), one line per model; "
         "the legend gives the fitted slopes (train / sample / memory); a cross on the axis marks a size "
         "that ran out of memory or failed.",
         lambda: scaling_figure(done), "no run has a resolution-scaling study"),
        ("fid_curve", "Quality during training",
         "FID during training against training images (left) and timed training seconds (right), one "
         "line per run, every point measured alike (the curve's FID n and Inception precision, named on "
         "the axis; few samples, so biased upward against the table's final FID).",
         lambda: curve_figure(done), "no run recorded FID during training"),
        ("fid_compute", "Quality against training compute",
         "FID during training against counted training FLOPs (matmuls and convolutions, forward and "
         "backward), every family on one axis: which learns fastest per unit of compute.",
         lambda: compute_figure(done), "no run recorded FLOPs with its training curve"),
        ("samples", "Samples", "Each model's sample grid (of its first run), side by side.",
         lambda: samples_figure(grids), "no run saved a sample grid"),
    ]
    for retired in ("triangle",):  # figures earlier reports drew, replaced since
        for suffix in (".png", ".pdf"):
            (out / retired).with_suffix(suffix).unlink(missing_ok=True)
    figures = []
    for stem, title, caption, draw, why_not in makers:
        fig = draw()
        if fig is not None:
            save(fig, out / stem)
        else:  # no stale figure of an earlier report beside a note saying it was not drawn
            for suffix in (".png", ".pdf"):
                (out / stem).with_suffix(suffix).unlink(missing_ok=True)
        figures.append(Figure(stem, title, caption, fig is not None, "" if fig is not None else why_not))
    return figures


def save(fig: MplFigure, stem: Path) -> None:
    fig.savefig(stem.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight", metadata={"CreationDate": None})


def label(row: dict[str, Any], several: bool) -> str:
    return f"{row['model']} ({row['dataset']})" if several else str(row["model"])


def plain_log_axis(axis) -> None:
    """Log-scale ticks at 1, 1.5, 2, 3, 5, 7 x 10^k as plain numbers (an FID axis spans about a decade)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)  # numpy scalars included


# --- the trilemma figure --------------------------------------------------------------------------

def trilemma_figure(models: pd.DataFrame) -> Optional[MplFigure]:
    """FID against seconds per image (both log), coverage as colour (:func:`coverage_axis`), the FID's
    95 % interval as a bar; grey rings where coverage is missing."""
    several = models["dataset"].nunique() > 1
    rows = [r for r in models.to_dict("records")
            if _finite(r.get("fid")) and _finite(r.get("sample_images_per_second"))
            and r["sample_images_per_second"] > 0]
    if not rows:
        return None
    fig = MplFigure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    seconds = [1.0 / r["sample_images_per_second"] for r in rows]
    errors = [r["fid_pm"] if _finite(r.get("fid_pm")) else 0.0 for r in rows]
    if any(errors):  # the 95 % interval of each FID (over seeds, else the bootstrap's), behind the points
        ax.errorbar(seconds, [r["fid"] for r in rows], yerr=errors, fmt="none", ecolor="0.4", elinewidth=0.8,
                    capsize=2, zorder=2)
    key, name = coverage_axis(rows)
    value = lambda r: coverage_value(r, key)  # noqa: E731
    with_value = [(s, r) for s, r in zip(seconds, rows) if _finite(value(r))]
    if with_value:
        points = ax.scatter([s for s, _ in with_value], [r["fid"] for _, r in with_value],
                            c=[value(r) for _, r in with_value], cmap="viridis", vmin=0, vmax=1,
                            s=70, edgecolors="black", zorder=3)
        fig.colorbar(points, ax=ax, label=f"coverage: {name}")
    without = [(s, r) for s, r in zip(seconds, rows) if not _finite(value(r))]
    if without:
        ax.scatter([s for s, _ in without], [r["fid"] for _, r in without], facecolors="none",
                   edgecolors="grey", s=70, zorder=3, label="coverage not measured")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.margins(x=0.2, y=0.15)  # room for the labels
    ax.set_xlabel("sampling time per image (s)")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    place_labels(ax, [(s, r["fid"]) for s, r in zip(seconds, rows)], [label(r, several) for r in rows])
    return fig


def coverage_axis(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Which coverage a figure shows, and its label: Stacked MNIST's modes where every row has them,
    else MNIST's class coverage where every row has it, else recall (Kynkäänniemi et al. 2019)."""
    if rows and all(_finite(r.get("modes")) for r in rows):
        return "modes", "modes covered / 1,000 (Stacked MNIST)"
    if rows and all(_finite(r.get("class_kl")) for r in rows):
        return "class_kl", "1 − KL(classes ‖ uniform) / ln 10 (MNIST classifier)"
    return "recall", "recall (Inception features)"


def coverage_value(row: dict[str, Any], key: str) -> Optional[float]:
    """A row's coverage in [0, 1] on the axis ``key`` (:func:`coverage_axis`); None where not measured."""
    if not _finite(row.get(key)):
        return None
    if key == "modes":
        return row["modes"] / 1000
    if key == "class_kl":
        return min(1.0, max(0.0, 1 - row["class_kl"] / math.log(10)))
    return row[key]


def nfe_figure(models: pd.DataFrame) -> Optional[MplFigure]:
    """FID against NFE (both log); circles: models of the review's rows, diamonds: the rest."""
    several = models["dataset"].nunique() > 1
    rows = [r for r in models.to_dict("records")
            if _finite(r.get("fid")) and _finite(r.get("sample_nfe")) and r["sample_nfe"] > 0]
    if not rows:
        return None
    fig = MplFigure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for beyond, marker, name in ((False, "o", "a row of the review"), (True, "D", "not in the review")):
        group = [r for r in rows if (not isinstance(r.get("literature"), str)) == beyond]
        if group:
            ax.scatter([r["sample_nfe"] for r in group], [r["fid"] for r in group], marker=marker, s=55,
                       facecolors="#4c72b0" if not beyond else "#dd8452", edgecolors="black", zorder=3,
                       label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    place_labels(ax, [(r["sample_nfe"], r["fid"]) for r in rows], [label(r, several) for r in rows])
    return fig


# Where a point's label may go, in points from the point, tried in this order: beside it (upper right),
# then further out to the right, left, above and below, where a thin line ties the label to its point.
LABEL_SPOTS = (((6, 4), "left"), ((14, -14), "left"), ((-14, 10), "right"), ((-14, -18), "right"),
               ((14, 14), "left"), ((0, 16), "center"), ((0, -26), "center"))


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], marker_px: float = 10.0) -> None:
    """Label each point at the first spot where its text overlaps no other label and no marker and stays
    inside the axes.

    Greedy, in order of the points, so the result is deterministic; a label that fits nowhere takes the
    spot with the least overlap. Positions are measured with an Agg renderer after the axes are final.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    fig = ax.get_figure()
    renderer = FigureCanvasAgg(fig).get_renderer()  # sizes in pixels at fig.dpi; overlaps hold at any dpi
    ax.autoscale_view()
    centres = ax.transData.transform(points)
    markers = [Bbox.from_extents(x - marker_px, y - marker_px, x + marker_px, y + marker_px) for x, y in centres]

    def overlap(a: Bbox, b: Bbox) -> float:
        common = Bbox.intersection(a, b)  # None where they are apart
        return common.width * common.height if common is not None else 0.0

    frame = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    for i, (point, text) in enumerate(zip(points, texts)):
        others = placed + [m for j, m in enumerate(markers) if j != i]
        best = None
        for k, (offset, ha) in enumerate(LABEL_SPOTS):
            leader = None if k == 0 else dict(arrowstyle="-", color="grey", linewidth=0.6, shrinkA=1, shrinkB=4)
            note = ax.annotate(text, point, textcoords="offset points", xytext=offset, ha=ha, fontsize=8,
                               arrowprops=leader)
            box = note.get_window_extent(renderer)
            outside = box.width * box.height - overlap(box, frame)  # a label must stay inside the axes
            cost = sum(overlap(box, o) for o in others) + 10 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box)
            else:
                note.remove()
            if cost == 0:
                break
        placed.append(best[2])


# --- the three-corner diagram --------------------------------------------------------------------

def corner_scores(row: dict[str, Any]) -> tuple[float, float, float]:
    """(quality, coverage, speed) in [0, 1] on the fixed scales above; 0 where not measured."""
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    quality = clip(1 - math.log(max(row["fid"], 1.0)) / math.log(FID_WORST)) if _finite(row.get("fid")) else 0.0
    coverage = clip(row["recall"]) if _finite(row.get("recall")) else 0.0
    speed = 0.0
    if _finite(row.get("sample_images_per_second")) and row["sample_images_per_second"] > 0:
        lo, hi = SPEED_DECADES
        speed = clip((math.log10(row["sample_images_per_second"]) - lo) / (hi - lo))
    return quality, coverage, speed


def profiles_figure(models: pd.DataFrame) -> Optional[MplFigure]:
    """Small multiples, one panel per model: three bars (quality, coverage, speed) on the fixed [0, 1]
    scales of :func:`corner_scores`, so panels compare at a glance and nothing overlaps."""
    several = models["dataset"].nunique() > 1
    rows = [r for r in models.to_dict("records") if _finite(r.get("fid"))]
    if not rows:
        return None
    rows.sort(key=lambda r: -sum(corner_scores(r)))  # the most balanced first
    cols = 3
    n_rows = math.ceil(len(rows) / cols)
    fig = MplFigure(figsize=(COLUMN_INCHES, 0.95 * n_rows + 0.3))
    axes = fig.subplots(n_rows, cols, squeeze=False, sharex=True)
    names = ("quality", "coverage", "speed")
    colors = ("#4c72b0", "#55a868", "#c44e52")
    for ax, row in zip(axes.flat, rows):
        scores = corner_scores(row)
        ax.barh([2, 1, 0], scores, color=colors, height=0.7)
        ax.set_xlim(0, 1)
        ax.set_yticks([2, 1, 0], names if ax in axes[:, 0] else [], fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(label(row, several), fontsize=7, pad=2)
        for x in (0.25, 0.5, 0.75):
            ax.axvline(x, color="lightgrey", linewidth=0.5, zorder=0)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.3)
    return fig


# --- cost against resolution ------------------------------------------------------------------------

SCALING_PANELS = (("train_seconds_per_image", "train step (s / image)", "train"),
                  ("sample_seconds_per_image", "sampling (s / image)", "sample"),
                  ("memory_bytes_per_image", "train memory (bytes / image)", "memory"))
# Studies written before the per-image protocol: their per-call fields (one fixed batch).
SCALING_FALLBACK = {"train_seconds_per_image": "train_seconds", "sample_seconds_per_image": "sample_seconds",
                    "memory_bytes_per_image": "memory_bytes"}


def scaling_figure(done: list[dict[str, Any]]) -> Optional[MplFigure]:
    """Three log-log panels; one line per model (its first run with a study); OOM points marked x."""
    studies = {}
    for r in done:
        study = r["measurements"].get("scaling")
        if study and r["model"]["name"] not in studies:
            studies[r["model"]["name"]] = study
    if not studies:
        return None
    sizes = sorted({(p["pixels"], p["resolution"]) for study in studies.values() for p in study["points"]})
    fig = MplFigure(figsize=(12, 3.8))
    axes = fig.subplots(1, 3)
    colors = matplotlib.colormaps["tab10"]
    for i, (name, study) in enumerate(sorted(studies.items())):
        ok = [p for p in study["points"] if p.get("status") == "ok"]
        failed = [p for p in study["points"] if p.get("status") != "ok"]
        slopes = study.get("slopes") or {}
        text = " / ".join("—" if slopes.get(k) is None else f"{slopes[k]:.2f}" for *_, k in SCALING_PANELS)
        for ax, (field, ylabel, _) in zip(axes, SCALING_PANELS):
            key = lambda p: field if field in p else SCALING_FALLBACK[field]  # noqa: E731
            pts = [(p["pixels"], p[key(p)]) for p in ok if _finite(p.get(key(p)))]
            ax.plot([n for n, _ in pts], [v for _, v in pts], "o-", color=colors(i % 10),
                    label=f"{name} ({text})" if ax is axes[0] else None)
            for p in failed:  # a failed size: a cross on the x axis
                ax.plot(p["pixels"], ax.get_ylim()[0] if pts else 1, "x", color=colors(i % 10), markersize=9)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator([n for n, _ in sizes]))  # a tick per measured size
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: next(
                (f"{r}x{r}" for n, r in sizes if n == round(v)), "")))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("resolution (log pixel count)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7,
               frameon=False, title="slopes train / sample / memory", title_fontsize=7)  # below the panels
    return fig


# --- FID against training time ------------------------------------------------------------------------

def curve_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's curve points of one protocol: those with the FID sample count and Inception precision of
    its first point (results written before every point was measured alike ended on the final FID@n)."""
    pts = [p for p in result.get("curve") or [] if _finite(p.get("fid"))]
    if not pts:
        return []
    protocol = (pts[0].get("fid_samples"), pts[0].get("precision"))
    return [p for p in pts if (p.get("fid_samples"), p.get("precision")) == protocol]


def curve_protocol(curves: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> str:
    protocols = sorted({(pts[0].get("fid_samples"), pts[0].get("precision") or "fp32") for _, pts in curves}, key=str)
    return "; ".join(f"FID@{n} ({precision} Inception)" for n, precision in protocols)


def plot_curves(ax, curves: list[tuple[dict[str, Any], list[dict[str, Any]]]], key: str) -> None:
    """One line per run, FID against its points' ``key``, log-log; a colour and one legend entry per family."""
    colors = matplotlib.colormaps["tab20"]
    names = sorted({r["model"]["name"] for r, _ in curves})
    labelled = set()
    for r, pts in curves:
        name = r["model"]["name"]
        ax.plot([p[key] for p in pts], [p["fid"] for p in pts], "o-", ms=2.5, lw=0.8, alpha=0.85,
                color=colors(names.index(name) % 20), label=None if name in labelled else name)
        labelled.add(name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.grid(True, which="both", alpha=0.3)


def curve_figure(done: list[dict[str, Any]]) -> Optional[MplFigure]:
    """FID during training against training images (left) and timed training seconds (right)."""
    curves = [(r, pts) for r in done if (pts := curve_points(r))]
    if not curves:
        return None
    fig = MplFigure(figsize=(2 * COLUMN_INCHES, 2.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, xlabel in ((axes[0], "images", "training images"),
                            (axes[1], "train_seconds", "training time (s, timed steps only)")):
        plot_curves(ax, curves, key)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(f"{curve_protocol(curves)}")
    axes[1].legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, ncol=2)
    return fig


def compute_figure(done: list[dict[str, Any]]) -> Optional[MplFigure]:
    """FID during training against counted training FLOPs, every family on one axis: which learns
    fastest per unit of compute (the trilemma at equal compute)."""
    curves = [(r, pts) for r in done if (pts := [p for p in curve_points(r) if _finite(p.get("flops"))
                                                     and p["flops"] > 0])]
    if not curves:
        return None
    fig = MplFigure(figsize=(COLUMN_INCHES, 2.6))
    ax = fig.add_subplot()
    plot_curves(ax, curves, "flops")
    ax.set_xlabel("training FLOPs (counted: matmuls and convolutions)")
    ax.set_ylabel(f"{curve_protocol(curves)}")
    ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, ncol=2)
    return fig


# --- sample grids ---------------------------------------------------------------------------------------

def samples_figure(grids: dict[str, Path]) -> Optional[MplFigure]:
    """Each model's grid (its first run's) in a row of panels, four to a row."""
    import matplotlib.image

    first: dict[str, Path] = {}
    for run, path in sorted(grids.items()):
        first.setdefault(run.rsplit("-s", 1)[0], path)  # one grid per model-dataset (run names end -s<seed>)
    if not first:
        return None
    cols = min(4, len(first))
    rows = math.ceil(len(first) / cols)
    fig = MplFigure(figsize=(3 * cols, 3.2 * rows))
    for i, (name, path) in enumerate(first.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(matplotlib.image.imread(path), cmap="gray", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return fig
