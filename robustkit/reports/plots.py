"""The benchmark's plots, one figure per kind and per dataset, model and training eps, as PNG and PDF.

Four kinds (:data:`PLOT_KINDS`):

- ``verified_vs_time``: verified accuracy on the monitoring subset after each epoch against the cumulative
  training time, one line per trainer (the paper's main comparison: robustness bought per second of training);
- ``accuracy_vs_eps``: clean, PGD and symbolically verified accuracy against the evaluation radius, from the
  eps sweep rows of ``results.csv`` only (:func:`sweep_points`): every point of a curve is measured on the same
  samples with the same attack, which the caption states (:func:`sweep_description`); the cell's own numbers at
  the training radius (all n test samples, the full evaluation) are the summary table's, marked by a dotted line
  but not mixed into the curves;
- ``training_curves``: loss, training eps and the loss weight (MixTrain's a, verifiable training's kappa)
  against the epoch;
- ``train_time``: training time per trainer as bars (log scale when the times span more than
  :data:`LOG_SCALE_RATIO`).

Accuracies are drawn with their 95% intervals as error bars (:func:`seed_means`); a run with several seeds is
drawn as the mean over its seeds. A plot without data (say, no eps sweep) is not drawn. Files go to ``plots/``
under the output folder with stable names, ``<kind>__<dataset>__<model>__eps<train eps>.png`` (and ``.pdf``).
Rendering uses matplotlib's Agg canvas on a :class:`~matplotlib.figure.Figure` created directly, never pyplot, so
nothing is shown and pyplot's global state is left alone; the files carry no dates, so the same records give the
same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from robustkit.reports.records import (
    GROUP_KEYS,
    METRIC_LABELS,
    RunRecords,
    cell_rows,
    ordered_unique,
    sweep_rows,
)
from robustkit.reports.summary import format_duration, group_title

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "EPS_SWEEP_METRICS", "INTERVAL_CAPTION", "KIND_TITLES", "LOG_SCALE_RATIO", "PLOTS_DIR", "PLOT_FORMATS",
    "PLOT_KINDS", "PlotSpec", "TrainerStyle", "plan_plots", "plot_stem", "render_plot", "save_figure", "seed_means",
    "sweep_description", "sweep_points", "trainer_styles", "write_plots",
]

PLOTS_DIR = "plots"
PLOT_FORMATS = ("png", "pdf")
PLOT_KINDS = ("verified_vs_time", "accuracy_vs_eps", "training_curves", "train_time")
KIND_TITLES = {
    "verified_vs_time": "Verified accuracy vs training time",
    "accuracy_vs_eps": "Accuracy vs evaluation eps",
    "training_curves": "Training curves",
    "train_time": "Training time",
}
EPS_SWEEP_METRICS = ("clean_acc", "pgd_acc", "verified_symbolic")
LOG_SCALE_RATIO = 30.0
DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

Group = tuple[str, str, float]


@dataclass(frozen=True)
class PlotSpec:
    """A plot to draw: its kind, its group (dataset, model, train eps), title, caption and file stem (the path
    relative to the output folder, without suffix)."""

    kind: str
    group: Group
    title: str
    caption: str
    stem: str


@dataclass(frozen=True)
class TrainerStyle:
    """How one trainer is drawn in every plot of a run (the same colour and marker everywhere)."""

    colour: str
    marker: str


def _slug(text: str) -> str:
    """``text`` made safe for a file name; a name that had to change gets a short hash so two never collide."""
    safe = _SAFE.sub("-", text).strip("-.") or "x"
    if safe != text:
        safe += "-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
    return safe


def plot_stem(kind: str, group: Group) -> str:
    """The stable file stem of a plot, relative to the output folder.

    >>> plot_stem("train_time", ("mnist5k", "mnist_small", 0.1))
    'plots/train_time__mnist5k__mnist_small__eps0.1'
    """
    dataset, model, train_eps = group
    return f"{PLOTS_DIR}/{kind}__{_slug(dataset)}__{_slug(model)}__eps{train_eps:g}"


def trainer_styles(records: RunRecords) -> dict[str, TrainerStyle]:
    """Colour and marker per trainer label, by first appearance in ``results.csv`` then ``epochs.csv``."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10"]
    trainers = ordered_unique([*records.results["trainer"], *records.epochs["trainer"]])
    return {
        t: TrainerStyle(to_hex(palette(i % palette.N)), MARKERS[i % len(MARKERS)]) for i, t in enumerate(trainers)
    }


def _rows(frame: pd.DataFrame, group: Group) -> pd.DataFrame:
    dataset, model, train_eps = group
    mask = (frame["dataset"] == dataset) & (frame["model"] == model)
    mask &= np.isclose(frame["train_eps"].to_numpy(dtype=float), train_eps, rtol=0.0, atol=1e-9)
    return frame.loc[mask]


