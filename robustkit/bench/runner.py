"""The benchmark runner: train and evaluate every cell of the grid, loss-free and resumable.

A run folder holds ``config.json`` (the resolved configuration, and the machine of the run's start and of every
resume: torch threads, CPU model, cores, versions, load average at the start and the end; see
:func:`robustkit.threads.machine_record`), one folder per cell under ``cells/`` (the
trainer's checkpoint after every epoch, ``model.pt`` once trained and ``result.json`` once evaluated, each
written atomically), and the aggregated ``results.csv`` and ``epochs.csv`` (rewritten after every cell), from
which :func:`robustkit.reports.build_report` makes the summary tables, plots and ``index.html``. Re-running
with ``resume`` skips finished cells, resumes a half-trained one from its last epoch and re-evaluates a
trained but unevaluated one. ``result.json`` also keeps the cell's pre-flight ``warnings`` (a file written before
they existed reads as none). A cell evaluated before the bench had its complete stage (a ``result.json`` with the
cell's clean accuracy but not the band's metrics, :data:`~robustkit.bench.complete.BAND_METRICS`) is evaluated
again on resume (its training is kept), and a run folder whose ``config.json`` predates the stage (no
``evaluation.complete``) resumes with this run's evaluation settings, which replace the saved ones: every cell
evaluated before is evaluated again with them, so all cells are measured alike.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustkit.bench.config import BenchConfig, TrainerSpec
from robustkit.bench.evaluate import evaluate_model
from robustkit.data import Dataset, Split, load_dataset
from robustkit.errors import InputError
from robustkit.evaluation import take_samples
from robustkit.io import atomic_write_text, json_value, torch_save_atomic, write_csv
from robustkit.parallel import die_with_parent
from robustkit.progress import WorkLog, format_seconds, log, progress
from robustkit.runlock import LOCK_FILE, run_lock
from robustkit.runtime import PeakMemory
from robustkit.threads import (
    auto_jobs,
    cpu_model,
    end_session_file,
    load_average,
    peak_threads,
    rebalance,
    reset_peak,
    retune,
    session_entries,
    set_share,
)

RESULT_COLUMNS = ("dataset", "model", "trainer", "trainer_name", "train_eps", "eval_eps", "metric", "value", "n",
                  "time_s", "seed", "robustkit_version", "torch_version", "config",
                  # the machine while the cell ran (torch threads, CPU model, 1-minute load average before and after)
                  "threads", "cpu", "load_start", "load_end")
EPOCH_COLUMNS = ("dataset", "model", "trainer", "trainer_name", "train_eps", "seed", "epoch", "train_time_s",
                 "epoch_time_s", "loss", "loss_natural", "loss_robust", "weight", "eps", "lr", "train_acc",
                 "clean_acc", "pgd_acc", "verified_acc", "n_val", "eval_time_s")


@dataclass(frozen=True)
class Cell:
    """One trained model of the grid."""

    dataset: str
    model: str
    trainer: TrainerSpec
    eps: float
    seed: int = 0

    @property
    def key(self) -> str:
        """The cell's folder name under ``cells/``: dataset, model, trainer label, eps and seed."""
        return f"{self.legacy_key}__seed{self.seed}"

    @property
    def legacy_key(self) -> str:
        """The folder name of runs made before seeds were part of the key (resumed where it exists)."""
        text = f"{self.dataset}__{self.model}__{self.trainer.label}__eps{self.eps:g}"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


@dataclass(frozen=True)
class CellOutcome:
    """What a finished cell produced (results rows, epoch rows, violations, pre-flight warnings) and whether it was
    reused."""

    cell: Cell
    results: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    violations: list[str]
    reused: bool
    warnings: list[str] = field(default_factory=list)

    def metric(self, name: str) -> float:
        for row in self.results:
            if row["metric"] == name and float(row["eval_eps"]) == self.cell.eps:
                return float(row["value"])
        return float("nan")


