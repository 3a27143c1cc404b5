"""The paper-style summary table: one row per trained cell, grouped by dataset, model and training eps.

The columns read like the MixTrain paper's table: Trainer | Clean | PGD | CW | Interval attack | AutoAttack |
Verified (interval) | Verified (symbolic) | Verified (CROWN) | Verified (best) | Falsified | Undecided | Train time |
Time vs MixTrain (``time_vs_mixtrain`` in ``summary.csv``, to 3 significant digits; AutoAttack: the bench's
``evaluation.autoattack``, ``n/a`` where it was off and in runs made before the bench measured it). Verified (best),
Falsified and Undecided are the undecided band's metrics (:data:`BAND_METRICS`, see
:mod:`robustkit.bench.complete`): Verified (best) is ``verified_complete``, the best relaxation's verifications and
the complete stage's (in runs made before the complete stage: ``verified_best``, the best relaxation's, and the
other two ``n/a``); under each table a line names the complete verifier that ran and its budget per sample
(``complete_method`` and ``complete_time_limit`` in ``summary.csv``, from the band rows' ``config``). Every value
comes from the ``results.csv`` rows measured at the cell's own radius (eval eps = train eps). "Time vs MixTrain"
divides a cell's training time by that of the MixTrain cell of the same dataset, model and training eps (the cell
labelled ``mixtrain``, else the first cell whose trainer is ``mixtrain``); it is ``n/a`` without one.

:func:`summary_frame` builds the table as a DataFrame (fractions and seconds), :func:`summary_markdown` renders
it for people (percentages with one decimal, readable times), :func:`write_summary` writes ``summary.csv`` and
``summary.md``. Cells keep the order of their first row in ``results.csv``, so the same file gives the same
table, byte for byte. ``summary.csv`` ends with the cells' pre-flight results (:data:`PREFLIGHT_METRICS`: the
number of warnings, 0/1 flags and the share of checked samples with zero input gradients), empty for runs made
before the bench recorded them; the Markdown table leaves them out. Every accuracy carries its 95% interval
(:mod:`robustkit.reports.stats`: Wilson over the test points for one seed, t over the seeds for several), shown
in parentheses in ``summary.md`` and as ``<metric>_low`` / ``<metric>_high`` in ``summary.csv`` (after every
earlier column); a cell run with several seeds is one row, their mean, with ± the standard deviation. Then
comes ``autoattack_acc``, then the band's metrics, their ``_std`` / ``_low`` / ``_high`` columns,
``complete_method`` and ``complete_time_limit`` (:data:`APPENDED_ACCURACY_METRICS`, empty where not measured):
later columns are appended, so the earlier ones keep their positions.

>>> format_percent(0.9712), format_duration(4521.0), format_ratio(15.24), format_ratio(float("nan"))
('97.1%', '1.3 h', '15.2x', 'n/a')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from robustkit.reports.records import (
    ACCURACY_METRICS,
    APPENDED_ACCURACY_METRICS,
    BAND_METRICS,
    CELL_KEYS,
    CELL_METRICS,
    GROUP_KEYS,
    METRIC_LABELS,
    MIXTRAIN,
    PREFLIGHT_METRICS,
    cell_rows,
    format_eps,
    ordered_unique,
)

__all__ = [
    "ACCURACY_NOTE", "INTERVAL_COLUMNS", "INTERVAL_NOTE", "NOT_AVAILABLE", "SUMMARY_COLUMNS", "SUMMARY_CSV",
    "SUMMARY_MD", "TABLE_HEADERS", "TABLE_METRICS", "complete_note", "format_accuracy", "format_duration",
    "format_percent", "format_ratio", "group_title", "iter_groups", "mixtrain_reference", "sample_count",
    "summary_frame", "summary_markdown", "table_cells", "write_summary",
]

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
NOT_AVAILABLE = "n/a"

TABLE_METRICS = (
    "clean_acc", "pgd_acc", "cw_acc", "interval_attack_acc", "autoattack_acc", "verified_interval",
    "verified_symbolic", "verified_crown", *BAND_METRICS,
)
TABLE_HEADERS = ("Trainer", *(METRIC_LABELS[m] for m in TABLE_METRICS), "Train time", "Time vs MixTrain")
# what the Verified (best) column shows for cells evaluated before the complete stage (it was the best relaxation)
_BEFORE_COMPLETE = {"verified_complete": "verified_best"}


def _intervals(metrics: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{metric}_{part}" for metric in metrics for part in ("std", "low", "high"))


# per accuracy: the standard deviation over seeds (empty for one seed) and the 95% interval's ends
INTERVAL_COLUMNS = _intervals(ACCURACY_METRICS)
# the complete stage of each cell: its verifier (none: none ran; empty before the stage) and seconds per sample
COMPLETE_COLUMNS = ("complete_method", "complete_time_limit")
SUMMARY_COLUMNS = (
    *GROUP_KEYS, "trainer", "trainer_name", "seed", "n",
    *(m for m in ACCURACY_METRICS if m not in APPENDED_ACCURACY_METRICS), *CELL_METRICS, "time_vs_mixtrain",
    *PREFLIGHT_METRICS, "n_seeds", "interval", *_intervals([m for m in ACCURACY_METRICS if m not in BAND_METRICS]),
    *(m for m in APPENDED_ACCURACY_METRICS if m not in BAND_METRICS),
    *BAND_METRICS, *_intervals(BAND_METRICS), *COMPLETE_COLUMNS,
)
# whole numbers in summary.csv: counts and the pre-flight flags
INTEGER_COLUMNS = frozenset({"seed", "n", "n_seeds", *PREFLIGHT_METRICS} - {"preflight_zero_gradient"})
# summary.csv columns rounded to this many significant digits (a ratio of two measured times)
ROUNDED_COLUMNS = {"time_vs_mixtrain": 3}
ACCURACY_NOTE = (
    "Accuracies count all n test samples of each cell, at the cell's training eps: clean-misclassified samples "
    "count as broken by the attacks and as not verified. The samples that the best relaxation (the per-sample best "
    "of the relaxation verifiers run) does not verify and no attack breaks form the undecided band; a complete "
    "verifier, named under each table with its time budget per sample, then decides what it can of the band. "
    "Verified (best) counts the samples verified by the best relaxation or by the complete verifier; Falsified "
    "those broken by an attack (clean-misclassified ones included) or falsified by the complete verifier with a "
    "counterexample that passed a re-check; Undecided the rest of the band (timeouts included): the three add up "
    "to 100%. AutoAttack is the AutoAttack ensemble (the bench's evaluation.autoattack version; n/a when off), one "
    "of the attacks of the per-sample worst case. Time vs MixTrain is the training time divided by that of the "
    "MixTrain cell in the same table (cells trained side by side, bench --jobs or run.jobs, shared the machine: "
    "compare training costs from a run one cell at a time)."
)
INTERVAL_NOTE = (
    "In parentheses: the 95% interval of each accuracy, over the n test samples (Wilson score interval) for one "
    "seed, over the seeds (t interval of the mean) for several; with several seeds the value is the mean over "
    "the seeds and ± its standard deviation. Differences inside these intervals are noise."
)


# ------------------------------------------------------------------------------------------- formatting


def _missing(value: float) -> bool:
    return math.isnan(value)


def format_percent(fraction: float) -> str:
    """An accuracy (a fraction) as a percentage with one decimal; ``n/a`` when it was not measured."""
    return NOT_AVAILABLE if _missing(fraction) else f"{100 * fraction:.1f}%"


def format_accuracy(value: float, std: float, low: float, high: float) -> str:
    """An accuracy with its spread and 95% interval: ``97.1% (96.0-97.9)`` for one seed, ``97.1% ± 0.4
    (96.2-98.0)`` (mean, standard deviation over seeds, interval) for several; parts that are NaN are left out.

    >>> format_accuracy(0.9712, math.nan, 0.9600, 0.9791), format_accuracy(0.5, 0.02, 0.45, 0.55)
    ('97.1% (96.0-97.9)', '50.0% ± 2.0 (45.0-55.0)')
    """
    if _missing(value):
        return NOT_AVAILABLE
    text = format_percent(value)
    if not _missing(std):
        text += f" ± {100 * std:.1f}"
    if not (_missing(low) or _missing(high)):
        text += f" ({100 * low:.1f}-{100 * high:.1f})"
    return text


def format_duration(seconds: float) -> str:
    """A duration for people: ``0.421 s``, ``45.2 s``, ``12.5 min``, ``3.1 h``, ``2.0 d``; ``n/a`` when missing.

    >>> [format_duration(s) for s in (0.4213, 3.0, 45.21, 750.0, 11160.0, 172800.0)]
    ['0.421 s', '3 s', '45.2 s', '12.5 min', '3.1 h', '2.0 d']
    """
    if _missing(seconds):
        return NOT_AVAILABLE
    if seconds < 9.995:
        return f"{seconds:.3g} s"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    if seconds < 3600 - 3:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 - 180:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_ratio(ratio: float) -> str:
    """A time ratio: ``0.33x``, ``1.00x``, ``15.2x``, ``150x``; ``n/a`` when there is nothing to compare with."""
    if _missing(ratio):
        return NOT_AVAILABLE
    if ratio < 9.995:
        return f"{ratio:.2f}x"
    if ratio < 99.95:
        return f"{ratio:.1f}x"
    return f"{ratio:.0f}x"


def group_title(dataset: str, model: str, train_eps: float) -> str:
    """The heading of one table: ``mnist5k / mnist_small / train eps 0.1``."""
    return f"{dataset} / {model} / train eps {format_eps(train_eps)}"


# ------------------------------------------------------------------------------------------------ table


def mixtrain_reference(group: pd.DataFrame) -> float:
    """The training time of the group's MixTrain cell (the one labelled ``mixtrain``, else the first whose
    trainer is ``mixtrain``); NaN when the group has none or its time is missing or zero."""
    candidates = group.loc[group["trainer_name"] == MIXTRAIN]
    if candidates.empty:
        return math.nan
    labelled = candidates.loc[candidates["trainer"] == MIXTRAIN]
    reference = float((labelled if not labelled.empty else candidates)["train_time_s"].iloc[0])
    return reference if reference > 0 else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def summary_frame(results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (dataset, model, trainer, train eps) with :data:`SUMMARY_COLUMNS`.

    Accuracies are fractions and times seconds, NaN where a metric was not measured. ``n`` is the number of
    test samples of the clean accuracy (else the largest ``n`` among the cell's rows). Groups and, inside a
    group, trainers are ordered by their first row in ``results``. A cell run with several seeds gets the mean
    over its seeds (the pre-flight metrics: the largest, the worst seed), ``seed`` lists them (``0;1;2``) and
    ``n_seeds`` counts them; every accuracy gets ``<metric>_std`` (over seeds, NaN for one) and the 95%
    interval ``<metric>_low`` / ``<metric>_high`` of :func:`robustkit.reports.stats.interval` (``interval``:
    ``wilson`` over the test samples for one seed, ``t`` over the seeds for several).
    """
    from robustkit.reports.stats import interval

    measured = cell_rows(results)
    trainer_rank = {t: i for i, t in enumerate(ordered_unique(results["trainer"]))}
    group_rank = {g: i for i, g in enumerate(ordered_unique(zip(*(results[k] for k in GROUP_KEYS), strict=True)))}
    rows: list[dict[str, Any]] = []
    for key, cell in measured.groupby(list(CELL_KEYS), sort=False):
        dataset, model, trainer, train_eps = key
        seeds = [int(seed) for seed in ordered_unique(cell["seed"])]
        per_seed = [cell.loc[cell["seed"] == seed] for seed in seeds]
        values = [dict(zip(rows_of_seed["metric"], rows_of_seed["value"], strict=True)) for rows_of_seed in per_seed]
        counts = cell.loc[cell["metric"] == "clean_acc", "n"].dropna()
        if counts.empty:
            counts = cell["n"].dropna()
        row: dict[str, Any] = {
            "dataset": dataset, "model": model, "train_eps": float(train_eps), "trainer": trainer,
            "trainer_name": cell["trainer_name"].iloc[0],
            "seed": seeds[0] if len(seeds) == 1 else ";".join(str(seed) for seed in seeds),
            "n": float(counts.max()) if not counts.empty else math.nan,
            "n_seeds": len(seeds), "interval": "wilson" if len(seeds) == 1 else "t",
        }
        for metric in ACCURACY_METRICS:
            measurements = [float(v.get(metric, math.nan)) for v in values]
            metric_n = cell.loc[cell["metric"] == metric, "n"].dropna()
            row[metric] = _mean(measurements)
            row[f"{metric}_std"] = _std(measurements)
            row[f"{metric}_low"], row[f"{metric}_high"] = interval(
                measurements, float(metric_n.max()) if not metric_n.empty else math.nan)
        for metric in CELL_METRICS:
            row[metric] = _mean([float(v.get(metric, math.nan)) for v in values])
        row["complete_method"], row["complete_time_limit"] = _complete_stage(
            cell.loc[cell["metric"] == BAND_METRICS[0], "config"])
        for metric in PREFLIGHT_METRICS:
            found = [float(v.get(metric, math.nan)) for v in values]
            row[metric] = max((v for v in found if not math.isnan(v)), default=math.nan)
        row["_order"] = (group_rank[(dataset, model, train_eps)], trainer_rank[trainer])
        rows.append(row)
    rows.sort(key=lambda r: r["_order"])
    frame = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS if c != "time_vs_mixtrain"])
    ratios = pd.Series(math.nan, index=frame.index, dtype="float64")
    for _, group in iter_groups(frame):
        reference = mixtrain_reference(group)
        ratios.loc[group.index] = group["train_time_s"] / reference
    frame.insert(list(SUMMARY_COLUMNS).index("time_vs_mixtrain"), "time_vs_mixtrain", ratios)
    return frame.reset_index(drop=True)


