"""CPU threads for torch that behave on a shared machine, and the record of what a run ran on.

torch's own default, one OpenMP thread per core with GNU OpenMP's spinning wait, multiplies run times when
other processes keep the cores busy: every parallel region waits at a barrier for all its threads, a thread
that lost its core holds the others up, and the waiting ones spin on cores the other processes need.
``benchmarks/threads.py`` measures the options; :func:`configure` applies the one chosen from those
measurements (see its docstring). The command line calls it once, before torch is loaded, for every command;
``--threads N`` overrides the count, an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment overrides
the wait policy. :func:`retune` applies the count rule again (the bench calls it before every cell).

:func:`machine_record` is what a run writes down about the machine (threads, allocator, CPU model, cores, torch version,
load average), so that timings of different runs can be compared.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_CURRENT: ThreadSetting | None = None


def usable_cores() -> int:
    """The logical cores this process may run on (its CPU affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return found.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


def _usable_cpu_ids() -> set[int] | None:
    """The CPU numbers this process may run on, or None where the platform does not tell."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return None


def _proc_stat() -> str | None:
    try:
        return Path("/proc/stat").read_text()
    except OSError:
        return None


def _cpu_times(text: str | None, cpus: set[int] | None = None) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot in the ``/proc/stat`` text (Linux): summed over the CPUs numbered
    ``cpus`` (their ``cpuN`` lines), over all CPUs when ``cpus`` is None; None when the text or a line is
    missing."""
    if text is None:
        return None
    lines = text.splitlines()
    busy = total = 0
    seen = 0
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or len(fields) < 5:
            continue
        label = fields[0][3:]
        if cpus is None:
            if label:
                continue  # the first line sums every CPU
        elif not label.isdigit() or int(label) not in cpus:
            continue
        values = [int(v) for v in fields[1:9]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        busy += sum(values) - idle
        total += sum(values)
        seen += 1
    expected = 1 if cpus is None else len(cpus)
    return (busy, total) if seen == expected and seen else None


def busy_cores(window: float = 0.25) -> float | None:
    """How many of this process's usable cores (its CPU affinity) other processes keep busy now: their busy
    share over ``window`` seconds (``/proc/stat``) times their number, while this process sleeps; the
    1-minute load average where ``/proc/stat`` is missing (it lags, and counts every core of the machine),
    None where neither exists."""
    cpus = _usable_cpu_ids()
    text = _proc_stat()
    first = _cpu_times(text, cpus)
    if first is None:
        cpus = None  # e.g. a container whose /proc/stat numbers the CPUs otherwise: the whole machine
        first = _cpu_times(text)
    if first is None:
        return load_average()
    time.sleep(window)
    second = _cpu_times(_proc_stat(), cpus)
    if second is None or second[1] <= first[1]:
        return load_average()
    share = (second[0] - first[0]) / (second[1] - first[1])
    count = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    return round(share * count, 2)


def free_cores(cores: int, busy: float | None) -> int:
    """The usable cores that other processes leave free: ``cores - busy`` rounded to the nearest whole core,
    between 1 and ``cores`` (all of them when ``busy`` is unknown)."""
    if busy is None:
        return cores
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


@dataclass(frozen=True)
class ThreadSetting:
    """How many threads torch got, why, and which OpenMP wait policy."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS", "free cores" or "as loaded" (torch was loaded before)
    wait_policy: str  # "passive", or the environment's setting, or "as loaded" (torch was loaded before)
    ceiling: int = 0  # "free cores": torch's own default count, which the rule never exceeds


def configure(requested: int | None = None) -> ThreadSetting:
    """Choose torch's thread count and OpenMP wait policy for this process; return what was chosen.

    The policy (``benchmarks/threads.py`` measures it against the alternatives on an idle and a busy machine):

    * wait policy ``PASSIVE`` (a thread with nothing to do sleeps at once instead of spinning), unless
      ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set. OpenMP reads it once, when torch loads, so it only
      applies when torch has not been imported yet;
    * ``requested`` threads when given (``--threads``); else, when torch was imported before (an in-process
      caller such as a test or a notebook), torch's current count; else ``OMP_NUM_THREADS`` when set (torch's
      own rule; ``torchrun`` sets it to 1 per process); else the cores that other processes leave free
      (:func:`free_cores` of the usable cores and :func:`busy_cores`, measured over a quarter of a second), so
      a busy machine gets one thread and an idle one all its cores.
    """
    loaded = "torch" in sys.modules
    if any(name in os.environ for name in WAIT_VARIABLES):
        wait = ", ".join(f"{name}={os.environ[name]}" for name in WAIT_VARIABLES if name in os.environ)
    elif loaded:
        wait = "as loaded"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        wait = "passive"
    if requested is not None:
        threads, source = requested, "--threads"
    elif loaded:  # an in-process caller (a test, a notebook) set torch up already: its count stays
        import torch

        threads, source = torch.get_num_threads(), "as loaded"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads, source = free_cores(usable_cores(), busy_cores()), "free cores"
    import torch

    ceiling = torch.get_num_threads()  # torch's own default (one per physical core): the rule never exceeds it
    if source == "free cores":
        threads = min(threads, ceiling)
    torch.set_num_threads(threads)
    global _CURRENT
    _CURRENT = ThreadSetting(threads, source, wait, ceiling)
    return _CURRENT


def retune() -> tuple[int, int] | None:
    """Choose the thread count again from the cores other processes leave free now, when this process's count
    came from that rule (:func:`configure` without ``--threads``): the bench calls it before every cell, so a
    machine that got busy (or free) during a long run gets a count that fits. Returns ``(before, after)``
    when the count changed, else None."""
    global _CURRENT
    if _CURRENT is None or _CURRENT.source != "free cores":
        return None
    import torch

    before = torch.get_num_threads()
    after = min(free_cores(usable_cores(), busy_cores()), _CURRENT.ceiling)
    if after == before:
        return None
    torch.set_num_threads(after)
    _CURRENT = ThreadSetting(after, _CURRENT.source, _CURRENT.wait_policy, _CURRENT.ceiling)
    return before, after


MAX_AUTO_JOBS = 4

_SHARE: Callable[[], int] | None = None
_PEAK = 0


def set_share(rule: Callable[[], int] | None) -> None:
    """Install (or with None remove) the rule that gives this process's torch thread count while it runs: the
    bench's cell workers install their share of the run's threads, which grows once other workers have no cell
    left to run (the last cells of a ``--jobs`` run would otherwise keep one thread each on an idle machine).
    :func:`rebalance` applies it; loops wrapped by :func:`robustkit.progress.progress` call that on every step."""
    global _SHARE
    _SHARE = rule
    reset_peak()


def share_installed() -> bool:
    """Whether a :func:`set_share` rule is installed in this process."""
    return _SHARE is not None


def rebalance() -> tuple[int, int] | None:
    """Apply the :func:`set_share` rule: ``(before, after)`` when the thread count changed, else None (also
    without a rule)."""
    global _PEAK
    if _SHARE is None:
        return None
    import torch

    before, after = torch.get_num_threads(), max(1, _SHARE())
    _PEAK = max(_PEAK, after, before)
    if after == before:
        return None
    torch.set_num_threads(after)
    return before, after


def reset_peak() -> None:
    """Start counting :func:`peak_threads` again (the bench does before every cell)."""
    global _PEAK
    _PEAK = 0


def peak_threads() -> int:
    """The most torch threads this process used since :func:`reset_peak`, at least its current count."""
    import torch

    return max(_PEAK, torch.get_num_threads())


def auto_jobs() -> int:
    """How many bench cells to run at once by default: the cores other processes leave free (at most
    :data:`MAX_AUTO_JOBS`, so that the memory of many concurrent cells stays moderate); 1 on a busy machine."""
    return max(1, min(MAX_AUTO_JOBS, free_cores(usable_cores(), busy_cores())))


def machine_record() -> dict[str, Any]:
    """What a run records about its machine at its start: threads (torch's count, how it was chosen, the wait
    policy), CPU model, logical and usable cores, torch and Python versions, and the 1-minute load average."""
    import torch

    from robustkit import allocator

    setting = current()
    record: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "threads_source": setting.source if setting else "torch",
        "wait_policy": setting.wait_policy if setting else "as loaded",
        "allocator": allocator.current(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "load_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return record


def current() -> ThreadSetting | None:
    """The setting of this process's :func:`configure` call, or None (a Python caller that chose its threads
    itself)."""
    return _CURRENT


def session_entries(saved: Any, warn: Callable[[str], None], what: str, **extra: Any) -> dict[str, Any]:
    """The machine entries of a run's ``config.json`` for this session: ``{"machine": ...}`` for a new run;
    for a resume of ``saved`` (the document written before), the first session's ``machine`` and the list
    ``resumed`` with this session's record added, calling ``warn`` when the thread count differs from the
    session before (``what``, e.g. "epoch times", names the timings that are then not comparable). ``extra``
    entries go into this session's record."""
    machine = {**machine_record(), **extra}
    first = saved.get("machine") if isinstance(saved, dict) else None
    if not isinstance(first, dict):
        return {"machine": machine}
    before = saved.get("resumed")
    sessions = [m for m in before if isinstance(m, dict)] if isinstance(before, list) else []
    previous = sessions[-1] if sessions else first
    if previous.get("threads") != machine["threads"]:
        warn(f"this run was started with {previous.get('threads')} torch thread(s) and is resumed with "
             f"{machine['threads']}: {what} before and after are not comparable (both are recorded in config.json)")
    return {"machine": first, "resumed": [*sessions, machine]}


def end_session(document: dict[str, Any]) -> None:
    """Add the load average and the time at this session's end to its record in ``document`` (in place)."""
    sessions = document.get("resumed")
    session = sessions[-1] if isinstance(sessions, list) and sessions else document.get("machine")
    if isinstance(session, dict):
        session["load_end"] = load_average()
        session["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")


def end_session_file(file: Path, indent: int) -> None:
    """:func:`end_session` on the JSON document ``file`` (a run's ``config.json``), rewritten atomically."""
    import json

    from robustkit.io import atomic_write_text

    document = json.loads(file.read_text())
    end_session(document)
    text = json.dumps(document, indent=indent)
    atomic_write_text(file, text + "\n" if indent > 1 else text)
