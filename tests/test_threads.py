"""The thread policy of :mod:`robustkit.threads`: the count from the free cores, the passive OpenMP wait, what
overrides them, and the machine record that runs keep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from robustkit import threads
from robustkit.threads import busy_cores, configure, free_cores, machine_record, session_entries, usable_cores


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 7.5, 1), (2, None, 2),
    (8, 3.2, 5), (8, 0.0, 8), (1, 0.0, 1), (1, 3.0, 1),
])
def test_free_cores_rounds_what_the_others_leave_and_keeps_one(cores, busy, expected):
    assert free_cores(cores, busy) == expected


def test_busy_cores_sees_a_busy_process():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        seen = busy_cores(0.5)
    finally:
        hog.kill()
        hog.wait()
    assert seen is not None and 0.0 <= seen <= os.cpu_count() + 1e-9
    # a process that spins takes a whole core when it gets one; the scheduler's share of it on a machine whose
    # every core is busy is at least 1 / (busy processes per core), so 0.5 is a floor on any machine of <= 2x load
    assert seen >= 0.5


def _stat(busy0: int, busy1: int, idle0: int, idle1: int) -> str:
    """A /proc/stat with two CPUs: user and idle jiffies per CPU, the first line their sums."""
    line = "{} {} 0 0 {} 0 0 0 0 0 0"
    return "\n".join([line.format("cpu ", busy0 + busy1, idle0 + idle1), line.format("cpu0", busy0, idle0),
                      line.format("cpu1", busy1, idle1), "intr 0", ""])


@pytest.mark.parametrize(("usable", "expected"), [({0}, 1.0), ({1}, 0.0), ({0, 1}, 1.0)])
def test_busy_cores_counts_only_the_cores_this_process_may_use(monkeypatch, usable, expected):
    # cpu0 busy for the whole window (100 jiffies), cpu1 idle: a process pinned to cpu1 has its core free
    snapshots = iter([_stat(1000, 50, 10, 900), _stat(1100, 50, 10, 1000)])
    monkeypatch.setattr(threads, "_proc_stat", lambda: next(snapshots))
    monkeypatch.setattr(threads, "_usable_cpu_ids", lambda: usable)
    assert busy_cores(0.0) == expected


def test_busy_cores_falls_back_to_the_whole_machine_when_the_cpus_are_not_listed(monkeypatch):
    snapshots = iter([_stat(1000, 50, 10, 900), _stat(1100, 50, 10, 1000)])
    monkeypatch.setattr(threads, "_proc_stat", lambda: next(snapshots))
    monkeypatch.setattr(threads, "_usable_cpu_ids", lambda: {4, 5})  # not in this /proc/stat
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert busy_cores(0.0) == 1.0  # half of all jiffies busy, times two cores


def _configure_in_fresh_process(args: str, **env: str) -> dict:
    """What :func:`configure` chose in a new interpreter (torch not loaded yet), and the wait policy OpenMP saw."""
    code = (
        "import json, os; from robustkit.threads import configure; "
        f"s = configure({args}); import torch; "
        "print(json.dumps({'threads': s.threads, 'source': s.source, 'wait': s.wait_policy, "
        "'torch': torch.get_num_threads(), 'env': os.environ.get('OMP_WAIT_POLICY')}))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_gets_passive_waiting_and_the_free_cores():
    chosen = _configure_in_fresh_process("None")
    assert chosen["wait"] == "passive" and chosen["env"] == "PASSIVE"
    assert chosen["source"] == "free cores" and 1 <= chosen["threads"] <= usable_cores()
    assert chosen["torch"] == chosen["threads"]


def test_the_users_settings_win():
    chosen = _configure_in_fresh_process("3", OMP_WAIT_POLICY="ACTIVE")
    assert (chosen["threads"], chosen["source"], chosen["torch"]) == (3, "--threads", 3)
    assert chosen["wait"] == "OMP_WAIT_POLICY=ACTIVE" and chosen["env"] == "ACTIVE"
    chosen = _configure_in_fresh_process("None", OMP_NUM_THREADS="1", GOMP_SPINCOUNT="1000")
    assert (chosen["threads"], chosen["source"], chosen["torch"]) == (1, "OMP_NUM_THREADS", 1)
    assert chosen["wait"] == "GOMP_SPINCOUNT=1000" and chosen["env"] is None


def test_an_in_process_caller_keeps_its_thread_count():
    before = torch.get_num_threads()
    chosen = configure(None)  # torch is loaded in this process: the count is the caller's
    assert (chosen.threads, chosen.source) == (before, "as loaded") and torch.get_num_threads() == before


def test_machine_record_and_resumed_sessions():
    record = machine_record()
    assert record["threads"] == torch.get_num_threads() and record["torch_version"] == torch.__version__
    assert record["usable_cores"] <= record["logical_cores"] and record["cpu"]
    first = session_entries(None, pytest.fail, "")
    assert set(first) == {"machine"}
    notes: list[str] = []
    same = session_entries({"machine": first["machine"]}, notes.append, "epoch times")
    assert notes == [] and same["machine"] == first["machine"] and len(same["resumed"]) == 1
    other = {"machine": {**first["machine"], "threads": first["machine"]["threads"] + 1}, "resumed": []}
    again = session_entries(other, notes.append, "epoch times")
    assert len(notes) == 1 and "epoch times before and after are not comparable" in notes[0]
    assert f"started with {first['machine']['threads'] + 1} torch thread(s)" in notes[0]
    assert again["machine"] == other["machine"] and again["resumed"][-1]["threads"] == torch.get_num_threads()


def test_retune_follows_the_free_cores_only_under_the_free_cores_rule(monkeypatch):
    import robustkit.threads as threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    try:
        monkeypatch.setattr(threads, "_CURRENT", threads.ThreadSetting(1, "free cores", "passive", 4))
        torch.set_num_threads(1)
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 0.2)
        assert threads.retune() == (1, 4) and torch.get_num_threads() == 4 and threads.current().threads == 4
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 3.6)
        assert threads.retune() == (4, 1) and torch.get_num_threads() == 1
        assert threads.retune() is None  # no change
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 0.0)
        monkeypatch.setattr(threads, "_CURRENT", threads.ThreadSetting(2, "free cores", "passive", 2))
        assert threads.retune() == (1, 2)  # never above torch's own default
        monkeypatch.setattr(threads, "_CURRENT", threads.ThreadSetting(1, "--threads", "passive", 4))
        torch.set_num_threads(1)
        assert threads.retune() is None and torch.get_num_threads() == 1  # the user's count stays
    finally:
        torch.set_num_threads(before)


def test_a_command_that_loads_torch_gets_the_policy_before_it(tmp_path):
    # click imports a command's module (and with it torch) before the root command's callback: the policy must
    # still reach OpenMP, i.e. be set before that import
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "ROBUSTKIT_ALLOCATOR")}
    subprocess.run([sys.executable, "-m", "robustkit", "--quiet", "train", "--trainer", "standard", "--model",
                    "mnist_fc_small", "--eps", "0.1", "--epochs", "1", "--n-train", "50", "--val-size", "0",
                    "--out", str(tmp_path / "run")], env=clean, check=True, capture_output=True, timeout=300)
    machine = json.loads((tmp_path / "run" / "config.json").read_text())["machine"]
    assert (machine["threads_source"], machine["wait_policy"]) == ("free cores", "passive")
    assert machine["allocator"] == "system"  # ROBUSTKIT_ALLOCATOR=kept is opt-in (robustkit.allocator)


def test_a_share_rule_moves_the_thread_count_at_every_step_of_a_progress_loop():
    from robustkit.progress import progress

    before = torch.get_num_threads()
    wanted = iter([1, 1, 2, 2, 1])
    seen = []
    try:
        torch.set_num_threads(1)
        assert threads.rebalance() is None  # no rule: nothing changes
        threads.set_share(lambda: next(wanted))
        for _ in progress(range(5), desc="loop"):
            seen.append(torch.get_num_threads())
        assert seen == [1, 1, 2, 2, 1]
        assert threads.peak_threads() == 2  # what the bench records for the cell
        threads.reset_peak()
        assert threads.peak_threads() == 1
    finally:
        threads.set_share(None)
        torch.set_num_threads(before)
    assert not threads.share_installed()


@pytest.mark.parametrize("not_started, running, threads, total, expected", [
    (3, 2, 1, 2, 1),  # cells wait: every worker keeps its share
    (0, 2, 1, 2, 1),  # none waits, both workers busy
    (0, 1, 1, 2, 2),  # the other worker finished: its thread comes over
    (0, 0, 1, 2, 2),
    (0, 3, 2, 8, 2),  # 4 workers of 2 threads, one finished: 8 // 3 = 2
    (0, 2, 2, 8, 4),
    (0, 1, 1, 1, 1),  # never below one thread
])
def test_thread_share_of_a_cell_worker(not_started, running, threads, total, expected):
    from robustkit.bench.runner import thread_share

    assert thread_share(not_started, running, threads, total) == expected