def _complete_stage(configs: Iterable[str]) -> tuple[str | float, float]:
    """``(complete_method, complete_time_limit)`` from the ``config`` texts of a cell's band rows (JSON written
    by the bench): the verifier (``none`` where none ran; seeds that differ are joined with ``;``) and its
    seconds per sample; NaN for both without band rows (a run from before the complete stage)."""
    methods, limits = [], []
    for text in configs:
        try:
            stage = json.loads(text)
        except ValueError:
            continue
        if not isinstance(stage, dict):
            continue
        method = stage.get("method")
        methods.append("none" if method is None else str(method))
        limit = stage.get("time_limit")
        if method is not None and isinstance(limit, int | float) and not isinstance(limit, bool):
            limits.append(float(limit))
    return ";".join(ordered_unique(methods)) or math.nan, max(limits, default=math.nan)


def complete_note(group: pd.DataFrame) -> str:
    """The line under a table: the complete verifier that decided its cells' undecided band and its budget per
    sample (per trainer where the cells differ)."""
    stages: dict[str, list[str]] = {}
    for _, row in group.iterrows():
        method, limit = row["complete_method"], float(row["complete_time_limit"])
        if not isinstance(method, str) or not method:
            text = ("none (evaluated before the bench had a complete stage: Verified (best) is the best relaxation's, "
                    "Falsified and Undecided are n/a)")
        elif method == "none":
            text = "none (evaluation.complete off, or no complete verifier applies: the band stays undecided)"
        else:
            text = f"{method}, at most {format_duration(limit)} per sample"
        stages.setdefault(text, []).append(str(row["trainer"]))
    if len(stages) <= 1:
        return f"Complete verifier on the undecided band: {next(iter(stages), 'none')}."
    return "Complete verifier on the undecided band: " + "; ".join(
        f"{text} for {', '.join(trainers)}" for text, trainers in stages.items()) + "."


