"""``robustkit vnnlib`` and ``robustkit vnnlib-export``: VNN-COMP instances, decided and written.

``robustkit vnnlib NETWORK PROPERTY`` decides one instance (:func:`robustkit.vnncomp.solve_instance`) and prints
its result as the last line of stdout; ``--out`` writes the VNN-COMP result file. ``robustkit vnnlib --instances
instances.csv --out results.csv`` runs a whole benchmark: every finished instance is kept as a small file in
``results.csv.parts/`` as it finishes and ``results.csv`` is rebuilt after each one, so a killed run continues
with ``--resume``. ``robustkit vnnlib-export`` writes a robustness benchmark of a model
(:func:`robustkit.vnncomp.write_robustness_benchmark`).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from robustkit.cli import Command, UserError
from robustkit.cli.options import (
    DataArgs,
    ModelArgs,
    PositiveFloat,
    eps_option,
    global_options,
    load_cli_model,
    load_eval_data,
    model_options,
    out_option,
    output_folder,
)
from robustkit.data import DATASETS
from robustkit.errors import InputError, RobustkitError
from robustkit.verifiers import VERIFIERS

RESULT_COLUMNS = ("onnx", "vnnlib", "result", "seconds")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_METHOD = "bab"


def part_path(parts: Path, index: int) -> Path:
    """The file that holds the result of instance ``index`` (0-based, in the CSV's order) of a run."""
    return parts / f"{index:05d}.json"


def _shown(path: Path, root: Path) -> str:
    """``path`` as the instances file names it: relative to the root when it lies under it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _stored_row(part: Path, onnx: str, vnnlib: str, method: str) -> list[str] | None:
    """The results row kept in ``part``, None when there is none; a part of another run is an error."""
    try:
        stored = json.loads(part.read_text())
        row = [str(stored["onnx"]), str(stored["vnnlib"]), str(stored["result"]), str(stored["seconds"])]
        their_method = str(stored["method"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, or damaged (parts are written atomically, so not by a run of ours): run it again
    if row[:2] != [onnx, vnnlib] or their_method != method:
        raise InputError(f"--resume: {part} holds {row[0]}, {row[1]} with {their_method}, not {onnx}, {vnnlib} with "
                         f"{method}: use the same instances and --method, or delete {part.parent}")
    return row


def _solve_task(context: tuple[str, str], task: tuple[str, str, float]) -> dict[str, Any]:
    """One instance of a ``--instances`` run (in this process or a worker): its result word, seconds and, for
    an instance whose files are broken, the one-line message (result ``error``)."""
    from robustkit.vnncomp import solve_instance

    method, device = context
    network, prop, timeout = task
    start = time.perf_counter()
    try:
        found = solve_instance(Path(network), Path(prop), timeout, method=method, device=device)
    except RobustkitError as exc:
        return {"result": "error", "seconds": time.perf_counter() - start, "message": " ".join(str(exc).split())}
    return {"result": found.result, "seconds": found.seconds, "message": ""}


def _run_instances(ctx: click.Context, instances_csv: Path, root: Path | None, method: str, out: Path,
                   resume: bool, workers: int = 1, scheduler: str | None = None) -> None:
    import torch

    from robustkit.io import atomic_write_text, write_csv
    from robustkit.parallel import iter_tasks
    from robustkit.runlock import run_lock
    from robustkit.runtime import resolve_device
    from robustkit.vnncomp import read_instances

    options = global_options(ctx)
    device = resolve_device(options.device)  # an unusable device fails the command, not every instance
    instances = read_instances(instances_csv, root)
    base = instances_csv.parent if root is None else root
    parts = out.with_name(out.name + ".parts")
    if parts.exists() and not parts.is_dir():
        raise UserError(f"{parts} is not a folder: it is where the results of each instance are kept")
    if not resume and parts.is_dir() and any(parts.glob("*.json")):
        raise UserError(f"{parts} holds results of an earlier run: pass --resume to continue it, or delete the "
                        "folder to start over")

    def note(message: str) -> None:
        click.echo(f"Note: {message}", err=True)

    rows: dict[int, list[str]] = {}
    resumed = 0
    with run_lock(parts, f"robustkit vnnlib --instances {instances_csv}", on_note=note):
        todo, names = [], {}
        for index, instance in enumerate(instances):
            onnx, vnnlib = _shown(instance.onnx, base), _shown(instance.vnnlib, base)
            names[index] = (onnx, vnnlib)
            stored = _stored_row(part_path(parts, index), onnx, vnnlib, method) if resume else None
            if stored is not None:
                rows[index] = stored
                resumed += 1
            else:
                todo.append(index)
        tasks = [(str(instances[i].onnx), str(instances[i].vnnlib), instances[i].timeout) for i in todo]
        threads = max(1, torch.get_num_threads() // workers) if scheduler is None else 1
        for position_in_todo, found in iter_tasks(_solve_task, (method, str(device)), tasks,
                                                  [str(i) for i in todo], workers=workers, scheduler=scheduler,
                                                  threads=threads):
            index = todo[position_in_todo]
            onnx, vnnlib = names[index]
            part = part_path(parts, index)
            result, seconds, message = found["result"], found["seconds"], found["message"]
            rows[index] = [onnx, vnnlib, result, format(seconds, ".6g")]
            atomic_write_text(part, json.dumps({"onnx": onnx, "vnnlib": vnnlib, "method": method, "result": result,
                                                "seconds": rows[index][3], "message": message}) + "\n")
            write_csv(out, RESULT_COLUMNS, [rows[i] for i in sorted(rows)])
            position = f"[{index + 1}/{len(instances)}] {onnx} {vnnlib}"
            if message:
                click.echo(f"{position}: error: {message}", err=True)
            elif not options.quiet:
                click.echo(f"{position}: {result} in {seconds:.3g} s", err=True)
        write_csv(out, RESULT_COLUMNS, [rows[i] for i in sorted(rows)])
        for index in rows:
            part_path(parts, index).unlink(missing_ok=True)
    with suppress(OSError):  # something else was put there: keep it
        parts.rmdir()
    counts = Counter(row[2] for row in rows.values())
    summary = ", ".join(f"{counts[r]} {r}" for r in ("sat", "unsat", "unknown", "timeout", "error") if counts[r])
    earlier = f"; {resumed} finished before, not run again" if resumed else ""
    click.echo(f"{len(instances)} instances ({summary}{earlier}); wrote {out}")


def _run_one(ctx: click.Context, network: Path, prop: Path, method: str, timeout: float, out: Path | None) -> None:
    from robustkit.io import atomic_write_text
    from robustkit.vnncomp import solve_instance
    from robustkit.vnnlib import format_result

    options = global_options(ctx)
    found = solve_instance(network, prop, timeout, method=method, device=options.device)
    if out is not None:
        try:
            atomic_write_text(out, format_result(found.result, found.x, found.y))
        except OSError as exc:
            raise UserError(f"cannot write the result file {out}: {exc.strerror or exc}") from None
    if not options.quiet:
        click.echo(f"{network.name} {prop.name}: {found.result} in {found.seconds:.3g} s ({method}, timeout "
                   f"{timeout:g} s)", err=True)
    click.echo(found.result)


@click.command("vnnlib", cls=Command)
@click.argument("network", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("prop", metavar="[PROPERTY]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--instances", "instances_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="CSV", help="Run every instance of a VNN-COMP instances.csv (rows onnx,vnnlib,timeout).")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Folder the paths of --instances are relative to (default: the CSV's folder).")
@click.option("--method", type=click.Choice(list(VERIFIERS)), default=DEFAULT_METHOD, show_default=True,
              help="The verifier; a complete one (bab, exact) decides, an incomplete one can only prove.")
@click.option("--timeout", type=PositiveFloat(), metavar="S",
              help=f"Time limit in seconds for NETWORK PROPERTY (default {DEFAULT_TIMEOUT_S:g}); --instances "
                   "takes each instance's from the CSV.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="NETWORK PROPERTY: the VNN-COMP result file to write; --instances: the results CSV (required).")
@click.option("--resume", is_flag=True,
              help="--instances: continue a killed run into the same --out; finished instances are not run again.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="--instances: worker processes, each deciding one instance at a time with an equal share of "
                   "the torch threads.")
@click.option("--scheduler", metavar="ADDRESS",
              help="--instances: run the instances on an existing Dask cluster (e.g. tcp://host:8786); needs the "
                   "cluster extra (dask[distributed]).")
@click.pass_context
def vnnlib(ctx: click.Context, network: Path | None, prop: Path | None, instances_csv: Path | None,
           root: Path | None, method: str, timeout: float | None, out: Path | None, resume: bool, workers: int,
           scheduler: str | None) -> None:
    """Decide VNN-LIB properties of ONNX networks: sat (a counterexample), unsat (proven), unknown or timeout.

    With NETWORK PROPERTY the result is the last line of stdout, and --out writes the VNN-COMP result file
    (with the counterexample when sat). Every counterexample is re-checked by a forward pass before sat is
    reported.

    With --instances CSV --out results.csv every instance runs with its own timeout; results.csv has one row
    per instance (onnx, vnnlib, result, seconds), in the CSV's order, rebuilt after each instance. Each finished
    instance is kept in results.csv.parts/ (removed at the end), so a killed run continues with --resume. An
    instance whose files cannot be read gets the result error and the run goes on. --workers N decides N
    instances at a time in worker processes, --scheduler on a Dask cluster.

    Example: robustkit vnnlib net.onnx prop.vnnlib --timeout 120 --out result.txt
    """
    if instances_csv is not None:
        if network is not None:
            raise click.UsageError("NETWORK PROPERTY and --instances exclude each other: give one or the other")
        if out is None:
            raise click.UsageError("--instances needs --out FILE: the results CSV to write")
        if timeout is not None:
            raise click.UsageError("--timeout applies to NETWORK PROPERTY: --instances takes each instance's "
                                   "timeout from the CSV")
        if scheduler is not None and workers != 1:
            raise click.UsageError("--workers and --scheduler exclude each other: the cluster has its own workers")
        _run_instances(ctx, instances_csv, root, method, out, resume, workers, scheduler)
        return
    if network is None or prop is None:
        raise click.UsageError("give NETWORK PROPERTY (an ONNX file and a VNN-LIB file), or --instances CSV")
    for flag, given in (("--root", root is not None), ("--resume", resume), ("--workers", workers != 1),
                        ("--scheduler", scheduler is not None)):
        if given:
            raise click.UsageError(f"{flag} applies to --instances only")
    _run_one(ctx, network, prop, method, DEFAULT_TIMEOUT_S if timeout is None else timeout, out)


def _benchmark_name(spec: str) -> str:
    """A file name for the exported network: the zoo name, the file's stem or the factory's function."""
    text = spec.rsplit(":", 1)[-1] if ":" in spec and not Path(spec).is_file() else Path(spec).name.split(".")[0]
    return re.sub(r"[^\w.+-]", "_", text) or "network"


@click.command("vnnlib-export", cls=Command)
@model_options
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist5k", show_default=True,
              help="Registered dataset (see 'robustkit datasets'); the points are the first of its test split.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Folder with the dataset's files (every dataset except the embedded mnist5k).")
@click.option("--n-examples", type=click.IntRange(min=1), default=100, show_default=True, metavar="N",
              help="Number of test points (the first N).")
@eps_option()
@click.option("--timeout", type=PositiveFloat(), default=DEFAULT_TIMEOUT_S, show_default=True, metavar="S",
              help="Time limit in seconds written for every instance.")
@click.option("--all-points", is_flag=True, help="Also write properties of points the model misclassifies.")
@out_option("vnnlib-export")
@click.pass_context
def vnnlib_export(ctx: click.Context, model_args: ModelArgs, dataset: str, data_dir: Path | None, n_examples: int,
                  eps: list[float], timeout: float, all_points: bool, out: Path | None) -> None:
    """Write a VNN-COMP benchmark of local robustness: the model as ONNX, a VNN-LIB property per test point and
    eps, and instances.csv.

    The model is exported by torch's ONNX exporter and read back to check that it computes the same outputs.
    Each property is sat when some class other than the point's label scores at least as high somewhere in the
    eps-box around it (clipped to [0, 1]); points the model misclassifies are skipped unless --all-points.
    Run the benchmark with: robustkit vnnlib --instances DIR/instances.csv --out results.csv

    Example: robustkit vnnlib-export --model mnist_fc256 --checkpoint w.pt --n-examples 20 --eps 0.02,0.05 --out b
    """
    from robustkit.vnncomp import write_robustness_benchmark

    options = global_options(ctx)
    data = load_eval_data(DataArgs(dataset, data_dir, n_examples))
    model = load_cli_model(model_args, data.dataset, options)
    name = _benchmark_name(model_args.spec)
    with output_folder(out, "vnnlib-export") as folder:
        count = write_robustness_benchmark(model, data.split.x, data.split.y, eps, folder, timeout,
                                           all_points=all_points, name=name)
    points = count // len(eps)
    skipped = "" if all_points else f"; {data.n - points} misclassified point(s) skipped"
    click.echo(f"Wrote {count} instances ({points} test point(s) of {dataset} x {len(eps)} eps{skipped}) to {folder}: "
               f"instances.csv, onnx/{name}.onnx, vnnlib/")
    if count == 0:
        click.echo("Note: every point is misclassified; --all-points writes their properties anyway.", err=True)
