"""The ``symbolic`` method (MixTrain's analysis) and its ReluVal-style baseline ``symbolic-naive``.

Symbolic intervals (:mod:`robustkit.verifiers.symstate`) are pushed through the graph. At every ReLU the
concrete pre-activation bounds are the symbolic ones intersected with interval arithmetic's, so ``symbolic``
is never looser than ``interval`` inside the network; the output specification (e.g. f_y - f_j) is applied
to the symbolic output before it is concretised, which keeps the correlations between logits, and the final
bound is the better of that and interval's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers import ops
from robustkit.verifiers.base import Verifier
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds
from robustkit.verifiers.graph import INPUT, Graph, build_graph, check_reproduces, node_shapes
from robustkit.verifiers.interval import Box, spec_lower_from_box
from robustkit.verifiers.symstate import INPUT_BLOCK, SymState, spec_lower


@dataclass
class SymbolicPass:
    """The specification's lower bounds and, per ReLU node, the pre-activation bounds used.

    ``input_coefficients`` (B, K, *input_shape), when asked for, holds the coefficient of each input
    coordinate in the symbolic expression of every specification row: the "interval gradient" of the
    interval attack (its sign is the direction in which the symbolic bound of that row grows).
    """

    spec_lower: Tensor
    pre_activation: dict[int, tuple[Tensor, Tensor]]
    input_coefficients: Tensor | None = None


def _input_coefficients(state: SymState, spec: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    state = state.untiled()
    b, k = spec.shape[:2]
    if state.scale is not None:
        if state.shared is None:
            coefficients = spec * state.scale.unsqueeze(1)
        else:
            projected = torch.einsum("in,bkn->bki", state.shared.flatten(1), spec)
            coefficients = projected * state.scale.unsqueeze(1)
    elif INPUT_BLOCK in state.dense:
        rows = state.dense[INPUT_BLOCK]
        coefficients = torch.bmm(spec, rows.reshape(b, rows.shape[1], -1).transpose(1, 2))
    else:
        coefficients = torch.zeros(b, k, ops.numel(input_shape), device=spec.device, dtype=spec.dtype)
    return coefficients.reshape(b, k, *input_shape)


#: tiles per side of an image grid: smaller tiles skip more zeros but mean more, smaller operations, which cost
#: more where autograd records them. Measured on mnist_small (2 threads, batch 50 and 100, eps 0.01 to 0.1):
#: with 7 per side the bounds took 15 to 25% less time than with 4 without gradients, a training step about 5% more.
TILES_PER_SIDE = 4
TILES_PER_SIDE_NO_GRAD = 7


def symbolic_pass(
    graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor, naive: bool = False, coefficients: bool = False,
    tiles_per_side: int | None = None, intersect: bool = True,
) -> SymbolicPass:
    """Propagate symbolic intervals over the box [lower, upper] and bound ``spec @ f`` from below.

    With ``tiles_per_side`` > 0, rows with local support on image grids are kept in about that many tiles per
    side (:mod:`robustkit.verifiers.tiles`); the bounds are the same, computed faster; 0 keeps them dense;
    None (the default) takes ``TILES_PER_SIDE`` when autograd records and ``TILES_PER_SIDE_NO_GRAD`` otherwise.
    With ``intersect`` (the default) the bounds of every non-linear layer's input are intersected with interval
    arithmetic's and the final bound is the better of both; without it the analysis is the paper's alone.
    """
    if tiles_per_side is None:
        tiles_per_side = TILES_PER_SIDE if torch.is_grad_enabled() else TILES_PER_SIDE_NO_GRAD
    states: dict[int, SymState] = {INPUT: SymState.from_box(lower, upper, tiles_per_side)}
    boxes: dict[int, Box] = {INPUT: Box.from_bounds(lower, upper)}
    remaining = {key: len(users) for key, users in graph.consumers().items()}
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    mode = ops.NAIVE if naive else ops.SYMBOLIC
    for index, node in enumerate(graph.nodes):
        op = node.op
        sources = [states[source] for source in node.inputs]
        if isinstance(op, ops.NonlinearOp):
            radius = sources[0].radius()
            low, high = sources[0].center - radius, sources[0].center + radius
            if intersect:
                source_box = boxes[node.inputs[0]]
                low, high = torch.maximum(low, source_box.lower), torch.minimum(high, source_box.upper)
                high = torch.maximum(high, low)  # both bounds are sound; guard against rounding crossing them
                boxes[index] = Box.from_bounds(*op.interval_bounds(low, high))
            pre[index] = (low, high)
            states[index] = op.symbolic(sources, (low, high), index, mode)
        else:
            states[index] = op.symbolic(sources, None, index, mode)
            if intersect:
                boxes[index] = op.interval([boxes[source] for source in node.inputs])
        for source_index in set(node.inputs):
            remaining[source_index] -= node.inputs.count(source_index)
            if remaining[source_index] == 0:
                del states[source_index]  # free generator rows as soon as no node needs them
    last = len(graph.nodes) - 1
    flat_spec = spec.reshape(spec.shape[0], spec.shape[1], -1)
    symbolic = spec_lower(states[last], flat_spec)
    found = _input_coefficients(states[last], flat_spec, tuple(lower.shape[1:])) if coefficients else None
    if not intersect:
        return SymbolicPass(symbolic, pre, found)
    interval = spec_lower_from_box(graph, boxes, spec)
    return SymbolicPass(torch.maximum(symbolic, interval), pre, found)


def symbolic_chunk(graph: Graph, input_shape: tuple[int, ...], memory_limit_gb: float) -> int:
    """Samples per piece so that the generator rows (inputs x largest layer, a few copies) fit the budget."""
    shapes = node_shapes(graph, input_shape)
    inputs = ops.numel(input_shape)
    widest = max(ops.numel(shape) for shape in shapes.values())
    per_sample = 4 * 4 * inputs * widest  # float32, about four live copies at the widest layer
    return max(1, int(memory_limit_gb * 2**30 // per_sample))


@dataclass(frozen=True)
class SymbolicVerifier(Verifier):
    """Symbolic intervals with Neurify's symbolic linear relaxation (the MixTrain paper's analysis).

    ``memory_limit_gb`` bounds the generator rows held at once (without gradients): larger batches are
    bounded in pieces. ``intersect`` (default True) intersects the bounds of every non-linear layer's input
    with interval arithmetic's and keeps the better final bound: sound, never looser than ``interval``, but
    not the published analysis; ``intersect=False`` runs the MixTrain analysis exactly as published (to
    reproduce the paper's figures).

    >>> import torch
    >>> from robustkit.models import build_model
    >>> from robustkit.verifiers import verify
    >>> model = build_model("toy2d", seed=0).eval()
    >>> x, y = torch.full((1, 1, 1, 2), 0.5), torch.tensor([0])
    >>> paper = verify(model, x, y, eps=0.05, method="symbolic", intersect=False).margin_lower
    >>> bool(verify(model, x, y, eps=0.05, method="symbolic").margin_lower >= paper)
    True
    """

    name: ClassVar[str] = "symbolic"
    memory_limit_gb: float = 4.0
    intersect: bool = True

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        return symbolic_chunk(graph, input_shape, self.memory_limit_gb)

    def bound(self, ctx: BoundContext) -> BoundResult:
        found = symbolic_pass(ctx.graph, ctx.lower, ctx.upper, ctx.spec, intersect=self.intersect)
        return BoundResult(found.spec_lower, LayerBounds(found.pre_activation))


@dataclass(frozen=True)
class SymbolicNaiveVerifier(Verifier):
    """ReluVal-style symbolic intervals: a crossing ReLU is concretised to [0, u] (a looser baseline that
    shows what Neurify's relaxation gains; it costs about as much as ``symbolic``)."""

    name: ClassVar[str] = "symbolic-naive"
    memory_limit_gb: float = 4.0

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        return symbolic_chunk(graph, input_shape, self.memory_limit_gb)

    def bound(self, ctx: BoundContext) -> BoundResult:
        found = symbolic_pass(ctx.graph, ctx.lower, ctx.upper, ctx.spec, naive=True)
        return BoundResult(found.spec_lower, LayerBounds(found.pre_activation))


def box_bounds(
    model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor, coefficients: bool = False,
    memory_limit_gb: float = 4.0,
) -> SymbolicPass:
    """Symbolic lower bounds of ``spec @ f`` over an arbitrary box [lower, upper] inside [0, 1].

    ``spec`` is (B, K, n_outputs). Used by the interval attack, whose boxes are small neighbourhoods of its
    current point rather than eps-balls around the clean input. Large batches are bounded in pieces within
    ``memory_limit_gb`` (the pre-activation bounds are then not returned).
    """
    if lower.shape != upper.shape or bool((lower > upper).any()):
        raise InputError("box_bounds needs lower <= upper of the same shape")
    if bool((lower < 0).any()) or bool((upper > 1).any()):
        raise InputError("box_bounds needs a box inside [0, 1]")
    graph = build_graph(model)
    check_reproduces(graph, model, lower[:2])
    size = symbolic_chunk(graph, tuple(lower.shape[1:]), memory_limit_gb)
    pieces = [
        symbolic_pass(graph, lower[i : i + size], upper[i : i + size], spec[i : i + size], coefficients=coefficients)
        for i in range(0, lower.shape[0], size)
    ]
    if len(pieces) == 1:
        return pieces[0]
    found = [p.input_coefficients for p in pieces]
    return SymbolicPass(
        spec_lower=torch.cat([p.spec_lower for p in pieces]),
        pre_activation={},
        input_coefficients=torch.cat(found) if all(f is not None for f in found) else None,  # type: ignore[arg-type]
    )
