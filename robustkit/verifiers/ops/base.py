"""The bound-operator contract: what every node of the graph provides to every bound method.

A bound operator is one layer of the network. It owns its rules for every method, so each method is one
generic loop over the graph (:mod:`~robustkit.verifiers.interval`, :mod:`~robustkit.verifiers.symbolic`,
:mod:`~robustkit.verifiers.crown`, :mod:`~robustkit.verifiers.milp`) and a new layer type is one new class:

* ``forward(*inputs)`` and ``out_shape(*in_shapes)``: the layer itself;
* ``interval(boxes)``: the output box from the input boxes (IBP);
* ``symbolic(states, bounds, block, mode)``: symbolic intervals through the layer (MixTrain's analysis);
* ``backward(coeff, in_shapes, out_shape, bounds, slopes)``: linear coefficients on the output pushed to the
  inputs, and the constant they pick up (CROWN);
* ``milp(builder, inputs, bounds, layer)``: the layer in a mixed-integer program (``exact``).

Three families implement the contract once for all their members:

* :class:`AffineOp` (y = L(x) + b): exact in every method through ``linear``, ``abs_linear``, ``adjoint`` and
  ``bias`` (see the class docstring);
* :class:`AddOp`: several inputs summed (the join of a skip connection), exact in every method;
* :class:`NonlinearOp`: one input whose bounds [l, u] the methods compute first (``needs_bounds``); the op
  gives its interval image and a :class:`Relaxation` (lower and upper linear bounds on [l, u]), which the
  symbolic and backward methods apply generically, and its MILP encoding (or says it has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from robustkit.verifiers import symstate
from robustkit.verifiers.milp import AffineMap, Expression, MilpBuilder, as_numpy

if TYPE_CHECKING:
    from robustkit.verifiers.symstate import SymState

Bounds = tuple[Tensor, Tensor]

# Jacobians for the MILP are built from identity bases in chunks of at most this many values (a conv layer of
# a CIFAR-sized input never materialises its dense Jacobian at once).
_CHUNK_VALUES = 1 << 22


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


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
        # halved in place: the same numbers as a division by 2, without two more tensors per box (freshly
        # allocated large tensors cost page faults; this was a tenth of an interval pass on mnist_small)
        return cls((upper + lower).mul_(0.5), (upper - lower).mul_(0.5))


@dataclass(frozen=True, eq=False)
class Relaxation:
    """Linear bounds of a non-linear layer over its input bounds [l, u], per output neuron o:

        lower_slope[o] * x[i(o)] + lower_offset[o] <= f(x)[o] <= upper_slope[o] * x[i(o)] + upper_offset[o]

    where i(o) = o for elementwise layers (``index`` None) and ``index`` (B, n_out) holds the flat input
    neuron each output depends on otherwise (max pooling). Slopes and offsets have the output's shape
    (B, *out_shape), or (B, K, *out_shape) when they differ per specification row (optimised slopes);
    an offset of None is zero. ``unstable`` (B, *out_shape) marks the neurons where the bounds are not exact
    (the candidates for new error terms, optimised slopes and branching).
    """

    lower_slope: Tensor
    upper_slope: Tensor
    unstable: Tensor
    lower_offset: Tensor | None = None
    upper_offset: Tensor | None = None
    index: Tensor | None = None


class BoundOp:
    """Base of all bound operators; see the module docstring for the contract."""

    #: number of inputs (nodes it reads)
    arity: ClassVar[int] = 1
    #: whether the methods must bound this node's input before they apply it (non-linear layers)
    needs_bounds: ClassVar[bool] = False
    #: whether ``milp`` encodes the layer (the ``exact`` method is applicable only when every layer is)
    milp_encodable: ClassVar[bool] = True

    def forward(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def out_shape(self, *in_shapes: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape (without batch) for inputs of shapes ``in_shapes``."""
        with torch.no_grad():
            probes = [torch.zeros((1, *shape), device=self.device, dtype=self.dtype) for shape in in_shapes]
            return tuple(self.forward(*probes).shape[1:])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def interval(self, boxes: Sequence[Box]) -> Box:
        raise NotImplementedError

    def symbolic(self, states: Sequence[SymState], bounds: Bounds | None, block: int, mode: str) -> SymState:
        raise NotImplementedError

    def backward(self, coeff: Tensor, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                 bounds: Bounds | None, slopes: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        raise NotImplementedError

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        raise NotImplementedError

    def milp_map(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], like: Tensor) -> AffineMap | None:
        """Data the MILP rule needs that depends only on the weights (affine layers: their sparse matrix)."""
        return None


def _spec_dims(coeff: Tensor) -> tuple[int, ...]:
    return tuple(range(2, coeff.dim()))


