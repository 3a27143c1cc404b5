"""Symbolic intervals: the state the ``symbolic`` method propagates, and its algebra.

A neuron's value is ``c + sum_r g_r * z_r`` with every ``z_r`` in [-1, 1]: ``c`` is the centre and the rows
``g_r`` are its generators. The first rows belong to the input (x = centre + radius * z over the input box),
the others are error terms that ReLU relaxations add. Rows come in *blocks* (the input block, then one block
per ReLU layer), each stored in the cheapest exact form:

* the input block, while only affine layers have been applied, as rows shared by the whole batch
  (``shared``, the layers' Jacobian of the input basis, or the identity) scaled per sample by ``scale``;
* blocks with local support on an image grid (the input pixels, a convolutional ReLU layer's error terms)
  as tiles that convolutions only touch where they are non-zero (:mod:`robustkit.verifiers.tiles`);
* error blocks a ReLU has just created as one-hot rows (``index``, ``magnitude``), which the next affine layer
  turns into rows of its own Jacobian by a gather instead of a convolution of one-hot images;
* every other block as dense rows (B, m, *shape).

Blocks are keyed by the graph node that created them, so the two branches of a skip connection are summed
block by block, and rows that only one branch has are kept as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from robustkit.verifiers import rowops, tiles

if TYPE_CHECKING:
    from robustkit.verifiers.ops.base import AffineOp, Relaxation

INPUT_BLOCK = -1
MAX_SPREAD = 0.4  # keep tiles while each covers at most this share of the grid


@dataclass
class OneHotRows:
    """k rows per sample, each zero but for ``magnitude`` at the flat neuron ``index``: both (B, k)."""

    index: Tensor
    magnitude: Tensor


@dataclass
class SymState:
    """A batch of symbolic intervals over neurons of shape ``center.shape[1:]``."""

    center: Tensor
    scale: Tensor | None = None  # (B, n_in): per-sample scaling of the shared input rows
    shared: Tensor | None = None  # (n_in, *shape); None with ``scale`` set means the identity
    dense: dict[int, Tensor] = field(default_factory=dict)  # block -> (B, m, *shape)
    onehot: dict[int, OneHotRows] = field(default_factory=dict)  # block -> one-hot rows
    tiled: dict[int, tiles.TiledRows] = field(default_factory=dict)  # block -> rows with local support
    tiles_per_side: int = 0

    @classmethod
    def from_box(cls, lower: Tensor, upper: Tensor, tiles_per_side: int = 0) -> SymState:
        """The input box as symbolic intervals: centre plus radius times the identity (in tiles for images
        when ``tiles_per_side`` > 0)."""
        scale = ((upper - lower) / 2).flatten(1)
        center = (upper + lower) / 2
        tiled = tiles.make_tiles(scale, tuple(lower.shape[1:]), tiles_per_side)
        if tiled is not None:
            return cls(center=center, tiled={INPUT_BLOCK: tiled}, tiles_per_side=tiles_per_side)
        return cls(center=center, scale=scale, tiles_per_side=tiles_per_side)

    def like(self, center: Tensor) -> SymState:
        """An empty state with this one's settings."""
        return SymState(center=center, tiles_per_side=self.tiles_per_side)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.center.shape[1:])

    @property
    def batch(self) -> int:
        return int(self.center.shape[0])

    @property
    def neurons(self) -> int:
        return math.prod(self.shape)

    def untiled(self, blocks: set[int] | None = None) -> SymState:
        """The same state with tiled blocks (all, or those in ``blocks``) in the shared (input) or dense form."""
        chosen = set(self.tiled) if blocks is None else set(blocks) & set(self.tiled)
        if not chosen:
            return self
        state = SymState(center=self.center, scale=self.scale, shared=self.shared, dense=dict(self.dense),
                         onehot=dict(self.onehot), tiled={k: v for k, v in self.tiled.items() if k not in chosen},
                         tiles_per_side=self.tiles_per_side)
        for block in chosen:
            tiled = self.tiled[block]
            full = tiles.densify(tiled)
            if tiled.shared and block == INPUT_BLOCK:
                state.scale, state.shared = tiled.scale, full.reshape(full.shape[0], *self.shape)
                continue
            if tiled.shared:
                full = full.unsqueeze(0)
            scaled = full * tiled.scale.view(*tiled.scale.shape, 1, 1, 1)
            state.dense[block] = scaled.reshape(self.batch, -1, *self.shape)
        return state

    def input_rows(self) -> Tensor | None:
        """The lazily held input block as dense rows (B, n_in, *shape), or None if it is held otherwise."""
        if self.scale is None:
            return None
        if self.shared is None:
            return torch.diag_embed(self.scale).reshape(self.batch, -1, *self.shape)
        return self.scale.unsqueeze(2).mul(self.shared.flatten(1).unsqueeze(0)).reshape(
            self.batch, -1, *self.shape
        )

    def radius(self) -> Tensor:
        """Sum of the absolute generators per neuron, (B, *shape): the half-width of the concrete interval."""
        total = torch.zeros(self.batch, self.neurons, device=self.center.device, dtype=self.center.dtype)
        for tiled in self.tiled.values():
            total = total + tiles.tiled_radius(tiled).reshape(self.batch, -1)
        if self.scale is not None:
            if self.shared is None:
                total = total + self.scale.abs()
            else:
                total = total + self.scale.abs() @ self.shared.flatten(1).abs()
        for rows in self.dense.values():
            total = total + rowops.abs_sum(rows.flatten(2))
        for hot in self.onehot.values():
            total = total.scatter_add(1, hot.index, hot.magnitude.abs())
        return total.view(self.batch, *self.shape)


