"""Interval bound propagation (IBP) over a bound-operator graph, in centre/radius form.

Affine layers map the centre exactly and the radius through |W|; a ReLU maps the box [l, u] to
[relu(l), relu(u)]. The output specification C (e.g. margins f_y - f_j) is folded into the last affine layer,
so the margin bound is computed from the penultimate box through the rows of C W, as in Gowal et al.'s IBP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustkit.verifiers import ops
from robustkit.verifiers.graph import INPUT, Graph


@dataclass
class Box:
    """An axis-aligned box in centre/radius form, batched: centre and radius have shape (B, *shape)."""

    center: Tensor
    radius: Tensor

    @property
    def lower(self) -> Tensor:
        return self.center - self.radius

    @property
    def upper(self) -> Tensor:
        return self.center + self.radius

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor) -> Box:
        return cls((upper + lower) / 2, (upper - lower) / 2)


def affine_box(op: ops.AffineOp, box: Box) -> Box:
    return Box(op.forward(box.center), op.abs_linear(box.radius))


def relu_box(lower: Tensor, upper: Tensor) -> Box:
    return Box.from_bounds(torch.relu(lower), torch.relu(upper))


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
        if isinstance(op, ops.AffineOp):
            if index == last:
                shapes[index] = op.out_shape(shapes[node.inputs[0]])
                break  # the specification is folded into the last affine layer
            box = affine_box(op, boxes[node.inputs[0]])
        elif isinstance(op, ops.ReLUOp):
            source = boxes[node.inputs[0]]
            pre[index] = (source.lower, source.upper)
            box = relu_box(source.lower, source.upper)
        elif isinstance(op, ops.AddOp):
            first, second = (boxes[i] for i in node.inputs)
            box = Box(first.center + second.center, first.radius + second.radius)
        else:
            raise TypeError(f"no interval rule for {type(op).__name__}")
        boxes[index] = box
        shapes[index] = tuple(box.center.shape[1:])
    return IntervalPass(spec_lower_from_box(graph, boxes, spec), pre, shapes)