def iter_groups(summary: pd.DataFrame) -> Iterator[tuple[tuple[str, str, float], pd.DataFrame]]:
    """``((dataset, model, train_eps), rows)`` per table, in the summary's order."""
    for key, group in summary.groupby(list(GROUP_KEYS), sort=False):
        dataset, model, train_eps = key
        yield (str(dataset), str(model), float(train_eps)), group


def table_cells(row: pd.Series) -> list[str]:
    """One summary row as the table shows it (:data:`TABLE_HEADERS`); Verified (best) shows ``verified_best`` for
    a cell evaluated before the complete stage (no ``verified_complete``), which it then was."""
    shown = [_BEFORE_COMPLETE.get(m, m) if _missing(float(row[m])) else m for m in TABLE_METRICS]
    return [
        str(row["trainer"]),
        *(format_accuracy(float(row[m]), float(row[f"{m}_std"]), float(row[f"{m}_low"]), float(row[f"{m}_high"]))
          for m in shown),
        format_duration(float(row["train_time_s"])),
        format_ratio(float(row["time_vs_mixtrain"])),
    ]


def sample_count(group: pd.DataFrame) -> str:
    """``n = 1,000 test samples`` for a table (a range when its cells differ)."""
    counts = sorted({int(n) for n in group["n"] if not math.isnan(n)})
    seeds = sorted({int(k) for k in group["n_seeds"] if not math.isnan(k)}) if "n_seeds" in group else []
    if not seeds or seeds == [1]:
        runs = ""
    elif len(seeds) == 1:
        runs = f", {seeds[0]} seeds per cell ({group['seed'].iloc[0]})".replace(";", ", ")
    else:
        runs = f", {seeds[0]} to {seeds[-1]} seeds per cell"
    if not counts:
        return "n unknown" + runs
    if len(counts) == 1:
        return f"n = {counts[0]:,} test samples" + runs
    return f"n = {counts[0]:,} to {counts[-1]:,} test samples (per cell in {SUMMARY_CSV})" + runs


