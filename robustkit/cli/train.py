"""``robustkit train``: train a network (a zoo name or the user's own factory) with one of the registered
trainers, with exact resume and DDP.

``--model`` takes a zoo name or a factory ``package.module:function`` / ``file.py:function`` (the same spec
``verify`` and ``attack`` accept): the factory is called once (its code runs) with the root ``--seed`` set, and
its model is probed against the dataset's input shape and number of classes before anything is written.

The trainer (``--trainer``, names from :data:`robustkit.trainers.TRAINERS`) runs
:meth:`~robustkit.trainers.Trainer.fit` on the dataset's training split (or its first ``--n-train`` samples) and
monitors the model after every epoch on a fixed subset of the **test** split: its first ``--val-size`` samples
(clean, 20-step PGD and symbolic-verified accuracy at ``--eps``). Trainer-specific options (``--k``,
``--schedule``, ``--method``, ``--steps``) are checked against the chosen trainer's own options: one that the
trainer does not take is a usage error naming the trainer.

``--out`` (default ``runs/train-<date>-<time>``) receives, atomically:

* ``config.json`` at the start: trainer name and options, the :class:`~robustkit.trainers.TrainConfig`, model,
  dataset, number of training samples, monitoring subset, seed, number of processes, robustkit version;
* ``checkpoint.pt`` after every epoch: the trainer's resume checkpoint (model, optimizer, schedules, every
  random state, history); ``--resume`` continues from it, refusing a checkpoint written with other settings;
* ``history.csv`` and ``history.jsonl`` after every epoch: one row per epoch (the
  :class:`~robustkit.trainers.EpochRecord` fields and the run's dataset, model, trainer, method, eval_eps, seed,
  n_train, robustkit_version; NaN for fields that do not apply, written ``nan`` in the CSV and ``null`` in the
  JSON lines);
* ``model.pt`` at the end: the trained model's state_dict (load it with ``--model SPEC --checkpoint model.pt``,
  SPEC being the zoo name or factory it was trained as, which ``config.json`` records, with the factory file's
  path and SHA-256); ``model.safetensors`` holds the same weights, with the model spec, dataset and trainer in
  its metadata.

Under ``torchrun --nproc_per_node=N -m robustkit train ...`` every process takes 1/N of each batch
(DistributedDataParallel); only rank 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from robustkit.cli import Command, UserError
from robustkit.cli.options import PositiveFloat, global_options, output_dir, parse_eps
from robustkit.data import DATASETS
from robustkit.trainers import TRAINERS, EpochRecord, TrainConfig, Trainer
from robustkit.verifiers import differentiable_methods

if TYPE_CHECKING:
    from torch import nn

    from robustkit.data import Dataset, Split

# the trainer-specific options: each CLI option sets the trainer's option of the same name
TRAINER_OPTIONS = ("k", "schedule", "method", "steps")
FILES = ("model.pt", "model.safetensors", "history.csv", "history.jsonl", "config.json", "checkpoint.pt")
RUN_COLUMNS = ("dataset", "model", "trainer", "method", "eval_eps", "seed", "n_train")
HISTORY_COLUMNS = (*RUN_COLUMNS, *(f.name for f in dataclasses.fields(EpochRecord)), "robustkit_version")
# config.json keys that must match for --resume (the data folder may move; the version may change)
RESUME_KEYS = ("trainer", "trainer_options", "train_config", "model", "dataset", "n_train", "monitor", "processes")


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def _trainer_default(trainer: str, option: str) -> Any:
    return next(f.default for f in dataclasses.fields(TRAINERS[trainer]) if f.name == option)


def trainers_taking(option: str) -> list[str]:
    """The registered trainers that have the keyword option ``option``."""
    return [name for name, cls in TRAINERS.items() if option in {f.name for f in dataclasses.fields(cls)}]


def make_trainer(name: str, given: dict[str, Any]) -> Trainer:
    """The trainer ``name`` with the trainer-specific options that were given (those not None).

    An option the trainer does not take is a :class:`click.UsageError` naming the trainer and those that take it.
    """
    accepted = {f.name for f in dataclasses.fields(TRAINERS[name])}
    options: dict[str, Any] = {}
    for option, value in given.items():
        if value is None:
            continue
        if option not in accepted:
            raise click.UsageError(
                f"--{option} is not an option of the {name} trainer (it applies to: "
                f"{', '.join(trainers_taking(option)) or 'no trainer'})"
            )
        options[option] = value
    return TRAINERS[name](**options)


def process_place() -> tuple[int, int]:
    """``(rank, world size)`` of this process: torchrun's environment, or ``(0, 1)``."""
    from robustkit.trainers.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


