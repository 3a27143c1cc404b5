"""Evaluation of one trained model: clean accuracy, attacks, verifiers, an eps sweep, and consistency checks.

Every accuracy counts all n test samples: a clean-misclassified sample counts as broken by every attack and as
not verified. Per sample, a verified sample must not be broken by any attack, and verified <= worst-case attack
<= clean accuracy; every violation is recorded (and fails the benchmark run). The exact verifier, where it
runs, decides only the samples that no other verifier verified and no attack broke.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkit.bench.config import EvaluationSettings
from robustkit.data import Split
from robustkit.progress import progress
from robustkit.runtime import PeakMemory


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
    """All measurements of a model, the consistency violations found, and the cost of evaluating."""

    measurements: tuple[Measurement, ...]
    violations: tuple[str, ...]
    eval_time_s: float
    peak_memory_mb: float


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


def _batched(x: Tensor, y: Tensor, size: int, run: Callable[[Tensor, Tensor], Tensor], desc: str) -> Tensor:
    parts = [run(x[i : i + size], y[i : i + size]) for i in progress(range(0, len(y), size), desc=desc, unit="batch")]
    return torch.cat(parts)


def evaluate_model(
    model: nn.Module, test: Split, eps: float, settings: EvaluationSettings, seed: int, device: torch.device,
) -> Evaluation:
    """Evaluate ``model`` (eval mode) on ``test`` at radius ``eps``; see the module docstring."""
    from robustkit.attacks import PGD, CWLinf, IntervalAttack
    from robustkit.attacks.base import Attack
    from robustkit.verifiers import Status, get_verifier, verify_many

    model.eval()
    x, y = test.x.to(device), test.y.to(device)
    n = len(y)
    measurements: list[Measurement] = []
    started = time.perf_counter()
    with PeakMemory() as memory:
        def predict(a: Tensor, b: Tensor) -> Tensor:
            with torch.no_grad():
                correct: Tensor = model(a).argmax(1) == b
            return correct

        correct = _batched(x, y, settings.batch_size, predict, "clean")
        measurements.append(Measurement("clean_acc", eps, _fraction(correct), n, 0.0))
        attacks = {
            "pgd_acc": PGD(steps=settings.pgd_steps, restarts=settings.pgd_restarts),
            "cw_acc": CWLinf(steps=settings.cw_steps),
            "interval_attack_acc": IntervalAttack(**settings.interval_attack),
        }
        broken_any = ~correct
        for metric, attack in attacks.items():
            generator = torch.Generator(device=device).manual_seed(seed)
            clock = time.perf_counter()

            def run(a: Tensor, b: Tensor, attack: Attack = attack, generator: torch.Generator = generator) -> Tensor:
                return attack(model, a, b, eps=eps, generator=generator).success

            broken = _batched(x, y, settings.batch_size, run, metric.removesuffix("_acc"))
            broken_any |= broken
            measurements.append(Measurement(metric, eps, _fraction(~broken), n,
                                            time.perf_counter() - clock, repr(attack)))
        measurements.append(Measurement("worst_attack_acc", eps, _fraction(~broken_any), n, 0.0))
        verified_any = torch.zeros(n, dtype=torch.bool, device=device)
        violations: list[str] = []
        statuses: dict[str, list[Status]] = {name: [] for name in settings.verifiers}
        seconds = dict.fromkeys(settings.verifiers, 0.0)
        for i in progress(range(0, n, settings.batch_size), desc="verify", unit="batch"):
            batch = verify_many(model, x[i : i + settings.batch_size], y[i : i + settings.batch_size], eps,
                                list(settings.verifiers))
            for name, result in batch.items():
                statuses[name] += result.status
                seconds[name] += float(result.time_s.sum())
        for name in settings.verifiers:
            verified = torch.tensor([s is Status.VERIFIED for s in statuses[name]], device=device)
            verified_any |= verified
            measurements.append(Measurement(f"verified_{name}", eps, _fraction(verified), n, seconds[name],
                                            repr(get_verifier(name))))
            for index in (verified & broken_any).nonzero().flatten().tolist():
                violations.append(f"test sample {index}: verified by {name} at eps {eps:g} but broken by an attack")
        if settings.exact == "true" or (settings.exact == "auto" and
                                        exact_applicable(model, tuple(x.shape[1:]), settings.exact_max_relus)):
            exact = get_verifier("exact", time_limit=settings.exact_time_limit)
            open_samples = (~verified_any & ~broken_any).nonzero().flatten()
            clock = time.perf_counter()
            exact_verified = verified_any.clone()
            if len(open_samples):
                result = exact.verify(model, x[open_samples], y[open_samples], eps)
                for position, status in zip(open_samples.tolist(), result.status, strict=True):
                    exact_verified[position] = status is Status.VERIFIED
            verified_any |= exact_verified
            measurements.append(Measurement("verified_exact", eps, _fraction(exact_verified), n,
                                            time.perf_counter() - clock, repr(exact)))
        best = _fraction(verified_any)
        measurements.append(Measurement("verified_best", eps, best, n, 0.0))
        worst = _fraction(~broken_any)
        clean = _fraction(correct)
        if not best <= worst <= clean:
            violations.append(f"accuracies out of order at eps {eps:g}: verified {best:.4f}, worst-case attack "
                              f"{worst:.4f}, clean {clean:.4f} (must be verified <= attack <= clean)")
        measurements += _sweep(model, x, y, settings, seed, device, eps)
    return Evaluation(tuple(measurements), tuple(violations), time.perf_counter() - started, memory.peak_mb)


def _sweep(
    model: nn.Module, x: Tensor, y: Tensor, settings: EvaluationSettings, seed: int, device: torch.device,
    train_eps: float,
) -> list[Measurement]:
    """Clean, PGD and interval/symbolic-verified accuracy at several eps on the first ``sweep_n`` samples
    (the training eps itself is measured on all test samples, so the sweep leaves it out)."""
    from robustkit.attacks import PGD
    from robustkit.verifiers import verify

    if not settings.eps_sweep or settings.sweep_n == 0:
        return []
    x, y = x[: settings.sweep_n], y[: settings.sweep_n]
    n = len(y)
    rows = []
    with torch.no_grad():
        clean = _fraction(model(x).argmax(1) == y)
    for eps in progress([e for e in settings.eps_sweep if e != train_eps], desc="eps sweep", unit="eps"):
        rows.append(Measurement("clean_acc", eps, clean, n, 0.0))
        clock = time.perf_counter()
        attack = PGD(steps=20)
        generator = torch.Generator(device=device).manual_seed(seed)
        robust = ~attack(model, x, y, eps=eps, generator=generator).success
        rows.append(Measurement("pgd_acc", eps, _fraction(robust), n, time.perf_counter() - clock,
                                repr(attack)))
        for method in ("interval", "symbolic"):
            clock = time.perf_counter()
            verified = torch.cat([verify(model, x[i : i + settings.batch_size], y[i : i + settings.batch_size], eps,
                                         method=method).verified for i in range(0, n, settings.batch_size)])
            rows.append(Measurement(f"verified_{method}", eps, _fraction(verified), n,
                                    time.perf_counter() - clock))
    return rows
