"""Rebuild a benchmark run's reports from its record files, and compare two runs.

:func:`build_report` reads ``results.csv`` and ``epochs.csv`` of a run folder and writes, in place, the
outputs of the formats asked for (:data:`REPORT_FORMATS`):

- ``csv``: ``summary.csv``; ``md``: ``summary.md`` (see :mod:`robustkit.reports.summary`);
- ``png``: the plots under ``plots/``, as PNG and PDF (see :mod:`robustkit.reports.plots`);
- ``html``: ``index.html`` (see :mod:`robustkit.reports.html`); the page shows the plots, so it draws them
  too, and it links the record and summary files present in the folder.

Nothing else is read, so a report can be rebuilt anywhere the two CSV files are, and the same files give
byte-identical outputs. :func:`compare_runs` sets the summaries of two runs side by side for the cells they
share (dataset, model, trainer and training eps), as Markdown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from robustkit.errors import InputError
from robustkit.reports.html import write_index
from robustkit.reports.plots import PLOT_FORMATS, plan_plots, write_plots
from robustkit.reports.records import (
    CELL_KEYS,
    EPOCHS_FILE,
    METRIC_LABELS,
    RESULTS_FILE,
    RecordsError,
    load_run,
    read_results,
)
from robustkit.reports.summary import (
    NOT_AVAILABLE,
    SUMMARY_CSV,
    SUMMARY_MD,
    TABLE_METRICS,
    format_duration,
    format_percent,
    format_ratio,
    group_title,
    iter_groups,
    summary_frame,
    write_summary,
)

__all__ = ["REPORT_FORMATS", "build_report", "compare_runs", "parse_formats"]

REPORT_FORMATS = ("md", "csv", "html", "png")
_ALIASES = {"pdf": "png", "markdown": "md"}


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """The report formats named in ``formats`` (a comma-separated string or names), checked, in the order of
    :data:`REPORT_FORMATS`; ``pdf`` stands for ``png`` (the plots are written in both).

    >>> parse_formats("png, md,pdf")
    ('md', 'png')
    """
    names = [n.strip().lower() for n in (formats.split(",") if isinstance(formats, str) else formats)]
    if not names or not all(names):
        raise InputError(f"give one or more comma-separated report formats from {', '.join(REPORT_FORMATS)}")
    chosen = set()
    for name in names:
        name = _ALIASES.get(name, name)
        if name not in REPORT_FORMATS:
            raise InputError(f"unknown report format {name!r}; formats: {', '.join(REPORT_FORMATS)} (pdf comes "
                             "with png)")
        chosen.add(name)
    return tuple(f for f in REPORT_FORMATS if f in chosen)


def build_report(run_dir: str | os.PathLike[str], formats: str | Iterable[str] = REPORT_FORMATS) -> list[Path]:
    """Regenerate the reports of the run folder ``run_dir`` from its ``results.csv`` and ``epochs.csv``.

    Writes atomically, in place, the outputs of ``formats`` (see the module docstring) and returns the files
    written: ``summary.csv``, ``summary.md``, the plots (PNG then PDF of each), ``index.html``, in that order.
    Raises :class:`~robustkit.reports.records.RecordsError` when the folder or a record file is missing or
    corrupt, and :class:`~robustkit.errors.InputError` for an unknown format.
    """
    chosen = parse_formats(formats)
    folder = Path(run_dir)
    records = load_run(folder)
    summary = summary_frame(records.results)
    written = write_summary(summary, folder, [f for f in ("csv", "md") if f in chosen])
    if "png" in chosen or "html" in chosen:
        written += write_plots(records, folder, PLOT_FORMATS)
    if "html" in chosen:
        links = [name for name in (RESULTS_FILE, EPOCHS_FILE, SUMMARY_CSV, SUMMARY_MD) if (folder / name).is_file()]
        written.append(write_index(folder, records, summary, plan_plots(records), links))
    return written


# ------------------------------------------------------------------------------------------------ compare

# the table's accuracies, and the best relaxation's (the Verified (best) of runs made before the complete stage)
_ACCURACIES = (*TABLE_METRICS, "verified_best")
_COMPARED = (*_ACCURACIES, "train_time_s", "time_vs_mixtrain")
_LABELS = {**METRIC_LABELS, "time_vs_mixtrain": "Time vs MixTrain", "n": "Test samples"}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|")


def _show(metric: str, value: float) -> str:
    if metric in _ACCURACIES:
        return format_percent(value)
    if metric == "train_time_s":
        return format_duration(value)
    if metric == "n":
        return NOT_AVAILABLE if math.isnan(value) else f"{int(value):,}"
    return format_ratio(value)


def _difference(metric: str, a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b):
        return NOT_AVAILABLE
    if metric in _ACCURACIES:
        return f"{100 * (b - a):+.1f} pp"
    if metric == "train_time_s":
        return "x" + format_ratio(b / a)[:-1] if a > 0 else NOT_AVAILABLE
    if metric == "n":
        return f"{int(b - a):+,}"
    return f"{b - a:+.2f}"


def _read_summary(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RecordsError(f"the run folder {folder} does not exist or is not a folder")
    return summary_frame(read_results(folder / RESULTS_FILE))


def compare_runs(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str]) -> str:
    """A Markdown comparison of two runs' summaries (from their ``results.csv``) for the cells they share.

    One table per dataset, model and training eps, with a row per trainer and metric: run A's value, run B's,
    and the difference (B - A in percentage points for accuracies, B / A as ``xR`` for training times, B - A
    for the other rows). Metrics neither run measured are left out; cells found in only one run are listed.
    """
    name_a, name_b = str(run_a), str(run_b)
    summary_a, summary_b = _read_summary(run_a), _read_summary(run_b)
    keys = list(CELL_KEYS)
    shared = summary_a.merge(summary_b, on=keys, how="inner", suffixes=("_a", "_b"), sort=False)
    lines = [
        "# Run comparison", "",
        f"A = `{_cell(name_a)}`, B = `{_cell(name_b)}`. Accuracies count all n test samples of each cell "
        "(clean-misclassified samples count as broken and not verified). Differences: pp = percentage points "
        "(B - A); xR = B took R times A's training time.", "",
    ]
    if shared.empty:
        lines += ["The runs share no cell (dataset, model, trainer and training eps).", ""]
    for (dataset, model, train_eps), group in iter_groups(shared):
        lines += [f"## {_cell(group_title(dataset, model, train_eps))}", "",
                  "| Trainer | Metric | A | B | Difference |", "|:---|:---|---:|---:|---:|"]
        for _, row in group.iterrows():
            for metric in ("n", *_COMPARED):
                a, b = float(row[f"{metric}_a"]), float(row[f"{metric}_b"])
                if math.isnan(a) and math.isnan(b):
                    continue
                cells = [str(row["trainer"]), _LABELS[metric], _show(metric, a), _show(metric, b),
                         _difference(metric, a, b)]
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    for label, mine, other in (("A", summary_a, summary_b), ("B", summary_b, summary_a)):
        only = mine.merge(other[keys], on=keys, how="left", indicator=True, sort=False)
        only = only.loc[only["_merge"] == "left_only"]
        if not only.empty:
            names = [f"{group_title(r.dataset, r.model, float(r.train_eps))} / {r.trainer}"
                     for r in only.itertuples()]
            lines += [f"Only in {label}: " + "; ".join(_cell(n) for n in names) + ".", ""]
    return "\n".join(lines)
