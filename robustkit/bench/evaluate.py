"""Evaluation of one trained model as the bench's measurements: clean accuracy, attacks, verifiers, an eps
sweep, and consistency checks, all through :mod:`robustkit.evaluation` (the path the commands take).

The attacks are PGD, cw-linf, the interval attack and, unless ``evaluation.autoattack`` is ``off``, AutoAttack (its
``standard`` ensemble or robustkit's ``fast`` version, the metric ``autoattack_acc``); ``worst_attack_acc`` is their
per-sample worst case. Every accuracy counts all n test samples: a clean-misclassified sample counts as broken by
every attack and as not verified. Per sample, a verified sample must not be broken by any attack nor falsified by
another verifier, every adversarial example must pass its re-check, and verified <= worst-case attack <= clean
accuracy; every violation is recorded (and fails the benchmark run). The older exact stage (``evaluation.exact``,
off by default), where it runs, decides only the samples that no other verifier verified and no attack broke, and
counts in ``verified_best``.

Then the complete stage (:mod:`robustkit.bench.complete`, ``evaluation.complete``) runs a complete verifier on
the undecided band, the samples neither in ``verified_best`` nor broken, and the cell records the band's three
fractions :data:`~robustkit.bench.complete.BAND_METRICS`: ``verified_complete`` (``verified_best`` or verified
by the complete stage), ``falsified`` (broken by an attack, clean-misclassified samples included, or falsified
by the complete stage with a re-checked counterexample) and ``undecided`` (the rest). Their ``config`` says
which complete verifier ran with what budget per sample (JSON). They are recorded with the complete stage off
too (the band then is what the relaxations and attacks leave). A sample both verified and falsified there (by any
stage) is a soundness bug: the evaluation stops with :class:`~robustkit.bench.complete.BandInvariantError`, naming
the sample and the stages, instead of recording a band that does not add up.

Before the attacks, the pre-flight checks of :mod:`robustkit.attacks.preflight` run on up to 100 test samples
(drawn with the seed): their warnings are kept (not violations: a masked gradient is a finding about the model,
not an inconsistency) and recorded as the metrics :data:`PREFLIGHT_METRICS`, each with ``n`` = the samples
checked: ``preflight_warnings`` (how many checks warned), ``preflight_randomised_outputs``,
``preflight_probability_outputs`` and ``preflight_train_mode`` (1 when that check warned, else 0) and
``preflight_zero_gradient`` (the share of the checked samples with a zero or non-finite input gradient; it warns
above 10%). The bench runs no gradient-free attack of its own (AutoAttack's Square stage attacks only the samples
its gradient stages left robust, inside the ensemble), so the gradient-free check does not apply.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustkit.bench.complete import Band, CompleteRun, choose_complete, combine_band, run_complete
from robustkit.bench.config import EvaluationSettings
from robustkit.data import Dataset, Split
from robustkit.evaluation import (
    EvalData,
    Robustness,
    batch_generator,
    find_conflicts,
    model_device,
    order_violation,
    predict,
    recheck,
    robustness_counts,
    run_attack,
    run_verifiers,
    verified_but_broken,
    worst_case,
)
from robustkit.progress import format_seconds, log, progress
from robustkit.runtime import PeakMemory, make_generator

if TYPE_CHECKING:
    from robustkit.parallel import WorkerPool


@dataclass(frozen=True)
class Measurement:
    """One number of the long-format results: ``metric`` at ``eval_eps`` over ``n`` samples."""

    metric: str
    eval_eps: float
    value: float
    n: int
    time_s: float
    config: str = ""


@dataclass(frozen=True)
class Evaluation:
    """All measurements of a model, the consistency violations found, the cost of evaluating and the pre-flight
    warnings.

    ``broken`` maps each attack metric (``pgd_acc``, ..., ``autoattack_acc`` when it ran) and ``worst_attack_acc``
    to its per-sample mask of broken test samples (clean-misclassified ones included), and ``verified`` is the
    per-sample mask of ``verified_best``; ``band`` holds the masks of the band's metrics and ``complete`` the
    complete stage's run: the per-sample facts behind the accuracies (not written to files).
    """

    measurements: tuple[Measurement, ...]
    violations: tuple[str, ...]
    eval_time_s: float
    peak_memory_mb: float
    warnings: tuple[str, ...] = ()
    broken: Mapping[str, Tensor] = field(default_factory=dict)
    verified: Tensor | None = None
    band: Band | None = None
    complete: CompleteRun | None = None


PREFLIGHT_METRICS = ("preflight_warnings", "preflight_randomised_outputs", "preflight_probability_outputs",
                     "preflight_zero_gradient", "preflight_train_mode")


def _preflight(model: nn.Module, test: Split, eps: float, seed: int) -> tuple[list[Measurement], tuple[str, ...]]:
    """The pre-flight checks as measurements (:data:`PREFLIGHT_METRICS`) and their warnings."""
    from robustkit.attacks.preflight import preflight

    started = time.perf_counter()
    report = preflight(model, test.x, test.y, generator=make_generator(seed, model_device(model)))
    seconds = time.perf_counter() - started
    values = [len(report.warnings), report.randomised_outputs, report.output_kind == "probabilities",
              report.zero_gradient_fraction, report.train_mode]
    # the checks' time goes with the count of warnings
    rows = [Measurement(metric, eps, float(value), report.n_checked, seconds if position == 0 else 0.0)
            for position, (metric, value) in enumerate(zip(PREFLIGHT_METRICS, values, strict=True))]
    return rows, report.warnings


def exact_applicable(model: nn.Module, input_shape: tuple[int, ...], max_relus: int) -> bool:
    """Whether the exact verifier is applicable (every layer has a MILP encoding) and practical: a network
    without convolutions, pooling or skip connections and with at most ``max_relus`` non-linear neurons."""
    from robustkit.verifiers import ops
    from robustkit.verifiers.exact import ExactVerifier
    from robustkit.verifiers.graph import build_graph, node_shapes

    graph = build_graph(model)
    if ExactVerifier().applicable(graph) is not None:
        return False
    shapes = node_shapes(graph, input_shape)
    dense = all(isinstance(node.op, ops.NonlinearOp) or (isinstance(node.op, ops.AffineOp) and (
        node.op.weight_matrix is not None or node.op.reshape is not None)) for node in graph.nodes)
    neurons = sum(ops.numel(shapes[i]) for i, node in enumerate(graph.nodes) if isinstance(node.op, ops.NonlinearOp))
    return dense and neurons <= max_relus


def _fraction(mask: Tensor) -> float:
    """Exact share of True entries (count / n, not a float32 mean)."""
    return int(mask.sum()) / max(mask.numel(), 1)


def evaluate_model(
    model: nn.Module, dataset: Dataset, test: Split, eps: float, settings: EvaluationSettings, seed: int, *,
    workers: int = 1,
) -> Evaluation:
    """Evaluate ``model`` (eval mode) on ``test`` (the first test samples of ``dataset``) at radius ``eps``; see
    the module docstring. With ``workers`` > 1 (on the CPU) the batches of the attacks, the relaxations and the
    sweep run in that many worker processes (:class:`robustkit.parallel.WorkerPool`, started once for all
    stages), this process's torch threads shared among them; every batch draws from its own generator
    (:func:`robustkit.evaluation.batch_generator`), so the results do not depend on ``workers``. The recorded
    peak memory is the larger of this process's and the most one batch added to a worker."""
    from robustkit.parallel import WorkerPool

    model.eval()
    pool = None
    if workers > 1 and model_device(model).type == "cpu":
        pool = WorkerPool(workers, threads=max(1, torch.get_num_threads() // workers))
        log(f"  evaluating in {workers} worker processes of {pool.threads} torch thread(s) each")
    try:
        evaluation = _evaluate(model, dataset, test, eps, settings, seed, pool)
    except BaseException:
        if pool is not None:
            pool.close(wait=False)
        raise
    if pool is None:
        return evaluation
    pool.close()
    return dataclasses.replace(evaluation, peak_memory_mb=max(evaluation.peak_memory_mb, pool.peak_mb))


def _evaluate(model: nn.Module, dataset: Dataset, test: Split, eps: float, settings: EvaluationSettings, seed: int,
              pool: WorkerPool | None) -> Evaluation:
    from robustkit.attacks import PGD, Attack, AutoAttack, CWLinf, IntervalAttack
    from robustkit.verifiers import Status, get_verifier

    data = EvalData(dataset, test, 0, settings.batch_size)
    n = data.n
    measurements: list[Measurement] = []
    started = time.perf_counter()
    with PeakMemory() as memory:
        correct = predict(model, data) == test.y
        measurements.append(Measurement("clean_acc", eps, _fraction(correct), n, 0.0))
        checks, warnings = _preflight(model, test, eps, seed)
        measurements += checks
        log(f"  stage clean accuracy and pre-flight checks on {n} samples: "
            f"{format_seconds(time.perf_counter() - started)}")
        attacks: dict[str, Attack] = {
            "pgd_acc": PGD(steps=settings.pgd_steps, restarts=settings.pgd_restarts),
            "cw_acc": CWLinf(steps=settings.cw_steps),
            "interval_attack_acc": IntervalAttack(**settings.interval_attack),
        }
        if settings.autoattack != "off":
            attacks["autoattack_acc"] = AutoAttack(version=settings.autoattack)
        runs = [run for metric, attack in attacks.items()
                for run in run_attack(model, data, metric.removesuffix("_acc"), attack, [eps], seed, pool=pool)]
        for metric, run in zip(attacks, runs, strict=True):
            measurements.append(Measurement(metric, eps, _fraction(~run.success), n, run.time_s, run.config))
        violations = [f"re-check failed: {problem}" for problem in recheck(model, data, runs)]
        broken_any = worst_case(runs, eps) | ~correct
        broken = {metric: run.success for metric, run in zip(attacks, runs, strict=True)}
        broken["worst_attack_acc"] = broken_any
        measurements.append(Measurement("worst_attack_acc", eps, _fraction(~broken_any), n, 0.0))
        verifiers = {name: get_verifier(name) for name in settings.verifiers}
        method_runs = run_verifiers(model, data, verifiers, [eps], pool=pool)
        verified_any = torch.zeros(n, dtype=torch.bool)
        for method_run in method_runs:
            verified = method_run.verified(test.y)
            verified_any |= verified
            measurements.append(Measurement(f"verified_{method_run.method}", eps, _fraction(verified), n,
                                            float(method_run.time_s.sum()), repr(verifiers[method_run.method])))
        violations += verified_but_broken(method_runs, broken_any, data, eps)
        violations += [str(conflict) for conflict in find_conflicts(method_runs, data)]
        if settings.exact == "true" or (settings.exact == "auto" and
                                        exact_applicable(model, dataset.input_shape, settings.exact_max_relus)):
            exact = get_verifier("exact", time_limit=settings.exact_time_limit)
            open_samples = (~verified_any & ~broken_any).nonzero().flatten()
            clock = time.perf_counter()
            exact_verified = verified_any.clone()
            if len(open_samples):
                result = exact.verify(model, test.x[open_samples], test.y[open_samples], eps)
                for position, status in zip(open_samples.tolist(), result.status, strict=True):
                    exact_verified[position] = status is Status.VERIFIED
            verified_any |= exact_verified
            measurements.append(Measurement("verified_exact", eps, _fraction(exact_verified), n,
                                            time.perf_counter() - clock, repr(exact)))
            log(f"  stage verify exact on the {len(open_samples)} open samples: "
                f"{format_seconds(time.perf_counter() - clock)}")
        best = _fraction(verified_any)
        measurements.append(Measurement("verified_best", eps, best, n, 0.0))
        violation = order_violation(best, _fraction(~broken_any), _fraction(correct), eps)
        if violation is not None:
            violations.append(violation)
        complete = run_complete(model, data, eps, choose_complete(settings.complete, model),
                                settings.complete_time_limit, ~verified_any & ~broken_any,
                                budget=settings.complete_cell_budget, pool=pool)
        band = combine_band(verified_any, broken_any, complete.verified, complete.falsified, data.indices)
        for position, (metric, value) in enumerate(band.fractions().items()):
            measurements.append(Measurement(metric, eps, value, n, complete.time_s if position == 0 else 0.0,
                                            complete.config()))
        measurements += _sweep(model, data, settings, seed, eps, pool)
    return Evaluation(tuple(measurements), tuple(violations), time.perf_counter() - started, memory.peak_mb,
                      warnings, broken, verified_any, band, complete)


SWEEP_PGD_STEPS = 20
SWEEP_METHODS = ("interval", "symbolic")


def _sweep(model: nn.Module, data: EvalData, settings: EvaluationSettings, seed: int, train_eps: float,
           pool: WorkerPool | None = None) -> list[Measurement]:
    """Clean, PGD and interval/symbolic-verified accuracy at the sweep's radii and at the training eps, all on the
    first ``sweep_n`` samples with one attack configuration, so every point of the accuracy-vs-eps curve is
    measured the same way (the cell's own rows at the training eps use all test samples and stronger attacks; the
    reports tell the two apart by ``n``). Every radius and batch is a task of its own (in ``pool``'s processes
    when given), with the batch's generator (:func:`robustkit.evaluation.batch_generator`)."""
    from robustkit.attacks import PGD
    from robustkit.parallel import iter_tasks

    if not settings.eps_sweep or settings.sweep_n == 0:
        return []
    x, y = data.split.x[: settings.sweep_n], data.split.y[: settings.sweep_n]
    n = len(y)
    radii = sorted({*settings.eps_sweep, train_eps})
    tasks = [(eps, offset, min(offset + settings.batch_size, n)) for eps in radii
             for offset in range(0, n, settings.batch_size)]
    context = (model, x, y, seed, f"the {data.dataset.name} test split")
    found: dict[int, Robustness] = {}
    clock = time.perf_counter()
    for index, counts in progress(iter_tasks(_sweep_task, context, tasks, [str(t) for t in tasks], pool=pool),
                                  total=len(tasks), desc="eps sweep", unit="batch"):
        found[index] = counts
    rows = []
    for eps in radii:
        counts = [found[i] for i, task in enumerate(tasks) if task[0] == eps]
        rows.append(Measurement("clean_acc", eps, sum(c.clean for c in counts) / n, n, 0.0))
        rows.append(Measurement("pgd_acc", eps, sum(c.pgd for c in counts) / n, n,
                                sum(c.pgd_time_s for c in counts), repr(PGD(steps=SWEEP_PGD_STEPS))))
        for method in SWEEP_METHODS:
            rows.append(Measurement(f"verified_{method}", eps, sum(c.verified[method] for c in counts) / n, n,
                                    sum(c.verify_time_s[method] for c in counts)))
    log(f"  stage eps sweep ({len(radii)} radii, {n} samples): {format_seconds(time.perf_counter() - clock)}")
    return rows


def _sweep_task(context: tuple[nn.Module, Tensor, Tensor, int, str], task: tuple[float, int, int]) -> Robustness:
    """One task of :func:`_sweep`: the counts of samples start..stop-1 at eps."""
    model, x, y, seed, what = context
    eps, start, stop = task
    return robustness_counts(model, x[start:stop], y[start:stop], eps, pgd_steps=SWEEP_PGD_STEPS,
                             methods=SWEEP_METHODS, generator=batch_generator(seed, start, model_device(model)),
                             what=what)
