"""``robustkit verify``: verified robust accuracy of a model on test samples, for several methods and radii.

For each method (``--method``, names from :data:`robustkit.verifiers.VERIFIERS`) and each eps, the samples
are verified in batches; the command prints one table row per method and eps and writes ``verify.csv``
(one row per sample, method and eps) and ``summary.csv`` (one row per method and eps) to ``--out``.
Verified accuracy counts over all N samples: a misclassified sample is never verified.

Every pair of methods is cross-checked sample by sample: one method verifying a sample that another falsifies
at the same eps is a soundness bug; it is reported and the command exits with code 1 after writing the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from robustkit.cli import Command
from robustkit.cli.options import (
    DataArgs,
    EvalData,
    ModelArgs,
    accepts_option,
    data_options,
    eps_option,
    global_options,
    load_cli_model,
    load_eval_data,
    method_option,
    model_options,
    out_option,
    output_dir,
)
from robustkit.verifiers import VERIFIERS, Status

if TYPE_CHECKING:
    from torch import Tensor, nn

    from robustkit.verifiers import VerificationResult, Verifier

TIME_LIMIT_OPTION = "time_limit"
COMMON_COLUMNS = ("dataset", "model", "checkpoint", "trainer", "method", "eps", "seed", "n")
SAMPLE_COLUMNS = (
    *COMMON_COLUMNS, "index", "label", "prediction", "status", "margin_lower", "time_s", "robustkit_version",
)
SUMMARY_COLUMNS = (
    *COMMON_COLUMNS, "clean_acc", "verified_acc", *(f"n_{s.value}" for s in Status), "time_s",
    "time_per_sample_s", "robustkit_version",
)


@dataclass(frozen=True, eq=False)
class MethodRun:
    """One method at one eps on all N samples (the batches' results joined)."""

    method: str
    eps: float
    status: tuple[Status, ...]
    margin_lower: Tensor
    prediction: Tensor
    time_s: Tensor

    def count(self, status: Status) -> int:
        """How many samples ended with ``status``."""
        return sum(s is status for s in self.status)


@dataclass(frozen=True)
class Conflict:
    """A sample that one method verified and another falsified at the same eps: a soundness bug."""

    index: int
    label: int
    eps: float
    verified_by: tuple[str, ...]
    falsified_by: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"soundness bug: test sample {self.index} (label {self.label}) at eps {self.eps:g} is verified by "
            f"{', '.join(self.verified_by)} but falsified by {', '.join(self.falsified_by)}"
        )


def make_verifiers(methods: Sequence[str], timeout: float | None) -> dict[str, Verifier]:
    """Instances of the named verifiers; ``timeout`` goes to those that take a ``time_limit``."""
    from robustkit.verifiers import get_verifier

    verifiers: dict[str, Verifier] = {}
    for name in methods:
        options: dict[str, Any] = {}
        if timeout is not None and accepts_option(VERIFIERS[name], TIME_LIMIT_OPTION):
            options[TIME_LIMIT_OPTION] = timeout
        verifiers[name] = get_verifier(name, **options)
    return verifiers


def run_method(
    model: nn.Module, data: EvalData, name: str, verifier: Verifier, eps_list: Sequence[float]
) -> list[MethodRun]:
    """Verify every sample with one method at every eps, batch by batch, with one progress bar."""
    import torch

    from robustkit.progress import progress

    steps = [(eps, batch) for eps in eps_list for batch in data.batches()]
    parts: dict[float, list[VerificationResult]] = {eps: [] for eps in eps_list}
    for eps, (_, x, y) in progress(steps, desc=f"verify {name}", unit="batch"):
        parts[eps].append(verifier.verify(model, x, y, eps))
    runs = []
    for eps, results in parts.items():
        runs.append(MethodRun(
            method=name,
            eps=eps,
            status=tuple(s for r in results for s in r.status),
            margin_lower=torch.cat([r.margin_lower.detach().cpu() for r in results]),
            prediction=torch.cat([r.prediction.detach().cpu() for r in results]),
            time_s=torch.cat([r.time_s.detach().cpu() for r in results]),
        ))
    return runs


def find_conflicts(runs: Sequence[MethodRun], data: EvalData) -> list[Conflict]:
    """Samples verified by one method and falsified by another at the same eps."""
    conflicts = []
    for eps in dict.fromkeys(r.eps for r in runs):
        same_eps = [r for r in runs if r.eps == eps]
        for position, index in enumerate(data.indices):
            verified = tuple(r.method for r in same_eps if r.status[position] is Status.VERIFIED)
            falsified = tuple(r.method for r in same_eps if r.status[position] is Status.FALSIFIED)
            if verified and falsified:
                label = int(data.split.y[position])
                conflicts.append(Conflict(index, label, eps, verified, falsified))
    return conflicts


