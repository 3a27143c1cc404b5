"""``robustkit report``: rebuild a benchmark run's reports from its CSV files, or compare two runs.

With one run folder, the outputs of ``--format`` are regenerated in place from ``results.csv`` and
``epochs.csv`` (see :func:`robustkit.reports.build.build_report`) and the files written are listed. With two,
the Markdown comparison of their summaries (:func:`robustkit.reports.build.compare_runs`) is printed; neither
folder is changed (redirect the output to keep it). A missing folder or a missing or corrupt CSV file is a
one-line error with exit code 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from robustkit.cli import Command, UserError

DEFAULT_FORMATS = "md,csv,html,png"
_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("report", cls=Command)
@click.argument("run_dir", type=_FOLDER)
@click.argument("other_run", type=_FOLDER, required=False, metavar="[RUN_DIR2]")
@click.option("--format", "formats", default=DEFAULT_FORMATS, show_default=True, metavar="FMT[,FMT...]",
              help="Outputs to rebuild: md (summary.md), csv (summary.csv), html (index.html, with the plots), "
                   "png (plots as PNG and PDF). One run only.")
@click.pass_context
def report(ctx: click.Context, run_dir: Path, other_run: Path | None, formats: str) -> None:
    """Rebuild the reports of a benchmark run folder, or compare two runs.

    RUN_DIR is a folder written by 'robustkit bench' (with results.csv and epochs.csv). Its summary tables,
    plots and index.html are regenerated in place from the two CSV files, and the files written are listed.

    With a second folder RUN_DIR2, prints a Markdown table comparing the two runs' summaries for the cells
    they share (B - A in percentage points, training time as a ratio); no file is written (redirect the output
    to keep it).

    \b
    Examples:
      robustkit report runs/quick
      robustkit report runs/quick --format md,csv
      robustkit report runs/old runs/new > comparison.md
    """
    from robustkit.reports.build import build_report, compare_runs, parse_formats

    explicit = ctx.get_parameter_source("formats") is click.core.ParameterSource.COMMANDLINE
    if other_run is not None and explicit:
        raise UserError("--format applies to rebuilding one run; comparing two runs prints Markdown only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if other_run is not None:
            text = compare_runs(run_dir, other_run)
        else:
            try:
                chosen = parse_formats(formats)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="'--format'") from None
            written = build_report(run_dir, chosen)
    for warning in caught:
        click.echo(f"Warning: {' '.join(str(warning.message).split())}", err=True)
    if other_run is not None:
        click.echo(text)
        return
    click.echo(f"Rebuilt the report of {run_dir} from results.csv and epochs.csv; wrote "
               f"{len(written)} file{'s' if len(written) != 1 else ''}:")
    for path in written:
        click.echo(f"  {path}")
    if "html" in chosen:
        click.echo(f"Open {run_dir / 'index.html'} in a browser.")
