"""``robustkit train``: the run's files and what they hold, loading the model with ``verify``, exact ``--resume``
after an interruption, and one-line user errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from robustkit import __version__
from robustkit.cli import main
from robustkit.cli.train import HISTORY_COLUMNS
from robustkit.models import build_model
from robustkit.trainers import EpochRecord
from tests.helpers import one_line_error, read_csv

pytestmark = pytest.mark.usefixtures("single_thread")

FILES = ("model.pt", "history.csv", "history.jsonl", "config.json", "checkpoint.pt")
TIMES = ("train_time_s", "epoch_time_s", "eval_time_s")
SMALL = ["--model", "mnist_fc_small", "--eps", "0.1", "--n-train", "80", "--batch-size", "40", "--val-size", "10"]




def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["--quiet", *args])




def read_jsonl(path: Path) -> list[dict[str, Any]]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]




def test_mixtrain_run_writes_every_file_and_verify_loads_the_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("train", "--trainer", "mixtrain", "--model", "mnist_small", "--dataset", "mnist5k", "--eps", "0.1",
                 "--epochs", "2", "--n-train", "200", "--val-size", "20", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in FILES)
    assert "first 20 samples of the mnist5k TEST split" in result.output
    epoch_lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert all(" a 0.500 " in line and "verified " in line for line in epoch_lines)
    assert "Done: 2 epochs of mixtrain" in result.output and f"to {out}" in result.output
    # --quiet: no progress log lines (the epoch lines above are results, on stdout)
    assert not [line for line in result.stderr.splitlines() if line.startswith("[")]

    columns, rows = read_csv(out / "history.csv")
    assert columns == list(HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert (r["dataset"], r["model"], r["trainer"], r["method"]) == ("mnist5k", "mnist_small", "mixtrain",
                                                                          "symbolic")
        assert (r["eval_eps"], r["seed"], r["n_train"], r["n_val"]) == ("0.1", "0", "200", "20")
        assert float(r["weight"]) == 0.5 and r["robustkit_version"] == __version__
        assert 0 <= float(r["verified_acc"]) <= float(r["pgd_acc"]) <= float(r["clean_acc"]) <= 1
    assert float(rows[1]["train_time_s"]) > float(rows[0]["train_time_s"]) > 0
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])

    lines = read_jsonl(out / "history.jsonl")
    assert [list(line) for line in lines] == [list(HISTORY_COLUMNS)] * 2
    for line, row in zip(lines, rows, strict=True):
        assert all(str(line[k]) == row[k] for k in ("epoch", "model", "n_val"))
        assert line["loss"] == float(row["loss"]) and line["weight"] == 0.5

    config = json.loads((out / "config.json").read_text())
    assert config["trainer"] == "mixtrain" and config["trainer_options"]["k"] == 5
    assert config["trainer_options"]["schedule"] == "adaptive" and config["trainer_options"]["method"] == "symbolic"
    assert config["train_config"]["epochs"] == 2 and config["train_config"]["eps"] == 0.1
    assert config["train_config"]["val_size"] == 20 and config["train_config"]["seed"] == 0
    assert (config["model"], config["dataset"], config["n_train"], config["processes"]) == (
        "mnist_small", "mnist5k", 200, 1)
    assert config["monitor"] == {"split": "test", "start": 0, "n": 20}
    assert config["seed"] == 0 and config["robustkit_version"] == __version__

    state = torch.load(out / "model.pt", weights_only=True)
    assert list(state) == list(build_model("mnist_small").state_dict())
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["trainer"] == "mixtrain"
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    assert [EpochRecord(**r).epoch for r in saved["history"]] == [1, 2]

    verified = run("verify", "--model", "mnist_small", "--checkpoint", str(out / "model.pt"), "--eps", "0.1",
                   "--method", "interval", "--n-examples", "20", "--out", str(tmp_path / "verify"))
    assert verified.exit_code == 0, verified.output
    _, summary = read_csv(tmp_path / "verify" / "summary.csv")
    assert summary[0]["method"] == "interval" and summary[0]["n"] == "20"
    # the trained weights were loaded: the clean accuracy on the first 20 test samples is the monitored one
    assert float(summary[0]["clean_acc"]) == pytest.approx(float(rows[1]["clean_acc"]))


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", "--trainer", "pgd", "--steps", "3", *SMALL, "--epochs", "2", "--ramp-epochs", "1"]
    whole = run(*args, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output

    import robustkit.cli.train as command

    write_history = command.write_history

    def interrupt(folder: Path, run_info: command.Run, history: list[EpochRecord]) -> None:
        write_history(folder, run_info, history)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch was saved

    monkeypatch.setattr(command, "write_history", interrupt)
    stopped = run(*args, "--out", str(tmp_path / "parts"))
    assert stopped.exit_code == 1 and "Aborted" in stopped.output
    assert (tmp_path / "parts" / "checkpoint.pt").is_file() and not (tmp_path / "parts" / "model.pt").exists()
    monkeypatch.setattr(command, "write_history", write_history)

    again = run(*args, "--out", str(tmp_path / "parts"))
    one_line_error(again, "already holds a training run", "--resume")
    resumed = run(*args, "--out", str(tmp_path / "parts"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming after epoch 1" in resumed.output
    assert [line.split()[1] for line in resumed.output.splitlines() if line.startswith("epoch ")] == ["2/2"]

    expected = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "parts" / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    _, whole_rows = read_csv(tmp_path / "whole" / "history.csv")
    _, part_rows = read_csv(tmp_path / "parts" / "history.csv")
    for a, b in zip(whole_rows, part_rows, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMES} == {k: v for k, v in b.items() if k not in TIMES}
    assert len(read_jsonl(tmp_path / "parts" / "history.jsonl")) == 2

    # another thread count is accepted, with a warning, and every session's machine is on record
    other = run("--threads", "2", *args, "--out", str(tmp_path / "parts"), "--resume")
    assert other.exit_code == 0, other.output
    assert "started with 1 torch thread(s) and is resumed with 2" in other.stderr
    saved = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert saved["machine"]["threads"] == 1 and [m["threads"] for m in saved["resumed"]] == [1, 2]
    assert saved["resumed"][-1]["threads_source"] == "--threads" and "load_end" in saved["resumed"][-1]
    torch.set_num_threads(1)

    refused = run(*[a if a != "3" else "4" for a in args], "--out", str(tmp_path / "parts"), "--resume")
    one_line_error(refused, "cannot resume", "different settings (steps")
    refused = run(*args, "--lr", "0.01", "--out", str(tmp_path / "parts"), "--resume")
    one_line_error(refused, "cannot resume", "(lr")
    refused = run(*[a if a != "80" else "120" for a in args], "--out", str(tmp_path / "parts"), "--resume")
    one_line_error(refused, "cannot resume", "n_train")


def test_standard_run_reports_nan_fields_as_missing(tmp_path: Path) -> None:
    out = tmp_path / "std"
    result = run("train", "--trainer", "standard", *SMALL, "--epochs", "1", "--val-size", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "No monitoring" in result.output and " a - " in result.output
    _, rows = read_csv(out / "history.csv")
    assert rows[0]["weight"] == "nan" and rows[0]["loss_robust"] == "nan" and rows[0]["method"] == ""
    assert math.isnan(float(rows[0]["clean_acc"])) and rows[0]["n_val"] == "0"
    (line,) = read_jsonl(out / "history.jsonl")
    assert line["weight"] is None and line["clean_acc"] is None and line["loss"] > 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--trainer", "standard", "--k", "3"], ["--k is not an option of the standard trainer", "mixtrain"]),
        (["--trainer", "mixtrain", "--steps", "5"], ["--steps is not an option of the mixtrain trainer", "pgd"]),
        (["--trainer", "pgd", "--method", "interval"], ["--method", "pgd trainer", "verifiable, mixtrain"]),
        (["--trainer", "verifiable", "--schedule", "geometric"], ["--schedule", "verifiable trainer"]),
        (["--trainer", "sgd"], ["'--trainer'", "'sgd' is not one of"]),
        (["--trainer", "standard", "--resume"], ["--resume needs --out"]),
        (["--trainer", "standard", "--eps", "1.5"], ["eps must be in [0, 1]"]),
        (["--trainer", "standard", "--eps", "0.1,0.2"], ["give one training radius"]),
        (["--trainer", "standard", "--model", "toy2d"], ["model toy2d does not take mnist5k's 1x28x28 inputs: it "
                                                         "takes 1x1x2 inputs"]),
        (["--trainer", "standard", "--dataset", "mnist"], ["pass --data-dir"]),
        (["--trainer", "standard", "--n-train", "100000"], ["--n-train 100000", "training split has 4000",
                                                           "use --n-train 4000 or less"]),
        (["--trainer", "standard", "--val-size", "1001"], ["--val-size 1001", "test split has 1000"]),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    base = {"--model": "mnist_fc_small", "--eps": "0.1"}
    given = dict(zip(args[::2], args[1::2], strict=False))
    extra = [item for key, value in base.items() if key not in given for item in (key, value)]
    out = tmp_path / "out"
    with_out = [] if "--resume" in args else ["--out", str(out)]
    one_line_error(run("train", *args, *extra, *with_out), *fragments)
    assert not out.exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("train", "--trainer", "standard", *SMALL, "--out", str(tmp_path / "empty"), "--resume")
    one_line_error(result, "--resume: there is no checkpoint.pt in")


def test_train_is_listed_with_its_options() -> None:
    listing = run("--help")
    assert listing.exit_code == 0 and "train" in listing.output
    helped = run("train", "--help")
    assert helped.exit_code == 0
    for option in ("--trainer", "--k", "--schedule", "--method", "--steps", "--warmup-epochs", "--ramp-epochs",
                   "--eps-factor", "--val-size", "--n-train", "--resume", "mixtrain", "verifiable"):
        assert option in helped.output, option


def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("train", "--trainer", "standard", *SMALL, "--epochs", "1", "--out", str(out)).exit_code == 0
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    line = one_line_error(run("train", "--trainer", "standard", *SMALL, "--epochs", "1", "--out", str(out),
                              "--resume"), f"cannot read checkpoint {checkpoint}: the file is damaged")
    assert "weights_only" not in line


def test_a_folder_locked_by_another_run_is_refused(tmp_path: Path) -> None:
    import os

    from robustkit.runlock import run_lock

    out = tmp_path / "run"
    with run_lock(out, "robustkit train"):
        one_line_error(run("train", "--trainer", "standard", *SMALL, "--epochs", "1", "--out", str(out)),
                       f"in use by another robustkit run: process {os.getpid()} (robustkit train")
    assert not (out / "checkpoint.pt").exists()
    assert run("train", "--trainer", "standard", *SMALL, "--epochs", "1", "--out", str(out)).exit_code == 0
    assert not (out / "robustkit.lock").exists()  # released at the end of the run


def test_without_a_terminal_every_epoch_logs_its_time_and_an_estimate(tmp_path: Path) -> None:
    import re

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--trainer", "standard", *SMALL, "--epochs", "3", "--val-size", "10",
                                       "--out", str(out)])  # CliRunner's stderr is no terminal
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 3
    pattern = (r"\[\d\d:\d\d:\d\d \+[\dhms.]+\]   standard epoch {epoch} done in [\d.]+s \(training [\d.]+s, "
               r"monitoring [\d.]+s\); {epoch}/3 epochs, elapsed [\d.]+s")
    for epoch, line in enumerate(lines, start=1):
        assert re.match(pattern.format(epoch=epoch), line), line
    # the estimate of the epochs left: the mean of those finished, and none once the last is done
    assert re.search(r", estimate [\d.]+s left \(2 x the mean [\d.]+s of the 1 epoch finished here\)$", lines[0])
    assert re.search(r", estimate [\d.]+s left \(1 x the mean [\d.]+s of the 2 epochs finished here\)$", lines[1])
    assert "estimate" not in lines[2]
