"""build_report (every output, reproducible bytes, format choice) and compare_runs."""

from __future__ import annotations

import pandas as pd
import pytest

from robustkit.errors import InputError
from robustkit.reports.build import build_report, compare_runs, parse_formats
from robustkit.reports.plots import PLOTS_DIR
from robustkit.reports.records import EPOCHS_COLUMNS, RESULTS_COLUMNS, RecordsError
from tests.reports.runs import make_run


def test_build_writes_every_output(built_run):
    folder, written = built_run
    assert written[:2] == [folder / "summary.csv", folder / "summary.md"] and written[-1] == folder / "index.html"
    plots = written[2:-1]
    assert len(plots) == 14 and all(p.parent == folder / PLOTS_DIR for p in plots)
    assert [p.suffix for p in plots] == [".png", ".pdf"] * 7
    for path in written:
        assert path.is_file() and path.stat().st_size > 0, path
    assert not list(folder.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_rebuilding_gives_identical_bytes(built_run):
    folder, written = built_run
    before = {path: path.read_bytes() for path in written}
    again = build_report(folder)
    assert again == written
    for path in written:
        assert path.read_bytes() == before[path], path  # PNG and PDF too: no dates in the files


def test_formats(run_dir):
    assert build_report(run_dir, ("md",)) == [run_dir / "summary.md"]
    assert build_report(run_dir, "csv, md") == [run_dir / "summary.csv", run_dir / "summary.md"]
    assert not (run_dir / "index.html").exists() and not (run_dir / PLOTS_DIR).exists()
    assert parse_formats(["PDF", "html"]) == ("html", "png")
    with pytest.raises(InputError, match="unknown report format 'svg'"):
        build_report(run_dir, "md,svg")
    with pytest.raises(InputError):
        parse_formats("")


def test_html_alone_draws_its_plots_and_links_existing_files(tmp_path):
    folder = make_run(tmp_path / "run")
    written = build_report(folder, "html")
    assert written[-1] == folder / "index.html" and {p.suffix for p in written[:-1]} == {".png", ".pdf"}
    source = (folder / "index.html").read_text()
    assert 'href="results.csv"' in source and 'href="summary.csv"' not in source  # not written this time


def test_missing_records(tmp_path):
    with pytest.raises(RecordsError, match="does not exist or is not a folder"):
        build_report(tmp_path / "nothing")
    (tmp_path / "results.csv").write_text("dataset,model\n")
    with pytest.raises(RecordsError, match="results.csv lacks the required column"):
        build_report(tmp_path)


def test_build_before_any_cell_finished(tmp_path):
    (tmp_path / "results.csv").write_text(",".join(RESULTS_COLUMNS) + "\n")
    (tmp_path / "epochs.csv").write_text(",".join(EPOCHS_COLUMNS) + "\n")
    written = build_report(tmp_path)
    assert written == [tmp_path / "summary.csv", tmp_path / "summary.md", tmp_path / "index.html"]
    assert "No cell has been trained or evaluated yet." in (tmp_path / "index.html").read_text()


def _edit_results(folder, edit):
    frame = pd.read_csv(folder / "results.csv", dtype=str, keep_default_na=False)
    edit(frame).to_csv(folder / "results.csv", index=False)


def test_compare_runs(tmp_path):
    run_a = make_run(tmp_path / "a")
    run_b = make_run(tmp_path / "b")

    def edit(frame):
        cell = (frame["trainer"] == "mixtrain") & (frame["eval_eps"] == "0.1")
        frame.loc[cell & (frame["metric"] == "clean_acc"), "value"] = "0.99"
        frame.loc[cell & (frame["metric"] == "train_time_s"), "value"] = "50.0"
        frame.loc[cell & (frame["metric"] == "cw_acc"), "value"] = ""  # not measured in B
        return frame.loc[~((frame["model"] == "mnist_fc") & (frame["trainer"] == "pgd"))]

    _edit_results(run_b, edit)
    text = compare_runs(run_a, run_b)
    assert text.startswith("# Run comparison\n") and f"A = `{run_a}`, B = `{run_b}`" in text
    lines = text.splitlines()
    assert "| mixtrain | Clean | 98.4% | 99.0% | +0.6 pp |" in lines
    assert "| mixtrain | Train time | 1.7 min | 50.0 s | x0.50 |" in lines
    assert "| mixtrain | CW | 95.1% | n/a | n/a |" in lines
    assert "| verifiable-symbolic | Time vs MixTrain | 15.0x | 30.0x | +15.00 |" in lines
    assert "| pgd | PGD | 93.1% | 93.1% | +0.0 pp |" in lines
    # the band, and the best relaxation's verified accuracy (runs from before the complete stage have only that)
    assert "| pgd | Verified (best) | 65.2% | 65.2% | +0.0 pp |" in lines
    assert "| pgd | Undecided | 5.3% | 5.3% | +0.0 pp |" in lines
    assert "| pgd | Verified (best relaxation) | 30.1% | 30.1% | +0.0 pp |" in lines
    assert not any(line.startswith("| standard | Falsified |") for line in lines[lines.index("## mnist5k / mnist_fc "
                                                                                                  "/ train eps 0.3"):])
    assert "| standard | Test samples | 1,000 | 1,000 | +0 |" in lines
    assert "Only in A: mnist5k / mnist_fc / train eps 0.3 / pgd." in lines
    assert not any(line.startswith("Only in B") for line in lines)
    assert not any("| Time vs MixTrain |" in line and "mnist_fc" in line for line in lines)
    assert compare_runs(run_a, run_b) == text  # deterministic


def test_compare_runs_without_shared_cells(tmp_path):
    run_a = make_run(tmp_path / "a")
    run_b = make_run(tmp_path / "b")
    _edit_results(run_b, lambda frame: frame.assign(dataset="cifar10"))
    text = compare_runs(run_a, run_b)
    assert "The runs share no cell" in text
    assert "Only in A: mnist5k / mnist_small / train eps 0.1 / standard;" in text
    assert "Only in B: cifar10 / mnist_small / train eps 0.1 / standard;" in text
    with pytest.raises(RecordsError, match="does not exist or is not a folder"):
        compare_runs(run_a, tmp_path / "missing")