class AffineOp(BoundOp):
    """An affine layer y = L(x) + b, exact in every method through:

    * ``linear(x)``: L without the bias, on a batch of shaped tensors (generator rows, identity bases);
    * ``abs_linear(r)``: |L| on a non-negative radius (interval arithmetic in centre/radius form);
    * ``adjoint(lam, in_shape)``: L transposed, for backward propagation;
    * ``bias(out_shape)``: b as a tensor of the output shape, or None.

    Optional structure the symbolic algebra exploits (:mod:`~robustkit.verifiers.symstate`,
    :mod:`~robustkit.verifiers.tiles`): ``weight_matrix`` (a dense matrix layer), ``channel_factor`` (a
    per-channel scaling), ``reshape`` (a pure reshape: ``"identity"`` or ``"flatten"``), ``window``
    and ``window_apply`` (a convolution-like layer with local support).
    """

    reshape: ClassVar[str | None] = None

    def linear(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def abs_linear(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        raise NotImplementedError

    @property
    def weight_matrix(self) -> Tensor | None:
        """The (out, in) weight of a dense matrix layer, or None."""
        return None

    def channel_factor(self, channels: int) -> Tensor | None:
        """The per-channel factors (C,) of a per-channel scaling (y = x * s[c] + t[c]), or None."""
        return None

    def window(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        """(kernel, stride, padding, dilation) of a convolution-like layer that rows with local support can
        pass on a rectangle, or None."""
        return None

    def window_apply(self, canvas: Tensor) -> Tensor:
        """The linear part on a zero-padded rectangle (padding 0), for layers with a ``window``."""
        raise NotImplementedError

    def linear_rows(self, x: Tensor) -> Tensor:
        """``linear`` on a (B, m, *in_shape) tensor of generator rows, returning (B, m, *out_shape)."""
        b, m = x.shape[:2]
        out = self.linear(x.reshape(b * m, *x.shape[2:]))
        return out.reshape(b, m, *out.shape[1:])

    # -- the rules of every method -------------------------------------------------------------------------

    def interval(self, boxes: Sequence[Box]) -> Box:
        (box,) = boxes
        return Box(self.forward(box.center), self.abs_linear(box.radius))

    def symbolic(self, states: Sequence[SymState], bounds: Bounds | None, block: int, mode: str) -> SymState:
        (state,) = states
        return symstate.affine(self, state)

    def backward(self, coeff: Tensor, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                 bounds: Bounds | None, slopes: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        bias = self.bias(out_shape)
        constant = None
        if bias is not None:
            bias = bias.to(coeff.device, coeff.dtype)
            constant = (coeff * bias.reshape(1, 1, *out_shape)).sum(_spec_dims(coeff))
        return [self.adjoint(coeff, in_shapes[0])], constant

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        (source,) = inputs
        if layer is None:
            return source
        return Expression(sp.csr_matrix(layer.matrix @ builder.widen(source.matrix)),
                          layer.matrix @ source.const + layer.bias)

    def milp_map(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], like: Tensor) -> AffineMap | None:
        """The layer as a sparse matrix and bias over flattened neurons (None for reshapes, which keep the
        row-major order): the transposed Jacobian, ``linear`` of an identity basis on ``like``'s device."""
        if self.reshape is not None:
            return None
        n_in, n_out = numel(in_shape), numel(out_shape)
        step = max(1, _CHUNK_VALUES // max(n_out, 1))
        blocks = []
        with torch.no_grad():
            for start in range(0, n_in, step):
                rows = torch.arange(min(step, n_in - start), device=like.device)
                basis = torch.zeros(rows.numel(), n_in, device=like.device, dtype=like.dtype)
                basis[rows, start + rows] = 1.0
                jacobian = self.linear(basis.view(-1, *in_shape)).reshape(rows.numel(), n_out)
                blocks.append(sp.csr_matrix(jacobian.cpu().double().numpy()))
            bias = self.bias(out_shape)
        return AffineMap(sp.csr_matrix(sp.vstack(blocks).T),
                         np.zeros(n_out) if bias is None else as_numpy(bias))


class AddOp(BoundOp):
    """The sum of several inputs of the same shape: the join of a skip connection. Exact in every method."""

    arity: ClassVar[int] = 2

    def forward(self, *inputs: Tensor) -> Tensor:
        total = inputs[0]
        for value in inputs[1:]:
            total = total + value
        return total

    def out_shape(self, *in_shapes: tuple[int, ...]) -> tuple[int, ...]:
        return in_shapes[0]

    def interval(self, boxes: Sequence[Box]) -> Box:
        first, second = boxes
        return Box(first.center + second.center, first.radius + second.radius)

    def symbolic(self, states: Sequence[SymState], bounds: Bounds | None, block: int, mode: str) -> SymState:
        first, second = states
        return symstate.add(first, second)

    def backward(self, coeff: Tensor, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                 bounds: Bounds | None, slopes: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        return [coeff] * len(in_shapes), None

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        first, second = inputs
        return Expression(sp.csr_matrix(builder.widen(first.matrix) + builder.widen(second.matrix)),
                          first.const + second.const)


# the modes of ``NonlinearOp.relaxation``
SYMBOLIC = "symbolic"  # parallel lower and upper bounds (one slope): what symbolic intervals can carry
NAIVE = "naive"  # ReluVal's concretisation: slope 0 wherever the layer is not linear on [l, u]
BACKWARD = "backward"  # the tightest pair for backward propagation (CROWN's adaptive choice)


class NonlinearOp(BoundOp):
    """A layer with one input that the methods relax given bounds [l, u] of that input (``needs_bounds``).

    Subclasses implement ``forward``, ``interval_bounds`` (the image of the box), ``relaxation`` and, where a
    mixed-integer encoding exists, ``milp``. Optimisable lower slopes (alpha-CROWN) are declared by
    ``slope_range``.
    """

    needs_bounds: ClassVar[bool] = True
    milp_encodable: ClassVar[bool] = False
    #: the input value at which the layer is split in two linear pieces by branch and bound (``bab``): an
    #: unstable neuron with bounds [l, u] becomes the sub-problems v >= branch_point and v <= branch_point,
    #: on each of which the layer is linear. None: the layer is not piecewise linear and is never split.
    branch_point: ClassVar[float | None] = None

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> Bounds:
        """Sound bounds of the output for inputs in [lower, upper]."""
        raise NotImplementedError

    def relaxation(self, lower: Tensor, upper: Tensor, mode: str) -> Relaxation:
        """Linear bounds of the layer on [lower, upper]; ``mode`` is SYMBOLIC, NAIVE or BACKWARD."""
        raise NotImplementedError

    def slope_range(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor] | None:
        """The range [lo, hi] (each (B, *shape)) of lower-relaxation slopes that stay sound, for alpha-CROWN;
        None when the layer's lower bound is not a free slope. ``backward(..., slopes=s)`` then uses ``s``
        clamped to that range as lower slope of the unstable neurons."""
        return None

    def with_slopes(self, relax: Relaxation, slopes: Tensor, lower: Tensor, upper: Tensor) -> Relaxation:
        """``relax`` with the lower slopes of the unstable neurons replaced by ``slopes`` (B, K, *shape)."""
        raise NotImplementedError(f"{type(self).__name__} has no optimisable slopes")

    def interval(self, boxes: Sequence[Box]) -> Box:
        (box,) = boxes
        return Box.from_bounds(*self.interval_bounds(box.lower, box.upper))

    def symbolic(self, states: Sequence[SymState], bounds: Bounds | None, block: int, mode: str) -> SymState:
        assert bounds is not None
        (state,) = states
        return symstate.relax(state, self.relaxation(bounds[0], bounds[1], mode), block)

    def backward(self, coeff: Tensor, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                 bounds: Bounds | None, slopes: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        assert bounds is not None
        relax = self.relaxation(bounds[0], bounds[1], BACKWARD)
        if slopes is not None:
            relax = self.with_slopes(relax, slopes, bounds[0], bounds[1])
        incoming, constant = backward_through(relax, coeff, in_shapes[0])
        return [incoming], constant

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        raise NotApplicable(f"{type(self).__name__} has no mixed-integer encoding")


class NotApplicable(Exception):
    """A method cannot handle a layer (e.g. no MILP encoding of a smooth activation)."""


def _per_row(value: Tensor, coeff: Tensor) -> Tensor:
    """A relaxation tensor (B, *shape) or (B, K, *shape) aligned with coefficients (B, K, *shape)."""
    return value if value.dim() == coeff.dim() else value.unsqueeze(1)


def backward_through(relax: Relaxation, coeff: Tensor, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """Coefficients on the layer's input and the constant picked up, for output coefficients ``coeff``
    (B, K, *out_shape): a positive coefficient takes the lower bound, a negative one the upper bound."""
    positive, negative = coeff.clamp(min=0), coeff.clamp(max=0)
    dims = _spec_dims(coeff)
    constant = None
    if relax.upper_offset is not None:
        constant = (negative * _per_row(relax.upper_offset, coeff)).sum(dims)
    if relax.lower_offset is not None:
        part = (positive * _per_row(relax.lower_offset, coeff)).sum(dims)
        constant = part if constant is None else constant + part
    incoming = positive * _per_row(relax.lower_slope, coeff) + negative * _per_row(relax.upper_slope, coeff)
    if relax.index is not None:
        b, k = coeff.shape[:2]
        flat = torch.zeros(b, k, numel(in_shape), device=coeff.device, dtype=coeff.dtype)
        index = relax.index.unsqueeze(1).expand(b, k, -1)
        incoming = flat.scatter_add(2, index, incoming.reshape(b, k, -1)).view(b, k, *in_shape)
    return incoming, constant
