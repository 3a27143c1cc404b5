"""The benchmark's record files, ``results.csv`` and ``epochs.csv``, read and checked into pandas DataFrames.

``robustkit bench`` writes both files in long format (DESIGN.md section 6); every report (summary tables,
plots, ``index.html``, run comparisons) is rebuilt from them alone. Reading checks every column the reports
need: a file that lacks one raises :class:`RecordsError` naming the file and the missing columns, and a cell
that is not of its column's type (a word in a number column, a fractional epoch, an accuracy outside [0, 1])
raises naming the file, the line and the column. Extra columns are kept as text.

Column types after reading (``NaN`` only where the column allows a missing value, written as an empty cell
or ``nan``):

- text columns are strings (``""`` where a column such as ``config`` may be empty);
- number columns are ``float64``; integer columns that are never missing (``seed``, ``epoch``) are ``int64``,
  and those that may be missing (``n``, ``n_val``) are integer-valued ``float64`` with ``NaN`` where missing.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "results.csv"
>>> _ = path.write_text(",".join(RESULTS_COLUMNS) + "\\n"
...                     + "mnist5k,mnist_small,mixtrain,mixtrain,0.1,0.1,clean_acc,0.98,1000,2.5,0,0.1.0,2.13.0,{}\\n")
>>> frame = read_results(path)
>>> frame.loc[0, "value"], int(frame.loc[0, "n"]), frame["seed"].dtype.name
(np.float64(0.98), 1000, 'int64')
>>> _ = path.write_text("dataset,model,value\\nmnist5k,mnist_small,0.9\\n")
>>> read_results(path)
Traceback (most recent call last):
...
robustkit.reports.records.RecordsError: .../results.csv lacks the required column(s) trainer, ...
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from robustkit.errors import DataError

__all__ = [
    "ACCURACY_METRICS", "APPENDED_ACCURACY_METRICS", "BAND_METRICS",
    "CELL_KEYS", "CELL_METRICS", "EPOCHS_COLUMNS", "EPOCHS_FILE", "EPOCHS_SCHEMA", "GROUP_KEYS",
    "METRICS", "METRIC_LABELS", "MIXTRAIN", "PREFLIGHT_METRICS", "RESULTS_COLUMNS", "RESULTS_FILE", "RESULTS_SCHEMA",
    "RUN_KEYS", "SWEEP_METRICS", "Column", "RecordsError", "RunRecords", "cell_rows", "format_eps", "load_run",
    "ordered_unique", "read_epochs", "read_results", "sweep_rows",
]

RESULTS_FILE = "results.csv"
EPOCHS_FILE = "epochs.csv"

# one trained network; ``trainer`` is the cell's label (e.g. verifiable-symbolic), ``trainer_name`` its registry name
CELL_KEYS = ("dataset", "model", "trainer", "train_eps")
# one trained network of one seed: a bench run with several seeds has one per cell and seed
RUN_KEYS = (*CELL_KEYS, "seed")
# the cells that one table (and one set of plots) compares
GROUP_KEYS = ("dataset", "model", "train_eps")
MIXTRAIN = "mixtrain"

# the undecided band's fractions (robustkit.bench.complete), measured since the bench's complete stage: verified by
# the best relaxation or the complete verifier, falsified by an attack or the complete verifier, and the rest
BAND_METRICS = ("verified_complete", "falsified", "undecided")
ACCURACY_METRICS = (
    "clean_acc", "pgd_acc", "cw_acc", "interval_attack_acc", "worst_attack_acc", "verified_interval",
    "verified_symbolic", "verified_crown", "verified_exact", "verified_best", "autoattack_acc", *BAND_METRICS,
)
# accuracies measured since the bench gained them (absent in older runs): summary.csv appends their columns
APPENDED_ACCURACY_METRICS = ("autoattack_acc", *BAND_METRICS)
CELL_METRICS = ("train_time_s", "eval_time_s", "peak_memory_mb", "epochs")
# the pre-flight (gradient-masking) checks of each cell's model (robustkit.bench.evaluate); absent in older runs
PREFLIGHT_METRICS = ("preflight_warnings", "preflight_randomised_outputs", "preflight_probability_outputs",
                     "preflight_zero_gradient", "preflight_train_mode")
METRICS = ACCURACY_METRICS + CELL_METRICS + PREFLIGHT_METRICS
# measured again at several eval_eps (on a subset) for the accuracy-vs-eps plot
SWEEP_METRICS = ("clean_acc", "pgd_acc", "verified_symbolic", "verified_interval")

METRIC_LABELS: dict[str, str] = {
    "clean_acc": "Clean",
    "pgd_acc": "PGD",
    "cw_acc": "CW",
    "interval_attack_acc": "Interval attack",
    "autoattack_acc": "AutoAttack",
    "worst_attack_acc": "Worst attack",
    "verified_interval": "Verified (interval)",
    "verified_symbolic": "Verified (symbolic)",
    "verified_crown": "Verified (CROWN)",
    "verified_exact": "Verified (exact)",
    "verified_best": "Verified (best relaxation)",
    "verified_complete": "Verified (best)",
    "falsified": "Falsified",
    "undecided": "Undecided",
    "train_time_s": "Train time",
    "eval_time_s": "Evaluation time",
    "peak_memory_mb": "Peak memory (MB)",
    "epochs": "Epochs",
    "preflight_warnings": "Pre-flight warnings",
    "preflight_randomised_outputs": "Randomised outputs",
    "preflight_probability_outputs": "Probability outputs",
    "preflight_zero_gradient": "Zero gradients",
    "preflight_train_mode": "Train mode",
}

_MISSING = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "null", "None"})
_EPS_TOLERANCE = 1e-9

Kind = Literal["text", "float", "int"]


class RecordsError(DataError):
    """A record file is missing, unreadable, lacks required columns or holds a value of the wrong type."""


@dataclass(frozen=True)
class Column:
    """One required column: its type, whether a cell may be missing, and the closed range of its values."""

    name: str
    kind: Kind
    missing_ok: bool = False
    low: float = -math.inf
    high: float = math.inf


def _unit(name: str, missing_ok: bool = False) -> Column:
    return Column(name, "float", missing_ok, 0.0, 1.0)


def _seconds(name: str, missing_ok: bool = True) -> Column:
    return Column(name, "float", missing_ok, 0.0)


RESULTS_SCHEMA = (
    Column("dataset", "text"), Column("model", "text"), Column("trainer", "text"), Column("trainer_name", "text"),
    _unit("train_eps"), _unit("eval_eps"), Column("metric", "text"), Column("value", "float", True),
    Column("n", "int", True, 0.0), _seconds("time_s"), Column("seed", "int"),
    Column("robustkit_version", "text", True), Column("torch_version", "text", True), Column("config", "text", True),
)
EPOCHS_SCHEMA = (
    Column("dataset", "text"), Column("model", "text"), Column("trainer", "text"), Column("trainer_name", "text"),
    _unit("train_eps"), Column("seed", "int"), Column("epoch", "int", False, 0.0),
    _seconds("train_time_s", missing_ok=False), _seconds("epoch_time_s"), Column("loss", "float", True),
    Column("loss_natural", "float", True), Column("loss_robust", "float", True), Column("weight", "float", True),
    _unit("eps", True), Column("lr", "float", True, 0.0), _unit("train_acc", True), _unit("clean_acc", True),
    _unit("pgd_acc", True), _unit("verified_acc", True), Column("n_val", "int", True, 0.0), _seconds("eval_time_s"),
)
RESULTS_COLUMNS = tuple(c.name for c in RESULTS_SCHEMA)
EPOCHS_COLUMNS = tuple(c.name for c in EPOCHS_SCHEMA)


def _line(position: int) -> int:
    return position + 2  # the header is line 1 (a cell holding a line break would shift this; the bench writes none)


def _bad_cell(path: Path, line: int, column: str, text: str, why: str) -> RecordsError:
    return RecordsError(f"{path}, line {line}, column {column}: {text!r} {why}")


def _parse_column(path: Path, frame: pd.DataFrame, column: Column) -> pd.Series:
    """The column ``column.name`` of ``frame`` (all text) converted to its type and checked."""
    text = frame[column.name].astype(str).str.strip()
    missing = text.isin(_MISSING).to_numpy()
    if not column.missing_ok and missing.any():
        position = int(np.flatnonzero(missing)[0])
        raise _bad_cell(path, _line(position), column.name, str(frame[column.name].iloc[position]),
                        "is missing; this column needs a value in every row")
    if column.kind == "text":
        return text.where(~missing, "")
    numbers = pd.to_numeric(text.where(~missing, "nan"), errors="coerce").astype("float64")
    values = numbers.to_numpy()
    problems: list[tuple[np.ndarray[Any, Any], str]] = [
        (np.isnan(values) & ~missing, "is not a number"),
        (np.isinf(values), "is not a finite number"),
    ]
    if column.kind == "int":
        with np.errstate(invalid="ignore"):
            problems.append((np.isfinite(values) & (values != np.round(values)), "is not a whole number"))
    with np.errstate(invalid="ignore"):
        problems.append((
            (values < column.low) | (values > column.high),
            f"is outside [{column.low:g}, {column.high:g}]",
        ))
    for mask, why in problems:
        if mask.any():
            position = int(np.flatnonzero(mask)[0])
            raise _bad_cell(path, _line(position), column.name, str(frame[column.name].iloc[position]), why)
    if column.kind == "int" and not column.missing_ok:
        return numbers.astype("int64")
    return numbers


def _read_table(path: str | os.PathLike[str], schema: Sequence[Column]) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise RecordsError(f"{path} does not exist (a run folder written by 'robustkit bench' holds "
                           f"{RESULTS_FILE} and {EPOCHS_FILE})")
    if not path.is_file():
        raise RecordsError(f"{path} is not a file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise RecordsError(f"{path} is empty: expected a CSV header with the columns "
                           f"{', '.join(c.name for c in schema)}") from None
    except UnicodeDecodeError:
        raise RecordsError(f"{path} is not a UTF-8 text file: it is corrupt or not a CSV file") from None
    except (pd.errors.ParserError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise RecordsError(f"{path} is not a valid CSV file: {reason}") from None
    except OSError as exc:
        raise RecordsError(f"{path} cannot be read: {exc.strerror or exc}") from None
    missing = [c.name for c in schema if c.name not in frame.columns]
    if missing:
        raise RecordsError(
            f"{path} lacks the required column(s) {', '.join(missing)} "
            f"(it has: {', '.join(str(c) for c in frame.columns) or 'none'})"
        )
    parsed = {c.name: _parse_column(path, frame, c) for c in schema}
    extra = [c for c in frame.columns if c not in parsed]
    result = pd.DataFrame({**parsed, **{c: frame[c].astype(str) for c in extra}})
    return result.reset_index(drop=True)


def _keep_first(frame: pd.DataFrame, keys: Sequence[str], path: Path) -> pd.DataFrame:
    """Drop rows that repeat a measurement (the same ``keys``), keeping the first, with a warning."""
    duplicated = frame.duplicated(list(keys), keep="first")
    if duplicated.any():
        warnings.warn(
            f"{path}: {int(duplicated.sum())} row(s) repeat an earlier measurement "
            f"({', '.join(keys)}); the first one of each is used",
            stacklevel=3,
        )
        frame = frame.loc[~duplicated].reset_index(drop=True)
    return frame


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check ``results.csv`` (one row per cell, eval eps and metric; see :data:`RESULTS_COLUMNS`).

    Accuracy metrics (:data:`ACCURACY_METRICS`) must lie in [0, 1]. Metric names outside :data:`METRICS` are
    kept (the reports ignore them). The same cell, eval eps and metric may appear with different ``n`` (the
    eps sweep measuring the training eps again on its subset; :func:`cell_rows` tells them apart); a row that
    repeats one with the same ``n`` too is dropped with a warning (the first is kept).
    """
    frame = _read_table(path, RESULTS_SCHEMA)
    accuracy = frame["metric"].isin(ACCURACY_METRICS).to_numpy()
    values = frame["value"].to_numpy()
    with np.errstate(invalid="ignore"):
        outside = accuracy & ((values < 0.0) | (values > 1.0))
    if outside.any():
        position = int(np.flatnonzero(outside)[0])
        raise _bad_cell(Path(path), _line(position), "value", str(values[position]),
                        f"is outside [0, 1] but {frame['metric'].iloc[position]} is an accuracy (a fraction)")
    return _keep_first(frame, [*RUN_KEYS, "eval_eps", "metric", "n"], Path(path))


