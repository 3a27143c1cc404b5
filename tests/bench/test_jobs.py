"""``bench --jobs N``: cells in worker processes give the files and numbers of a run one cell at a time."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustkit.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = """
[grid]
models = ["mnist_fc_small"]
trainers = ["standard", "pgd", "mixtrain"]
eps = [0.1]
[data]
n_train = 100
n_test = 30
val_size = 0
[training]
epochs = 1
[trainers.pgd]
trainer = "pgd"
steps = 2
[trainers.mixtrain]
trainer = "mixtrain"
k = 2
[evaluation]
pgd_steps = 3
pgd_restarts = 1
cw_steps = 3
interval_attack = { inner_steps = 2, iterations = 1, restarts = 1 }
autoattack = "off"
eps_sweep = []
verifiers = ["interval", "crown"]
exact = false
complete = "off"             # a time budget is not deterministic: the runs below compare numbers
"""
# measured, not computed: they differ between runs
TIMES = {"train_time_s", "eval_time_s", "peak_memory_mb"}
MACHINE = {"time_s", "load_start", "load_end"}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def comparable(path: Path) -> list[dict[str, str]]:
    found = []
    for row in rows(path):
        if row.get("metric") in TIMES:
            row["value"] = ""
        found.append({k: v for k, v in row.items() if k not in MACHINE and "time" not in k})
    return found


def test_cells_in_worker_processes_give_the_numbers_of_one_process(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    assert torch.get_num_threads() == 1  # both runs' cells then train with one thread: the same float sums
    one = CliRunner().invoke(main, ["--quiet", "bench", "--config", str(config), "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # as a user runs it, with its log in a file: the workers write their log lines to the same stderr; the jobs
    # come from the configuration's run.jobs when the command line has no --jobs
    scheduled = tmp_path / "tiny-jobs.toml"
    scheduled.write_text(TINY + "\n[run]\njobs = 2\n")
    two = subprocess.run([sys.executable, "-m", "robustkit", "--threads", "2", "bench", "--config", str(scheduled),
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "running 3 cells in 2 worker processes of 1 torch thread(s) each" in two.stderr
    worker_lines = [line for line in two.stderr.splitlines() if "(worker " in line]
    assert len(worker_lines) == 3 and len({line.split("(worker ")[1].split(",")[0] for line in worker_lines}) == 2
    # the cells expected to take longest (MixTrain's bounds, then PGD) started first, standard training last
    started = [line.split("cell ")[1].split("__")[2] for line in worker_lines]
    assert sorted(started[:2]) == ["mixtrain", "pgd"] and started[2] == "standard"
    # every result and epoch row in grid order; a cell that ran with one thread throughout has the numbers of the
    # run in one process (times excepted); the last cell to run may have taken over the finished worker's thread
    threads = {row["trainer"]: row["threads"] for row in rows(tmp_path / "two" / "results.csv")}
    assert set(threads.values()) <= {"1", "2"} and "1" in threads.values()
    assert ("2" in threads.values()) == ("torch threads 1 -> 2: the other cell workers have no cell left to run"
                                         in two.stderr)
    ones = [name for name, count in threads.items() if count == "1"]

    def kept(file: Path) -> list[dict[str, str]]:
        return [row for row in comparable(file) if row["trainer"] in ones]

    assert [row["trainer"] for row in comparable(tmp_path / "two" / "results.csv")] == [
        row["trainer"] for row in comparable(tmp_path / "one" / "results.csv")]
    assert kept(tmp_path / "two" / "results.csv") == kept(tmp_path / "one" / "results.csv")
    assert kept(tmp_path / "two" / "epochs.csv") == kept(tmp_path / "one" / "epochs.csv")
    # the jobs do not change the results, so a resume may take others (here the command line's, over the config's)
    before = (tmp_path / "two" / "results.csv").read_text()
    again = CliRunner().invoke(main, ["--quiet", "bench", "--config", str(config), "--out", str(tmp_path / "two"),
                                      "--resume", "--jobs", "1"])
    assert again.exit_code == 0, again.output
    assert "worker processes" not in again.output and (tmp_path / "two" / "results.csv").read_text() == before
    for cell in (tmp_path / "one" / "cells").iterdir():
        if cell.name.split("__")[2] not in ones:
            continue
        mine = torch.load(tmp_path / "two" / "cells" / cell.name / "model.pt", weights_only=True)
        theirs = torch.load(cell / "model.pt", weights_only=True)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), cell.name
    # the per-cell report lines came in this process, one per cell
    assert sum(line.startswith("[") and "/3]" in line for line in two.stdout.splitlines()) == 3
    machine = json.loads((tmp_path / "two" / "config.json").read_text())["machine"]
    assert (machine["threads"], machine["jobs"]) == (2, 2)


def test_jobs_and_eval_workers_must_be_a_count_or_auto(tmp_path):
    for option in ("--jobs", "--eval-workers"):
        for bad in ("0", "two", "-1"):
            result = CliRunner().invoke(main, ["bench", "--preset", "quick", "--out", str(tmp_path / bad),
                                               option, bad])
            assert result.exit_code == 2 and option in result.output and "auto" in result.output
            assert not (tmp_path / bad).exists()


def test_auto_jobs_never_runs_more_processes_than_threads(monkeypatch):
    import robustkit.bench.runner as runner

    monkeypatch.setattr(runner, "auto_jobs", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert runner._workers(None, 5, "cpu") == 1  # --threads 1 (or a busy machine): one process
        torch.set_num_threads(2)
        assert runner._workers(None, 5, "cpu") == 2
        assert runner._workers(None, 1, "cpu") == 1  # one cell: this process
        assert runner._workers(None, 5, "cuda") == 1
        assert runner._workers(3, 5, "cpu") == 3  # an explicit count is the user's
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_bench_takes_its_cell_workers_with_it(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("epochs = 1", "epochs = 100000"))  # cells that would train for hours
    bench = subprocess.Popen([sys.executable, "-m", "robustkit", "--threads", "2", "bench", "--config", str(config),
                              "--out", str(tmp_path / "run"), "--jobs", "2"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and time.time() < deadline and bench.poll() is None:
            line = bench.stderr.readline() if bench.stderr else ""
            if "(worker " in line:
                workers.add(int(line.split("(worker ")[1].split(",")[0]))
        assert len(workers) == 2, "the bench did not start its two workers"
    finally:
        bench.kill()  # SIGKILL: the bench cannot stop its workers itself
        bench.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, "cell workers outlived the killed bench"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())