def _groups(records: RunRecords) -> list[Group]:
    keys = [*zip(*(records.results[k] for k in GROUP_KEYS), strict=True),
            *zip(*(records.epochs[k] for k in GROUP_KEYS), strict=True)]
    return [(str(d), str(m), float(e)) for d, m, e in ordered_unique(keys)]


def _has_values(frame: pd.DataFrame, column: str) -> bool:
    return bool(frame[column].notna().any())


def sweep_points(results: pd.DataFrame) -> pd.DataFrame:
    """The points of the accuracy-vs-eps curves: the eps sweep's rows (:func:`~robustkit.reports.records.sweep_rows`)
    of :data:`EPS_SWEEP_METRICS` with a value, never a cell's own rows (measured on other samples with other
    attacks)."""
    sweep = sweep_rows(results)
    return sweep.loc[sweep["metric"].isin(EPS_SWEEP_METRICS) & sweep["value"].notna()]


def _described(values: Sequence[str]) -> str:
    distinct = ordered_unique(v for v in values if v)
    return " / ".join(distinct) if distinct else "not recorded"


def sweep_description(points: pd.DataFrame) -> str:
    """What the points of :func:`sweep_points` are: their number of test samples and the attack, e.g. ``the first
    200 test samples; PGD: PGD(steps=20, ...)`` (a range or every configuration when the points differ, as in
    runs merged from several configurations)."""
    counts = sorted({int(n) for n in points["n"].dropna()})
    samples = ("n unknown" if not counts else f"the first {counts[0]:,} test samples" if len(counts) == 1
               else f"{counts[0]:,} to {counts[-1]:,} test samples (the points differ)")
    attack = _described(points.loc[points["metric"] == "pgd_acc", "config"].tolist())
    return f"{samples}; PGD: {attack}"


def seed_means(frame: pd.DataFrame, by: str, column: str, n_column: str | None) -> pd.DataFrame:
    """``column`` per value of ``by`` over the seeds of ``frame`` (one trainer's rows): its mean, and the ends
    ``low`` / ``high`` of its 95% interval (:func:`robustkit.reports.stats.interval`: Wilson over the ``n_column``
    samples for one seed, t over the seeds for several; NaN without ``n_column`` for one seed)."""
    from robustkit.reports.stats import interval

    rows = []
    for key, part in frame.loc[frame[column].notna()].groupby(by, sort=True):
        values = [float(v) for v in part[column]]
        n = float(part[n_column].max()) if n_column is not None else math.nan
        low, high = interval(values, n)
        rows.append({by: float(key), "mean": sum(values) / len(values), "low": low, "high": high,
                     "seeds": part["seed"].nunique()})
    return pd.DataFrame(rows, columns=[by, "mean", "low", "high", "seeds"])


def _error_bars(axes: Axes, x: Sequence[float], means: pd.DataFrame, colour: str, scale: float = 100.0) -> None:
    """Vertical 95% interval bars at ``x`` (none where the interval is unknown)."""
    known = means["low"].notna().to_numpy() & means["high"].notna().to_numpy()
    if not known.any():
        return
    centre = scale * means["mean"].to_numpy()[known]
    below = centre - scale * means["low"].to_numpy()[known]
    above = scale * means["high"].to_numpy()[known] - centre
    axes.errorbar(np.asarray(x, dtype=float)[known], centre, yerr=np.vstack([below, above]), fmt="none",
                  ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.8)


INTERVAL_CAPTION = ("Error bars: 95% intervals (Wilson over the samples for one seed, t over the seeds for several; "
                    "several seeds are plotted as their mean).")


def plan_plots(records: RunRecords) -> list[PlotSpec]:
    """The plots the records have data for, in a stable order: per group, the kinds of :data:`PLOT_KINDS`."""
    plans = []
    for group in _groups(records):
        epochs = _rows(records.epochs, group)
        results = _rows(records.results, group)
        points = sweep_points(results)
        times = cell_rows(results)
        times = times.loc[(times["metric"] == "train_time_s") & times["value"].notna()]
        n_val = sorted({int(v) for v in epochs["n_val"].dropna()})
        subset = f"{n_val[0]:,}" if len(n_val) == 1 else "a fixed subset of"
        available = {
            "verified_vs_time": (
                not epochs.empty and _has_values(epochs, "verified_acc"),
                f"Verified accuracy after each epoch ({subset} monitoring test samples) against the cumulative "
                "training time, evaluation excluded. " + INTERVAL_CAPTION,
            ),
            "accuracy_vs_eps": (
                not points.empty,
                "Clean, PGD and symbolically verified accuracy against the evaluation radius (the eps sweep): every "
                f"point on {sweep_description(points)}. The dotted line is the training radius; the summary table's "
                "numbers there come from all n test samples and the full evaluation, so they differ from the curve. "
                + INTERVAL_CAPTION,
            ),
            "training_curves": (
                not epochs.empty,
                "Training loss, training eps and loss weight (MixTrain's a, verifiable training's kappa) per epoch.",
            ),
            "train_time": (not times.empty, "Total training time per trainer (evaluation excluded)."),
        }
        for kind in PLOT_KINDS:
            has_data, caption = available[kind]
            if has_data:
                title = f"{KIND_TITLES[kind]}: {group_title(*group)}"
                plans.append(PlotSpec(kind, group, title, caption, plot_stem(kind, group)))
    return plans