def read_epochs(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and check ``epochs.csv`` (one row per cell and epoch; see :data:`EPOCHS_COLUMNS`).

    ``train_time_s`` is the cumulative training time at the end of the epoch (evaluation excluded); the
    monitoring accuracies (``clean_acc``, ``pgd_acc``, ``verified_acc`` on ``n_val`` test samples) and the
    loss parts are NaN where a trainer does not measure them. A repeated epoch keeps its first row (with a
    warning).
    """
    frame = _read_table(path, EPOCHS_SCHEMA)
    return _keep_first(frame, [*RUN_KEYS, "epoch"], Path(path))


@dataclass(frozen=True, eq=False)
class RunRecords:
    """A benchmark run folder's records: ``results`` and ``epochs`` as read by :func:`read_results` and
    :func:`read_epochs`."""

    run_dir: Path
    results: pd.DataFrame
    epochs: pd.DataFrame


def load_run(run_dir: str | os.PathLike[str]) -> RunRecords:
    """Read ``results.csv`` and ``epochs.csv`` of the run folder ``run_dir``."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RecordsError(f"the run folder {folder} does not exist or is not a folder")
    return RunRecords(folder, read_results(folder / RESULTS_FILE), read_epochs(folder / EPOCHS_FILE))


def _cell_mask(results: pd.DataFrame) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which rows are a cell's own measurements: at eval eps = train eps and, where the eps sweep measured the
    training eps again on its subset, the row over the most samples (on a tie, the first)."""
    at_train = np.isclose(results["eval_eps"].to_numpy(dtype=float), results["train_eps"].to_numpy(dtype=float),
                          rtol=0.0, atol=_EPS_TOLERANCE)
    candidates = results.loc[at_train, [*RUN_KEYS, "metric"]].assign(
        _position=np.flatnonzero(at_train), _n=results.loc[at_train, "n"].fillna(-1.0).to_numpy(),
    )
    candidates = candidates.sort_values(["_n", "_position"], ascending=[False, True], kind="stable")
    chosen = candidates.drop_duplicates([*RUN_KEYS, "metric"], keep="first")["_position"].to_numpy()
    mask = np.zeros(len(results), dtype=bool)
    mask[chosen] = True
    return mask


def cell_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The cells' own measurements, one per cell, seed and metric, at eval eps = train eps over all n test samples:
    the summary's numbers. Where the eps sweep measured the training eps too (on a subset, so with a smaller
    ``n``), the row with the largest ``n`` is the cell's and the other belongs to :func:`sweep_rows`."""
    return results.loc[_cell_mask(results)]


def sweep_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The eps sweep: every row that is not one of :func:`cell_rows` (rows with eval eps != train eps, and
    repeated measurements at the training eps on the sweep's subset), one per cell, eval eps and metric."""
    rest = results.loc[~_cell_mask(results)]
    return rest.drop_duplicates([*RUN_KEYS, "eval_eps", "metric"], keep="first")


def ordered_unique(values: Iterable[Hashable]) -> list[Any]:
    """The distinct values in order of first appearance.

    >>> ordered_unique(["pgd", "standard", "pgd"])
    ['pgd', 'standard']
    """
    return list(dict.fromkeys(values))


def format_eps(eps: float) -> str:
    """A radius as people write it: ``0.1``, or ``2/255`` for a multiple of 1/255 that has no short decimal.

    >>> format_eps(0.1), format_eps(2 / 255), format_eps(0.2), format_eps(0.0)
    ('0.1', '2/255', '0.2', '0')
    """
    short = f"{eps:g}"
    steps = eps * 255
    if len(short.lstrip("0.")) > 4 and abs(steps - round(steps)) < 1e-6 and round(steps) > 0:
        return f"{round(steps)}/255"
    return short
