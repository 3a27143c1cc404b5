"""One evaluation path for ``robustkit attack``, ``robustkit verify``, the bench and the trainers' monitoring.

Written once here: which samples are evaluated (:func:`take_samples`, the same check for every count option),
the clean forward pass that refuses non-finite logits (:func:`predict`), every attack on every sample at every
radius (:func:`run_attack`) with the re-check of its adversarial examples (:func:`recheck`) and the per-sample
worst case over attacks (:func:`worst_case`), the pre-flight (gradient-masking) checks before the attacks
(:func:`run_preflight`) and after them (:func:`gradient_free_gaps`), every verifier on every sample
(:func:`run_verifiers`), and the consistency checks between methods (:func:`find_conflicts`: verified by one
verifier, falsified by another; :func:`verified_but_broken`: verified, yet broken by an attack;
:func:`order_violation`). The commands parse options, write files and print; the bench turns the results into
measurements.

Accuracies count all N samples: a clean-misclassified sample counts as broken by every attack and is never
verified.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustkit.errors import InputError, NonFiniteError

if TYPE_CHECKING:
    from robustkit.attacks import Attack
    from robustkit.attacks.preflight import GradientFreeGap, PreflightReport
    from robustkit.data import Dataset, Split
    from robustkit.parallel import TaskStore, WorkerPool
    from robustkit.verifiers import Status, Verifier

__all__ = [
    "AttackRun", "Conflict", "EvalData", "MethodRun", "PreflightRun", "Robustness", "batch_generator",
    "check_finite_logits", "find_conflicts", "gradient_free_gaps", "model_device", "order_violation", "predict",
    "recheck", "robustness_counts", "run_attack", "run_preflight", "run_verifiers", "take_samples",
    "verified_but_broken", "worst_case",
]

TOLERANCE = 1e-6  # how far outside the eps-ball or [0, 1] an adversarial example may lie (float rounding)


# ------------------------------------------------------------------------------------------------ samples


def take_samples(split: Split, start: int, n: int, *, what: str, count: str, first: str | None = None) -> Split:
    """Samples ``start`` to ``start + n - 1`` of ``split``, which must hold them all.

    Evaluating or training on fewer samples than asked would make runs silently incomparable, so a range
    outside the split is an :class:`~robustkit.errors.InputError` naming the options: ``count`` (such as
    ``--n-examples`` or ``data.n_test``) and ``first`` (such as ``--start``; None when the range starts at 0).
    ``what`` describes the split (``the mnist5k test split``).
    """
    size = len(split)
    if size == 0:
        raise InputError(f"{what} is empty")
    if start >= size:
        raise InputError(f"{first} {start} is out of range: {what} has {size} samples (indices 0 to {size - 1})")
    if start + n > size:
        if first is None:
            raise InputError(f"{count} {n} asks for {n} samples, but {what} has {size}: use {count} {size} or less")
        raise InputError(
            f"{first} {start} {count} {n} asks for samples up to index {start + n - 1}, but {what} has {size} "
            f"samples: use {count} {size - start} or less"
        )
    return split.subset(start, n)


@dataclass(frozen=True, eq=False)
class EvalData:
    """The evaluation samples: ``split`` holds test samples ``start``, ``start + 1``, ... of ``dataset``."""

    dataset: Dataset
    split: Split
    start: int
    batch_size: int

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.split)

    @property
    def indices(self) -> range:
        """The samples' absolute indices in the dataset's test split."""
        return range(self.start, self.start + self.n)

    def batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(offset, x, y)`` per batch of at most ``batch_size`` samples; ``offset`` counts from ``start``."""
        for offset in range(0, self.n, self.batch_size):
            end = offset + self.batch_size
            yield offset, self.split.x[offset:end], self.split.y[offset:end]

    def num_batches(self) -> int:
        """How many batches :meth:`batches` yields."""
        return -(-self.n // self.batch_size)


# ------------------------------------------------------------------------------------------ forward pass


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; the CPU for a model without any."""
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def check_finite_logits(logits: Tensor, first_index: int, what: str) -> None:
    """Raise :class:`~robustkit.errors.NonFiniteError` when any row of ``logits`` holds NaN or infinity.

    Row ``i`` belongs to sample ``first_index + i`` of ``what`` (such as ``the mnist5k test split``): a model
    whose outputs are not numbers cannot be attacked or verified, and accuracies computed from them mean nothing.
    """
    bad = (~torch.isfinite(logits)).any(1).nonzero().flatten()
    if len(bad):
        where = ", ".join(str(first_index + int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise NonFiniteError(
            f"the model returns NaN or infinite logits on {len(bad)} of {logits.shape[0]} samples of {what} "
            f"(sample {where}): its outputs cannot be evaluated"
        )


def predict(model: nn.Module, data: EvalData, images: Tensor | None = None) -> Tensor:
    """The model's predicted classes for the evaluation samples (or ``images`` in their place), batch by batch.

    Non-finite logits are a :class:`~robustkit.errors.NonFiniteError` naming the samples.
    """
    device = model_device(model)
    what = f"the {data.dataset.name} test split" + ("" if images is None else " (adversarial examples)")
    parts, finite = [], []
    with torch.no_grad():
        for offset, x, _ in data.batches():
            batch = x if images is None else images[offset:offset + x.shape[0]]
            logits = model(batch.to(device))
            finite.append(torch.isfinite(logits).all(1).cpu())
            parts.append(logits.argmax(1).cpu())
    # all samples first, so the message counts every one of them
    check_finite_logits(torch.where(torch.cat(finite), 0.0, float("nan")).unsqueeze(1), data.start, what)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------- attacks


@dataclass(frozen=True, eq=False)
class PreflightRun:
    """The pre-flight checks of :mod:`robustkit.attacks.preflight` on the evaluation samples: ``report`` (checks
    a to d on its subset of at most 100 samples) and, for every sample, ``zero_gradient`` (check c: the
    cross-entropy or margin input gradient is zero or non-finite; on the CPU)."""

    report: PreflightReport
    zero_gradient: Tensor


def run_preflight(model: nn.Module, data: EvalData, seed: int) -> PreflightRun:
    """Checks a to d on a subset drawn with a generator seeded with ``seed``, and check c on every sample, batch by
    batch (two input gradients per sample: a few percent of one PGD run)."""
    from robustkit.attacks.preflight import gradient_flags, preflight
    from robustkit.runtime import make_generator

    report = preflight(model, data.split.x, data.split.y, generator=make_generator(seed, model_device(model)))
    flags = []
    for _, x, y in data.batches():
        ce_zero, margin_zero = gradient_flags(model, x, y)
        flags.append((ce_zero | margin_zero).cpu())
    return PreflightRun(report, torch.cat(flags))


@dataclass(frozen=True, eq=False)
class AttackRun:
    """One attack at one eps on all N samples (the batches' results joined, on the CPU); ``gradient_free`` is the
    attack class's flag (:attr:`robustkit.attacks.Attack.gradient_free`).

    For an attack made of stages (AutoAttack, whose results are
    :class:`~robustkit.attacks.AutoAttackResult`), ``stages`` names them (``clean`` first) and ``broken_at``
    holds per sample the position of the stage from which it counts as broken (``len(stages)``: never); both
    are empty for other attacks.
    """

    label: str
    config: str
    eps: float
    x_adv: Tensor
    success: Tensor
    prediction: Tensor
    time_s: float
    gradient_free: bool = False
    stages: tuple[str, ...] = ()
    broken_at: Tensor | None = None

    @property
    def n_broken(self) -> int:
        """Samples broken (clean-misclassified ones included)."""
        return int(self.success.sum())

    def stage_robust_counts(self) -> list[tuple[str, int]]:
        """``(stage, samples still robust after it)`` for every stage, in order (empty without stages)."""
        if self.broken_at is None:
            return []
        return [(stage, int((self.broken_at > position).sum())) for position, stage in enumerate(self.stages)]


def batch_generator(seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random generator of the batch whose first sample is at ``offset``, seeded from ``seed`` and ``offset``
    together (numpy's ``SeedSequence``), so a batch's random draws depend on nothing else: not on the batches
    before it, nor on which process runs it."""
    import numpy as np

    from robustkit.runtime import make_generator

    entropy = np.random.SeedSequence([seed % 2**63, offset]).generate_state(1, dtype=np.uint64)[0]
    return make_generator(int(entropy), device)


def run_attack(
    model: nn.Module, data: EvalData, label: str, attack: Attack, eps_list: Sequence[float], seed: int, *,
    pool: WorkerPool | None = None,
) -> list[AttackRun]:
    """Attack every sample at every eps, batch by batch, with one progress bar (and one log line at the end,
    :func:`robustkit.progress.log`).

    Every batch at every eps gets its own generator (:func:`batch_generator` of ``seed`` and the batch's
    offset), so an attack's result depends neither on the other radii, nor on the other attacks evaluated, nor
    on whether the batches run here or in the processes of ``pool`` (:class:`robustkit.parallel.WorkerPool`).
    """
    from robustkit.attacks import AttackResult, AutoAttackResult
    from robustkit.parallel import iter_tasks
    from robustkit.progress import format_seconds, log, progress

    tasks = [(eps, offset, min(offset + data.batch_size, data.n)) for eps in eps_list
             for offset in range(0, data.n, data.batch_size)]
    keys = [f"eps{eps:g}-{start}-{stop}" for eps, start, stop in tasks]
    found: dict[int, AttackResult] = {}
    started = time.perf_counter()
    context = (model, attack, data.split.x, data.split.y, seed)
    for index, result in progress(iter_tasks(_attack_task, context, tasks, keys, pool=pool), total=len(tasks),
                                  desc=f"attack {label}", unit="batch"):
        found[index] = result
    log(f"  stage attack {label} at eps {', '.join(f'{e:g}' for e in eps_list)} on {data.n} samples: "
        f"{format_seconds(time.perf_counter() - started)}")
    runs = []
    for eps in eps_list:
        results = [found[i] for i, task in enumerate(tasks) if task[0] == eps]
        staged = [r for r in results if isinstance(r, AutoAttackResult) and r.broken_at is not None]
        stages: tuple[str, ...] = ()
        broken_at = None
        if staged and len(staged) == len(results):
            stages = tuple(stage for stage, _ in staged[0].stage_robust_accuracy)
            broken_at = torch.cat([r.broken_at.detach().cpu() for r in staged if r.broken_at is not None])
        runs.append(AttackRun(
            label=label, config=repr(attack), eps=eps,
            x_adv=torch.cat([r.x_adv.detach().cpu() for r in results]),
            success=torch.cat([r.success.detach().cpu() for r in results]),
            prediction=torch.cat([r.prediction.detach().cpu() for r in results]),
            time_s=sum(r.time_s for r in results), gradient_free=type(attack).gradient_free,
            stages=stages, broken_at=broken_at,
        ))
    return runs


def _attack_task(context: tuple[nn.Module, Attack, Tensor, Tensor, int], task: tuple[float, int, int]) -> Any:
    """One task of :func:`run_attack`: the attack on samples start..stop-1 at eps."""
    model, attack, x, y, seed = context
    eps, start, stop = task
    return attack(model, x[start:stop], y[start:stop], eps=eps, generator=batch_generator(seed, start,
                                                                                          model_device(model)))


def recheck(model: nn.Module, data: EvalData, runs: Sequence[AttackRun]) -> list[str]:
    """Every adversarial example inside the ball and [0, 1], and misclassified by a fresh forward pass where the
    attack reports success; returns one message per failed sample (empty when all pass)."""
    problems = []
    x, labels = data.split.x, data.split.y
    for run in runs:
        prediction = predict(model, data, run.x_adv)
        distance = (run.x_adv - x).abs().flatten(1).amax(1)
        flat = run.x_adv.flatten(1)
        checks = [
            (distance > run.eps + TOLERANCE, "outside the eps-ball"),
            ((flat.amin(1) < 0) | (flat.amax(1) > 1), "pixel values outside [0, 1]"),
            (run.success & (prediction == labels), "reported adversarial, but a fresh forward pass classifies it "
                                                   "correctly"),
        ]
        for failed, what in checks:
            for position in failed.nonzero().flatten().tolist():
                problems.append(
                    f"{run.label} at eps {run.eps:g}, test sample {data.start + position}: {what} "
                    f"(L-inf distance {float(distance[position]):.6g}, prediction {int(prediction[position])}, "
                    f"label {int(labels[position])})"
                )
    return problems


def worst_case(runs: Sequence[AttackRun], eps: float) -> Tensor:
    """Per sample: broken by any of the attacks run at ``eps``."""
    return torch.stack([r.success for r in runs if r.eps == eps]).any(0)


def gradient_free_gaps(runs: Sequence[AttackRun]) -> dict[float, GradientFreeGap]:
    """Check e per eps at which gradient-free and gradient attacks both ran: the samples some gradient-free attack
    broke and no gradient attack did (:func:`robustkit.attacks.preflight.gradient_free_gap`)."""
    from robustkit.attacks.preflight import gradient_free_gap

    gaps = {}
    for eps in dict.fromkeys(r.eps for r in runs):
        free = [r.success for r in runs if r.eps == eps and r.gradient_free]
        gradient = [r.success for r in runs if r.eps == eps and not r.gradient_free]
        if free and gradient:
            gaps[eps] = gradient_free_gap(torch.stack(gradient).any(0), torch.stack(free).any(0))
    return gaps


# --------------------------------------------------------------------------------------------- verifiers


@dataclass(frozen=True, eq=False)
class MethodRun:
    """One verifier at one eps on all N samples (the batches' results joined, on the CPU)."""

    method: str
    eps: float
    status: tuple[Status, ...]
    margin_lower: Tensor
    prediction: Tensor
    time_s: Tensor

    def count(self, status: Status) -> int:
        """How many samples ended with ``status``."""
        return sum(s is status for s in self.status)

    def verified(self, labels: Tensor) -> Tensor:
        """Per sample: verified and correctly classified (a misclassified sample is never verified)."""
        from robustkit.verifiers import Status

        return torch.tensor([s is Status.VERIFIED for s in self.status], dtype=torch.bool) & (
            self.prediction == labels
        )


def run_verifiers(
    model: nn.Module, data: EvalData, verifiers: Mapping[str, Verifier], eps_list: Sequence[float], *,
    workers: int = 1, scheduler: str | None = None, store: TaskStore | None = None, threads: int = 1,
    pool: WorkerPool | None = None,
) -> list[MethodRun]:
    """Verify every sample with every verifier at every eps, batch by batch, with one progress bar.

    The verifiers of a batch run together (:func:`robustkit.verifiers.verify_many`, which shares the symbolic
    pass between ``symbolic`` and ``crown``). When a complete verifier is among them, every sample is a task
    of its own. Tasks run in ``workers`` processes, in those of ``pool`` or on the Dask cluster at ``scheduler``
    (:func:`robustkit.parallel.iter_tasks`, ``threads`` torch threads each) and, with a ``store``, every
    finished task is kept on disk and a re-run skips it. Runs are ordered by verifier, then eps, samples in
    index order. At the end one log line per verifier (:func:`robustkit.progress.log`) gives its time,
    measured inside the shared run.
    """
    from robustkit.parallel import iter_tasks
    from robustkit.progress import format_seconds, log, progress
    from robustkit.verifiers import Status

    size = 1 if any(v.complete for v in verifiers.values()) else data.batch_size
    tasks = [(eps, offset, min(offset + size, data.n)) for eps in eps_list for offset in range(0, data.n, size)]
    keys = [f"eps{eps:g}-{start}-{stop}" for eps, start, stop in tasks]
    context = (model, dict(verifiers), data.split.x, data.split.y)
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for index, result in progress(iter_tasks(_verify_task, context, tasks, keys, workers=workers,
                                             scheduler=scheduler, store=store, threads=threads, pool=pool),
                                  total=len(tasks), desc=f"verify {','.join(verifiers)}",
                                  unit="sample" if size == 1 else "batch"):
        found[index] = result
    runs = []
    for name in verifiers:
        for eps in eps_list:
            parts = [found[i][name] for i, task in enumerate(tasks) if task[0] == eps]
            runs.append(MethodRun(
                method=name, eps=eps,
                status=tuple(Status(s) for part in parts for s in part["status"]),
                margin_lower=torch.cat([part["margin_lower"] for part in parts]),
                prediction=torch.cat([part["prediction"] for part in parts]),
                time_s=torch.cat([part["time_s"] for part in parts]),
            ))
    for name in verifiers:
        seconds = sum(float(run.time_s.sum()) for run in runs if run.method == name)
        log(f"  stage verify {name} at eps {', '.join(f'{e:g}' for e in eps_list)} on {data.n} samples: "
            f"{format_seconds(seconds)}" + (" (run batch by batch with the other verifiers)" if len(verifiers) > 1
                                            else ""))
    return runs


def _verify_task(context: tuple[nn.Module, dict[str, Verifier], Tensor, Tensor],
                 task: tuple[float, int, int]) -> dict[str, dict[str, Any]]:
    """One task of :func:`run_verifiers`: every verifier on samples start..stop-1 at eps, as plain tensors and
    strings (what a task store keeps)."""
    from robustkit.verifiers import verify_many

    model, verifiers, x, y = context
    eps, start, stop = task
    results = verify_many(model, x[start:stop], y[start:stop], eps, list(verifiers.values()))
    return {name: {"status": [s.value for s in results[v.name].status],
                   "margin_lower": results[v.name].margin_lower.detach().cpu(),
                   "prediction": results[v.name].prediction.detach().cpu(),
                   "time_s": results[v.name].time_s.detach().cpu()}
            for name, v in verifiers.items()}


# ------------------------------------------------------------------------------------------- consistency


@dataclass(frozen=True)
class Conflict:
    """A sample that one method verified and another falsified at the same eps: a soundness bug."""

    index: int
    label: int
    eps: float
    verified_by: tuple[str, ...]
    falsified_by: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"soundness bug: test sample {self.index} (label {self.label}) at eps {self.eps:g} is verified by "
            f"{', '.join(self.verified_by)} but falsified by {', '.join(self.falsified_by)}"
        )


def find_conflicts(runs: Sequence[MethodRun], data: EvalData) -> list[Conflict]:
    """Samples verified by one method and falsified by another at the same eps."""
    from robustkit.verifiers import Status

    conflicts = []
    for eps in dict.fromkeys(r.eps for r in runs):
        same_eps = [r for r in runs if r.eps == eps]
        for position, index in enumerate(data.indices):
            verified = tuple(r.method for r in same_eps if r.status[position] is Status.VERIFIED)
            falsified = tuple(r.method for r in same_eps if r.status[position] is Status.FALSIFIED)
            if verified and falsified:
                conflicts.append(Conflict(index, int(data.split.y[position]), eps, verified, falsified))
    return conflicts


def verified_but_broken(runs: Sequence[MethodRun], broken: Tensor, data: EvalData, eps: float) -> list[str]:
    """One message per sample that a verifier verified at ``eps`` although an attack broke it there."""
    problems = []
    for run in runs:
        if run.eps != eps:
            continue
        for position in (run.verified(data.split.y) & broken).nonzero().flatten().tolist():
            problems.append(f"test sample {data.start + position}: verified by {run.method} at eps {eps:g} but "
                            "broken by an attack")
    return problems


def order_violation(verified: float, attacked: float, clean: float, eps: float) -> str | None:
    """The message when accuracies are out of order (verified <= worst-case attack <= clean must hold)."""
    if verified <= attacked <= clean:
        return None
    return (f"accuracies out of order at eps {eps:g}: verified {verified:.4f}, worst-case attack {attacked:.4f}, "
            f"clean {clean:.4f} (must be verified <= attack <= clean)")


# ------------------------------------------------------------------------------------------- quick checks


@dataclass(frozen=True)
class Robustness:
    """Counts over ``n`` samples: correctly classified, robust to PGD, and verified by each method, with the
    seconds that PGD and each verifier took."""

    n: int
    clean: int
    pgd: int
    verified: dict[str, int]
    pgd_time_s: float
    verify_time_s: dict[str, float]


def robustness_counts(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, pgd_steps: int, methods: Sequence[str],
    generator: torch.Generator, what: str,
) -> Robustness:
    """Clean, ``pgd_steps``-step PGD and verified counts of one batch at ``eps``: the trainers' monitoring after
    every epoch and the bench's accuracy-vs-eps sweep. Without PGD steps (or at eps 0) the PGD count is the
    clean one. Non-finite logits are a :class:`~robustkit.errors.NonFiniteError` naming ``what``."""
    from robustkit.attacks import PGD
    from robustkit.verifiers import verify

    with torch.no_grad():
        logits = model(x.to(model_device(model)))
    check_finite_logits(logits, 0, what)
    clean = int((logits.argmax(1).cpu() == y.cpu()).sum())
    robust, pgd_time = clean, 0.0
    if pgd_steps > 0 and eps > 0:
        attacked = PGD(steps=pgd_steps)(model, x, y, eps=eps, generator=generator)
        robust, pgd_time = int((~attacked.success).sum()), attacked.time_s
    results = {method: verify(model, x, y, eps, method=method) for method in methods}
    return Robustness(
        n=len(y), clean=clean, pgd=robust, verified={m: int(r.verified.sum()) for m, r in results.items()},
        pgd_time_s=pgd_time, verify_time_s={m: float(r.time_s.sum()) for m, r in results.items()},
    )
