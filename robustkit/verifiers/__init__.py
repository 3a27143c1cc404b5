"""The bound engine: sound bounds of a network's outputs over an L-inf ball, and verification.

Methods (registry :data:`VERIFIERS`): ``interval`` (IBP), ``symbolic`` (MixTrain's symbolic intervals with
Neurify's symbolic linear relaxation), ``symbolic-naive`` (ReluVal's concretisation, a baseline), ``crown``
(backward linear relaxation), ``alpha-crown`` (CROWN with optimised slopes) and ``exact`` (mixed-integer
programming). One API for all:

>>> import torch
>>> from robustkit.models import build_model
>>> from robustkit.verifiers import verify
>>> model = build_model("toy2d", seed=0).eval()
>>> result = verify(model, torch.full((1, 1, 1, 2), 0.5), torch.tensor([0]), eps=0.0, method="interval")
>>> result.status[0].value in ("verified", "falsified")
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from robustkit.registry import Registry
from robustkit.verifiers.alpha_crown import AlphaCrownVerifier
from robustkit.verifiers.base import LogitBounds, Status, VerificationResult, Verifier
from robustkit.verifiers.crown import CrownVerifier
from robustkit.verifiers.exact import ExactVerifier
from robustkit.verifiers.interval import interval_pass
from robustkit.verifiers.symbolic import SymbolicNaiveVerifier, SymbolicVerifier

__all__ = [
    "VERIFIERS", "LogitBounds", "Status", "VerificationResult", "Verifier", "bounds", "get_verifier",
    "margin_bounds", "verify", "verify_many",
]


class IntervalVerifier(Verifier):
    """Interval bound propagation (IBP): the box through every layer, the margin folded into the last one."""

    name = "interval"

    def spec_lower(self, graph: Any, lower: Tensor, upper: Tensor, spec: Tensor) -> Tensor:
        return interval_pass(graph, lower, upper, spec).spec_lower

    def __repr__(self) -> str:
        return "IntervalVerifier()"


VERIFIERS: Registry[type[Verifier]] = Registry("verifier")
VERIFIERS.add("interval", IntervalVerifier)
VERIFIERS.add("symbolic", SymbolicVerifier)
VERIFIERS.add("symbolic-naive", SymbolicNaiveVerifier)
VERIFIERS.add("crown", CrownVerifier)
VERIFIERS.add("alpha-crown", AlphaCrownVerifier)
VERIFIERS.add("exact", ExactVerifier)


def get_verifier(method: str | Verifier, **options: Any) -> Verifier:
    """A verifier instance from a registered name and its options (or an instance, returned as is)."""
    if isinstance(method, Verifier):
        if options:
            raise TypeError("options cannot be combined with a verifier instance")
        return method
    return VERIFIERS[method](**options)


def verify(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str | Verifier = "symbolic",
           **options: Any) -> VerificationResult:
    """Verify each sample of (x, y) at L-inf radius eps with ``method``; see :class:`VerificationResult`."""
    return get_verifier(method, **options).verify(model, x, y, eps)


def verify_many(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, methods: Sequence[str | Verifier]
) -> dict[str, VerificationResult]:
    """Verify with several methods at once, keyed by method name. ``symbolic`` and ``crown`` (with symbolic
    intermediate bounds) share one symbolic pass, since crown starts from it; the results are those of
    calling :func:`verify` per method. ``symbolic``'s time is that pass, ``crown``'s that pass plus its own."""
    import time

    import torch

    from robustkit.verifiers.base import check_labels, input_box, margin_spec, output_size, result_from_margins
    from robustkit.verifiers.crown import backward_bound
    from robustkit.verifiers.symbolic import symbolic_pass

    verifiers = [get_verifier(m) for m in methods]
    symbolic = next((v for v in verifiers if type(v) is SymbolicVerifier), None)
    crown = next((v for v in verifiers if type(v) is CrownVerifier and v.intermediate == "symbolic"), None)
    results: dict[str, VerificationResult] = {}
    if symbolic is not None and crown is not None:
        start = time.perf_counter()
        with torch.no_grad():
            graph, inputs, labels, radius = symbolic._prepare(model, x, y, eps)
            assert labels is not None
            logits = model(inputs)
            check_labels(labels, logits.shape[1])
            spec = margin_spec(labels, output_size(graph, tuple(inputs.shape[1:]))).to(inputs.dtype)
            lower, upper = input_box(inputs, radius)
            sizes = [v.chunk_size(graph, tuple(inputs.shape[1:])) for v in (symbolic, crown)]
            size = min((s for s in sizes if s), default=inputs.shape[0])
            symbolic_parts, crown_parts = [], []
            symbolic_time = backward_time = 0.0
            for i in range(0, inputs.shape[0], size):
                piece = slice(i, i + size)
                clock = time.perf_counter()
                found = symbolic_pass(graph, lower[piece], upper[piece], spec[piece])
                symbolic_parts.append(found.spec_lower)
                symbolic_time += time.perf_counter() - clock
                clock = time.perf_counter()
                crown_parts.append(torch.maximum(
                    backward_bound(graph, lower[piece], upper[piece], spec[piece], found.pre_activation),
                    found.spec_lower))
                backward_time += time.perf_counter() - clock
        setup_time = time.perf_counter() - start - symbolic_time - backward_time
        for name, parts, seconds in ((symbolic.name, symbolic_parts, setup_time + symbolic_time),
                                     (crown.name, crown_parts, setup_time + symbolic_time + backward_time)):
            results[name] = result_from_margins(name, radius, inputs, labels, logits, torch.cat(parts), seconds)
    for verifier in verifiers:
        if verifier.name not in results:
            results[verifier.name] = verifier.verify(model, x, y, eps)
    return {verifier.name: results[verifier.name] for verifier in verifiers}


def bounds(model: nn.Module, x: Tensor, eps: float, method: str | Verifier = "symbolic", **options: Any) -> LogitBounds:
    """Sound lower/upper bounds of every logit over the eps-box around each x (differentiable)."""
    return get_verifier(method, **options).logit_bounds(model, x, eps)


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str | Verifier = "symbolic",
                  **options: Any) -> Tensor:
    """Lower bounds (B, K) of f_y - f_j over the eps-box (0 at j = y), differentiable: the robust-loss input."""
    return get_verifier(method, **options).margin_bounds(model, x, y, eps)
