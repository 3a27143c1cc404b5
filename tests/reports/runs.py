"""Synthetic benchmark run folders shaped like the output of ``robustkit bench``, with known numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from robustkit.reports.records import EPOCHS_COLUMNS, RESULTS_COLUMNS

GROUP = ("mnist5k", "mnist_small", 0.1)
SMALL_GROUP = ("mnist5k", "mnist_fc", 0.3)
N_TEST = 1000
N_SWEEP = 200
N_VAL = 200
EPOCHS = 4
SWEEP_EPS = (0.05, 0.2)
# a configuration with characters that must be escaped in HTML and quoted in CSV
CONFIG = '{"note": "<script>alert(\'x\')</script> & \\"co\\"", "lr": 0.001}'

TRAINERS = {  # label -> registry name
    "standard": "standard",
    "pgd": "pgd",
    "verifiable-symbolic": "verifiable",
    "verifiable-interval": "verifiable",
    "mixtrain": "mixtrain",
}
ACCURACY_ORDER = (
    "clean_acc", "pgd_acc", "cw_acc", "interval_attack_acc", "worst_attack_acc", "verified_interval",
    "verified_symbolic", "verified_crown", "verified_best",
)
# label -> (accuracies in ACCURACY_ORDER, train_time_s)
CELLS = {
    "standard": ((0.989, 0.021, 0.013, 0.004, 0.002, 0.0, 0.0, 0.001, 0.001), 30.0),
    "pgd": ((0.985, 0.931, 0.925, 0.912, 0.905, 0.0, 0.124, 0.301, 0.301), 95.0),
    "verifiable-symbolic": ((0.975, 0.953, 0.951, 0.950, 0.948, 0.900, 0.952, 0.953, 0.953), 1500.0),
    "verifiable-interval": ((0.980, 0.940, 0.939, 0.935, 0.930, 0.922, 0.925, 0.926, 0.926), 120.0),
    "mixtrain": ((0.984, 0.955, 0.951, 0.952, 0.950, 0.910, 0.951, 0.955, 0.955), 100.0),
}
SMALL_CELLS = {
    "standard": ((0.97, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), 12.0),
    "pgd": ((0.91, 0.62, 0.60, 0.58, 0.57, 0.0, 0.02, 0.05, 0.05), 48.0),
}
EXACT = {"mixtrain": 0.962}  # verified_exact is only run where asked
# the undecided band (verified_complete, falsified, undecided) in the main group only: the small group stands for
# a run made before the bench's complete stage; every cell's band went to bab with 2 s per sample
BAND_ORDER = ("verified_complete", "falsified", "undecided")
BAND = {"standard": (0.002, 0.998, 0.0), "pgd": (0.652, 0.295, 0.053), "verifiable-symbolic": (0.948, 0.052, 0.0),
        "verifiable-interval": (0.928, 0.070, 0.002), "mixtrain": (0.950, 0.050, 0.0)}
BAND_CONFIG = json.dumps({"method": "bab", "time_limit": 2.0, "band": 604})
# autoattack_acc in the main group only: the small group stands for a run made before the bench measured it
AUTOATTACK = {"standard": 0.002, "pgd": 0.906, "verifiable-symbolic": 0.949, "verifiable-interval": 0.931,
              "mixtrain": 0.951}


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def sweep_value(label: str, metric: str, eval_eps: float) -> float:
    """A smooth made-up accuracy at ``eval_eps`` for the eps sweep (decreasing in eps, clean constant)."""
    base = dict(zip(ACCURACY_ORDER, CELLS[label][0], strict=True))[metric]
    if metric == "clean_acc":
        return round(base - 0.01, 3)  # the subset's clean accuracy differs from the full test split's
    return round(min(1.0, max(0.0, base - 0.01 + 0.5 * (0.1 - eval_eps))), 3)


def results_rows(order: list[str] | None = None, sweep_eps: tuple[float, ...] = SWEEP_EPS) -> list[list[object]]:
    """Rows of results.csv (with one extra column, ``host``), cells in ``order`` (default: TRAINERS).

    The eps sweep follows each cell's own rows, as ``robustkit bench`` writes it; a sweep point at the training
    eps (0.1) repeats clean, PGD and verified accuracy there on the sweep's subset of N_SWEEP samples.
    """
    rows: list[list[object]] = []

    def add(group, label, eval_eps, metric, value, n, time_s, config=CONFIG):
        dataset, model, train_eps = group
        rows.append([dataset, model, label, TRAINERS[label], train_eps, eval_eps, metric, value, n, time_s, 0,
                     "0.1.0", "2.13.0", config, "node-1"])

    for label in order or list(TRAINERS):
        accuracies, train_time = CELLS[label]
        for metric, value in zip(ACCURACY_ORDER, accuracies, strict=True):
            add(GROUP, label, 0.1, metric, value, N_TEST, 1.5)
        if label in EXACT:
            add(GROUP, label, 0.1, "verified_exact", EXACT[label], N_TEST, 300.0)
        add(GROUP, label, 0.1, "autoattack_acc", AUTOATTACK[label], N_TEST, 120.0)
        for metric, value in zip(BAND_ORDER, BAND[label], strict=True):
            add(GROUP, label, 0.1, metric, value, N_TEST, 60.0 if metric == BAND_ORDER[0] else 0.0, BAND_CONFIG)
        add(GROUP, label, 0.1, "train_time_s", train_time, N_TEST, train_time)
        add(GROUP, label, 0.1, "eval_time_s", 42.0, N_TEST, 42.0)
        add(GROUP, label, 0.1, "peak_memory_mb", 512.5, N_TEST, float("nan"))
        add(GROUP, label, 0.1, "epochs", float(EPOCHS), N_TEST, float("nan"))
        for eval_eps in sweep_eps:
            for metric in ("clean_acc", "pgd_acc", "verified_symbolic", "verified_interval"):
                add(GROUP, label, eval_eps, metric, sweep_value(label, metric, eval_eps), N_SWEEP, 0.5)
    for label, (accuracies, train_time) in SMALL_CELLS.items():
        for metric, value in zip(ACCURACY_ORDER, accuracies, strict=True):
            add(SMALL_GROUP, label, 0.3, metric, value, 500, 0.7)
        add(SMALL_GROUP, label, 0.3, "train_time_s", train_time, 500, train_time)
    return rows


def epoch_rows() -> list[list[object]]:
    """Rows of epochs.csv (with one extra column, ``note``)."""
    nan = float("nan")
    rows: list[list[object]] = []
    for group, cells in ((GROUP, CELLS), (SMALL_GROUP, SMALL_CELLS)):
        dataset, model, train_eps = group
        for label, (accuracies, train_time) in cells.items():
            robust = TRAINERS[label] in ("verifiable", "mixtrain")
            for epoch in range(1, EPOCHS + 1):
                fraction = epoch / EPOCHS
                weight = {"mixtrain": min(0.6, 0.1 * 2.5 ** (epoch - 1)), "verifiable": 1.0 - 0.1 * epoch}.get(
                    TRAINERS[label], nan)
                rows.append([
                    dataset, model, label, TRAINERS[label], train_eps, 0, epoch, train_time * fraction,
                    train_time / EPOCHS, 1.5 / epoch, 1.0 / epoch, 2.0 / epoch if robust else nan, weight,
                    train_eps * min(1.0, fraction * 2), 0.001, 0.9 + 0.02 * fraction, accuracies[0] * fraction,
                    accuracies[1] * fraction, accuracies[6] * fraction, N_VAL, 0.8, "ok",
                ])
    return rows


def make_run(folder: Path, order: list[str] | None = None, sweep_eps: tuple[float, ...] = SWEEP_EPS) -> Path:
    """Write results.csv and epochs.csv into ``folder`` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "results.csv", [*RESULTS_COLUMNS, "host"],
           [[_value(v) for v in row] for row in results_rows(order, sweep_eps)])
    _write(folder / "epochs.csv", [*EPOCHS_COLUMNS, "note"], [[_value(v) for v in row] for row in epoch_rows()])
    return folder