# ------------------------------------------------------------------------------------------------ drawing


def _percent_axis(axes: Axes) -> None:
    axes.set_ylim(-2, 102)
    axes.grid(True, alpha=0.3)


def _log_if_wide(axes: Axes, values: Sequence[float], axis: str) -> None:
    """A log scale when the positive ``values`` span more than :data:`LOG_SCALE_RATIO`, labelled as plain numbers
    at 1, 2 and 5 times the powers of ten over short spans and at the powers of ten over long ones (matplotlib's
    own minor labels overlap on short spans)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive or max(positive) / min(positive) <= LOG_SCALE_RATIO:
        return
    (axes.set_xscale if axis == "x" else axes.set_yscale)("log")
    target = axes.xaxis if axis == "x" else axes.yaxis
    decades = math.log10(max(positive) / min(positive))
    target.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def _draw_verified_vs_time(figure: Figure, epochs: pd.DataFrame, styles: dict[str, TrainerStyle]) -> None:
    axes = figure.subplots()
    times: list[float] = []
    for trainer in ordered_unique(epochs["trainer"]):
        rows = epochs.loc[(epochs["trainer"] == trainer) & epochs["verified_acc"].notna()]
        if rows.empty:
            continue
        style = styles[trainer]
        verified = seed_means(rows, "epoch", "verified_acc", "n_val")
        seconds = seed_means(rows, "epoch", "train_time_s", None)["mean"].tolist()  # the mean over the seeds
        axes.plot(seconds, 100 * verified["mean"], color=style.colour, marker=style.marker, markersize=4,
                  label=trainer)
        _error_bars(axes, seconds, verified, style.colour)
        times += seconds
    _log_if_wide(axes, times, "x")
    axes.set_xlabel("cumulative training time (s)")
    axes.set_ylabel("verified accuracy (%)")
    _percent_axis(axes)
    axes.legend(fontsize=8)


def _draw_accuracy_vs_eps(figure: Figure, results: pd.DataFrame, styles: dict[str, TrainerStyle]) -> None:
    from matplotlib.ticker import MaxNLocator

    panels = figure.subplots(1, len(EPS_SWEEP_METRICS), sharey=True, squeeze=False)[0]
    points = sweep_points(results)
    for axes, metric in zip(panels, EPS_SWEEP_METRICS, strict=True):
        for trainer in ordered_unique(results["trainer"]):
            style = styles[trainer]
            line = seed_means(points.loc[(points["trainer"] == trainer) & (points["metric"] == metric)], "eval_eps",
                              "value", "n")
            if not line.empty:
                axes.plot(line["eval_eps"], 100 * line["mean"], color=style.colour, marker=style.marker,
                          markersize=4, label=trainer)
                _error_bars(axes, line["eval_eps"].tolist(), line, style.colour)
        if not results.empty:
            axes.axvline(float(results["train_eps"].iloc[0]), color="0.6", linestyle=":", linewidth=1)
        axes.set_title(METRIC_LABELS[metric], fontsize=10)
        axes.set_xlabel("evaluation eps")
        axes.xaxis.set_major_locator(MaxNLocator(5))
        _percent_axis(axes)
    panels[0].set_ylabel("accuracy (%)")
    handles, labels = panels[0].get_legend_handles_labels()
    for axes in panels[1:]:
        more_handles, more_labels = axes.get_legend_handles_labels()
        for handle, label in zip(more_handles, more_labels, strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        panels[-1].legend(handles, labels, fontsize=8)


def _draw_training_curves(figure: Figure, epochs: pd.DataFrame, styles: dict[str, TrainerStyle]) -> None:
    from matplotlib.ticker import MaxNLocator

    panels = figure.subplots(1, 3, squeeze=False)[0]
    quantities = (("loss", "training loss"), ("eps", "training eps"), ("weight", "loss weight (a / kappa)"))
    for axes, (column, label) in zip(panels, quantities, strict=True):
        drawn = False
        for trainer in ordered_unique(epochs["trainer"]):
            rows = epochs.loc[(epochs["trainer"] == trainer) & epochs[column].notna()]
            if rows.empty:
                continue
            style = styles[trainer]
            means = seed_means(rows, "epoch", column, None)  # the mean over the seeds
            axes.plot(means["epoch"], means["mean"], color=style.colour, marker=style.marker, markersize=3,
                      label=trainer)
            drawn = True
        if not drawn:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes, color="0.5")
        axes.set_title(label, fontsize=10)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        panels[0].legend(handles, labels, fontsize=8)


def _draw_train_time(figure: Figure, results: pd.DataFrame, styles: dict[str, TrainerStyle]) -> None:
    rows = cell_rows(results)
    rows = rows.loc[(rows["metric"] == "train_time_s") & rows["value"].notna()]
    trainers = ordered_unique(rows["trainer"])
    per_seed = [rows.loc[rows["trainer"] == t, "value"].astype(float).tolist() for t in trainers]
    seconds = [sum(values) / len(values) for values in per_seed]  # the mean over the seeds
    axes = figure.subplots()
    positions = list(range(len(trainers)))
    axes.barh(positions, seconds, color=[styles[t].colour for t in trainers])
    from robustkit.reports.stats import t_interval

    spread = [t_interval(values, bounds=(0.0, math.inf)) for values in per_seed]
    for position, mean, (low, high) in zip(positions, seconds, spread, strict=True):
        if not math.isnan(low):  # a t interval over the seeds (a time has no binomial interval)
            axes.errorbar([mean], [position], xerr=[[mean - low], [high - mean]], fmt="none", ecolor="0.2",
                          capsize=3)
    axes.set_yticks(positions, labels=trainers)
    axes.invert_yaxis()
    _log_if_wide(axes, seconds, "x")
    for position, value in zip(positions, seconds, strict=True):
        axes.annotate(format_duration(value), (value, position), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=8)
    axes.margins(x=0.15)
    axes.set_xlabel("training time (s)")
    axes.grid(True, axis="x", alpha=0.3)


_SIZES = {
    "verified_vs_time": (6.4, 4.4),
    "accuracy_vs_eps": (11.0, 4.0),
    "training_curves": (11.0, 3.8),
    "train_time": (6.4, 0.9),  # height grows with the number of trainers
}


def render_plot(spec: PlotSpec, records: RunRecords, styles: dict[str, TrainerStyle] | None = None) -> Figure:
    """Draw the plot ``spec`` (from :func:`plan_plots`) on a new figure."""
    from matplotlib.figure import Figure

    styles = trainer_styles(records) if styles is None else styles
    width, height = _SIZES[spec.kind]
    results = _rows(records.results, spec.group)
    epochs = _rows(records.epochs, spec.group)
    if spec.kind == "train_time":
        height += 0.45 * results["trainer"].nunique()
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    if spec.kind == "verified_vs_time":
        _draw_verified_vs_time(figure, epochs, styles)
    elif spec.kind == "accuracy_vs_eps":
        _draw_accuracy_vs_eps(figure, results, styles)
    elif spec.kind == "training_curves":
        _draw_training_curves(figure, epochs, styles)
    elif spec.kind == "train_time":
        _draw_train_time(figure, results, styles)
    else:
        raise ValueError(f"unknown plot kind {spec.kind!r}; kinds: {', '.join(PLOT_KINDS)}")
    figure.suptitle(spec.title, fontsize=11)
    return figure


# ------------------------------------------------------------------------------------------------ writing

# no dates or versions in the files, so that the same records give byte-identical plots
_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def save_figure(
    figure: Figure, stem: str | os.PathLike[str], formats: Sequence[str] = PLOT_FORMATS
) -> list[Path]:
    """Write ``figure`` as ``<stem>.png`` and/or ``<stem>.pdf`` atomically, without timestamps; returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from robustkit.io import atomic_write_bytes

    FigureCanvasAgg(figure)
    written = []
    for fmt in formats:
        if fmt not in _METADATA:
            raise ValueError(f"unknown plot format {fmt!r}; formats: {', '.join(_METADATA)}")
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, metadata=_METADATA[fmt])
        written.append(atomic_write_bytes(Path(f"{os.fspath(stem)}.{fmt}"), buffer.getvalue()))
    return written


def write_plots(
    records: RunRecords, out_dir: str | os.PathLike[str], formats: Sequence[str] = PLOT_FORMATS
) -> list[Path]:
    """Draw every plot the records have data for (:func:`plan_plots`) and write it to ``out_dir/plots``;
    returns the written files in a stable order."""
    styles = trainer_styles(records)
    written: list[Path] = []
    for spec in plan_plots(records):
        figure = render_plot(spec, records, styles)
        written += save_figure(figure, Path(out_dir) / spec.stem, formats)
    return written
