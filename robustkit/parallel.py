"""Per-sample work in worker processes or on a Dask cluster, with every finished task kept on disk.

Complete verification is embarrassingly parallel over samples: :func:`run_tasks` applies one function to a
list of independent tasks, in ``workers`` local processes (spawned, one torch thread each unless told
otherwise) or on an existing Dask cluster (``scheduler``: the scheduler's address, e.g.
``tcp://10.0.0.5:8786``; ``dask[distributed]`` must be installed, the ``cluster`` extra), or in this process
when ``workers`` is 1. The shared ``context`` (the model, the verifiers) is sent to each worker once.

With a :class:`TaskStore`, every finished task's result is written atomically to its own file as soon as it
arrives, and tasks whose file exists are not run again: a killed run loses at most the tasks in flight, and
``--resume`` continues it. Results are returned in task order whatever the order of completion. Stored
results are plain tensors, strings and numbers, read back with ``torch.load(weights_only=True)``, which
refuses anything else.

A :class:`WorkerPool` keeps its processes for many calls (the bench's evaluation stages of one cell share one,
so the processes start once): each call's context is pickled once and sent with its tasks, and a worker
unpickles it once per call.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from robustkit.errors import InputError

__all__ = ["TaskStore", "WorkerPool", "die_with_parent", "iter_tasks", "run_tasks"]

Task = Any
Result = Any
Work = Callable[[Any, Task], Result]

_CONTEXT: Any = None
#: seconds to wait for a Dask scheduler to answer before giving up with a clear error
CONNECT_TIMEOUT_S = 30.0


class TaskStore:
    """A folder of finished tasks: ``<key>.pt`` per task and ``config.json``, the settings they were run
    with. A folder with results from other settings is refused (resuming must not mix runs)."""

    def __init__(self, folder: Path, config: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        marker = folder / "config.json"
        if folder.exists() and any(folder.iterdir()):
            if not resume:
                raise InputError(f"{folder} holds results of an earlier run: pass --resume to continue it, or "
                                 "delete the folder to start over")
            try:
                stored = json.loads(marker.read_text())
            except (OSError, ValueError):
                raise InputError(f"{marker} is missing or damaged: cannot tell which run {folder} belongs to; "
                                 "delete the folder to start over") from None
            if stored != json.loads(json.dumps(config)):
                changed = sorted(key for key in set(stored) | set(config) if stored.get(key) != config.get(key))
                raise InputError(f"--resume: {folder} was run with other settings ({', '.join(changed)} differ); "
                                 "use the same settings or another output folder")
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(marker, json.dumps(config, indent=2, sort_keys=True).encode())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> Result | None:
        """The stored result of ``key``, or None when it is not stored (a damaged file counts as not stored)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a file cut short by a kill: run the task again
            return None

    def save(self, key: str, result: Result) -> None:
        handle, name = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        torch.save(result, name)
        os.replace(name, self.path(key))


def _atomic_write(path: Path, data: bytes) -> None:
    handle, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.replace(name, path)