@dataclass(frozen=True)
class Run:
    """What identifies a training run: written to ``config.json`` and checked by ``--resume``."""

    trainer: Trainer
    config: TrainConfig
    model: str
    dataset: str
    data_dir: Path | None
    n_train: int
    n_val: int
    processes: int
    model_source: dict[str, str] | None = None

    @property
    def method(self) -> str:
        """The trainer's bound method ('' for trainers without one)."""
        return str(getattr(self.trainer, "method", ""))

    def to_json(self) -> dict[str, Any]:
        from robustkit import __version__

        document = {
            "trainer": self.trainer.name,
            "trainer_options": self.trainer.options(),
            "train_config": self.config.to_dict(),
            "model": self.model,
            **({"model_source": self.model_source} if self.model_source else {}),
            "dataset": self.dataset,
            "data_dir": None if self.data_dir is None else str(self.data_dir),
            "n_train": self.n_train,
            "monitor": {"split": "test", "start": 0, "n": self.n_val},
            "seed": self.config.seed,
            "processes": self.processes,
            "robustkit_version": __version__,
        }
        normalised: dict[str, Any] = json.loads(json.dumps(document))  # tuples -> lists, as read back
        return normalised


def _parse_eps(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:  # missing: robustkit's Command reports it
        return None
    try:
        values = parse_eps(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if len(values) != 1:
        raise click.BadParameter(f"give one training radius, got {value!r}")
    return values[0]


def history_rows(run: Run, history: Sequence[EpochRecord]) -> list[list[Any]]:
    """The rows of ``history.csv`` (and, as dicts, of ``history.jsonl``)."""
    from robustkit import __version__

    common = [run.dataset, run.model, run.trainer.name, run.method, run.config.eps, run.config.seed, run.n_train]
    return [[*common, *record.to_dict().values(), __version__] for record in history]


def write_history(folder: Path, run: Run, history: Sequence[EpochRecord]) -> None:
    """Rewrite ``history.csv`` and ``history.jsonl`` atomically (NaN -> ``nan`` in CSV, ``null`` in JSON)."""
    from robustkit.io import atomic_write_text, json_value, write_csv

    rows = history_rows(run, history)
    write_csv(folder / "history.csv", HISTORY_COLUMNS, rows)
    lines = [
        json.dumps({k: json_value(v) for k, v in zip(HISTORY_COLUMNS, row, strict=True)})
        for row in rows
    ]
    atomic_write_text(folder / "history.jsonl", "".join(f"{line}\n" for line in lines))


def _differing(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The settings (keys of :data:`RESUME_KEYS`, or their sub-keys such as ``lr`` or ``k``) that differ."""
    differing: list[str] = []
    for key in RESUME_KEYS:
        theirs, ours = saved.get(key), mine.get(key)
        if isinstance(theirs, dict) and isinstance(ours, dict):
            differing += sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        elif theirs != ours:
            differing.append(key)
    return differing


def resume_history(folder: Path, run: Run) -> list[EpochRecord]:
    """Check that ``folder`` holds a checkpoint of this very run and return the history it has so far."""
    from robustkit.trainers.base import load_checkpoint

    checkpoint = folder / "checkpoint.pt"
    if not checkpoint.is_file():
        raise UserError(f"--resume: there is no checkpoint.pt in {str(folder)!r} to continue from")
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot resume: {config_file} is unreadable ({exc})") from None
        mine = run.to_json()
        for document in (saved, mine):
            document.get("train_config", {}).pop("device", None)
        differing = _differing(saved, mine)
        if differing:
            raise UserError(
                f"cannot resume from {checkpoint}: it was written with different settings ({', '.join(differing)}; "
                f"see {config_file})"
            )
    saved_checkpoint = load_checkpoint(checkpoint, run.trainer, run.config)
    return [EpochRecord(**row) for row in saved_checkpoint["history"]]


def write_config(folder: Path, run: Run, resume: bool, warn: Callable[[str], None]) -> None:
    """Write ``config.json``: the run's identity and the machine it runs on (``machine``: torch threads, CPU,
    cores, versions, load average; a resume keeps the first session's and adds its own to ``resumed``, and
    warns when the thread count changed; see :func:`robustkit.threads.session_entries`)."""
    from robustkit.io import atomic_write_text
    from robustkit.threads import session_entries

    file = folder / "config.json"
    saved = None
    if resume and file.is_file():
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError):
            saved = None  # resume_history accepted the checkpoint; a damaged record is written anew
    document = {**run.to_json(), **session_entries(saved, warn, "epoch times")}
    atomic_write_text(file, json.dumps(document, indent=2) + "\n")


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def epoch_line(record: EpochRecord, epochs: int) -> str:
    """The line printed after every epoch."""
    weight = "-" if math.isnan(record.weight) else f"{record.weight:.3f}"
    return (
        f"epoch {record.epoch}/{epochs}  time {record.epoch_time_s:.1f}s (total {record.train_time_s:.1f}s)  "
        f"loss {record.loss:.4f}  a {weight}  eps {record.eps:.4g}  clean {_percent(record.clean_acc)}  "
        f"PGD {_percent(record.pgd_acc)}  verified {_percent(record.verified_acc)}"
    )


def load_training_data(
    dataset_name: str, data_dir: Path | None, n_train: int | None, val_size: int
) -> tuple[Dataset, Split]:
    """The dataset and its training split (the first ``n_train`` samples when given). Both ``--n-train`` and
    ``--val-size`` (monitoring samples of the test split) must fit the data, as ``--n-examples`` must."""
    from robustkit.data import load_dataset
    from robustkit.evaluation import take_samples

    dataset = load_dataset(dataset_name, data_dir)
    if len(dataset.train) == 0:
        raise UserError(f"the {dataset_name} files in {dataset.source} have no training split to train on")
    if val_size:
        take_samples(dataset.test, 0, val_size, what=f"the {dataset_name} test split", count="--val-size")
    if n_train is None:
        return dataset, dataset.train
    return dataset, take_samples(dataset.train, 0, n_train, what=f"the {dataset_name} training split",
                                 count="--n-train")


def _model_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--model``: a zoo name or a factory spec (checked for its form here, built when the command runs)."""
    from robustkit.errors import RobustkitError
    from robustkit.models import spec_kind

    if value is None:  # missing: robustkit's Command reports it
        return None
    try:
        kind = spec_kind(value)
    except RobustkitError as exc:
        raise click.BadParameter(str(exc)) from None
    if kind not in ("zoo", "factory"):
        raise click.BadParameter(f"{value} is a {'weights checkpoint' if kind == 'weights' else kind + ' file'}: "
                                 "training builds a new network from a zoo name or a factory "
                                 "(package.module:function or file.py:function)")
    return value


def build_checked(spec: str, dataset: Dataset, seed: int) -> nn.Module:
    """The freshly initialised network ``spec`` (seeded), probed against the dataset's input shape and classes."""
    from robustkit.models import build_network, fit_problem

    model = build_network(spec, seed=seed)
    problem = fit_problem(model, dataset.input_shape, dataset.num_classes, spec=spec, data=dataset.name)
    if problem is not None:
        raise UserError(problem)
    return model


def model_source(spec: str) -> dict[str, str] | None:
    """For a factory in a file: the file's absolute path and SHA-256, recorded in config.json."""
    import hashlib

    from robustkit.models import spec_kind

    target = spec.rsplit(":", 1)[0]
    if spec_kind(spec) != "factory" or not target.endswith(".py"):
        return None
    file = Path(target).expanduser().resolve()
    return {"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def _describe(trainer: Trainer) -> str:
    options = ", ".join(f"{k}={v}" for k, v in trainer.options().items())
    return f"{trainer.name}({options})"


@click.command("train", cls=Command)
@click.option("--trainer", "trainer_name", required=True, type=click.Choice(list(TRAINERS)),
              help="The training method.")
@click.option("--model", "model_name", required=True, callback=_model_spec, metavar="SPEC",
              help="The network to train from scratch: a zoo name (see 'robustkit models') or a factory "
                   "package.module:function or file.py:function returning an nn.Module (its code runs); "
                   "initialised from the root --seed.")
@click.option("--dataset", "dataset_name", type=click.Choice(list(DATASETS)), default="mnist5k", show_default=True,
              help="Registered dataset (see 'robustkit datasets'): trains on its training split.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="Folder with the dataset's files (every dataset except the embedded mnist5k).")
@click.option("--eps", required=True, callback=_parse_eps, metavar="EPS",
              help="Training and monitoring L-inf radius in input space [0, 1] (e.g. 0.1 or 2/255).")
@click.option("--epochs", type=click.IntRange(min=1), default=_default("epochs"), show_default=True, metavar="N",
              help="Passes over the training samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_default("batch_size"), show_default=True,
              metavar="B", help="Samples per optimizer step (shared out among the processes under torchrun).")
@click.option("--lr", type=PositiveFloat(), default=_default("lr"), show_default=True,
              help="Adam learning rate (step schedule: x0.2 at 60% and 85% of the epochs).")
@click.option("--k", type=click.IntRange(min=1), metavar="K",
              help=f"mixtrain: points per batch given the robust loss [default: {_trainer_default('mixtrain', 'k')}].")
@click.option("--schedule", type=click.Choice(["adaptive", "geometric"]),
              help="mixtrain: how the weight a of the robust loss changes per epoch [default: adaptive].")
@click.option("--method", type=click.Choice(list(differentiable_methods())),
              help="verifiable, mixtrain: the bound method of the robust loss [default: symbolic].")
@click.option("--steps", type=click.IntRange(min=1), metavar="S",
              help=f"pgd: PGD steps per training batch [default: {_trainer_default('pgd', 'steps')}].")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=_default("warmup_epochs"), show_default=True,
              help="Epochs at eps 0 before the eps ramp.")
@click.option("--ramp-epochs", type=click.IntRange(min=0), default=_default("ramp_epochs"), show_default=True,
              help="Epochs over which the training eps grows linearly to eps x --eps-factor.")
@click.option("--eps-factor", type=PositiveFloat(), default=_default("eps_factor"),
              show_default=True, help="Train at this multiple of --eps (monitoring stays at --eps).")
@click.option("--val-size", type=click.IntRange(min=0), default=_default("val_size"), show_default=True,
              help="Monitor after every epoch on the first V samples of the TEST split (0: no monitoring).")
@click.option("--n-train", type=click.IntRange(min=1), metavar="N",
              help="Train on the first N training samples only (default: all; for quick runs and tests).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Folder for the run's files (created; default runs/train-<date>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pt.")
@click.pass_context
def train(
    ctx: click.Context, trainer_name: str, model_name: str, dataset_name: str, data_dir: Path | None, eps: float,
    epochs: int, batch_size: int, lr: float, k: int | None, schedule: str | None, method: str | None,
    steps: int | None, warmup_epochs: int, ramp_epochs: int, eps_factor: float, val_size: int,
    n_train: int | None, out: Path | None, resume: bool,
) -> None:
    """Train a zoo network or your own (a factory) with standard, pgd, verifiable or mixtrain training.

    Monitors clean, PGD and symbolic-verified accuracy at --eps after every epoch on the first --val-size
    samples of the test split, prints one line per epoch and writes model.pt, history.csv, history.jsonl,
    config.json and checkpoint.pt to --out. --resume continues an interrupted run exactly. Runs data-parallel
    under 'torchrun --nproc_per_node=N -m robustkit train ...'.

    Example: robustkit train --trainer mixtrain --model mnist_small --eps 0.1 --epochs 20 --out runs/mix
    """
    from robustkit.io import save_safetensors, torch_save_atomic
    from robustkit.progress import set_log, set_progress
    from robustkit.runlock import run_lock
    from robustkit.threads import end_session_file
    from robustkit.trainers import distributed

    options = global_options(ctx)
    set_log(True)  # one line per epoch, stage and cell when stderr is no terminal (not under --quiet)
    ctx.call_on_close(lambda: set_log(False))
    trainer = make_trainer(trainer_name, {"k": k, "schedule": schedule, "method": method, "steps": steps})
    if resume and out is None:
        raise click.UsageError("--resume needs --out DIR: the folder of the run to continue")
    rank, world = process_place()
    main_process = rank == 0
    if not main_process:
        set_progress(False)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, eps=eps, eps_factor=eps_factor, warmup_epochs=warmup_epochs,
        ramp_epochs=ramp_epochs, seed=options.seed, val_size=val_size, device=options.device,
    )
    dataset, train_split = load_training_data(dataset_name, data_dir, n_train, val_size)
    model = build_checked(model_name, dataset, options.seed)
    from robustkit.trainers.base import engine_problem

    problem = engine_problem(model, train_split.x[:2])
    if problem is not None and trainer.bound_method() is not None:
        raise UserError(f"the {trainer.name} trainer needs bounds of the model, but {problem}")
    run = Run(trainer, config, model_name, dataset.name, data_dir, len(train_split), val_size, world,
              model_source(model_name))

    if out is not None:
        folder = out
    elif main_process:
        folder = output_dir(None, "train")
    else:  # only rank 0 writes, so the other processes' folder is only a name (they may not agree on the time)
        folder = Path("runs") / "train"
    if main_process:  # held until the command ends, however it ends (see robustkit.runlock)
        ctx.with_resource(run_lock(folder, "robustkit train" + (" --resume" if resume else ""),
                                   lambda note: click.echo(f"Note: {note}.", err=True)))
    checkpoint = folder / "checkpoint.pt"
    history: list[EpochRecord] = []
    if resume:
        history = resume_history(folder, run)
    elif checkpoint.exists():
        raise UserError(
            f"{str(folder)!r} already holds a training run (checkpoint.pt): add --resume to continue it, or choose "
            "another --out"
        )
    if main_process:
        write_config(folder, run, resume, lambda note: click.echo(f"Warning: {note}.", err=True))
        click.echo(
            f"Training {model_name} with {_describe(trainer)} on {run.n_train} {dataset.name} training samples: "
            f"eps {eps:g}, {epochs} epochs, batch {batch_size}" + (f", {world} processes (DDP)" if world > 1 else "")
        )
        if run.n_val and problem is not None:
            click.echo(f"Note: verified accuracy is not monitored, as the bound engine cannot read the model: "
                       f"{problem}", err=True)
        if run.n_val:
            click.echo(
                f"Monitoring after every epoch on the first {run.n_val} samples of the {dataset.name} TEST split "
                f"(clean, {config.val_pgd_steps}-step PGD and {config.val_method}-verified accuracy at eps {eps:g})."
            )
        else:
            click.echo("No monitoring (--val-size 0): accuracies are reported as '-'.")
        if history:
            click.echo(f"Resuming after epoch {history[-1].epoch} from {checkpoint}.")

    def on_epoch(record: EpochRecord) -> None:
        history.append(record)
        write_history(folder, run, history)
        click.echo(epoch_line(record, epochs))

    result = trainer.fit(model, train_split, dataset.test, config, checkpoint=checkpoint, resume=resume,
                         on_epoch=on_epoch)
    if main_process:
        state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
        torch_save_atomic(state, folder / "model.pt")
        save_safetensors(state, folder / "model.safetensors", {"model": model_name, "dataset": dataset.name,
                                                               "trainer": trainer.name})
        write_history(folder, run, result.history)  # also when a resumed run had no epoch left to train
        last = result.history[-1]
        click.echo(
            f"Done: {len(result.history)} epochs of {trainer.name} in {result.train_time_s:.1f}s of training time "
            f"(monitoring excluded). Last epoch on the first {last.n_val} test samples at eps {eps:g}: clean "
            f"{_percent(last.clean_acc)}, PGD {_percent(last.pgd_acc)}, verified ({config.val_method}) "
            f"{_percent(last.verified_acc)}."
        )
        end_session_file(folder / "config.json", indent=2)
        click.echo(f"Wrote {', '.join(FILES)} to {folder}.")
    distributed.leave_group()