@dataclass(frozen=True)
class BenchRun:
    """A finished run: its folder, every cell's outcome and every consistency violation."""

    folder: Path
    outcomes: tuple[CellOutcome, ...]
    report_files: tuple[Path, ...]

    @property
    def violations(self) -> list[str]:
        return [f"{o.cell.key}: {v}" for o in self.outcomes for v in o.violations]


def plan(config: BenchConfig) -> list[Cell]:
    """The grid's cells in run order: seed (the whole grid of the first seed first, so its table fills first),
    dataset, model, eps, then the trainers in their listed order."""
    return [
        Cell(dataset, model, trainer, eps, seed)
        for seed in config.seeds for dataset in config.datasets for model in config.models for eps in config.eps
        for trainer in config.trainers
    ]


@dataclass(frozen=True, eq=False)
class GridData:
    """A dataset of the grid and the samples every cell uses: training, evaluation (the first ``n_test`` test
    samples) and monitoring (the first ``val_size``), each checked to exist before anything is trained."""

    dataset: Dataset
    train: Split
    test: Split
    monitor: Split | None

    @classmethod
    def load(cls, name: str, config: BenchConfig) -> GridData:
        """Load dataset ``name``; a count of the configuration beyond its splits is an error naming the key."""
        dataset = load_dataset(name, config.data_dir)

        def first(split: Split, n: int, which: str, key: str) -> Split:
            return take_samples(split, 0, n or len(split), what=f"the {name} {which}", count=key)

        train = first(dataset.train, config.n_train, "training split", "data.n_train")
        test = first(dataset.test, config.n_test, "test split", "data.n_test")
        monitor = first(dataset.test, config.val_size, "test split", "data.val_size") if config.val_size else None
        if config.evaluation.eps_sweep and config.evaluation.sweep_n:
            first(test, config.evaluation.sweep_n, "evaluated test samples", "evaluation.sweep_n")
        return cls(dataset, train, test, monitor)


def check_models(config: BenchConfig, datasets: dict[str, GridData]) -> None:
    """Every model of the grid is built once and must fit every dataset (input shape, classes) and be readable by
    the bound engine (every cell is verified), so a bad model fails before any training, naming ``grid.models``;
    a complete verifier named in ``evaluation.complete`` must apply to every model (an error naming the key)."""
    from robustkit.bench.complete import complete_problem
    from robustkit.models import build_network, fit_problem
    from robustkit.models.loading import resolve_spec
    from robustkit.trainers.base import engine_problem

    for spec in config.models:
        model = build_network(resolve_spec(spec, config.model_dir), seed=config.seeds[0])
        for name, data in datasets.items():
            problem = fit_problem(model, data.dataset.input_shape, data.dataset.num_classes, spec=spec, data=name)
            if problem is None:
                unreadable = engine_problem(model, data.test.x[:2])
                problem = None if unreadable is None else f"the bench verifies every model, but {unreadable}"
            if problem is not None:
                raise InputError(f"bench config: grid.models: {problem}")
        problem = complete_problem(config.evaluation.complete, model)
        if problem is not None:
            raise InputError(f"bench config: evaluation.complete: model {spec!r}: {problem} (use auto, another "
                             "complete verifier, or off)")


def _versions() -> tuple[str, str]:
    from robustkit import __version__

    return __version__, torch.__version__


