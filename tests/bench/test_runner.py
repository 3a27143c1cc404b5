"""The quick preset end to end through the CLI: every output file, consistency, and the resume path."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustkit.bench.complete import choose_complete
from robustkit.bench.config import TrainerSpec
from robustkit.bench.runner import Cell, CellOutcome, _load_outcome
from robustkit.cli import main
from robustkit.cli.bench import _report_cell
from robustkit.models import build_network

OUTPUTS = ["config.json", "results.csv", "epochs.csv", "summary.csv", "summary.md", "index.html"]
PLOTS = ["verified_vs_time", "accuracy_vs_eps", "training_curves", "train_time"]
TRAINERS = ["standard", "pgd", "verifiable-symbolic", "verifiable-interval", "mixtrain"]
ACCURACY_COLUMNS = ["clean_acc", "pgd_acc", "cw_acc", "interval_attack_acc", "worst_attack_acc",
                    "verified_interval", "verified_symbolic", "verified_best", "autoattack_acc"]
# the complete stage's metrics: decided within a time budget per sample, so they depend on the machine's speed
BAND = ["verified_complete", "falsified", "undecided"]
PREFLIGHT = ["preflight_warnings", "preflight_randomised_outputs", "preflight_probability_outputs",
             "preflight_zero_gradient", "preflight_train_mode"]


@pytest.fixture(scope="module")
def quick_run_and_log(tmp_path_factory):
    """The quick preset as ``robustkit bench --preset quick > log.txt 2>&1`` runs it: stderr is no terminal, so
    the progress bars are off and the log lines on."""
    out = tmp_path_factory.mktemp("bench") / "run"
    result = CliRunner().invoke(main, ["bench", "--preset", "quick", "--out", str(out), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    return out, result.stdout, result.stderr


@pytest.fixture(scope="module")
def quick_run(quick_run_and_log):
    out, output, _ = quick_run_and_log
    return out, output


LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d \+(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d)?)s\] (.*)$")


def log_lines(stderr: str) -> list[tuple[float, str]]:
    """(seconds since the log started, message) of every progress log line."""
    lines = []
    for line in stderr.splitlines():
        match = LOG_LINE.match(line)
        if match:
            hours, minutes, seconds, message = match.groups()
            lines.append((3600 * int(hours or 0) + 60 * int(minutes or 0) + float(seconds), message))
    return lines


def test_a_log_without_terminal_shows_every_epoch_stage_and_cell(quick_run_and_log):
    out, _, stderr = quick_run_and_log
    lines = log_lines(stderr)
    messages = [message for _, message in lines]
    keys = [f"mnist5k__mnist_fc_small__{trainer}__eps0.1__seed0" for trainer in TRAINERS]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(keys)
    complete = choose_complete("auto", build_network("mnist_fc_small", seed=0)).method  # bab once robustkit has it
    for position, (trainer, key) in enumerate(zip(TRAINERS, keys, strict=True), start=1):
        start = messages.index(f"cell {key} ({position}/5): training {trainer}")
        end = next(i for i, m in enumerate(messages) if m.startswith(f"cell {key} done in "))
        mine = messages[start:end + 1]
        assert "estimate" not in mine[0]  # nothing has finished in this cell yet
        # every epoch: its time, the elapsed time, and an estimate of the epochs left from those finished
        epochs = [m.strip() for m in mine if " epoch " in m and " done in " in m]
        assert len(epochs) == 2 and epochs[0].startswith(f"{trainer.split('-')[0]} epoch 1 done in ")
        assert ", elapsed " in epochs[0] and ", estimate " in epochs[0] and "1/2 epochs" in epochs[0]
        assert "2/2 epochs" in epochs[1] and "estimate" not in epochs[1]  # nothing is left
        stages = [m.strip() for m in mine if m.strip().startswith("stage ")]
        assert [s.split(" at eps")[0].split(" on ")[0].split(":")[0] for s in stages] == [
            "stage clean accuracy and pre-flight checks", "stage attack pgd", "stage attack cw",
            "stage attack interval_attack", "stage attack autoattack", "stage verify interval",
            "stage verify symbolic", "stage verify crown", f"stage complete {complete}",
            "stage eps sweep (3 radii, 30 samples)"]
        assert all(re.search(r": \d+(\.\d)?s( \(.*\))?$", s) for s in stages)
        # the cell's last line: its time, the cells done, the elapsed time and an estimate of the cells left
        assert f"; {position}/5 cells, elapsed " in mine[-1]
        assert (", estimate " in mine[-1]) == (position < 5)
    assert messages[-1].startswith("report: ")
    times = [t for t, _ in lines]
    assert times == sorted(times)
    # the quick preset's longest stage is a few seconds: the log never falls silent for a minute
    assert max(b - a for a, b in zip([0.0, *times], times, strict=False)) < 60


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_every_output_file_is_written(quick_run):
    out, output = quick_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for plot in PLOTS:
        for suffix in ("png", "pdf"):
            assert list((out / "plots").glob(f"{plot}__*.{suffix}")), (plot, suffix)
    for trainer in TRAINERS:
        cell = next((out / "cells").glob(f"*__{trainer}__*"))
        assert (cell / "model.pt").is_file() and (cell / "result.json").is_file() and (cell / "checkpoint.pt").is_file()
        # strict JSON: a metric that does not apply is null, never a bare NaN token
        saved = json.loads((cell / "result.json").read_text(), parse_constant=lambda token: pytest.fail(token))
        assert saved["results"] and saved["violations"] == []
    assert "| Trainer | Clean | PGD | CW | Interval attack |" in output
    machine = json.loads((out / "config.json").read_text())["machine"]
    assert machine["threads"] == torch.get_num_threads() and machine["threads_source"] == "as loaded"
    assert machine["cpu"] and machine["usable_cores"] >= 1 and machine["torch_version"] == torch.__version__
    assert machine["load_start"] is None or machine["load_start"] >= 0
    assert machine["load_end"] is None or machine["load_end"] >= 0
    for row in rows(out / "results.csv"):  # every row says what the cell ran on
        assert int(row["threads"]) == torch.get_num_threads() and row["cpu"] == machine["cpu"]
        assert row["load_start"] == "nan" or float(row["load_start"]) >= 0


def test_results_are_long_format_with_every_metric(quick_run):
    out, _ = quick_run
    results = rows(out / "results.csv")
    assert set(results[0]) >= {"dataset", "model", "trainer", "train_eps", "eval_eps", "metric", "value", "n",
                               "time_s", "seed", "robustkit_version", "torch_version"}
    for trainer in TRAINERS:
        at_train_eps = [r for r in results if r["trainer"] == trainer and r["eval_eps"] == r["train_eps"]]
        mine: dict[str, dict[str, str]] = {}
        for r in at_train_eps:
            mine.setdefault(r["metric"], r)  # the cell's own rows come first, then the sweep's at the same eps
        for metric in ["clean_acc", "pgd_acc", "cw_acc", "interval_attack_acc", "worst_attack_acc",
                       "verified_interval", "verified_symbolic", "verified_crown", "verified_best", "autoattack_acc",
                       *BAND, "train_time_s", "eval_time_s", "peak_memory_mb", "epochs"]:
            assert metric in mine, (trainer, metric)
        assert "verified_exact" not in mine  # the older exact stage is off: the complete stage took its place
        assert mine["autoattack_acc"]["config"] == "AutoAttack(version='fast')"
        value = {m: float(r["value"]) for m, r in mine.items()}
        assert int(mine["clean_acc"]["n"]) == 60
        # the consistency the bench enforces, visible in the numbers
        assert value["verified_best"] <= value["worst_attack_acc"] <= value["clean_acc"]
        assert value["worst_attack_acc"] <= min(value["pgd_acc"], value["cw_acc"], value["interval_attack_acc"],
                                                value["autoattack_acc"])
        assert value["verified_best"] <= value["autoattack_acc"] <= value["clean_acc"]
        assert value["verified_best"] >= max(value["verified_interval"], value["verified_symbolic"])
        assert value["verified_crown"] >= value["verified_symbolic"] - 1e-9  # crown takes the better bound
        # the band: verified (best relaxation or complete), falsified (attacks or complete), undecided, all counted
        assert sum(round(value[m] * 60) for m in BAND) == 60
        assert value["verified_best"] <= value["verified_complete"] <= value["worst_attack_acc"]
        assert value["falsified"] >= 1 - value["worst_attack_acc"] - 1e-9
        stage = json.loads(mine["verified_complete"]["config"])
        assert stage["method"] in ("bab", "exact") and stage["time_limit"] == 0.5
        assert stage["band"] == round((value["worst_attack_acc"] - value["verified_best"]) * 60)
        sweep = {float(r["eval_eps"]) for r in results if r["trainer"] == trainer and r["eval_eps"] != r["train_eps"]}
        assert sweep == {0.05, 0.2}
        # the sweep measures the training eps too, on its own 30 samples with its own PGD, like its other points
        sweep_pgd = [r for r in results if r["trainer"] == trainer and r["metric"] == "pgd_acc" and r["n"] == "30"]
        assert sorted(float(r["eval_eps"]) for r in sweep_pgd) == [0.05, 0.1, 0.2]
        assert len({r["config"] for r in sweep_pgd}) == 1 and sweep_pgd[0]["config"] != mine["pgd_acc"]["config"]
        # the pre-flight checks of the cell's model, on all 60 test samples (fewer than 100)
        assert all(int(mine[m]["n"]) == 60 for m in PREFLIGHT)
        flags = [value[m] for m in PREFLIGHT[1:] if m != "preflight_zero_gradient"]
        assert flags == [0.0, 0.0, 0.0]  # deterministic logits, and the bench evaluates in eval mode
        assert 0 <= value["preflight_zero_gradient"] <= 1
        assert value["preflight_warnings"] == float(value["preflight_zero_gradient"] > 0.1)
        cell = next((out / "cells").glob(f"*__{trainer}__*"))
        assert len(json.loads((cell / "result.json").read_text())["warnings"]) == value["preflight_warnings"]
    epochs = rows(out / "epochs.csv")
    assert {r["trainer"] for r in epochs} == set(TRAINERS)
    assert all(r["epoch"] in ("1", "2") for r in epochs)
    mixtrain = [r for r in epochs if r["trainer"] == "mixtrain"]
    assert float(mixtrain[0]["weight"]) > 0  # the weight a is logged per epoch


def test_summary_table_matches_results(quick_run):
    out, _ = quick_run
    summary = rows(out / "summary.csv")
    assert [r["trainer"] for r in summary] == TRAINERS
    results = rows(out / "results.csv")
    for row in summary:
        pgd = next(r for r in results if r["trainer"] == row["trainer"] and r["metric"] == "pgd_acc"
                   and r["eval_eps"] == r["train_eps"])
        assert float(row["pgd_acc"]) == pytest.approx(float(pgd["value"]))
    mixtrain = next(r for r in summary if r["trainer"] == "mixtrain")
    assert float(mixtrain["time_vs_mixtrain"]) == pytest.approx(1.0)
    columns = list(summary[0])
    after = columns.index("time_vs_mixtrain")
    # appended, earlier columns unchanged: the pre-flight metrics, the seeds and the intervals, then AutoAttack
    assert columns[after:after + 8] == ["time_vs_mixtrain", *PREFLIGHT, "n_seeds", "interval"]
    assert columns[after + 8:after + 11] == ["clean_acc_std", "clean_acc_low", "clean_acc_high"]
    assert columns[columns.index("autoattack_acc"):] == [
        "autoattack_acc", *BAND, *(f"{m}_{part}" for m in BAND for part in ("std", "low", "high")),
        "complete_method", "complete_time_limit"]
    assert "autoattack_acc_low" in columns
    for row in summary:
        assert (row["seed"], row["n_seeds"], row["interval"], row["clean_acc_std"]) == ("0", "1", "wilson", "")
        assert float(row["clean_acc_low"]) <= float(row["clean_acc"]) <= float(row["clean_acc_high"])
    for row in summary:
        autoattack = next(r for r in results if r["trainer"] == row["trainer"] and r["metric"] == "autoattack_acc")
        assert float(row["autoattack_acc"]) == pytest.approx(float(autoattack["value"]))
        for metric in PREFLIGHT:
            measured = next(r for r in results if r["trainer"] == row["trainer"] and r["metric"] == metric)
            assert float(row[metric]) == pytest.approx(float(measured["value"]))
        assert row["preflight_warnings"] in ("0", "1") and row["preflight_train_mode"] == "0"
    markdown = (out / "summary.md").read_text()
    assert "mixtrain" in markdown and "Time vs MixTrain" in markdown
    assert "| Trainer | Clean | PGD | CW | Interval attack | AutoAttack | Verified (interval) |" in markdown
    assert "| Verified (best) | Falsified | Undecided | Train time |" in markdown
    method = summary[0]["complete_method"]
    assert method in ("bab", "exact") and {r["complete_method"] for r in summary} == {method}
    assert f"Complete verifier on the undecided band: {method}, at most 0.5 s per sample." in markdown
    percentages = {r["trainer"]: f"{100 * float(r['autoattack_acc']):.1f}%" for r in summary}
    band = {m: f"{100 * float(mixtrain[m]):.1f}%" for m in BAND}
    for line in markdown.splitlines():
        if line.startswith("| mixtrain |"):
            cells = [cell.split(" (")[0] for cell in line.split(" | ")]  # each value, then its 95% interval
            assert cells[5] == percentages["mixtrain"]
            assert cells[9:12] == [band["verified_complete"], band["falsified"], band["undecided"]]


def test_index_html_references_existing_images(quick_run):
    out, _ = quick_run

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    parser = Collect()
    parser.feed((out / "index.html").read_text())
    assert len(parser.images) >= len(PLOTS)
    assert all((out / src).is_file() for src in parser.images)


def test_report_regenerates_identical_tables(quick_run, tmp_path):
    out, _ = quick_run
    before = {name: (out / name).read_bytes() for name in ("summary.csv", "summary.md")}
    result = CliRunner().invoke(main, ["report", str(out), "--format", "md,csv"])
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_bytes() for name in before} == before


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def test_interrupted_run_resumes_to_the_same_summary(quick_run, tmp_path):
    reference, _ = quick_run
    out = tmp_path / "interrupted"
    # the reference ran in this process: the same thread count, so the same floating-point summation order
    threads = str(torch.get_num_threads())
    command = [sys.executable, "-m", "robustkit", "--quiet", "--threads", threads, "bench", "--preset", "quick",
               "--out", str(out), "--jobs", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_in_cell = None
    done: list[Path] = []
    try:
        # kill the run while a cell is half-trained: its checkpoint holds 1 of its 2 epochs
        while time.time() < deadline and process.poll() is None:
            cells = sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []
            done = [c for c in cells if (c / "result.json").is_file()]
            half = [c for c in cells if (c / "checkpoint.pt").is_file() and not (c / "result.json").is_file()]
            if done and half and checkpoint_epoch(half[0] / "checkpoint.pt") == 1:
                process.kill()
                killed_in_cell = half[0]
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert killed_in_cell is not None, "the run finished before it could be interrupted half-way through a cell"
    assert checkpoint_epoch(killed_in_cell / "checkpoint.pt") == 1
    result = CliRunner().invoke(main, ["--quiet", "bench", "--preset", "quick", "--out", str(out), "--resume",
                                       "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "(finished earlier, reused)" in result.output
    assert not log_lines(result.stderr)  # --quiet silences the log lines
    ours = {r["trainer"]: r for r in rows(out / "summary.csv")}
    theirs = {r["trainer"]: r for r in rows(reference / "summary.csv")}
    for trainer in TRAINERS:
        for column in ACCURACY_COLUMNS:
            assert ours[trainer][column] == theirs[trainer][column], (trainer, column)
        # how the complete verifier splits the band rests on a time budget, so it may differ between runs; the band
        # itself (from verified_best and worst_attack_acc, compared above) does not
        for summary in (ours, theirs):
            row = summary[trainer]
            assert sum(round(60 * float(row[m])) for m in BAND) == 60
            assert float(row["verified_best"]) <= float(row["verified_complete"]) <= float(row["worst_attack_acc"])
        assert ours[trainer]["complete_method"] == theirs[trainer]["complete_method"]
    # the cells finished before the kill are reused, complete stage included, not evaluated again
    for cell in done:
        saved = json.loads((cell / "result.json").read_text())["results"]
        trainer = saved[0]["trainer"]
        for metric in BAND:
            value = next(r["value"] for r in saved if r["metric"] == metric)
            assert float(ours[trainer][metric]) == pytest.approx(value, abs=1e-9), (trainer, metric)
    # both sessions are on record: the start's machine and the resume's
    saved = json.loads((out / "config.json").read_text())
    assert saved["machine"]["threads"] == int(threads) and saved["machine"]["threads_source"] == "--threads"
    assert [session["threads"] for session in saved["resumed"]] == [torch.get_num_threads()]
    assert "load_end" in saved["resumed"][0] and "load_end" not in saved["machine"]  # the first was killed


def test_resume_refuses_other_settings_and_fresh_runs_refuse_used_folders(quick_run):
    out, _ = quick_run
    again = CliRunner().invoke(main, ["bench", "--preset", "quick", "--out", str(out), "--jobs", "1"])
    assert again.exit_code == 2 and "--resume" in again.output
    other = CliRunner().invoke(main, ["bench", "--preset", "quick", "--out", str(out), "--resume", "--seed", "7",
                                      "--jobs", "1"])
    assert other.exit_code == 2 and "different settings" in other.output


def test_invalid_config_fails_before_training(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[grid]\ntrainers = ["standard", "mixtrian"]\n')
    result = CliRunner().invoke(main, ["bench", "--config", str(config), "--out", str(tmp_path / "run"), "--jobs", "1"])
    assert result.exit_code == 2
    assert "grid.trainers" in result.output and "mixtrain" in result.output
    assert not (tmp_path / "run" / "cells").exists()


def test_preflight_warnings_go_to_the_log_and_old_result_files_have_none(tmp_path, capsys):
    cell = Cell("mnist5k", "mnist_fc_small", TrainerSpec("pgd", "pgd", {}, {}), 0.1)
    outcome = CellOutcome(cell, [], [], [], reused=False, warnings=["randomised outputs: ...", "the model is ..."])
    _report_cell(outcome, 1, 2)
    captured = capsys.readouterr()
    assert captured.out.startswith("[1/2] mnist5k mnist_fc_small pgd eps 0.1 seed 0:")
    assert captured.err.splitlines() == [f"Warning: {cell.key}: randomised outputs: ...",
                                         f"Warning: {cell.key}: the model is ..."]
    old = tmp_path / "result.json"
    old.write_text(json.dumps({"results": [], "epochs": [], "violations": []}))  # written before pre-flight checks
    assert _load_outcome(cell, old).warnings == []
    old.write_text(json.dumps({"results": [], "epochs": [], "violations": [], "warnings": ["a", "b"]}))
    assert _load_outcome(cell, old).warnings == ["a", "b"]