def _onehot_jacobian(op: AffineOp, hot: OneHotRows, in_shape: tuple[int, ...]) -> Tensor:
    """Rows of ``op``'s Jacobian for one-hot inputs, scaled: (B, k, *out_shape)."""
    if op.weight_matrix is not None:
        weight_t = op.weight_matrix.t()
        return rowops.scale_rows(weight_t[hot.index], hot.magnitude)  # (B, k, out)
    unique, position = torch.unique(hot.index, return_inverse=True)
    basis = torch.zeros(unique.numel(), math.prod(in_shape), device=hot.index.device, dtype=hot.magnitude.dtype)
    basis[torch.arange(unique.numel(), device=basis.device), unique] = 1.0
    jac = op.linear(basis.view(-1, *in_shape))  # (u, *out_shape)
    return rowops.scale_rows(jac[position], hot.magnitude)  # (B, k, *out_shape)


def _tiled_through(op: AffineOp, tiled: tiles.TiledRows, block: int, out: SymState) -> None:
    """Put a tiled block through ``op`` into the state ``out`` (tiled, shared or dense, whatever fits)."""
    if op.weight_matrix is not None and tiled.flat:
        rows = tiles.tiled_linear(op.weight_matrix, tiled)
        if tiled.shared and block == INPUT_BLOCK:
            out.scale, out.shared = tiled.scale, rows
        else:
            rows = rows.unsqueeze(0) if tiled.shared else rows
            out.dense[block] = rows * tiled.scale.unsqueeze(2)
        return
    moved = tiles.tiled_affine(op, tiled, out.shape)
    if moved is not None:
        if tiles.spread(moved) <= MAX_SPREAD:
            out.tiled[block] = moved
        else:  # the tiles have grown over most of the grid: dense rows are cheaper from here on
            done = SymState(center=out.center, tiled={block: moved}).untiled()
            out.scale, out.shared = (done.scale, done.shared) if done.shared is not None else (out.scale, out.shared)
            out.dense.update(done.dense)
        return
    dense = SymState(center=out.center, tiled={block: tiled}).untiled()
    if block == INPUT_BLOCK and dense.shared is not None:
        out.scale, out.shared = dense.scale, op.linear(dense.shared)
    else:
        out.dense[block] = op.linear_rows(dense.dense[block])


def _channel_factor(op: AffineOp, channels: int) -> Tensor:
    factor = op.channel_factor(channels)
    assert factor is not None
    return factor


def affine(op: AffineOp, state: SymState) -> SymState:
    """Map a symbolic interval through an affine layer: exact, no relaxation."""
    in_shape = state.shape
    out = state.like(op.forward(state.center))
    scale, shared = state.scale, state.shared
    channel_wise = op.channel_factor(in_shape[0]) is not None
    if scale is not None:
        if shared is None and channel_wise:
            channel = torch.arange(scale.shape[1], device=scale.device) // math.prod(in_shape[1:])
            scale = scale * _channel_factor(op, in_shape[0])[channel].unsqueeze(0)
        elif shared is None and op.reshape is not None:
            pass
        elif shared is None and op.weight_matrix is not None:
            shared = op.weight_matrix.t()
        elif shared is None:
            eye = torch.eye(scale.shape[1], device=scale.device, dtype=scale.dtype)
            shared = op.linear(eye.view(-1, *in_shape))
        else:
            shared = op.linear(shared)
        out.scale, out.shared = scale, shared
    out.dense = {block: op.linear_rows(rows) for block, rows in state.dense.items()}
    for block, tiled in state.tiled.items():
        _tiled_through(op, tiled, block, out)
    for block, hot in state.onehot.items():
        if op.reshape is not None:
            out.onehot[block] = hot
        elif channel_wise:
            channel = hot.index // math.prod(in_shape[1:])
            out.onehot[block] = OneHotRows(hot.index, hot.magnitude * _channel_factor(op, in_shape[0])[channel])
        else:
            out.dense[block] = _onehot_jacobian(op, hot, in_shape)
    return out