def _check_folder(folder: Path, config: BenchConfig, resume: bool) -> bool:
    """Whether ``folder`` may be used (a clear error otherwise): a new run needs an empty folder, a resume the
    same settings as the saved ones. True for a resume of a run from before the complete stage, whose evaluation
    settings are not compared (every cell it evaluated is evaluated again, see the module docstring)."""
    saved_file = folder / "config.json"
    if not resume:
        if any(entry.name != LOCK_FILE for entry in folder.iterdir()):
            raise InputError(f"output folder {folder} is not empty: use --resume to continue that run or a new --out")
        return False
    if not saved_file.is_file():
        raise InputError(f"cannot resume: {folder} holds no bench run (no config.json)")
    saved = _read_json(saved_file, "config", "this folder cannot be resumed; start the run in a new --out")
    if isinstance(saved, dict) and "seeds" not in saved and "seed" in saved:  # written before seeds
        saved["seeds"] = [saved.pop("seed")]
    mine = json.loads(json.dumps(config.to_dict()))
    evaluation = saved.get("evaluation") if isinstance(saved, dict) else None
    before_complete = isinstance(evaluation, dict) and "complete" not in evaluation
    ignored = {"source", "jobs"} | ({"evaluation"} if before_complete else set())  # jobs: same results
    differing = sorted(k for k in set(saved) | set(mine) if k not in ignored and saved.get(k) != mine.get(k))
    if differing:
        raise InputError(f"cannot resume {folder}: it was run with different settings ({', '.join(differing)})")
    return before_complete


def evaluated_before_complete_stage(outcome: CellOutcome) -> bool:
    """Whether a finished cell's records predate the complete stage: its clean accuracy at its eps is there, the
    band's metrics are not (so the cell must be evaluated again)."""
    from robustkit.bench.complete import BAND_METRICS

    own = {row.get("metric") for row in outcome.results if float(row.get("eval_eps", math.nan)) == outcome.cell.eps}
    return "clean_acc" in own and not set(BAND_METRICS) <= own


def _train(cell: Cell, config: BenchConfig, train: Any, monitor: Any, folder: Path, device: str,
           resume: bool) -> tuple[torch.nn.Module, Any, float]:
    from robustkit.models import build_network
    from robustkit.models.loading import resolve_spec
    from robustkit.trainers import get_trainer
    from robustkit.trainers.base import TrainConfig

    model = build_network(resolve_spec(cell.model, config.model_dir), seed=cell.seed)
    trainer = get_trainer(cell.trainer.name, **cell.trainer.options)
    settings = TrainConfig(**cell.trainer.training, eps=cell.eps, seed=cell.seed, device=device,
                           val_size=config.val_size)
    with PeakMemory() as memory:
        result = trainer.fit(model, train, monitor, settings, checkpoint=folder / "checkpoint.pt", resume=resume)
    torch_save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")
    return model, result, memory.peak_mb


