"""``robustkit bench``: train and evaluate the grid of a configuration and write the paper-style report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from robustkit.cli import Command
from robustkit.cli.options import global_options, output_dir

if TYPE_CHECKING:
    from robustkit.bench import CellOutcome


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def _cell_line(outcome: CellOutcome, position: int, total: int) -> str:
    cell = outcome.cell
    parts = [
        f"[{position}/{total}] {cell.dataset} {cell.model} {cell.trainer.label} eps {cell.eps:g} seed {cell.seed}:",
        f"clean {_percent(outcome.metric('clean_acc'))}",
        f"pgd {_percent(outcome.metric('pgd_acc'))}",
        f"worst attack {_percent(outcome.metric('worst_attack_acc'))}",
        f"verified {_percent(outcome.metric('verified_best'))}",
        f"train {outcome.metric('train_time_s'):.0f}s",
        f"eval {outcome.metric('eval_time_s'):.0f}s",
    ]
    if outcome.reused:
        parts.append("(finished earlier, reused)")
    return " ".join(parts)


def _parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as a tuple of distinct integers (a usage error otherwise)."""
    from robustkit.bench.config import check_seeds
    from robustkit.errors import InputError

    try:
        values = [int(part) for part in text.split(",")]
        return check_seeds(values, "--seeds")
    except (ValueError, InputError) as exc:
        raise click.BadParameter(f"{text!r}: give distinct integers separated by commas, e.g. 0,1,2 ({exc})",
                                 param_hint="--seeds") from None


def _report_cell(outcome: CellOutcome, position: int, total: int) -> None:
    """The cell's line on stdout, then its pre-flight warnings, one ``Warning: <cell>: ...`` line each on stderr."""
    click.echo(_cell_line(outcome, position, total))
    for warning in outcome.warnings:
        click.echo(f"Warning: {outcome.cell.key}: {warning}", err=True)


def _check_jobs(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    text = value.strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{value!r} is neither a whole number >= 1 nor 'auto'")
    return int(text)


def _threads_text() -> str:
    """", 2 torch threads (free cores, passive wait)" for the header line."""
    import torch

    from robustkit.threads import current

    setting = current()
    how = f" ({setting.source}, {setting.wait_policy} wait)" if setting else ""
    return f", {torch.get_num_threads()} torch thread(s){how}"


@click.command("bench", cls=Command)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE.toml",
              help="A benchmark configuration (see examples/bench.toml); default: the preset.")
@click.option("--preset", "preset_name", default=None, metavar="NAME",
              help="A built-in configuration: paper (default) or quick.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default runs/bench-<date-time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out: finished cells are kept.")
@click.option("--seed", type=int, default=None, help="Seed for training and evaluation (overrides the config).")
@click.option("--seeds", "seed_list", default=None, metavar="S,S,...",
              help="Run every cell once per seed (e.g. 0,1,2; overrides the config's seed or seeds): summary.md "
                   "shows the mean, the spread and a t interval over the seeds.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (overrides the root --device).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the files of datasets read from disk (overrides data.data_dir).")
@click.option("--jobs", default="1", metavar="N|auto", callback=_check_jobs,
              help="Cells trained and evaluated at once, each in its own process with an equal share of the torch "
                   "threads, the longest first; the last cells share the threads of the workers that have finished "
                   "(CPU only); auto: the cores other processes leave free, at most 4 (1 on a busy machine). "
                   "Default: the configuration's run.jobs (the paper preset: auto; otherwise 1).")
@click.option("--eval-workers", default="auto", show_default=True, metavar="N|auto", callback=_check_jobs,
              help="Processes that share a cell's evaluation batches (attacks, verifiers, sweep) and the torch "
                   "threads, when cells run one at a time (CPU only); auto: one per torch thread. The results do "
                   "not depend on it.")
@click.pass_context
def bench(ctx: click.Context, config_file: str | None, preset_name: str | None, out: Path | None, resume: bool,
          seed: int | None, seed_list: str | None, device: str | None, data_dir: str | None,
          jobs: int | None, eval_workers: int | None) -> None:
    """Train every trainer of the grid, evaluate each model with attacks and verifiers, and report.

    Writes results.csv (one row per cell and measurement), epochs.csv (training curves), summary.csv,
    summary.md, plots (PNG and PDF) and index.html to --out. Accuracies count every test sample; a
    clean-misclassified sample is broken and not verified. Any sample verified but broken by an attack is a
    soundness error: it is printed and the exit code is 1. Pre-flight warnings (signs of gradient masking)
    are printed per cell on stderr and recorded as preflight_* metrics.
    """
    import dataclasses

    from robustkit.bench import load_config, preset, run_bench
    from robustkit.progress import set_log
    from robustkit.runtime import resolve_device

    options = global_options(ctx)
    set_log(True)  # one line per epoch, stage and cell when stderr is no terminal (not under --quiet)
    ctx.call_on_close(lambda: set_log(False))
    if config_file is not None and preset_name is not None:
        raise click.UsageError("give either --config or --preset, not both")
    config = load_config(config_file) if config_file is not None else preset(preset_name or "paper")
    root = ctx.find_root()
    if seed is None and root.get_parameter_source("seed") is click.core.ParameterSource.COMMANDLINE:
        seed = options.seed  # robustkit --seed S bench ...
    if seed is not None and seed_list is not None:
        raise click.UsageError("give either --seed or --seeds, not both")
    if seed is not None:
        config = dataclasses.replace(config, seeds=(seed,))
    if seed_list is not None:
        config = dataclasses.replace(config, seeds=_parse_seeds(seed_list))
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    chosen_device = str(resolve_device(device if device is not None else options.device))
    if resume and out is None:
        raise click.UsageError("--resume needs the --out folder of the run to continue")
    folder = out if out is not None else output_dir(None, "bench")
    header = (f"robustkit bench: {config.source}, {len(config.trainers)} trainer(s) x {len(config.models)} "
              f"model(s) x {len(config.datasets)} dataset(s) x {len(config.eps)} eps x {len(config.seeds)} seed(s) "
              f"({', '.join(map(str, config.seeds))}), device {chosen_device}{_threads_text()}, "
              f"into {folder}")
    if ctx.get_parameter_source("jobs") is not click.core.ParameterSource.COMMANDLINE:
        jobs = config.jobs  # the configuration's run.jobs (the paper preset: auto)
    run = run_bench(config, folder, resume=resume, device=chosen_device, on_cell=_report_cell, jobs=jobs,
                    eval_workers=eval_workers,
                    on_note=lambda note: click.echo(f"Note: {note}.", err=True),
                    on_start=lambda: click.echo(header))
    summary = folder / "summary.md"
    if summary.is_file():
        click.echo("")
        click.echo(summary.read_text().rstrip())
    click.echo(f"\nWrote {len(run.report_files)} report files; open {folder / 'index.html'}")
    if run.violations:
        for violation in run.violations:
            click.echo(f"Error: {violation}", err=True)
        raise click.ClickException(f"{len(run.violations)} consistency violation(s); results are in {folder}")
