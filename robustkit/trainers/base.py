"""What every trainer shares: configuration, the epoch loop, monitoring, checkpoints and exact resume.

``Trainer.fit(model, train, val, config) -> TrainResult``. A trainer implements one method,
:meth:`Trainer.batch_loss`; the base class runs the epochs (seeded data order, eps and learning-rate
schedules, Adam or SGD), measures cumulative training wall time (monitoring excluded), evaluates clean, PGD
and verified accuracy on the monitoring subset after every epoch, writes an atomic checkpoint (model,
optimizer, schedules, every random state, history) and, with ``resume``, continues from it so that the final
weights equal those of an uninterrupted run. Under ``torchrun`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.data import Split
from robustkit.errors import InputError, NonFiniteError, UnsupportedLayerError
from robustkit.progress import WorkLog, format_seconds, progress
from robustkit.trainers import distributed
from robustkit.trainers.schedules import EpsSchedule, LRSchedule

CHECKPOINT_FORMAT = "robustkit-train-checkpoint/1"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Options shared by every trainer (see the module docstring); eps is in input units [0, 1].

    The training eps ramps from 0 (after ``warmup_epochs`` at 0) to ``eps_factor * eps`` over
    ``ramp_epochs``; monitoring after every epoch uses ``eps`` itself on ``val_size`` samples of the
    monitoring split, with ``val_pgd_steps``-step PGD and the ``val_method`` verifier.
    """

    epochs: int = 20
    batch_size: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    eps: float = 0.1
    eps_factor: float = 1.0
    warmup_epochs: int = 0
    ramp_epochs: int = 0
    ramp: str = "linear"
    grad_clip: float | None = None
    seed: int = 0
    val_size: int = 200
    val_pgd_steps: int = 20
    val_method: str = "symbolic"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("epochs and batch size must be >= 1")
        if not 0 <= self.eps <= 1 or not self.eps_factor > 0 or not 0 <= self.eps * self.eps_factor <= 1:
            raise InputError(
                f"eps must be in [0, 1] (also after eps_factor), got eps={self.eps}, factor={self.eps_factor}"
            )
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.val_size < 0 or self.val_pgd_steps < 0:
            raise InputError("val_size and val_pgd_steps must be >= 0")
        if not self.momentum >= 0 or not self.weight_decay >= 0:
            raise InputError(f"momentum and weight_decay must be >= 0, got {self.momentum} and {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be > 0 (or left out), got {self.grad_clip}")
        EpsSchedule(self.eps, self.warmup_epochs, self.ramp_epochs, self.ramp)
        LRSchedule(self.lr, self.lr_schedule, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EpochRecord:
    """One row of the training history."""

    epoch: int
    train_time_s: float
    epoch_time_s: float
    loss: float
    loss_natural: float
    loss_robust: float
    weight: float
    eps: float
    lr: float
    train_acc: float
    clean_acc: float
    pgd_acc: float
    verified_acc: float
    n_val: int
    eval_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The trained model (eval mode), its history and the configuration that produced it."""

    model: nn.Module
    history: tuple[EpochRecord, ...]
    config: TrainConfig
    trainer: str
    train_time_s: float


@dataclass(eq=False)
class LossParts:
    """A batch's loss to minimise and its parts for the history (robust loss NaN when not computed)."""

    loss: Tensor
    natural: float
    robust: float = float("nan")
    correct: int = 0
    count: int = 0


@dataclass(eq=False)
class TrainState:
    """Per-run state handed to :meth:`Trainer.batch_loss`: random generators, epoch, schedule position."""

    net: nn.Module  # the model as trained (DistributedDataParallel under torchrun)
    model: nn.Module  # the plain model (bound engines and attacks read it)
    dist: distributed.DistInfo
    attack_generator: torch.Generator
    sample_generator: torch.Generator
    eval_eps: float = 0.0  # the radius robustness is measured at (config.eps)
    epoch: int = 0
    ramp_progress: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def natural_loss(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the clean batch and its logits."""
    logits = net(x)
    return F.cross_entropy(logits, y), logits


def check_bound_method(method: str, what: str) -> None:
    """A clear error unless ``method`` is a registered verifier whose bounds are differentiable (a loss)."""
    from robustkit.verifiers import differentiable_methods

    if method not in differentiable_methods():
        raise InputError(f"{what} must be a verifier with differentiable bounds, one of "
                         f"{', '.join(differentiable_methods())}; got {method!r}")


def robust_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str) -> Tensor:
    """Cross-entropy of the worst-case margins: the vector of upper bounds of f_j - f_y (0 for y)."""
    from robustkit.verifiers import margin_bounds

    return F.cross_entropy(-margin_bounds(model, x, y, eps, method=method), y)


@dataclass(frozen=True, kw_only=True)
class Trainer(ABC):
    """Base of all trainers; subclasses implement :meth:`batch_loss` (and may keep per-run state)."""

    name: ClassVar[str]

    @abstractmethod
    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        """The loss of one (sharded) batch at training radius ``eps``."""

    def weight(self, state: TrainState) -> float:
        """The loss weight logged per epoch (MixTrain's a, verifiable training's kappa); NaN if none."""
        return float("nan")

    def end_epoch(self, state: TrainState, train: Split, ramp_done: bool) -> None:  # noqa: B027 - optional hook
        """Hook after each epoch's training (MixTrain sets its weight here; counts as training time)."""

    def state_dict(self, state: TrainState) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: TrainState, saved: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` saved."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bound_method(self) -> str | None:
        """The verifier whose bounds the loss uses (verifiable, mixtrain), or None: such trainers need a model
        the bound engine reads, and :meth:`fit` refuses any other before the first batch."""
        return None

    def fit(
        self,
        model: nn.Module,
        train: Split,
        val: Split | None,
        config: TrainConfig,
        *,
        checkpoint: str | Path | None = None,
        resume: bool = False,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> TrainResult:
        """Train ``model`` in place; see the module docstring.

        A trainer with a :meth:`bound_method` refuses, before the first batch, a model the bound engine cannot
        read (:class:`~robustkit.errors.UnsupportedLayerError` naming every unsupported layer); the others train
        it and leave the verified accuracy of the monitoring out (NaN)."""
        from robustkit.runtime import resolve_device

        if len(train) == 0:
            raise InputError("the dataset has no training split (e.g. an MNIST folder with only the test files)")
        device = distributed.local_device(resolve_device(config.device))
        info = distributed.setup(device)
        model.to(device)
        problem = engine_problem(model, train.x[:2].to(device))
        if problem is not None and self.bound_method() is not None:
            raise problem
        model.train()
        net: nn.Module = model
        if info.active:
            device_ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        optimizer = make_optimizer(model, config)
        eps_schedule = EpsSchedule(
            config.eps * config.eps_factor, config.warmup_epochs, config.ramp_epochs, config.ramp
        )
        lr_schedule = LRSchedule(config.lr, config.lr_schedule, config.epochs)
        data_generator = torch.Generator().manual_seed(config.seed)
        state = TrainState(
            net=net, model=model, dist=info,
            attack_generator=torch.Generator(device=device).manual_seed(config.seed + 1 + 7919 * info.rank),
            sample_generator=torch.Generator().manual_seed(config.seed + 2 + 7919 * info.rank),
            eval_eps=config.eps,
        )
        history: list[EpochRecord] = []
        train_time = 0.0
        start_epoch = 0
        path = Path(checkpoint) if checkpoint is not None else None
        if resume and path is not None and path.is_file():
            saved = load_checkpoint(path, self, config)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            data_generator.set_state(saved["generators"]["data"])
            state.attack_generator.set_state(saved["generators"]["attack"][info.rank])
            state.sample_generator.set_state(saved["generators"]["sample"][info.rank])
            torch.set_rng_state(saved["torch_rng"])
            self.load_state_dict(state, saved["trainer_state"])
            history = [EpochRecord(**row) for row in saved["history"]]
            train_time = float(saved["train_time_s"])
            start_epoch = int(saved["epoch"])
        monitor = val.subset(0, config.val_size) if val is not None and config.val_size > 0 else None
        n = len(train)
        batches = math.ceil(n / config.batch_size)
        epochs_log = WorkLog(f"  {self.name}", config.epochs, "epoch", done=start_epoch)
        for epoch in range(start_epoch, config.epochs):
            lr = lr_schedule(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(n, generator=data_generator)
            state.epoch = epoch
            model.train()
            started = time.perf_counter()
            sums = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # loss, natural, robust, robust batches, correct, count
            eps = 0.0
            bar = progress(range(batches), desc=f"{self.name} epoch {epoch + 1}/{config.epochs}", unit="batch")
            seen = 0
            for batch in bar:
                whole = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                if len(whole) < info.world:
                    continue  # under torchrun a last batch smaller than the number of processes is dropped
                index = distributed.shard(whole, info)
                x, y = train.x[index].to(device), train.y[index].to(device)
                eps = eps_schedule(epoch, batch, batches)
                state.ramp_progress = eps_schedule.progress(epoch, batch, batches)
                parts = self.batch_loss(x, y, eps, state)
                where = Divergence(epoch + 1, batch + 1, batches, lr, path, len(history))
                # every process learns of a non-finite loss anywhere, so all of them stop at the same batch
                if distributed.all_sum([float(not bool(torch.isfinite(parts.loss.detach())))], info, device)[0]:
                    raise where.error(f"the loss is {float(parts.loss.detach())}")
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over processes; weighting by the share keeps it the batch mean
                share = len(index) * info.world / len(whole)
                (parts.loss * share).backward()  # type: ignore[no-untyped-call]
                seen += 1
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                # the weights are the same in every process (DDP averages the gradients)
                broken = non_finite_parameters(model)
                if broken:
                    raise where.error(f"the optimizer step left NaN or infinite weights in {', '.join(broken[:3])}")
                robust_seen = not math.isnan(parts.robust)
                sums = [a + b for a, b in zip(sums, [
                    float(parts.loss.detach()), parts.natural, parts.robust if robust_seen else 0.0,
                    float(robust_seen), parts.correct, parts.count], strict=True)]
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        loss=f"{float(parts.loss.detach()):.3f}", a=f"{self.weight(state):.2f}", eps=f"{eps:.3f}"
                    )
            weight = self.weight(state)  # the weight this epoch trained with (end_epoch sets the next one's)
            self.end_epoch(state, train, eps_schedule.ramp_done(epoch + 1))
            sums = distributed.all_sum(sums, info, device)
            epoch_time = time.perf_counter() - started
            train_time += distributed.all_sum([epoch_time], info, device)[0] / info.world
            evaluated = time.perf_counter()
            clean, pgd, verified, count = evaluate(model, monitor, config, epoch, info, device,
                                                   verify=problem is None)
            record = EpochRecord(
                epoch=epoch + 1, train_time_s=train_time, epoch_time_s=epoch_time,
                loss=sums[0] / max(seen * info.world, 1), loss_natural=sums[1] / max(seen * info.world, 1),
                loss_robust=sums[2] / sums[3] if sums[3] else float("nan"), weight=weight, eps=eps,
                lr=lr, train_acc=sums[4] / max(sums[5], 1), clean_acc=clean, pgd_acc=pgd, verified_acc=verified,
                n_val=count, eval_time_s=time.perf_counter() - evaluated,
            )
            history.append(record)
            if path is not None:
                save_checkpoint(path, self, config, epoch + 1, model, optimizer, data_generator, state, history,
                                train_time)
            if info.main:
                epochs_log.finished(f"epoch {epoch + 1}", epoch_time + record.eval_time_s,
                                    f" (training {format_seconds(epoch_time)}, monitoring "
                                    f"{format_seconds(record.eval_time_s)})")
            if on_epoch is not None and info.main:
                on_epoch(record)
        model.eval()
        return TrainResult(model=model, history=tuple(history), config=config, trainer=repr(self),
                           train_time_s=train_time)


@dataclass(frozen=True)
class Divergence:
    """Where training is when a batch goes wrong, to say so in the error (see :meth:`error`)."""

    epoch: int  # 1-based, like the history
    batch: int  # 1-based
    batches: int
    lr: float
    checkpoint: Path | None
    epochs_done: int

    def error(self, what: str) -> NonFiniteError:
        """The one-line error: what went wrong, where, and what is kept."""
        if self.checkpoint is None:
            kept = "nothing was saved (no checkpoint file)"
        elif self.epochs_done:
            kept = (f"{self.checkpoint} and the history still hold the last good epoch ({self.epochs_done}); "
                    "the model of this epoch is discarded")
        else:
            kept = "no epoch finished, so no checkpoint was written"
        return NonFiniteError(
            f"training diverged at epoch {self.epoch}, batch {self.batch} of {self.batches}: {what} (learning "
            f"rate {self.lr:g}; a smaller one, or grad_clip, usually helps); {kept}"
        )


def non_finite_parameters(model: nn.Module) -> list[str]:
    """The names of the parameters holding NaN or infinite values (one synchronisation when all are finite)."""
    named = list(model.named_parameters())
    if not named or bool(torch.stack([torch.isfinite(p).all() for _, p in named]).all()):
        return []
    return [name for name, p in named if not bool(torch.isfinite(p).all())]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def engine_problem(model: nn.Module, x: Tensor) -> UnsupportedLayerError | None:
    """Why the bound engine cannot read ``model`` (its error, listing every unsupported layer), or None; ``x`` is
    a probe batch for the check that the engine's graph reproduces the model. The mode is left as it was."""
    from robustkit.verifiers.graph import build_graph, check_reproduces

    training = model.training
    model.eval()
    try:
        check_reproduces(build_graph(model), model, x)
    except UnsupportedLayerError as exc:
        return exc
    finally:
        model.train(training)
    return None


def evaluate(
    model: nn.Module, monitor: Split | None, config: TrainConfig, epoch: int, info: distributed.DistInfo,
    device: torch.device, *, verify: bool = True,
) -> tuple[float, float, float, int]:
    """Clean, PGD and verified accuracy at ``config.eps`` on the monitoring subset (shared across processes);
    without ``verify`` (a model the bound engine cannot read) the verified accuracy is NaN."""
    if monitor is None or len(monitor) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    from robustkit.evaluation import robustness_counts

    model.eval()
    index = distributed.shard(torch.arange(len(monitor)), info)
    x, y = monitor.x[index].to(device), monitor.y[index].to(device)
    counts = [0.0, 0.0, 0.0, float(len(index))]
    for start in range(0, len(index), 100):
        generator = torch.Generator(device=device).manual_seed(10_000 + epoch)
        found = robustness_counts(
            model, x[start : start + 100], y[start : start + 100], config.eps, pgd_steps=config.val_pgd_steps,
            methods=[config.val_method] if verify else [], generator=generator,
            what=f"the monitoring samples after epoch {epoch + 1}",
        )
        counts[0] += found.clean
        counts[1] += found.pgd
        counts[2] += found.verified[config.val_method] if verify else 0
    counts = distributed.all_sum(counts, info, device)
    total = max(counts[3], 1.0)
    return counts[0] / total, counts[1] / total, counts[2] / total if verify else float("nan"), int(counts[3])


def _generator_states(generator: torch.Generator, info: distributed.DistInfo) -> list[Tensor]:
    """Every process's state of a per-process generator (gathered so that any process can resume)."""
    state = generator.get_state()
    if not info.active:
        return [state]
    gathered: list[Tensor] = [torch.empty_like(state) for _ in range(info.world)]
    torch.distributed.all_gather(gathered, state)
    return gathered


def save_checkpoint(
    path: Path, trainer: Trainer, config: TrainConfig, epoch: int, model: nn.Module,
    optimizer: torch.optim.Optimizer, data_generator: torch.Generator, state: TrainState,
    history: list[EpochRecord], train_time: float,
) -> None:
    """Write everything needed to resume after ``epoch`` epochs, atomically (main process only)."""
    from robustkit.io import torch_save_atomic

    attack = _generator_states(state.attack_generator, state.dist)
    sample = _generator_states(state.sample_generator, state.dist)
    if state.dist.main:
        torch_save_atomic({
            "format": CHECKPOINT_FORMAT,
            "trainer": trainer.name,
            "trainer_options": _plain(trainer.options()),
            "config": _plain(config.to_dict()),
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "generators": {"data": data_generator.get_state(), "attack": [s.cpu() for s in attack],
                           "sample": sample},
            "torch_rng": torch.get_rng_state(),
            "trainer_state": trainer.state_dict(state),
            "history": [r.to_dict() for r in history],
            "train_time_s": train_time,
        }, path)
    distributed.barrier(state.dist)


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


def load_checkpoint(path: Path, trainer: Trainer, config: TrainConfig) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain values only) and check that it belongs to this run."""
    from robustkit.models.loading import load_checkpoint as read

    saved = read(path)
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a robustkit training checkpoint")
    if saved.get("trainer") != trainer.name:
        raise InputError(f"cannot resume from {path}: it was written by the {saved.get('trainer')!r} trainer")
    mine: dict[str, dict[str, Any]] = {
        "trainer_options": _plain(trainer.options()),
        "config": {k: v for k, v in _plain(config.to_dict()).items() if k != "device"},
    }
    for key, value in mine.items():
        theirs = {k: v for k, v in dict(saved[key]).items() if k != "device"}
        differing = sorted(k for k in set(theirs) | set(value) if theirs.get(k) != value.get(k))
        if differing:
            raise InputError(
                f"cannot resume from {path}: it was written with different settings ({', '.join(differing)})"
            )
    return saved