def run_cell(cell: Cell, config: BenchConfig, data: GridData, folder: Path, device: str, resume: bool,
             eval_workers: int = 1) -> CellOutcome:
    """Train (or resume) and evaluate one cell (the evaluation in ``eval_workers`` processes, see
    :func:`robustkit.bench.evaluate.evaluate_model`); its ``result.json`` is written atomically at the end."""
    version, torch_version = _versions()
    folder.mkdir(parents=True, exist_ok=True)
    reset_peak()  # the rows record the most threads the cell used (a worker's share can grow)
    load_start = load_average()
    train, test = data.train, data.test
    model, result, train_memory = _train(cell, config, train, data.monitor, folder, device, resume)
    log(f"  trained ({format_seconds(result.train_time_s)} of training time); evaluating on {len(test)} test samples "
        f"at eps {cell.eps:g}")
    evaluation = evaluate_model(model, data.dataset, test, cell.eps, config.evaluation, cell.seed,
                                workers=eval_workers)
    base = {"dataset": cell.dataset, "model": cell.model, "trainer": cell.trainer.label,
            "trainer_name": cell.trainer.name, "train_eps": cell.eps, "seed": cell.seed}
    tail = {"robustkit_version": version, "torch_version": torch_version, "threads": peak_threads(),
            "cpu": cpu_model(), "load_start": _or_nan(load_start), "load_end": _or_nan(load_average())}
    results = [
        {**base, "eval_eps": cell.eps, "metric": metric, "value": value, "n": n, "time_s": seconds, **tail,
         "config": text}
        for metric, value, n, seconds, text in [
            ("train_time_s", result.train_time_s, len(train), result.train_time_s,
             f"{result.trainer} {json.dumps(cell.trainer.training, sort_keys=True)}"),
            ("epochs", float(len(result.history)), len(train), result.train_time_s, ""),
            ("eval_time_s", evaluation.eval_time_s, len(test), evaluation.eval_time_s, ""),
            ("peak_memory_mb", max(train_memory, evaluation.peak_memory_mb), len(test), 0.0, "train and evaluation"),
        ]
    ]
    results += [
        {**base, "eval_eps": m.eval_eps, "metric": m.metric, "value": m.value, "n": m.n, "time_s": m.time_s, **tail,
         "config": m.config}
        for m in evaluation.measurements
    ]
    epochs = [{**base, **record.to_dict()} for record in result.history]
    outcome = CellOutcome(cell, results, epochs, list(evaluation.violations), reused=False,
                          warnings=list(evaluation.warnings))
    def strict(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: json_value(v) for k, v in row.items()} for row in rows]

    # NaN (a metric that does not apply) is written as null, so result.json is strict JSON
    atomic_write_text(folder / "result.json", json.dumps(
        {"results": strict(results), "epochs": strict(epochs), "violations": outcome.violations,
         "warnings": outcome.warnings}, indent=1, allow_nan=False))
    return outcome


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _record_machine(folder: Path, config: BenchConfig, device: str, on_note: Callable[[str], None] | None,
                    jobs: int, replace_config: bool = False) -> None:
    """Write ``config.json`` at a run's start with the machine it starts on; a resume adds this session's machine
    to its ``resumed`` list, with a note when the thread count changed (see
    :func:`robustkit.threads.session_entries`), and with ``replace_config`` (a run from before the complete
    stage) writes this run's configuration in place of the saved one."""
    version, torch_version = _versions()
    file = folder / "config.json"
    if file.is_file():  # a resume: _check_folder read it, so it is valid JSON
        document = json.loads(file.read_text())
        document.update(session_entries(document, on_note or _warn, "timings of the cells run", jobs=jobs))
        if replace_config:
            document["config"] = config.to_dict()
    else:
        document = {"config": config.to_dict(), "robustkit_version": version, "torch_version": torch_version,
                    "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **session_entries(None, _warn, "", jobs=jobs)}
    atomic_write_text(file, json.dumps(document, indent=1))


def _eval_workers(wanted: int | None, device: str) -> int:
    """The evaluation workers of the next cell run in this process (see :func:`run_bench`)."""
    if wanted is not None:
        if wanted < 1:
            raise InputError(f"bench evaluation workers must be >= 1, got {wanted}")
        return wanted if device == "cpu" else 1
    return torch.get_num_threads() if device == "cpu" else 1


def _warn(note: str) -> None:
    warnings.warn(note, RuntimeWarning, stacklevel=3)


def _workers(jobs: int | None, cells: int, device: str) -> int:
    """How many worker processes run cells: 1 (this process) for a single cell or a GPU."""
    if cells <= 1 or not device.startswith("cpu"):
        return 1
    # auto: never more processes than torch threads (``--threads 1`` keeps one process)
    wanted = min(auto_jobs(), torch.get_num_threads()) if jobs is None else jobs
    if wanted < 1:
        raise InputError(f"bench jobs must be >= 1, got {wanted}")
    return min(wanted, cells)


_WORKER_DATA: dict[str, GridData] = {}


_WORKER_COUNTS: Any = None  # a cell worker's view of the run: [cells not started, cells running] (shared)


def _worker_start(threads: int, total: int, counts: Any, log_on: bool, log_since: float) -> None:
    """A cell worker's setup: its thread count and share rule, no bars, the parent's log state (elapsed times
    counted from the parent's start), and Ctrl-C left to the parent, which stops the workers."""
    import signal

    from robustkit import allocator
    from robustkit.progress import set_log, set_progress

    global _WORKER_COUNTS
    allocator.configure()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    torch.set_num_threads(threads)
    _WORKER_COUNTS = counts
    set_share(lambda: thread_share(counts[0], counts[1], threads, total))
    set_progress(log_on)  # bars of several processes would garble a terminal: only log lines, when the parent logs
    set_log(log_on, since=log_since)


def thread_share(not_started: int, running: int, threads: int, total: int) -> int:
    """A cell worker's torch threads: ``threads`` (the run's ``total`` over its workers) while cells wait to be
    started; once none does, the ``total`` shared among the workers still running one, so the last cells get the
    cores of the workers that have finished (each worker is one process among those running cells).

    >>> thread_share(2, 2, 1, 2), thread_share(0, 2, 1, 2), thread_share(0, 1, 1, 2), thread_share(0, 3, 1, 4)
    (1, 1, 2, 1)
    """
    if not_started > 0:
        return threads
    return max(threads, total // max(1, running))


def _worker_cell(cell: Cell, config: BenchConfig, folder: Path, device: str, resume: bool,
                 position: int, total: int) -> tuple[int, CellOutcome, float]:
    if cell.dataset not in _WORKER_DATA:
        _WORKER_DATA[cell.dataset] = GridData.load(cell.dataset, config)
    counts = _WORKER_COUNTS
    if counts is not None:
        with counts.get_lock():
            counts[0] -= 1
            counts[1] += 1
    try:
        rebalance()
        log(f"cell {cell.key} ({position + 1}/{total}): training {cell.trainer.label} (worker {os.getpid()}, "
            f"{torch.get_num_threads()} thread(s))")
        clock = time.perf_counter()
        outcome = run_cell(cell, config, _WORKER_DATA[cell.dataset], folder, device, resume)
        return position, outcome, time.perf_counter() - clock
    finally:
        if counts is not None:
            with counts.get_lock():
                counts[1] -= 1


#: A cell's evaluation, in units of one epoch of standard training (about a second for ``mnist_small`` on the
#: embedded data): the paper preset's evaluations took 280 to 460 s per cell on 2 AMD EPYC threads.
EVALUATION_COST = 300.0
#: One epoch of full verifiable training with a linear-relaxation bound (symbolic, crown, ...), in the same units
#: (about 120 s for ``mnist_small`` with symbolic bounds); interval bounds cost about 3 and a PGD step about 0.7.
RELAXATION_EPOCH_COST = 120.0


def expected_cost(cell: Cell) -> float:
    """A rough estimate of a cell's time, in epochs of standard training, from its trainer and options: only
    used to start the longest cells first under ``--jobs`` (then the last ones to finish are short).

    >>> from robustkit.bench.config import preset
    >>> cells = plan(preset("paper"))
    >>> [c.trainer.label for c in sorted(cells, key=expected_cost, reverse=True)]
    ['verifiable-symbolic', 'pgd', 'mixtrain', 'verifiable-interval', 'standard']
    """
    from robustkit.trainers import TRAINERS
    from robustkit.trainers.base import TrainConfig

    spec = cell.trainer
    trainer = TRAINERS[spec.name](**spec.options)
    epochs = float(spec.training.get("epochs", TrainConfig.epochs))

    def bound(method: str) -> float:
        return 3.0 if method == "interval" else RELAXATION_EPOCH_COST

    per_epoch = 1.0
    if spec.name == "pgd":
        per_epoch += 0.7 * float(getattr(trainer, "steps", 0))
    elif spec.name == "verifiable":
        per_epoch = bound(str(getattr(trainer, "method", "symbolic")))
    elif spec.name == "mixtrain":
        batch = float(spec.training.get("batch_size", TrainConfig.batch_size))
        share = min(1.0, float(getattr(trainer, "k", 1)) / max(batch, 1.0))
        per_epoch += 2.5 * share * bound(str(getattr(trainer, "method", "symbolic")))
    return EVALUATION_COST + epochs * per_epoch


def _run_parallel(todo: list[tuple[int, Cell, Path]], config: BenchConfig, device: str, resume: bool, workers: int,
                  cells_log: WorkLog, finished: Callable[[int, CellOutcome], None]) -> None:
    """Run the cells ``todo`` in ``workers`` processes (spawned: nothing of this process's state leaks in), the
    longest first by :func:`expected_cost` (grid order among equals; the files keep the grid order); ``finished``
    is called in this process as each cell ends. A worker's error stops the others and is raised here, and so
    does Ctrl-C (every checkpoint is atomic: ``--resume`` continues)."""
    import multiprocessing

    from robustkit.progress import log_enabled, log_started_at

    total = torch.get_num_threads()
    threads = max(1, total // workers)
    log(f"running {len(todo)} cells in {workers} worker processes of {threads} torch thread(s) each (the last "
        f"cells share the {total} thread(s) among the workers still running)")
    context = multiprocessing.get_context("spawn")
    counts = context.Array("i", [len(todo), 0])
    pool = context.Pool(workers, initializer=_worker_start,
                        initargs=(threads, total, counts, log_enabled(), log_started_at()))
    try:
        waiting = [pool.apply_async(_worker_cell, (cell, config, cell_folder, device, resume, position,
                                                   cells_log.total))
                   for position, cell, cell_folder in sorted(todo, key=lambda item: -expected_cost(item[1]))]
        while waiting:
            ready = [job for job in waiting if job.ready()]
            if not ready:
                time.sleep(0.2)
                continue
            for job in ready:
                waiting.remove(job)
                position, outcome, seconds = job.get()  # a worker's exception is raised here
                cells_log.finished(outcome.cell.key, seconds)
                finished(position, outcome)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _read_json(file: Path, key: str, advice: str) -> Any:
    """``json[key]`` of a file the bench wrote; a damaged file is an error naming it, with ``advice``."""
    try:
        return json.loads(file.read_text())[key]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise InputError(f"{file} is damaged (not the JSON file robustkit bench writes): {advice}") from None


def _load_outcome(cell: Cell, file: Path) -> CellOutcome:
    saved = {key: _read_json(file, key, "delete it to evaluate that cell again")
             for key in ("results", "epochs", "violations")}

    def restore(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: (float("nan") if v is None else v) for k, v in row.items()} for row in rows]

    warnings = json.loads(file.read_text()).get("warnings", [])  # the file is valid JSON: its keys were read
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise InputError(f"{file} is damaged (its warnings are not a list of texts): delete it to evaluate that "
                         "cell again")
    return CellOutcome(cell, restore(saved["results"]), restore(saved["epochs"]), list(saved["violations"]),
                       reused=True, warnings=warnings)


def _write_tables(folder: Path, outcomes: list[CellOutcome]) -> None:
    def cell_value(value: Any) -> Any:
        return format(value, ".9g") if isinstance(value, float) else value

    write_csv(folder / "results.csv", RESULT_COLUMNS,
              [[cell_value(row.get(c, "")) for c in RESULT_COLUMNS] for o in outcomes for row in o.results])
    write_csv(folder / "epochs.csv", EPOCH_COLUMNS,
              [[cell_value(row.get(c, "")) for c in EPOCH_COLUMNS] for o in outcomes for row in o.epochs])


def run_bench(
    config: BenchConfig,
    folder: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_cell: Callable[[CellOutcome, int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    on_start: Callable[[], None] | None = None,
    jobs: int | None = 1,
    eval_workers: int | None = None,
) -> BenchRun:
    """Run (or resume) the whole grid into ``folder``; see the module docstring.

    ``jobs`` cells run at once, each in its own worker process with ``threads // jobs`` torch threads (at least
    one; ``threads`` being this process's count), on the CPU only, the longest first (:func:`expected_cost`);
    once no cell waits, the workers still running share the ``threads`` of those that finished
    (:func:`thread_share`). ``None`` picks :func:`robustkit.threads.auto_jobs` (the cores other processes leave
    free, at most 4), never more than ``threads``. The results are the same files in the same order as one at a
    time; a cell's numbers may differ in the last float bits with its thread count, which its results rows record
    (the most threads it used).

    One cell at a time, a cell's evaluation runs in ``eval_workers`` processes that share the torch threads
    (:func:`robustkit.bench.evaluate.evaluate_model`; ``None``: as many as this process has torch threads when
    the evaluation starts, each with one thread: the attacks' small convolutions gain little from a second
    thread, and the batches are independent). The results do not depend on it. Cells run in ``jobs`` workers
    evaluate in their own process.

    The run holds the folder's lock (:func:`robustkit.runlock.run_lock`) from the first check to the report,
    so a second run on the same folder fails at once instead of redoing or overwriting cells; ``on_note``
    receives the note when a stale lock of a killed run is taken over, and when a resume runs with another torch
    thread count than the session before (without ``on_note``, a :class:`RuntimeWarning`). ``on_start`` is called
    once the data and the folder passed their checks, before the first cell.
    """
    folder = Path(folder)
    datasets = {name: GridData.load(name, config) for name in config.datasets}  # bad counts fail before any file
    check_models(config, datasets)
    with run_lock(folder, "robustkit bench" + (" --resume" if resume else ""), on_note):
        before_complete = _check_folder(folder, config, resume)
        if on_start is not None:
            on_start()
        cells = plan(config)
        slots: list[CellOutcome | None] = [None] * len(cells)
        cells_log = WorkLog("cell", len(cells), "cell")
        todo: list[tuple[int, Cell, Path]] = []
        for position, cell in enumerate(cells):
            cell_folder = folder / "cells" / cell.key
            legacy = folder / "cells" / cell.legacy_key
            if resume and len(config.seeds) == 1 and not cell_folder.exists() and legacy.is_dir():
                cell_folder = legacy  # a run made before seeds were part of the cells' folder names
            outcome = None
            if resume and (cell_folder / "result.json").is_file():
                outcome = _load_outcome(cell, cell_folder / "result.json")
                if evaluated_before_complete_stage(outcome):
                    log(f"cell {cell.key}: evaluated before the bench had its complete stage; evaluating it again")
                    outcome = None
            if outcome is not None:
                slots[position] = outcome
                cells_log.finished(cell.key, None)
            else:
                todo.append((position, cell, cell_folder))
        workers = _workers(jobs, len(todo), device)
        if before_complete:
            (on_note or _warn)(f"{folder / 'config.json'} predates the complete stage: this run's evaluation settings "
                               "replace the saved ones, and the cells evaluated before are evaluated again")
        _record_machine(folder, config, device, on_note, workers, replace_config=before_complete)

        def finished(position: int, outcome: CellOutcome) -> None:
            slots[position] = outcome
            _write_tables(folder, [o for o in slots if o is not None])
            if on_cell is not None:
                on_cell(outcome, position + 1, len(cells))

        for position, outcome in enumerate(slots):  # cells finished before, in grid order
            if outcome is not None:
                finished(position, outcome)
        if workers > 1:
            _run_parallel(todo, config, device, resume, workers, cells_log, finished)
        for position, cell, cell_folder in progress(todo if workers <= 1 else [], desc="bench cells", unit="cell"):
            changed = retune()
            if changed is not None:
                log(f"torch threads {changed[0]} -> {changed[1]}: the cores other processes leave free now")
            log(f"cell {cell.key} ({position + 1}/{len(cells)}): training {cell.trainer.label}")
            clock = time.perf_counter()
            outcome = run_cell(cell, config, datasets[cell.dataset], cell_folder, device, resume,
                               _eval_workers(eval_workers, device))
            cells_log.finished(cell.key, time.perf_counter() - clock)
            finished(position, outcome)
        outcomes = [o for o in slots if o is not None]
        from robustkit.reports.build import build_report

        clock = time.perf_counter()
        files = build_report(folder)
        log(f"report: {len(files)} files in {format_seconds(time.perf_counter() - clock)}")
        end_session_file(folder / "config.json", indent=1)
    return BenchRun(folder, tuple(outcomes), tuple(files))