def die_with_parent() -> None:
    """On Linux, have the kernel kill this worker process when its parent dies, however it dies (``kill -9``, an
    out-of-memory kill): a worker left running would go on working, or writing a run folder while a ``--resume``
    takes the run over (one writer per run folder). Elsewhere a worker ends when it next asks for work."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _initialise(context: Any, threads: int) -> None:
    global _CONTEXT
    import signal

    from robustkit import allocator

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    die_with_parent()
    allocator.configure()
    torch.set_num_threads(threads)
    _CONTEXT = context


def _run_in_worker(work: Work, task: Task) -> Result:
    return work(_CONTEXT, task)


#: a pooled worker's context of the current call: (call number, context)
_POOLED: tuple[int, Any] = (-1, None)


def _run_pooled(work: Work, call: int, blob: bytes, modules: dict[str, str], task: Task) -> tuple[Result, float]:
    """One task in a pooled worker: the result and the peak memory (MiB) the task added to the worker."""
    global _POOLED
    from robustkit.runtime import PeakMemory

    if _POOLED[0] != call:
        from robustkit.models.loading import import_file_module

        for name, file in modules.items():  # factory files the context's classes come from
            if name not in sys.modules:
                import_file_module(name, Path(file))
        _POOLED = (-1, None)  # the previous call's context is freed first
        _POOLED = (call, pickle.loads(blob))  # bytes this worker's parent pickled, never a file
    with PeakMemory() as memory:
        result = work(_POOLED[1], task)
    return result, memory.peak_mb


class WorkerPool:
    """``workers`` spawned processes of ``threads`` torch threads each, kept for many :func:`iter_tasks` calls
    (``pool=``) until :meth:`close` (or the end of a ``with`` block). The context of a call must pickle (classes
    from factory files too: the workers import those files under the same module names). ``peak_mb`` is the
    most memory one task added to its worker so far."""

    _calls = itertools.count()

    def __init__(self, workers: int, threads: int = 1) -> None:
        if workers < 2:
            raise InputError(f"a worker pool needs at least 2 workers, got {workers}")
        self.workers = workers
        self.threads = threads
        self.peak_mb = 0.0
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                             initializer=_initialise, initargs=(None, threads))

    def run(self, work: Work, context: Any, tasks: Sequence[Task], todo: Sequence[int] | None = None,
            keep_going: Callable[[], bool] | None = None) -> Iterator[tuple[int, Result]]:
        """``(index, result)`` for the tasks ``todo`` (default: all), in order of completion. At most one task per
        worker is in flight, the next one started as one finishes, and none once ``keep_going()`` is False (the
        tasks not started are then not yielded)."""
        from robustkit.models.loading import user_modules

        blob = pickle.dumps(context)
        call = next(self._calls)
        modules = user_modules()
        waiting = list(range(len(tasks)) if todo is None else todo)[::-1]
        running: dict[Future[tuple[Result, float]], int] = {}

        def feed() -> None:
            while waiting and len(running) < self.workers and (keep_going is None or keep_going()):
                index = waiting.pop()
                running[self._executor.submit(_run_pooled, work, call, blob, modules, tasks[index])] = index

        try:
            feed()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    result, peak_mb = future.result()
                    self.peak_mb = max(self.peak_mb, peak_mb)
                    yield running.pop(future), result
                feed()
        finally:
            for future in running:  # an error or an abandoned call: drop what has not started
                future.cancel()

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        self.close(wait=kind is None)


def _run_on_dask(work: Work, context: Any, task: Task, threads: int) -> Result:
    from robustkit import allocator

    allocator.configure()
    torch.set_num_threads(threads)
    return work(context, task)


def iter_tasks(work: Work, context: Any, tasks: Sequence[Task], keys: Sequence[str], *, workers: int = 1,
               scheduler: str | None = None, store: TaskStore | None = None, threads: int = 1,
               pool: WorkerPool | None = None) -> Iterator[tuple[int, Result]]:
    """``(index, work(context, tasks[index]))`` for every task, computed in parallel (module docstring), stored
    ones first, then in order of completion. ``keys`` name the tasks in ``store``. ``work`` must be a
    module-level function (it is sent to the workers by reference). With a ``pool`` its processes run the
    tasks (``workers`` and ``threads`` are then the pool's)."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if len(keys) != len(tasks):
        raise ValueError("one key per task")
    todo = []
    for index, key in enumerate(keys):
        found = store.load(key) if store is not None else None
        if found is None:
            todo.append(index)
        else:
            yield index, found

    def finished(index: int, result: Result) -> tuple[int, Result]:
        if store is not None:
            store.save(keys[index], result)
        return index, result

    if scheduler is not None:
        yield from (finished(i, r) for i, r in _run_dask(work, context, tasks, todo, scheduler, threads))
    elif pool is not None and len(todo) > 1:
        yield from (finished(i, r) for i, r in pool.run(work, context, tasks, todo))
    elif workers == 1 or len(todo) <= 1:
        for index in todo:
            yield finished(index, work(context, tasks[index]))
    else:
        executor = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn"),
                                       initializer=_initialise, initargs=(context, threads))
        try:
            running: dict[Future[Result], int] = {executor.submit(_run_in_worker, work, tasks[i]): i for i in todo}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield finished(running.pop(future), future.result())
        except BaseException:  # Ctrl-C or a failed task: drop the queued tasks, do not wait for running ones
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)


def run_tasks(work: Work, context: Any, tasks: Sequence[Task], keys: Sequence[str], **options: Any) -> list[Result]:
    """The results of :func:`iter_tasks` in task order."""
    results: list[Result] = [None] * len(tasks)
    for index, result in iter_tasks(work, context, tasks, keys, **options):
        results[index] = result
    return results


def _run_dask(work: Work, context: Any, tasks: Sequence[Task], todo: list[int], scheduler: str,
              threads: int) -> Iterator[tuple[int, Result]]:
    try:
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        raise InputError("--scheduler needs Dask's distributed scheduler: pip install 'robustkit[cluster]' "
                         "(dask[distributed])") from None
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from None
    try:
        if not todo:
            return
        shared = client.scatter(context, broadcast=True)
        futures = {client.submit(_run_on_dask, work, shared, tasks[i], threads, pure=False): i for i in todo}
        for future in distributed.as_completed(futures):
            yield futures[future], future.result()
    finally:
        client.close()
