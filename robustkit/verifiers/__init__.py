"""The bound engine: sound bounds of a network's outputs over an input box, and verification.

Methods (registry :data:`VERIFIERS`): ``interval`` (IBP), ``symbolic`` (MixTrain's symbolic intervals with
Neurify's symbolic linear relaxation), ``symbolic-naive`` (ReluVal's concretisation, a baseline), ``crown``
(backward linear relaxation), ``alpha-crown`` (CROWN with optimised slopes), ``exact`` (mixed-integer
programming) and ``bab`` (branch and bound on optimised bounds, complete). One API for all:

>>> import torch
>>> from robustkit.models import build_model
>>> from robustkit.verifiers import verify
>>> model = build_model("toy2d", seed=0).eval()
>>> result = verify(model, torch.full((1, 1, 1, 2), 0.5), torch.tensor([0]), eps=0.0, method="interval")
>>> result.status[0].value in ("verified", "falsified")
True

Any box and any linear specification ``C f(x) + d > 0``:

>>> lower, upper = torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), 0.3)
>>> rows = torch.tensor([[1.0, -1.0, 0.0]])  # f_0 - f_1 > 0 on the box
>>> spec_bounds(model, lower, upper, rows, method="crown").shape
torch.Size([1, 1])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.registry import Registry
from robustkit.verifiers.alpha_crown import AlphaCrownVerifier
from robustkit.verifiers.bab import BabVerifier
from robustkit.verifiers.base import (
    LogitBounds,
    SpecResult,
    Status,
    VerificationResult,
    Verifier,
    recheck_near_zero,
    result_from_margins,
)
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds, make_context
from robustkit.verifiers.crown import CrownVerifier
from robustkit.verifiers.exact import ExactVerifier
from robustkit.verifiers.interval import IntervalVerifier
from robustkit.verifiers.ops import register_operator
from robustkit.verifiers.symbolic import SymbolicNaiveVerifier, SymbolicVerifier

__all__ = [
    "VERIFIERS", "BoundContext", "BoundResult", "LayerBounds", "LogitBounds", "SpecResult", "Status",
    "VerificationResult", "Verifier", "bounds", "differentiable_methods", "get_verifier", "make_context",
    "margin_bounds", "register_operator", "spec_bounds", "verify", "verify_many", "verify_spec",
]

VERIFIERS: Registry[type[Verifier]] = Registry("verifier")
VERIFIERS.add("interval", IntervalVerifier)
VERIFIERS.add("symbolic", SymbolicVerifier)
VERIFIERS.add("symbolic-naive", SymbolicNaiveVerifier)
VERIFIERS.add("crown", CrownVerifier)
VERIFIERS.add("alpha-crown", AlphaCrownVerifier)
VERIFIERS.add("exact", ExactVerifier)
VERIFIERS.add("bab", BabVerifier)


def get_verifier(method: str | Verifier, **options: Any) -> Verifier:
    """A verifier instance from a registered name and its options (or an instance, returned as is)."""
    if isinstance(method, Verifier):
        if options:
            raise TypeError("options cannot be combined with a verifier instance")
        return method
    return VERIFIERS[method](**options)


def differentiable_methods() -> tuple[str, ...]:
    """The registered methods whose bounds carry gradients (usable as a robust training loss)."""
    return tuple(name for name in VERIFIERS if VERIFIERS[name].differentiable)


def verify(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str | Verifier = "symbolic",
           **options: Any) -> VerificationResult:
    """Verify each sample of (x, y) at L-inf radius eps with ``method``; see :class:`VerificationResult`."""
    return get_verifier(method, **options).verify(model, x, y, eps)


def verify_many(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, methods: Sequence[str | Verifier]
) -> dict[str, VerificationResult]:
    """Verify with several methods at once, keyed by method name; the results are those of calling
    :func:`verify` per method. All relaxation methods run on one bound context per piece of the batch, so a
    method that builds on another's bounds (``crown`` on ``symbolic``'s) reuses that result instead of
    computing it again; each method's time includes the results it built on. Methods with a ``verify`` of
    their own (``exact``, which decides samples rather than bounding them) run on their own."""
    verifiers = [get_verifier(m) for m in methods]
    shared = [v for v in verifiers if type(v).verify is Verifier.verify]
    results: dict[str, VerificationResult] = {}
    if shared:
        start = time.perf_counter()
        with torch.no_grad():
            ctx, inputs, labels, radius = shared[0]._eps_context(model, x, y, eps)
            assert labels is not None
            for verifier in shared:
                verifier.check_applicable(ctx.graph)
            logits = model(inputs)
            sizes = [v.chunk_size(ctx.graph, ctx.input_shape) for v in shared]
            size = min((s for s in sizes if s), default=ctx.batch)
            parts: dict[Verifier, list[Tensor]] = {v: [] for v in shared}
            seconds = dict.fromkeys(shared, 0.0)
            spent = 0.0
            for first in range(0, ctx.batch, size):
                piece = ctx.piece(first, first + size)
                for verifier in shared:
                    found = piece.run(verifier)
                    parts[verifier].append(found.spec_lower)
                    seconds[verifier] += found.seconds
                spent += piece.spent
        setup = max(time.perf_counter() - start - spent, 0.0)  # validation, the clean forward pass, pieces
        for verifier in shared:
            clock = time.perf_counter()
            with torch.no_grad():
                margins = recheck_near_zero(verifier, model, inputs, labels, radius, logits, torch.cat(parts[verifier]))
            spent_here = time.perf_counter() - clock
            results[verifier.name] = result_from_margins(verifier.name, radius, inputs, labels, logits, margins,
                                                         setup + seconds[verifier] + spent_here)
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


def spec_bounds(model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor, offset: Tensor | None = None,
                method: str | Verifier = "symbolic", **options: Any) -> Tensor:
    """Sound lower bounds (B, K) of ``spec @ f(x) + offset`` over the box [lower, upper] (any box)."""
    return get_verifier(method, **options).spec_bounds(model, lower, upper, spec, offset)


def verify_spec(model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor | list[Tensor],
                offset: Tensor | list[Tensor] | None = None, method: str | Verifier = "symbolic",
                **options: Any) -> SpecResult:
    """Verify ``spec @ f(x) + offset > 0`` (every row; a list is a disjunction) on the box, per sample."""
    return get_verifier(method, **options).verify_spec(model, lower, upper, spec, offset)
