"""Interval bound propagation (IBP) over a bound-operator graph, in centre/radius form.

Every operator gives its own interval rule (``op.interval``; non-linear ones ``op.interval_bounds``): affine
layers map the centre exactly and the radius through |W|; a ReLU maps the box [l, u] to [relu(l), relu(u)].
The output specification C (e.g. margins f_y - f_j) is folded into the last affine layer, so the margin
bound is computed from the penultimate box through the rows of C W, as in Gowal et al.'s IBP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustkit.verifiers import ops
from robustkit.verifiers.base import Verifier
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds
from robustkit.verifiers.graph import INPUT, Graph
from robustkit.verifiers.ops.base import Box

__all__ = ["Box", "IntervalPass", "IntervalVerifier", "interval_pass", "spec_lower_from_box"]


def spec_lower_from_box(graph: Graph, boxes: dict[int, Box], spec: Tensor) -> Tensor:
    """Lower bounds of ``spec @ f(x)`` (B, K): folded into the last node when it is affine, else on its box."""
    last = len(graph.nodes) - 1
    node = graph.nodes[last]
    if isinstance(node.op, ops.AffineOp) and node.inputs[0] in boxes:
        box = boxes[node.inputs[0]]
        in_shape = tuple(box.center.shape[1:])
        out_shape = node.op.out_shape(in_shape)
        folded = node.op.adjoint(spec.reshape(*spec.shape[:2], *out_shape), in_shape)  # (B, K, *in_shape)
        dims = tuple(range(2, folded.dim()))
        value = (folded * box.center.unsqueeze(1)).sum(dims) - (folded.abs() * box.radius.unsqueeze(1)).sum(dims)
        bias = node.op.bias(out_shape)
        if bias is not None:
            bias = bias.to(spec.device, spec.dtype)
            value = value + (spec * bias.reshape(1, 1, -1)).sum(2)
        return value
    box = boxes[last]
    center, radius = box.center.flatten(1), box.radius.flatten(1)
    return torch.einsum("bkn,bn->bk", spec, center) - torch.einsum("bkn,bn->bk", spec.abs(), radius)


@dataclass
class IntervalPass:
    """Result of one IBP pass: the lower bounds of the specification and the pre-activation bounds of every
    ReLU node (used by the backward method as intermediate bounds)."""

    spec_lower: Tensor
    pre_activation: dict[int, tuple[Tensor, Tensor]]
    shapes: dict[int, tuple[int, ...]]


def interval_pass(graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor) -> IntervalPass:
    """Propagate the input box [lower, upper] through ``graph`` and bound ``spec @ f`` from below."""
    boxes: dict[int, Box] = {INPUT: Box.from_bounds(lower, upper)}
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    shapes: dict[int, tuple[int, ...]] = {INPUT: tuple(lower.shape[1:])}
    last = len(graph.nodes) - 1
    for index, node in enumerate(graph.nodes):
        op = node.op
        if index == last and isinstance(op, ops.AffineOp):
            shapes[index] = op.out_shape(shapes[node.inputs[0]])
            break  # the specification is folded into the last affine layer
        sources = [boxes[source] for source in node.inputs]
        if isinstance(op, ops.NonlinearOp):
            pre[index] = (sources[0].lower, sources[0].upper)
            box = Box.from_bounds(*op.interval_bounds(*pre[index]))
        else:
            box = op.interval(sources)
        boxes[index] = box
        shapes[index] = tuple(box.center.shape[1:])
    return IntervalPass(spec_lower_from_box(graph, boxes, spec), pre, shapes)


@dataclass(frozen=True)
class IntervalVerifier(Verifier):
    """Interval bound propagation (IBP): the box through every layer, the specification folded into the last."""

    name: ClassVar[str] = "interval"

    def bound(self, ctx: BoundContext) -> BoundResult:
        found = interval_pass(ctx.graph, ctx.lower, ctx.upper, ctx.spec)
        return BoundResult(found.spec_lower, LayerBounds(found.pre_activation))
