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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from robustkit.cli import Command
from robustkit.cli.options import (
    DataArgs,
    ModelArgs,
    PositiveFloat,
    accepts_option,
    data_options,
    eps_option,
    global_options,
    load_cli_model,
    load_eval_data,
    method_option,
    model_options,
    out_option,
    output_folder,
)
from robustkit.verifiers import VERIFIERS, Status

if TYPE_CHECKING:
    from torch import Tensor

    from robustkit.evaluation import EvalData, MethodRun
    from robustkit.verifiers import Verifier

TIME_LIMIT_OPTION = "time_limit"
COMMON_COLUMNS = ("dataset", "model", "checkpoint", "trainer", "method", "eps", "seed", "n")
SAMPLE_COLUMNS = (
    *COMMON_COLUMNS, "index", "label", "prediction", "status", "margin_lower", "time_s", "robustkit_version",
)
SUMMARY_COLUMNS = (
    *COMMON_COLUMNS, "clean_acc", "verified_acc", *(f"n_{s.value}" for s in Status), "time_s",
    "time_per_sample_s", "robustkit_version",
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


def _verified_count(run: MethodRun, labels: Tensor) -> int:
    return int(run.verified(labels).sum())


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
            f"{run.count(Status.UNKNOWN)}/{run.count(Status.TIMEOUT)}/{run.count(Status.MEMORY)}",
            f"{float(run.time_s.sum()) / n:.3g}s",
        ])
    headers = ["method", "eps", "clean acc", "verified acc", "falsified", "unknown/timeout/memory", "time/sample"]
    return format_table(headers, rows)


@click.command("verify", cls=Command)
@model_options
@data_options
@eps_option()
@method_option(VERIFIERS, "verifier")
@click.option("--timeout", type=PositiveFloat(), metavar="S",
              help="Time limit in seconds per sample for methods that take one (the complete verifiers exact and bab).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Worker processes for the per-sample work (each gets an equal share of the torch threads).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Run the per-sample work on an existing Dask cluster (e.g. tcp://host:8786) instead of local "
                   "workers; needs the cluster extra (dask[distributed]).")
@click.option("--resume", is_flag=True,
              help="Continue a killed run into the same --out: samples already finished are not run again.")
@out_option("verify")
@click.pass_context
def verify(
    ctx: click.Context,
    model_args: ModelArgs,
    data_args: DataArgs,
    eps: list[float],
    methods: list[str],
    timeout: float | None,
    workers: int,
    scheduler: str | None,
    resume: bool,
    out: Path | None,
) -> None:
    """Verify a model's robustness on test samples with one or more bound methods.

    Prints clean and verified accuracy, falsified, unknown and timed-out counts and the time per sample for
    every method and eps, and writes verify.csv (per sample) and summary.csv to --out. Verified accuracy
    counts over all samples: misclassified ones are never verified. A sample verified by one method and
    falsified by another is a soundness bug: it is reported and the exit code is 1.

    Every finished sample (or batch, for relaxation methods alone) is kept in --out's verify.parts folder as
    it finishes, so a killed run continues with --resume; the folder is removed once the results are written.
    --workers N runs the samples in N processes, --scheduler on a Dask cluster; results are the same, in
    sample order.

    Example: robustkit verify --model mnist_small --checkpoint w.pt --eps 0.1,0.3 --method interval,crown
    """
    import shutil

    import torch

    from robustkit.evaluation import find_conflicts, predict, run_verifiers
    from robustkit.parallel import TaskStore
    from robustkit.runlock import run_lock

    if resume and out is None:
        raise click.UsageError("--resume needs --out: the folder of the run to continue")
    if scheduler is not None and workers != 1:
        raise click.UsageError("--workers and --scheduler exclude each other: the cluster has its own workers")

    options = global_options(ctx)
    data = load_eval_data(data_args)
    model = load_cli_model(model_args, data.dataset, options)
    predict(model, data)  # a model with NaN or infinite logits on these samples fails here, in one line
    verifiers = make_verifiers(methods, timeout)
    if timeout is not None and not any(accepts_option(VERIFIERS[m], TIME_LIMIT_OPTION) for m in methods):
        click.echo(f"Note: --timeout is ignored: none of {', '.join(methods)} takes a time limit.", err=True)

    # before the long part, so that a bad --out fails at once
    with output_folder(out, "verify") as folder:
        ctx.with_resource(run_lock(folder, "robustkit verify" + (" --resume" if resume else "")))
        settings = {"model": model_args.spec, "checkpoint": str(model_args.checkpoint), "dataset": data.dataset.name,
                    "start": data.start, "n": data.n, "batch_size": data.batch_size, "methods": list(methods),
                    "eps": [float(e) for e in eps], "timeout": timeout, "seed": options.seed,
                    "mean": model_args.mean, "std": model_args.std}
        parts = folder / "verify.parts"
        store = TaskStore(parts, settings, resume)
        threads = max(1, torch.get_num_threads() // workers) if scheduler is None else 1
        runs = run_verifiers(model, data, verifiers, eps, workers=workers, scheduler=scheduler, store=store,
                             threads=threads)
        conflicts = find_conflicts(runs, data)
        write_results(folder, runs, data, model_args, options.seed)
        shutil.rmtree(parts, ignore_errors=True)

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
