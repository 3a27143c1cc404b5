"""The ``crown`` method: backward linear relaxation from the output specification (CROWN / DeepPoly style).

Starting from the specification rows (e.g. f_y - f_j), linear coefficients are pushed backward through the
network. Affine layers are exact (transposed maps); at a ReLU with pre-activation bounds [l, u] a positive
coefficient takes the lower relaxation alpha * v (alpha = 1 when u >= -l, else 0: CROWN's adaptive choice) and
a negative one the upper relaxation u / (u - l) * (v - l). At the input the linear function is minimised over
the box in closed form.

The pre-activation bounds (``intermediate``) come from

* ``"symbolic"`` (the default): one symbolic-interval pass;
* ``"interval"``: interval arithmetic;
* ``"crown"``: CROWN itself, layer by layer (Zhang et al., *Efficient Neural Network Robustness
  Certification with General Activation Functions*, arXiv:1811.00866): in topological order, the input of
  every non-linear node is bounded by a backward pass that starts at that input with identity rows and uses
  the bounds already found for the earlier non-linear nodes, intersected with interval arithmetic over those
  bounds. Only the neurons that interval arithmetic leaves unstable get a row, gathered per sample (padded to
  the batch's largest count) and processed in chunks of rows within ``memory_limit_gb``;
* ``"crown+symbolic"``: the same, with every node's bounds also intersected with the symbolic pass's (fewer
  unstable neurons, so fewer rows); its result includes that of ``"symbolic"``, so it is never below it.

Nodes whose input is the network input or one affine layer of it get no backward pass (interval arithmetic is
exact there). On a MixTrain-trained ``mnist_small`` at eps 0.3, ``"crown"`` alone was looser than
``"symbolic"`` (a network trained through symbolic intervals suits their relaxation) and about 8x slower than
``"crown+symbolic"``, whose symbolic pass leaves about a tenth of the neurons that interval arithmetic leaves
unstable; ``"crown+symbolic"`` is the tightest of the four.

Any verifier object can supply the intermediate bounds too (``CrownVerifier(intermediate=SymbolicVerifier(
intersect=False))``): its result on the same bound context is reused when it was computed already (as in
:func:`robustkit.verifiers.verify_many`). The result is the better of the backward bound and the bound of the
method(s) that supplied the intermediate bounds (interval arithmetic over the tightened boxes for
``"crown"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustkit.errors import InputError
from robustkit.verifiers import ops
from robustkit.verifiers.base import Verifier
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds
from robustkit.verifiers.graph import INPUT, Graph, node_shapes
from robustkit.verifiers.interval import IntervalVerifier, interval_pass, spec_lower_from_box
from robustkit.verifiers.ops.base import Box
from robustkit.verifiers.symbolic import SymbolicVerifier, symbolic_pass

Bounds = tuple[Tensor, Tensor]
INTERMEDIATES = ("symbolic", "interval", "crown", "crown+symbolic")


def backward_bound(
    graph: Graph,
    lower: Tensor,
    upper: Tensor,
    spec: Tensor,
    pre_activation: dict[int, tuple[Tensor, Tensor]],
    slopes: dict[int, Tensor] | None = None,
    output: int | None = None,
    input_terms: dict[int, Tensor] | None = None,
    record: dict[int, Tensor] | None = None,
) -> Tensor:
    """Lower bounds (B, K) of ``spec @ v`` by backward linear relaxation with the given bounds of every
    non-linear node's input, where v is the output of node ``output`` (default: the network's).

    ``slopes`` (node -> (B, K, *shape)) replaces the lower-relaxation slopes of those nodes' unstable neurons
    (alpha-CROWN; each operator clamps them to its sound range). ``input_terms`` (node -> (B, K, *in_shape))
    adds linear terms in a non-linear node's input to the bounded function: branch and bound's Lagrangian
    terms -beta * s * v of split constraints s * v >= 0 (beta-CROWN), which keep the bound sound on the
    sub-problem for any beta >= 0. ``record``, when given, receives the coefficients (B, K, *shape) on the
    output of every non-linear node and (key -1) on the input, as the pass computed them."""
    shapes = node_shapes(graph, tuple(lower.shape[1:]))
    last = len(graph.nodes) - 1 if output is None else output
    lam: dict[int, Tensor] = {last: spec.reshape(*spec.shape[:2], *shapes[last])}
    constant = torch.zeros(spec.shape[:2], device=spec.device, dtype=spec.dtype)
    for index in range(last, -1, -1):
        if index not in lam:
            continue
        coeff = lam.pop(index)
        node = graph.nodes[index]
        if record is not None and index in pre_activation:
            record[index] = coeff
        incoming, extra = node.op.backward(coeff, [shapes[source] for source in node.inputs], shapes[index],
                                           pre_activation.get(index), None if slopes is None else slopes.get(index))
        if extra is not None:
            constant = constant + extra
        if input_terms is not None and index in input_terms:
            incoming = [incoming[0] + input_terms[index], *incoming[1:]]
        for source, value in zip(node.inputs, incoming, strict=True):
            lam[source] = lam[source] + value if source in lam else value
    coeff = lam[INPUT]
    if record is not None:
        record[INPUT] = coeff
    dims = tuple(range(2, coeff.dim()))
    center, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return constant + (coeff * center).sum(dims) - (coeff.abs() * radius).sum(dims)


@dataclass(frozen=True, eq=False)
class Rows:
    """The neurons of one node that get a backward pass: ``index`` (B, M) flat positions per sample, padded
    with the out-of-range position n (the node's size) up to the batch's largest count M."""

    index: Tensor
    size: int

    @classmethod
    def where(cls, mask: Tensor) -> Rows:
        """The True positions of ``mask`` (B, *shape) per sample."""
        flat = mask.flatten(1)
        count = int(flat.sum(1).max()) if flat.numel() else 0
        order = torch.sort(flat.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
        valid = torch.arange(count, device=mask.device) < flat.sum(1, keepdim=True)
        return cls(torch.where(valid, order, flat.shape[1]), flat.shape[1])

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def spec(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows ``start`` to ``stop`` - 1 (B, stop - start, n) of the 2M specification rows: +e_i for the lower
        bound of every neuron i, then -e_i for its upper bound (padding rows are zero)."""
        b, m = self.index.shape
        position = torch.arange(start, stop, device=self.index.device)
        sign = torch.where(position < m, 1.0, -1.0).to(dtype).expand(b, -1)
        rows = torch.zeros(b, stop - start, self.size + 1, device=self.index.device, dtype=dtype)
        rows.scatter_(2, self.index[:, position % m].unsqueeze(2), sign.unsqueeze(2))
        return rows[..., : self.size]

    def tighten(self, low: Tensor, high: Tensor, found: Tensor) -> Bounds:
        """``low``, ``high`` (B, *shape) intersected with the bounds ``found`` (B, 2M) of the rows of :meth:`spec`."""
        b, m = self.index.shape
        pad = torch.full((b, 1), -torch.inf, device=low.device, dtype=low.dtype)
        new_low = torch.cat([low.flatten(1), pad], 1)
        new_high = torch.cat([high.flatten(1), -pad], 1)
        new_low = new_low.scatter(1, self.index, torch.maximum(new_low.gather(1, self.index), found[:, :m]))
        new_high = new_high.scatter(1, self.index, torch.minimum(new_high.gather(1, self.index), -found[:, m:]))
        new_low, new_high = new_low[:, : self.size].view_as(low), new_high[:, : self.size].view_as(high)
        return new_low, torch.maximum(new_high, new_low)  # both sound; guard against rounding crossing them


def row_chunk(graph: Graph, input_shape: tuple[int, ...], output: int, batch: int, memory_limit_gb: float) -> int:
    """Specification rows per backward pass from ``output`` so that the coefficients (rows x the widest node
    on the way, a few live copies, float32) of the whole batch fit ``memory_limit_gb``."""
    shapes = node_shapes(graph, input_shape)
    widest = max(ops.numel(shapes[index]) for index in range(INPUT, output + 1))
    per_row = 6 * 4 * widest * batch
    return max(1, int(memory_limit_gb * 2**30 // per_row))


def row_bounds(graph: Graph, lower: Tensor, upper: Tensor, output: int, rows: Rows,
               pre_activation: dict[int, Bounds], slopes: dict[int, Tensor] | None, chunk: int) -> Tensor:
    """Lower bounds (B, 2M) of the rows of :meth:`Rows.spec` on node ``output``'s value, ``chunk`` rows at a time;
    ``slopes`` (node -> (B, 2M, *shape)) are sliced along with the rows."""
    parts = []
    total = 2 * rows.count
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        chosen = None if slopes is None else {node: value[:, start:stop] for node, value in slopes.items()}
        spec = rows.spec(start, stop, lower.dtype)
        parts.append(backward_bound(graph, lower, upper, spec, pre_activation, chosen, output))
    return torch.cat(parts, 1)


def unstable_inputs(op: ops.NonlinearOp, low: Tensor, high: Tensor) -> Tensor:
    """The input neurons (B, *in_shape) of a non-linear node whose tighter bounds can change its relaxation:
    the unstable ones of an elementwise layer; every neuron with l < u for a layer whose outputs read other
    neurons (max pooling), whose ``unstable`` mask is over its outputs."""
    relax = op.relaxation(low, high, ops.BACKWARD)
    return relax.unstable if relax.index is None and relax.unstable.shape == low.shape else high > low


def needs_backward(graph: Graph, index: int) -> bool:
    """Whether the input of non-linear node ``index`` can be tightened by a backward pass: not when it is the
    network input or one affine layer applied to it (interval arithmetic is then exact)."""
    (source,) = graph.nodes[index].inputs
    if source == INPUT:
        return False
    node = graph.nodes[source]
    return not (isinstance(node.op, ops.AffineOp) and node.inputs == (INPUT,))


@dataclass(eq=False)
class CrownLayers:
    """Bounds of every non-linear node's input (``pre_activation``), the interval boxes of every node over
    them (``boxes``), and the rows that got a backward pass, per non-linear node (``rows``)."""

    pre_activation: dict[int, Bounds]
    boxes: dict[int, Box]
    rows: dict[int, Rows]


def layer_bounds(
    graph: Graph,
    lower: Tensor,
    upper: Tensor,
    known: dict[int, Bounds] | None = None,
    rows: dict[int, Rows] | None = None,
    slopes: dict[int, dict[int, Tensor]] | None = None,
    memory_limit_gb: float = 4.0,
) -> CrownLayers:
    """CROWN's intermediate bounds: for every non-linear node in topological order, interval arithmetic over
    the bounds found so far, intersected with ``known`` (other sound bounds, e.g. symbolic's) and with a
    backward pass from the node's input over its unstable neurons (``rows``: node -> the neurons to pass,
    nodes without an entry get none; default: those that the intersection leaves unstable, wherever
    interval arithmetic is not exact). ``slopes`` (node -> earlier node -> (B, 2M, *shape)) sets the lower
    slopes of every row's pass (alpha-CROWN's optimised intermediate bounds)."""
    boxes: dict[int, Box] = {INPUT: Box.from_bounds(lower, upper)}
    pre: dict[int, Bounds] = {}
    used: dict[int, Rows] = {}
    input_shape = tuple(lower.shape[1:])
    for index, node in enumerate(graph.nodes):
        op = node.op
        if not isinstance(op, ops.NonlinearOp):
            boxes[index] = op.interval([boxes[source] for source in node.inputs])
            continue
        (source,) = node.inputs
        low, high = boxes[source].lower, boxes[source].upper
        if known is not None and index in known:
            low, high = torch.maximum(low, known[index][0]), torch.minimum(high, known[index][1])
            high = torch.maximum(high, low)
        chosen = None
        if rows is not None:
            chosen = rows.get(index)
        elif needs_backward(graph, index):
            chosen = Rows.where(unstable_inputs(op, low, high))
        if chosen is not None and chosen.count:
            chunk = row_chunk(graph, input_shape, source, lower.shape[0], memory_limit_gb)
            found = row_bounds(graph, lower, upper, source, chosen, pre,
                               None if slopes is None else slopes.get(index), chunk)
            low, high = chosen.tighten(low, high, found)
            used[index] = chosen
        pre[index] = (low, high)
        boxes[index] = Box.from_bounds(*op.interval_bounds(low, high))
    return CrownLayers(pre, boxes, used)


def intermediate_bounds(graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor, intermediate: str,
                        memory_limit_gb: float = 4.0) -> tuple[Tensor, CrownLayers]:
    """The ``intermediate`` method's own lower bound (B, K) of ``spec @ f`` (for ``crown+symbolic``: also
    CROWN's with symbolic intermediate bounds) and its bounds of every non-linear node's input (with the rows
    that got a backward pass, for ``crown`` and ``crown+symbolic``)."""
    if intermediate == "symbolic":
        found = symbolic_pass(graph, lower, upper, spec)
        return found.spec_lower, CrownLayers(found.pre_activation, {}, {})
    if intermediate == "interval":
        box = interval_pass(graph, lower, upper, spec)
        return box.spec_lower, CrownLayers(box.pre_activation, {}, {})
    known = None
    base = None
    if intermediate == "crown+symbolic":
        symbolic = symbolic_pass(graph, lower, upper, spec)
        known = symbolic.pre_activation
        # tighter intermediate bounds do not always tighten CROWN's bound (its adaptive slopes change with
        # them): crown with symbolic intermediates is part of the result, so this one is never below it
        base = torch.maximum(symbolic.spec_lower, backward_bound(graph, lower, upper, spec, known))
    layers = layer_bounds(graph, lower, upper, known, memory_limit_gb=memory_limit_gb)
    boxed = spec_lower_from_box(graph, layers.boxes, spec)
    return (boxed if base is None else torch.maximum(boxed, base)), layers


def check_intermediate(intermediate: str) -> None:
    """A clear :class:`InputError` for an unknown ``intermediate`` method."""
    if intermediate not in INTERMEDIATES:
        raise InputError(f"crown intermediate bounds must be one of {', '.join(map(repr, INTERMEDIATES))}, "
                         f"got {intermediate!r}")


@dataclass(frozen=True)
class CrownVerifier(Verifier):
    """Backward linear relaxation with intermediate bounds from ``symbolic`` (default), ``interval``,
    ``crown``, ``crown+symbolic`` (see the module docstring) or a verifier object; ``memory_limit_gb`` bounds
    the symbolic generator rows and the rows of the layer-by-layer passes held at once."""

    name: ClassVar[str] = "crown"
    intermediate: str | Verifier = "symbolic"
    memory_limit_gb: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.intermediate, CrownVerifier):
            raise InputError("crown takes layer-by-layer crown bounds with intermediate='crown', not a crown object")
        if not isinstance(self.intermediate, Verifier):
            check_intermediate(self.intermediate)

    def source(self) -> Verifier | None:
        """The verifier whose result supplies the intermediate bounds (None for the layer-by-layer ones)."""
        if isinstance(self.intermediate, Verifier):
            return self.intermediate
        if self.intermediate in ("symbolic", "crown+symbolic"):
            return SymbolicVerifier(memory_limit_gb=self.memory_limit_gb)
        return IntervalVerifier() if self.intermediate == "interval" else None

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        source = self.source()
        return None if source is None else source.chunk_size(graph, input_shape)

    def applicable(self, graph: Graph) -> str | None:
        source = self.source()
        return None if source is None else source.applicable(graph)

    def bound(self, ctx: BoundContext) -> BoundResult:
        source = self.source()
        base = None if source is None else ctx.run(source)
        if self.intermediate in ("crown", "crown+symbolic"):
            known = None if base is None else dict(base.layer_bounds)
            layers = layer_bounds(ctx.graph, ctx.lower, ctx.upper, known, memory_limit_gb=self.memory_limit_gb)
            own = spec_lower_from_box(ctx.graph, layers.boxes, ctx.spec)
            if base is not None and known is not None:  # never below crown with symbolic intermediates
                with_known = backward_bound(ctx.graph, ctx.lower, ctx.upper, ctx.spec, known)
                own = torch.maximum(own, torch.maximum(base.spec_lower, with_known))
            pre = layers.pre_activation
        else:
            assert base is not None
            own, pre = base.spec_lower, dict(base.layer_bounds)
        found = backward_bound(ctx.graph, ctx.lower, ctx.upper, ctx.spec, pre)
        return BoundResult(torch.maximum(found, own), LayerBounds(pre))


def crown_pass(graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor, intermediate: str | Verifier = "symbolic",
               memory_limit_gb: float = 4.0) -> tuple[Tensor, dict[int, Bounds]]:
    """crown's bound (B, K) of ``spec @ f`` over a box of an already validated graph, and the bounds of every
    non-linear node's input that it used."""
    verifier = CrownVerifier(intermediate=intermediate, memory_limit_gb=memory_limit_gb)
    found = BoundContext(graph, lower, upper, spec).run(verifier)
    return found.spec_lower, dict(found.layer_bounds)