def _tile_errors(state: SymState, count: int) -> bool:
    """Whether a ReLU layer's error terms are cheaper as tiles (every neuron of the layer a row, each row only
    where the following layers reach) than as one-hot rows (the crossing neurons only, each over the whole
    grid after the next layer). Estimated for a following 3x3 convolution keeping the channels: tiles win
    when more neurons cross than one tiled row holds."""
    if state.tiles_per_side <= 0 or len(state.shape) != 3:
        return False
    side = max(1, -(-max(state.shape[1], state.shape[2]) // state.tiles_per_side))
    return count > state.shape[0] * (side + 2) ** 2


def relax(state: SymState, relaxation: Relaxation, block: int) -> SymState:
    """Apply a layer's parallel relaxation (one slope s, offsets [lo, hi]): v -> s * v + (lo + hi) / 2 plus
    a new error term of half-width (hi - lo) / 2 in block ``block`` for the unstable neurons. A relaxation
    with an ``index`` (each output reads one input neuron) first selects those neurons per sample."""
    if relaxation.index is not None:
        state = _select(state, relaxation.index, tuple(relaxation.lower_slope.shape[1:]))
    slope, low, high = relaxation.lower_slope, relaxation.lower_offset, relaxation.upper_offset
    if low is None and high is None:
        offset = error = torch.zeros_like(slope)
    elif low is None:
        assert high is not None
        offset = error = high / 2
    elif high is None:
        offset, error = low / 2, -low / 2
    else:
        offset, error = (low + high) / 2, (high - low) / 2
    return _scaled(state, slope, offset, error, relaxation.unstable, block)


def _select(state: SymState, index: Tensor, shape: tuple[int, ...]) -> SymState:
    """Neurons ``index`` (B, n_out) of every sample, as a state over ``shape`` (all rows dense)."""
    state = state.untiled()
    b = state.batch
    out = SymState(center=state.center.reshape(b, -1).gather(1, index).view(b, *shape),
                   tiles_per_side=state.tiles_per_side)
    for block in _blocks(state):
        rows = _densify(state, block).flatten(2)
        picked = rows.gather(2, index.unsqueeze(1).expand(-1, rows.shape[1], -1))
        out.dense[block] = picked.view(b, -1, *shape)
    return out


def _scaled(state: SymState, slope: Tensor, offset: Tensor, error: Tensor, unstable: Tensor,
            block: int) -> SymState:
    """Every row times ``slope``, the centre moved by ``offset`` and error terms ``error`` added where
    ``unstable``; the error terms go to block ``block``."""
    state = state.untiled({k for k, v in state.tiled.items() if v.flat})
    b = state.batch
    slope_flat = slope.reshape(b, -1)
    out = state.like(state.center * slope + offset)
    for key, tiled in state.tiled.items():
        out.tiled[key] = tiles.tiled_relu(tiled, slope)
    if state.scale is not None and state.shared is not None:
        # materialise the shared input rows and scale them in one pass: scale (B, n, 1) * (shared * slope)
        product = state.shared.flatten(1).unsqueeze(0) * slope_flat.unsqueeze(1)
        out.dense[INPUT_BLOCK] = (product * state.scale.unsqueeze(2)).view(b, -1, *state.shape)
    elif state.scale is not None:
        rows = state.input_rows()
        assert rows is not None
        out.dense[INPUT_BLOCK] = rowops.scale_columns(rows, slope)
    for key, value in state.dense.items():
        out.dense[key] = rowops.scale_columns(value, slope)
    for key, hot in state.onehot.items():
        out.onehot[key] = OneHotRows(hot.index, hot.magnitude * slope_flat.gather(1, hot.index))
    crossing = unstable.reshape(b, -1)
    count = int(crossing.sum(1).max().item()) if crossing.numel() else 0
    if count:
        if _tile_errors(state, count):
            errors = tiles.make_tiles(error.reshape(b, -1), state.shape, state.tiles_per_side, always=True)
            assert errors is not None
            out.tiled[block] = errors
        else:
            order = torch.argsort(crossing.to(torch.int8), dim=1, descending=True, stable=True)[:, :count]
            magnitude = error.reshape(b, -1).gather(1, order)
            out.onehot[block] = OneHotRows(order, magnitude)
    return out


def _densify(state: SymState, block: int) -> Tensor:
    """One block as dense rows (B, m, *shape) (``state`` is untiled)."""
    if block == INPUT_BLOCK and block not in state.dense:
        rows = state.input_rows()
        assert rows is not None
        return rows
    if block in state.dense:
        return state.dense[block]
    hot = state.onehot[block]
    rows = torch.zeros(state.batch, hot.index.shape[1], state.neurons, device=hot.index.device,
                       dtype=hot.magnitude.dtype)
    rows = rows.scatter(2, hot.index.unsqueeze(2), hot.magnitude.unsqueeze(2))
    return rows.view(state.batch, -1, *state.shape)


def _blocks(state: SymState) -> list[int]:
    blocks = [INPUT_BLOCK] if state.scale is not None else []
    return blocks + list(state.dense) + list(state.onehot)


def add(first: SymState, second: SymState) -> SymState:
    """The sum of two symbolic intervals over the same input (the join of a skip connection)."""
    result = first.like(first.center + second.center)
    for block in set(first.tiled) & set(second.tiled):
        summed = tiles.tiled_add(first.tiled[block], second.tiled[block])
        if summed is not None:
            result.tiled[block] = summed
    rest = {k: v for k, v in first.tiled.items() if k not in result.tiled}
    first = SymState(center=first.center, scale=first.scale, shared=first.shared, dense=first.dense,
                     onehot=first.onehot, tiled=rest).untiled()
    rest = {k: v for k, v in second.tiled.items() if k not in result.tiled}
    second = SymState(center=second.center, scale=second.scale, shared=second.shared, dense=second.dense,
                      onehot=second.onehot, tiled=rest).untiled()
    center = result.center
    if first.scale is not None and second.scale is not None and first.scale is second.scale:
        # both branches still hold the input block lazily with the same per-sample scaling: add the shared rows
        eye = torch.eye(first.scale.shape[1], device=center.device, dtype=center.dtype)
        a = first.shared if first.shared is not None else eye.view(-1, *first.shape)
        c = second.shared if second.shared is not None else eye.view(-1, *second.shape)
        result.scale, result.shared = first.scale, a + c
    for block in dict.fromkeys(_blocks(first) + _blocks(second)):
        if block == INPUT_BLOCK and result.scale is not None:
            continue
        in_first, in_second = block in _blocks(first), block in _blocks(second)
        if in_first and in_second:
            hot_a, hot_b = first.onehot.get(block), second.onehot.get(block)
            if hot_a is not None and hot_b is not None and hot_a.index is hot_b.index:
                result.onehot[block] = OneHotRows(hot_a.index, hot_a.magnitude + hot_b.magnitude)
            else:
                result.dense[block] = _densify(first, block) + _densify(second, block)
        else:
            owner = first if in_first else second
            if block in owner.onehot:
                result.onehot[block] = owner.onehot[block]
            else:
                result.dense[block] = _densify(owner, block)
    return result


def spec_lower(state: SymState, spec: Tensor) -> Tensor:
    """Lower bounds (B, K) of ``spec @ v`` for spec (B, K, N) over the state's neurons, correlations kept."""
    state = state.untiled()
    b = state.batch
    center = torch.einsum("bkn,bn->bk", spec, state.center.reshape(b, -1))
    total = torch.zeros_like(center)
    if state.scale is not None:
        if state.shared is None:
            total = total + torch.einsum("bkn,bn->bk", spec.abs(), state.scale.abs())
        else:
            projected = torch.einsum("in,bkn->bik", state.shared.flatten(1), spec)
            total = total + (projected * state.scale.unsqueeze(2)).abs().sum(1)
    for rows in state.dense.values():
        total = total + torch.bmm(rows.reshape(b, rows.shape[1], -1), spec.transpose(1, 2)).abs().sum(1)
    for hot in state.onehot.values():
        index = hot.index.unsqueeze(1).expand(-1, spec.shape[1], -1)
        total = total + (spec.gather(2, index) * hot.magnitude.unsqueeze(1)).abs().sum(2)
    return center - total