def _verified_count(run: MethodRun, labels: Tensor) -> int:
    correct = (run.prediction == labels).tolist()
    return sum(s is Status.VERIFIED and c for s, c in zip(run.status, correct, strict=True))


def write_results(out: Path, runs: Sequence[MethodRun], data: EvalData, model_args: ModelArgs, seed: int) -> None:
    """``verify.csv`` (one row per sample, method and eps) and ``summary.csv`` (one row per method and eps)."""
    from robustkit import __version__
    from robustkit.io import write_csv

    checkpoint = "" if model_args.checkpoint is None else str(model_args.checkpoint)
    labels = data.split.y
    sample_rows: list[list[Any]] = []
    summary_rows: list[list[Any]] = []
    for run in runs:
        common = [data.dataset.name, model_args.spec, checkpoint, "", run.method, run.eps, seed, data.n]
        columns = zip(
            data.indices, labels.tolist(), run.prediction.tolist(), run.status, run.margin_lower.tolist(),
            run.time_s.tolist(), strict=True,
        )
        for index, label, prediction, status, margin, seconds in columns:
            sample_rows.append([
                *common, index, label, prediction, status.value, format(margin, ".9g"), format(seconds, ".6g"),
                __version__,
            ])
        total_time = float(run.time_s.sum())
        summary_rows.append([
            *common,
            format(float((run.prediction == labels).float().mean()), ".6g"),
            format(_verified_count(run, labels) / data.n, ".6g"),
            *(run.count(status) for status in Status),
            format(total_time, ".6g"),
            format(total_time / data.n, ".6g"),
            __version__,
        ])
    write_csv(out / "verify.csv", SAMPLE_COLUMNS, sample_rows)
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows)


def format_summary(runs: Sequence[MethodRun], labels: Tensor) -> str:
    """The terminal table: one row per method and eps."""
    from robustkit.reports.tables import format_table

    rows = []
    for run in runs:
        n = len(run.status)
        rows.append([
            run.method,
            f"{run.eps:g}",
            f"{100 * float((run.prediction == labels).float().mean()):.1f}%",
            f"{100 * _verified_count(run, labels) / n:.1f}%",
            str(run.count(Status.FALSIFIED)),
            f"{run.count(Status.UNKNOWN)}/{run.count(Status.TIMEOUT)}",
            f"{float(run.time_s.sum()) / n:.3g}s",
        ])
    headers = ["method", "eps", "clean acc", "verified acc", "falsified", "unknown/timeout", "time/sample"]
    return format_table(headers, rows)


@click.command("verify", cls=Command)
@model_options
@data_options
@eps_option()
@method_option(VERIFIERS, "verifier")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Time limit in seconds per sample for methods that take one (the exact verifier).")
@out_option("verify")
@click.pass_context
def verify(
    ctx: click.Context,
    model_args: ModelArgs,
    data_args: DataArgs,
    eps: list[float],
    methods: list[str],
    timeout: float | None,
    out: Path | None,
) -> None:
    """Verify a model's robustness on test samples with one or more bound methods.

    Prints clean and verified accuracy, falsified, unknown and timed-out counts and the time per sample for
    every method and eps, and writes verify.csv (per sample) and summary.csv to --out. Verified accuracy
    counts over all samples: misclassified ones are never verified. A sample verified by one method and
    falsified by another is a soundness bug: it is reported and the exit code is 1.

    Example: robustkit verify --model mnist_small --checkpoint w.pt --eps 0.1,0.3 --method interval,crown
    """
    options = global_options(ctx)
    data = load_eval_data(data_args)
    model = load_cli_model(model_args, data.dataset, options)
    verifiers = make_verifiers(methods, timeout)
    if timeout is not None and not any(accepts_option(VERIFIERS[m], TIME_LIMIT_OPTION) for m in methods):
        click.echo(f"Note: --timeout is ignored: none of {', '.join(methods)} takes a time limit.", err=True)

    folder = output_dir(out, "verify")  # before the long part, so that a bad --out fails at once

    runs = [run for name, verifier in verifiers.items() for run in run_method(model, data, name, verifier, eps)]
    conflicts = find_conflicts(runs, data)
    write_results(folder, runs, data, model_args, options.seed)

    click.echo(format_summary(runs, data.split.y))
    click.echo(
        f"{data.n} test samples of {data.dataset.name} (indices {data.start} to {data.start + data.n - 1}); "
        "verified accuracy counts all of them: misclassified samples are not verified."
    )
    click.echo(f"Wrote {folder / 'verify.csv'} and {folder / 'summary.csv'}.")
    if conflicts:
        for conflict in conflicts:
            click.echo(f"Error: {conflict}", err=True)
        raise click.ClickException(
            f"{len(conflicts)} soundness conflict(s) between methods (listed above); results are in {folder}"
        )
