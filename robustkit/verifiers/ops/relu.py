"""ReLU and LeakyReLU: piecewise-linear activations, exact outside the unstable neurons (l < 0 < u).

On an unstable neuron the upper bound is the chord through (l, f(l)) and (u, f(u)). The lower bound is a line
through the origin whose slope is free in [negative_slope, 1] (alpha-CROWN optimises it); backward
propagation starts from CROWN's adaptive choice (slope 1 when u >= -l, else negative_slope), symbolic
intervals use the chord's slope for both lines (Neurify's symbolic linear relaxation) and ReluVal's naive
mode concretises to the interval [f(l), f(u)]. The MILP encoding is the big-M formulation of Tjeng, Xiao and
Tedrake (arXiv:1711.07356), with one binary per unstable neuron.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.verifiers.milp import BOUND_SLACK, AffineMap, Expression, MilpBuilder
from robustkit.verifiers.ops.base import NAIVE, SYMBOLIC, Bounds, NonlinearOp, Relaxation


class LeakyReLUOp(NonlinearOp):
    """f(v) = v for v >= 0, ``negative_slope`` * v otherwise (0 <= negative_slope <= 1)."""

    milp_encodable: ClassVar[bool] = True
    branch_point: ClassVar[float | None] = 0.0

    def __init__(self, negative_slope: float = 0.0) -> None:
        self.negative_slope = float(negative_slope)

    @classmethod
    def from_module(cls, module: nn.Module) -> LeakyReLUOp:
        assert isinstance(module, nn.LeakyReLU)
        return cls(module.negative_slope)

    def forward(self, *inputs: Tensor) -> Tensor:
        return F.leaky_relu(inputs[0], self.negative_slope)

    def out_shape(self, *in_shapes: tuple[int, ...]) -> tuple[int, ...]:
        return in_shapes[0]

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> Bounds:
        return self.forward(lower), self.forward(upper)

    def relaxation(self, lower: Tensor, upper: Tensor, mode: str) -> Relaxation:
        crossing = (lower < 0) & (upper > 0)
        active = (lower >= 0).to(lower.dtype)
        leak = self.negative_slope
        stable = active if leak == 0 else active + (1 - active) * leak  # the slope outside crossing neurons
        if mode == NAIVE:  # crossing neurons become the constant interval [leak * l, u]
            upper_offset = torch.where(crossing, upper, torch.zeros_like(upper))
            if leak == 0:
                return Relaxation(stable, stable, crossing, upper_offset=upper_offset)
            slope = torch.where(crossing, torch.zeros_like(stable), stable)
            lower_offset = torch.where(crossing, leak * lower, torch.zeros_like(lower))
            return Relaxation(slope, slope, crossing, lower_offset=lower_offset, upper_offset=upper_offset)
        denominator = torch.where(crossing, upper - lower, torch.ones_like(lower))
        if leak == 0:
            chord = torch.where(crossing, upper / denominator, stable)
            upper_offset = torch.where(crossing, -chord * lower, torch.zeros_like(lower))
        else:  # the chord through (l, leak * l) and (u, u), of slope leak + (1 - leak) u / (u - l)
            # (its excess over leak computed directly: chord - leak cancels when -l >> u, and times l the
            # rounding of chord would move the line by far more than float32 resolution)
            excess = torch.where(crossing, (1 - leak) * upper / denominator, torch.zeros_like(lower))
            chord = torch.where(crossing, leak + excess, stable)
            upper_offset = torch.where(crossing, -excess * lower, torch.zeros_like(lower))
        if mode == SYMBOLIC:
            # the parallel line below the layer is chord * v itself: f(v) - chord * v is smallest at v = 0
            return Relaxation(chord, chord, crossing, upper_offset=upper_offset)
        wide = upper >= -lower
        adaptive = wide.to(lower.dtype) if leak == 0 else torch.where(wide, 1.0, leak).to(lower.dtype)
        return Relaxation(torch.where(crossing, adaptive, stable), chord, crossing, upper_offset=upper_offset)

    def slope_range(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return torch.full_like(lower, self.negative_slope), torch.ones_like(upper)

    def with_slopes(self, relax: Relaxation, slopes: Tensor, lower: Tensor, upper: Tensor) -> Relaxation:
        crossing = relax.unstable.unsqueeze(1)
        chosen = torch.where(crossing, slopes.clamp(self.negative_slope, 1.0), relax.lower_slope.unsqueeze(1))
        return Relaxation(chosen, relax.upper_slope, relax.unstable, relax.lower_offset, relax.upper_offset)

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        """Active neurons: a variable equal to the input; inactive ones: leak times the input (no variable);
        crossing ones: y and a binary d (d = 1: the input is >= 0) with y >= z, y >= leak z,
        y <= z - (1 - leak) l (1 - d) and y <= leak z + (1 - leak) u d."""
        (pre,) = inputs
        low, high = bounds
        n, leak = low.shape[0], self.negative_slope
        act, cross = np.flatnonzero((low >= 0) & (high > 0)), np.flatnonzero((low < 0) & (high > 0))
        n_act, n_cross = act.size, cross.size
        low = low - BOUND_SLACK * (1 + np.abs(low))  # widened: never cut off a point of the box
        high = high + BOUND_SLACK * (1 + np.abs(high))
        cross_low = np.zeros(n_cross) if leak == 0 else leak * low[cross]
        first = builder.variables(np.concatenate([low[act], cross_low]), np.concatenate([high[act], high[cross]]))
        binary = builder.variables(np.zeros(n_cross), np.ones(n_cross), integer=True)
        matrix, unit = builder.widen(pre.matrix), builder.unit
        v, a, d = first + np.arange(n_act), first + n_act + np.arange(n_cross), binary + np.arange(n_cross)
        c, lo, hi, free = pre.const[cross], low[cross], high[cross], np.full(n_cross, np.inf)
        builder.rows += [
            (unit(v) - matrix[act], pre.const[act], pre.const[act]),  # v = z, with z = M w + c
            (unit(a) - matrix[cross], c, free),  # a >= z
            (unit(a) - matrix[cross] - unit(d, (1 - leak) * lo), -free, c - (1 - leak) * lo),
        ]
        if leak == 0:
            builder.rows.append((unit(a) - unit(d, hi), -free, np.zeros(n_cross)))  # a <= u d
        else:
            builder.rows += [
                (unit(a) - leak * matrix[cross], leak * c, free),  # a >= leak z
                (unit(a) - leak * matrix[cross] - unit(d, (1 - leak) * hi), -free, leak * c),
            ]
        out = sp.csr_matrix((np.ones(n_act + n_cross), (np.concatenate([act, cross]), np.concatenate([v, a]))),
                            shape=(n, builder.n_vars))
        const = np.zeros(n)
        dead = np.flatnonzero(bounds[1] <= 0)
        if leak != 0 and dead.size:
            select = sp.csr_matrix((np.full(dead.size, leak), (dead, np.arange(dead.size))), shape=(n, dead.size))
            out = sp.csr_matrix(out + select @ matrix[dead])
            const[dead] = leak * pre.const[dead]
        return Expression(out, const)


class ReLUOp(LeakyReLUOp):
    """max(v, 0)."""

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__(0.0)

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.relu(inputs[0])

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> Bounds:
        return torch.relu(lower), torch.relu(upper)
