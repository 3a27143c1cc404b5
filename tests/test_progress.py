"""Progress log lines without a terminal: when they show, their estimates, the heartbeat, and --quiet."""

from __future__ import annotations

import re
import sys

import pytest

from robustkit import progress


@pytest.fixture
def stderr(capsys):
    """stderr as pytest captures it: no terminal (``isatty()`` is False), like output sent to a file."""
    progress.set_progress(True)
    progress.set_log(True)
    yield capsys
    progress.set_log(False)


def messages(capture: pytest.CaptureFixture[str]) -> list[str]:
    text = capture.readouterr().err
    return [re.sub(r"^\[\d\d:\d\d:\d\d \+[\dhms.]+\] ", "", line) for line in text.splitlines()]


def test_work_log_estimates_from_the_finished_units_only(stderr, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    progress.set_log(True)  # the log's clock starts at 0 too
    work = progress.WorkLog("cell", 4, "cell", done=1)  # one finished in an earlier run: not timed here
    now[0] = 10.0
    work.finished("a", 10.0)
    now[0] = 30.0
    work.finished("b", 20.0)
    work.finished("c", None)
    assert messages(stderr) == [
        "cell a done in 10.0s; 2/4 cells, elapsed 10.0s, estimate 20.0s left (2 x the mean 10.0s of the 1 cell "
        "finished here)",
        "cell b done in 20.0s; 3/4 cells, elapsed 30.0s, estimate 15.0s left (1 x the mean 15.0s of the 2 cells "
        "finished here)",
        "cell c finished earlier, reused; 4/4 cells, elapsed 30.0s",
    ]


def test_no_estimate_before_a_unit_was_timed(stderr):
    work = progress.WorkLog("cell", 3, "cell")
    work.finished("a", None)  # reused: says nothing about how long the others take
    assert "estimate" not in messages(stderr)[0]


def test_heartbeat_inside_long_loops(stderr, monkeypatch):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    assert list(progress.progress(range(3), desc="pgd epoch 1/2", unit="batch")) == [0, 1, 2]
    assert [m.split(",")[0] for m in messages(stderr)] == [
        "pgd epoch 1/2: 1/3 batches done", "pgd epoch 1/2: 2/3 batches done", "pgd epoch 1/2: 3/3 batches done"]


def test_quiet_a_terminal_or_a_library_call_log_nothing(stderr, monkeypatch):
    progress.set_progress(False)  # --quiet
    progress.log("hidden")
    progress.set_progress(True)
    progress.set_log(False)  # a library call: no command turned the log on
    progress.log("hidden")
    progress.set_log(True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bars show progress
    progress.log("hidden")
    assert messages(stderr) == []


def test_units_are_counted_in_plain_english(stderr):
    work = progress.WorkLog("  pgd", 2, "epoch")
    work.finished("epoch 1", 1.0)
    assert "1/2 epochs" in messages(stderr)[0]
    assert [progress._plural(u) for u in ("batch", "epoch", "cell", "eps")] == ["batches", "epochs", "cells", "eps"]
