"""``robustkit report``: rebuilding a run folder from its CSV files, comparing two runs, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from robustkit.cli import main
from robustkit.reports.build import build_report, compare_runs
from robustkit.reports.html import render_index
from robustkit.reports.plots import plan_plots
from robustkit.reports.records import load_run
from robustkit.reports.summary import summary_frame
from tests.helpers import one_line_error
from tests.reports.runs import make_run


def run(*args: str):
    return CliRunner().invoke(main, list(args))




def test_report_regenerates_identical_outputs(tmp_path):
    library = make_run(tmp_path / "library" / "run")
    expected = {p.relative_to(library): p.read_bytes() for p in build_report(library, "md,csv")}
    records = load_run(library)
    expected[Path("index.html")] = render_index(
        records, summary_frame(records.results), plan_plots(records),
        ["results.csv", "epochs.csv", "summary.csv", "summary.md"],
    ).encode()
    folder = make_run(tmp_path / "cli" / "run")
    result = run("report", str(folder))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Rebuilt the report of {folder} from results.csv and epochs.csv; wrote 17 files:"
    listed = [line.strip() for line in lines[1:-1]]
    plots = [f"{spec.stem}{suffix}" for spec in plan_plots(records) for suffix in (".png", ".pdf")]
    assert listed == [str(folder / name) for name in ("summary.csv", "summary.md", *plots, "index.html")]
    assert lines[-1] == f"Open {folder / 'index.html'} in a browser."
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, name
    for name in plots:
        assert (folder / name).stat().st_size > 1000


def test_report_rebuilds_in_place_after_the_outputs_are_removed(tmp_path):
    folder = make_run(tmp_path / "run")
    assert run("report", str(folder), "--format", "md,csv").exit_code == 0
    tables = {name: (folder / name).read_bytes() for name in ("summary.md", "summary.csv")}
    for name in tables:
        (folder / name).unlink()
    result = run("report", str(folder), "--format", "csv,md")
    assert result.exit_code == 0 and "wrote 2 files:" in result.output
    assert {name: (folder / name).read_bytes() for name in tables} == tables
    assert not (folder / "index.html").exists() and "index.html" not in result.output
    assert "98.4%" in tables["summary.md"].decode() and "15.0x" in tables["summary.md"].decode()


def test_report_compares_two_runs(tmp_path):
    run_a = make_run(tmp_path / "a")
    run_b = make_run(tmp_path / "b")
    frame = pd.read_csv(run_b / "results.csv", dtype=str, keep_default_na=False)
    frame.loc[(frame["trainer"] == "pgd") & (frame["metric"] == "pgd_acc") & (frame["eval_eps"] == "0.1"),
              "value"] = "0.9"
    frame.to_csv(run_b / "results.csv", index=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run("report", str(run_a), str(run_b))
    assert result.exit_code == 0, result.output
    assert result.output == compare_runs(run_a, run_b) + "\n"
    assert "| pgd | PGD | 93.1% | 90.0% | -3.1 pp |" in result.output.splitlines()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # neither run folder is changed


def test_errors_are_one_line(tmp_path):
    one_line_error(run("report", str(tmp_path / "missing")), "RUN_DIR", "does not exist")
    one_line_error(run("report", str(tmp_path)), "results.csv does not exist")
    folder = make_run(tmp_path / "run")
    one_line_error(run("report", str(folder), "--format", "md,svg"), "--format", "unknown report format 'svg'")
    one_line_error(run("report", str(folder), str(folder), "--format", "md"), "--format applies to rebuilding one run")
    frame = pd.read_csv(folder / "epochs.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["loss", "weight"]).to_csv(folder / "epochs.csv", index=False)
    one_line_error(run("report", str(folder)), str(folder / "epochs.csv"), "lacks the required column(s) loss, weight")
    (folder / "results.csv").write_bytes(b"\x00\xff\xfe broken")
    one_line_error(run("report", str(folder), str(folder)), "results.csv is not a UTF-8 text file")
    assert not (folder / "summary.md").exists()


def test_repeated_rows_are_reported_as_a_warning(tmp_path):
    folder = make_run(tmp_path / "run")
    lines = (folder / "results.csv").read_text().splitlines()
    (folder / "results.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    result = run("report", str(folder), "--format", "md")
    assert result.exit_code == 0
    assert "Warning: " in result.stderr and "1 row(s) repeat an earlier measurement" in result.stderr
    assert "Warning" not in result.stdout
