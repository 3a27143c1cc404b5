"""The ``crown`` method: backward linear relaxation from the output specification (CROWN / DeepPoly style).

Starting from the specification rows (e.g. f_y - f_j), linear coefficients are pushed backward through the
network. Affine layers are exact (transposed maps); at a ReLU with pre-activation bounds [l, u] a positive
coefficient takes the lower relaxation alpha * v (alpha = 1 when u >= -l, else 0: CROWN's adaptive choice) and
a negative one the upper relaxation u / (u - l) * (v - l). At the input the linear function is minimised over
the box in closed form. Pre-activation bounds come from ``symbolic`` (default), ``interval`` or any verifier object
(``CrownVerifier(intermediate=SymbolicVerifier(intersect=False))``); the result is the better of the backward
bound and that of the method that supplied the intermediate bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustkit.errors import InputError
from robustkit.verifiers.base import Verifier
from robustkit.verifiers.context import BoundContext, BoundResult
from robustkit.verifiers.graph import INPUT, Graph, node_shapes
from robustkit.verifiers.interval import IntervalVerifier
from robustkit.verifiers.symbolic import SymbolicVerifier


def backward_bound(
    graph: Graph,
    lower: Tensor,
    upper: Tensor,
    spec: Tensor,
    pre_activation: dict[int, tuple[Tensor, Tensor]],
    slopes: dict[int, Tensor] | None = None,
    output: int | None = None,
) -> Tensor:
    """Lower bounds (B, K) of ``spec @ v`` by backward linear relaxation with the given bounds of every
    non-linear node's input, where v is the output of node ``output`` (default: the network's).

    ``slopes`` (node -> (B, K, *shape)) replaces the lower-relaxation slopes of those nodes' unstable neurons
    (alpha-CROWN; each operator clamps them to its sound range)."""
    shapes = node_shapes(graph, tuple(lower.shape[1:]))
    last = len(graph.nodes) - 1 if output is None else output
    lam: dict[int, Tensor] = {last: spec.reshape(*spec.shape[:2], *shapes[last])}
    constant = torch.zeros(spec.shape[:2], device=spec.device, dtype=spec.dtype)
    for index in range(last, -1, -1):
        if index not in lam:
            continue
        coeff = lam.pop(index)
        node = graph.nodes[index]
        incoming, extra = node.op.backward(coeff, [shapes[source] for source in node.inputs], shapes[index],
                                           pre_activation.get(index), None if slopes is None else slopes.get(index))
        if extra is not None:
            constant = constant + extra
        for source, value in zip(node.inputs, incoming, strict=True):
            lam[source] = lam[source] + value if source in lam else value
    coeff = lam[INPUT]
    dims = tuple(range(2, coeff.dim()))
    center, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return constant + (coeff * center).sum(dims) - (coeff.abs() * radius).sum(dims)


@dataclass(frozen=True)
class CrownVerifier(Verifier):
    """Backward linear relaxation with the intermediate bounds of another verifier: ``intermediate`` is a
    registered name (``"symbolic"``, the default, or ``"interval"``) or a verifier object; the result is the
    better of the backward bound and that verifier's own bound."""

    name: ClassVar[str] = "crown"
    intermediate: str | Verifier = "symbolic"
    memory_limit_gb: float = 4.0

    def __post_init__(self) -> None:
        source = self.source()
        if isinstance(source, CrownVerifier):
            raise InputError("crown cannot take its intermediate bounds from itself this way")

    def source(self) -> Verifier:
        """The verifier that supplies the intermediate bounds."""
        if isinstance(self.intermediate, Verifier):
            return self.intermediate
        if self.intermediate == "symbolic":
            return SymbolicVerifier(memory_limit_gb=self.memory_limit_gb)
        if self.intermediate == "interval":
            return IntervalVerifier()
        raise InputError(f"crown intermediate bounds must be 'symbolic', 'interval' or a verifier, "
                         f"got {self.intermediate!r}")

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        return self.source().chunk_size(graph, input_shape)

    def applicable(self, graph: Graph) -> str | None:
        return self.source().applicable(graph)

    def bound(self, ctx: BoundContext) -> BoundResult:
        base = ctx.run(self.source())
        found = backward_bound(ctx.graph, ctx.lower, ctx.upper, ctx.spec, dict(base.layer_bounds))
        return BoundResult(torch.maximum(found, base.spec_lower), base.layer_bounds)
