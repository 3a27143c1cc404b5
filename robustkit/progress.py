"""Progress for long loops: tqdm bars on a terminal, one log line per unit of work without one.

On a terminal (stderr is a tty) :func:`progress` shows a tqdm bar on stderr. Without one (output sent to a file
or a pipe) bars are off, and commands that run for long (``bench``, ``train``) turn on log lines instead
(:func:`set_log`): :func:`log` writes one line on stderr, prefixed with the wall-clock time and the time since
the log was turned on, ``[02:41:07 +3m12s]``. :class:`WorkLog` logs each finished unit of a known amount of work
(an epoch, a cell) with its time and, once a unit has finished, an estimate of what is left from the units
finished so far; :func:`progress` adds a line at most every :data:`HEARTBEAT_S` seconds inside a long loop (a
slow epoch), so a log never falls silent for long. ``--quiet`` silences bars and log lines alike; library calls
log nothing unless a command turned the log on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

T = TypeVar("T")

HEARTBEAT_S = 30.0
"""Inside a loop wrapped by :func:`progress`, the longest silence (plus one item) between log lines."""

_enabled = True
_log = False
_log_started = 0.0
_last_line = 0.0


def set_progress(enabled: bool) -> None:
    """Turn progress bars and log lines on or off for this process (the CLI's ``--quiet`` turns them off)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether a progress bar would be shown now."""
    return _enabled and sys.stderr.isatty()


def set_log(enabled: bool, since: float | None = None) -> None:
    """Turn log lines on (``bench`` and ``train`` do) or off; they show only while stderr is no terminal and
    progress is not silenced. Elapsed times in the lines count from the call that turns them on, or from the
    wall-clock time ``since`` (:func:`log_started_at` of another process: the bench's cell workers)."""
    global _log, _log_started, _last_line
    _log = enabled
    _last_line = time.perf_counter()
    _log_started = _last_line if since is None else _last_line - max(0.0, time.time() - since)


def log_started_at() -> float:
    """The wall-clock time (:func:`time.time`) from which this process's log lines count their elapsed time."""
    return time.time() - (time.perf_counter() - _log_started)


def log_enabled() -> bool:
    """Whether :func:`log` prints now: turned on, not silenced, and no terminal (where bars show progress)."""
    return _log and _enabled and not sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    """A duration in a log line: ``4.2s``, ``3m12s``, ``1h05m``.

    >>> format_seconds(4.21), format_seconds(192.4), format_seconds(3900.0)
    ('4.2s', '3m12s', '1h05m')
    """
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes}m{whole % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def log(message: str) -> None:
    """Write ``[HH:MM:SS +elapsed] message`` as one line on stderr when :func:`log_enabled`."""
    global _last_line
    if not log_enabled():
        return
    now = time.perf_counter()
    _last_line = now
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')} +{format_seconds(now - _log_started)}] {message}\n")
    sys.stderr.flush()


class WorkLog:
    """Log lines for ``total`` units of work (``unit``: epoch, cell), ``done`` of which finished before (a
    resumed run); see the module docstring.

    The estimate of what is left is the mean time of the units finished and timed in this process times the
    units left, and says so; there is none before the first unit finishes.
    """

    def __init__(self, what: str, total: int, unit: str, done: int = 0) -> None:
        self.what, self.total, self.unit, self.done = what, total, unit, done
        self.started = time.perf_counter()
        self.timed = 0
        self.timed_seconds = 0.0

    def finished(self, label: str, seconds: float | None, details: str = "") -> None:
        """Log that the unit ``label`` finished after ``seconds`` (None: not run here, e.g. reused)."""
        self.done += 1
        if seconds is not None:
            self.timed += 1
            self.timed_seconds += seconds
        left = self.total - self.done
        took = "finished earlier, reused" if seconds is None else f"done in {format_seconds(seconds)}"
        line = (f"{self.what} {label} {took}{details}; {self.done}/{self.total} {_plural(self.unit)}, elapsed "
                f"{format_seconds(time.perf_counter() - self.started)}")
        if left and self.timed:
            mean = self.timed_seconds / self.timed
            line += (f", estimate {format_seconds(left * mean)} left ({left} x the mean {format_seconds(mean)} of "
                     f"the {self.timed} {_plural(self.unit) if self.timed > 1 else self.unit} finished here)")
        log(line)


def _plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``epoch`` -> ``epochs``, ``cell`` -> ``cells``; ``eps`` stays."""
    if unit == "eps":
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "sh", "tch")) else "s")


def _heartbeat(iterable: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    started = time.perf_counter()
    for count, item in enumerate(iterable, start=1):
        yield item
        if time.perf_counter() - _last_line >= HEARTBEAT_S:
            of = f"/{total}" if total is not None else ""
            log(f"{desc}: {count}{of} {_plural(unit)} done, {format_seconds(time.perf_counter() - started)} so far")


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when progress bars are enabled, and in a heartbeat of log lines (at most
    every :data:`HEARTBEAT_S` seconds) when log lines are; keyword arguments go to tqdm (``desc`` and ``unit``
    name the loop in log lines too)."""
    from robustkit import threads

    if log_enabled():
        wrapped = _heartbeat(iterable, str(kwargs.get("desc", "working")), str(kwargs.get("unit", "it")),
                             kwargs.get("total"))
    else:
        from tqdm.auto import tqdm

        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        wrapped = tqdm(iterable, disable=not progress_enabled(), file=sys.stderr, **kwargs)
    return _rebalancing(wrapped) if threads.share_installed() else wrapped


def _rebalancing(iterable: Iterable[T]) -> Iterator[T]:
    """``iterable`` with :func:`robustkit.threads.rebalance` before every item (a bench cell worker's thread
    share), logging each change."""
    from robustkit import threads

    for item in iterable:
        changed = threads.rebalance()
        if changed is not None:
            log(f"torch threads {changed[0]} -> {changed[1]}: the other cell workers have no cell left to run")
        yield item