# ---------------------------------------------------------------------------------------------- outputs


def _markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|")


def summary_markdown(summary: pd.DataFrame, title: str = "Benchmark summary") -> str:
    """``summary.md``: the accuracy note, then one Markdown table per dataset, model and training eps."""
    lines = [f"# {_markdown_cell(title)}", "", ACCURACY_NOTE, "", INTERVAL_NOTE, ""]
    if summary.empty:
        lines += ["No cell has been evaluated yet.", ""]
    for (dataset, model, train_eps), group in iter_groups(summary):
        lines += [f"## {_markdown_cell(group_title(dataset, model, train_eps))}", "", f"{sample_count(group)}.", ""]
        lines.append("| " + " | ".join(TABLE_HEADERS) + " |")
        lines.append("|" + "|".join([":---", *("---:" for _ in TABLE_HEADERS[1:])]) + "|")
        for _, row in group.iterrows():
            lines.append("| " + " | ".join(_markdown_cell(c) for c in table_cells(row)) + " |")
        lines += ["", _markdown_cell(complete_note(group)), ""]
    return "\n".join(lines)


def _csv_value(value: Any, integer: bool, digits: int | None = None) -> str:
    """A summary.csv cell: text as is, empty for NaN, whole numbers without a point, ``digits`` significant
    digits where given (``15.2438`` -> ``15.2``), else every digit of the float."""
    if isinstance(value, str):
        return value
    number = float(value)
    if math.isnan(number):
        return ""
    if integer:
        return str(int(number))
    return repr(float(f"{number:.{digits}g}")) if digits is not None else repr(number)


def write_summary(
    summary: pd.DataFrame, out_dir: str | os.PathLike[str], formats: Sequence[str] = ("csv", "md")
) -> list[Path]:
    """Write ``summary.csv`` (fractions, seconds; empty where not measured) and/or ``summary.md`` atomically."""
    from robustkit.io import atomic_write_text, write_csv

    folder = Path(out_dir)
    written = []
    if "csv" in formats:
        rows = [
            [_csv_value(record[c], c in INTEGER_COLUMNS, ROUNDED_COLUMNS.get(c)) for c in SUMMARY_COLUMNS]
            for record in summary.to_dict("records")
        ]
        written.append(write_csv(folder / SUMMARY_CSV, SUMMARY_COLUMNS, rows))
    if "md" in formats:
        written.append(atomic_write_text(folder / SUMMARY_MD, summary_markdown(summary)))
    return written
