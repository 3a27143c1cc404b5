"""Sigmoid and Tanh: S-shaped activations, convex on (-inf, 0] and concave on [0, inf), increasing, with
f(v) + f(-v) = c (c = 1 for the sigmoid, 0 for tanh) and a derivative f' that is largest at 0.

On an input interval [l, u] (all three modes need only f and f' at a few points):

* **interval**: [f(l), f(u)] (f is increasing);
* **NAIVE**: the same constant interval, slope 0;
* **SYMBOLIC**: two parallel lines of slope s = min(f'(l), f'(u)), f(l) + s (v - l) below and f(u) + s (v - u)
  above. f' is unimodal with its peak at 0, so f' >= s on all of [l, u] and f(v) - f(l) >= s (v - l),
  f(u) - f(v) >= s (u - v): both lines are sound (DeepPoly's crossing-case slope, Singh et al., POPL 2019);
* **BACKWARD**: CROWN's lines (Zhang et al., *Efficient Neural Network Robustness Certification with General
  Activation Functions*, NeurIPS 2018, arXiv:1811.00866). Upper line: on the convex part (u <= 0) the chord;
  on the concave part (l >= 0) the tangent at the midpoint; crossing (l < 0 < u) the chord when it stays above
  f (f'(u) >= chord slope), else the tangent at the point d in (0, u] whose tangent passes through (l, f(l)).
  The lower line is the upper line of the reflected interval [-u, -l] mapped back by f(v) = c - f(-v).

For crossing neurons we use CROWN's tangent lines rather than DeepPoly's parallel pair (which SYMBOLIC uses,
because symbolic intervals can only carry one slope): on wide intervals such as [-30, 40] min(f'(l), f'(u)) is
about 1e-13 and DeepPoly's lines are the constant interval [f(l), f(u)], while CROWN's still follow f on
either side of the inflection point. The tangent point d is found by bisection that keeps the upper end of
its bracket: any tangent at d' >= d in the concave part is above f on [l, u] (its value at l only grows with
d'), so the bisection's error costs tightness, never soundness. Bisection runs without gradients: the chosen
line is sound for any d' >= d, so d is a choice, not a function to differentiate.

Chord slopes are clamped to the range of f' on [l, u] (a chord slope is a mean of f'), which keeps float
cancellation on very narrow intervals from producing steep lines; l == u gives the tangent line at l, which is
exact there. Bounds beyond +-1e30 (or not finite) get the constant interval [f(l), f(u)], so no line is ever
evaluated as 0 * inf. There is no mixed-integer encoding of a smooth activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustkit.verifiers.milp import AffineMap, Expression, MilpBuilder
from robustkit.verifiers.ops.base import NAIVE, SYMBOLIC, Bounds, NonlinearOp, NotApplicable, Relaxation

# bounds beyond this magnitude get the constant relaxation (f is saturated there to every float precision, and
# products such as f'(d) * (l - d) stay finite below it)
_LARGE = 1e30
# halvings of the tangent-point bracket [0, u]: 2^-20 of u is far below the bound's float32 resolution
_BISECTION_STEPS = 20


def _through(point: Tensor, value: Tensor, slope: Tensor) -> Tensor:
    """The offset of the line of ``slope`` through (point, value): value - slope * point, and exactly
    ``value`` where the slope is 0."""
    return torch.where(slope == 0, value, value - slope * point)


class SShapedOp(NonlinearOp):
    """Base of the S-shaped activations; subclasses give ``function``, ``derivative``, ``symmetry`` (c in
    f(v) + f(-v) = c) and ``layer`` (the layer's name in messages). See the module docstring."""

    symmetry: ClassVar[float] = 0.0
    layer: ClassVar[str] = ""

    def __init__(self, module: nn.Module | None = None) -> None:
        """``module`` is the layer the registry builds this operator from; the function has no parameters."""

    def function(self, v: Tensor) -> Tensor:
        """f(v), elementwise."""
        raise NotImplementedError

    def derivative(self, v: Tensor) -> Tensor:
        """f'(v), elementwise."""
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.function(inputs[0])

    def out_shape(self, *in_shapes: tuple[int, ...]) -> tuple[int, ...]:
        return in_shapes[0]

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> Bounds:
        return self.function(lower), self.function(upper)

    def relaxation(self, lower: Tensor, upper: Tensor, mode: str) -> Relaxation:
        unstable = upper > lower
        f_lower, f_upper = self.function(lower), self.function(upper)
        if mode == NAIVE:
            zero = torch.zeros_like(lower)
            return Relaxation(zero, zero, unstable, lower_offset=f_lower, upper_offset=f_upper)
        usable = (lower.abs() <= _LARGE) & (upper.abs() <= _LARGE)
        low = torch.where(usable, lower, torch.zeros_like(lower))
        high = torch.where(usable, upper, torch.zeros_like(upper))
        if mode == SYMBOLIC:
            slope = torch.minimum(self.derivative(low), self.derivative(high))
            lower_slope = upper_slope = slope
            lower_offset, upper_offset = _through(low, f_lower, slope), _through(high, f_upper, slope)
        else:
            upper_slope, upper_offset = self._upper_line(low, high)
            reflected_slope, reflected_offset = self._upper_line(-high, -low)
            lower_slope, lower_offset = reflected_slope, self.symmetry - reflected_offset
        zero = torch.zeros_like(lower)
        return Relaxation(
            torch.where(usable, lower_slope, zero), torch.where(usable, upper_slope, zero), unstable,
            lower_offset=torch.where(usable, lower_offset, f_lower),
            upper_offset=torch.where(usable, upper_offset, f_upper),
        )

    def _upper_line(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """(slope, offset) of CROWN's upper line of f on [lower, upper] (finite bounds)."""
        f_lower, f_upper = self.function(lower), self.function(upper)
        d_lower, d_upper = self.derivative(lower), self.derivative(upper)
        width = upper - lower
        positive = width > 0
        # a chord slope is a mean of f' over [l, u]: clamp it to the range of f' there (f' peaks at 0)
        peak = self.derivative(torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper))
        chord = torch.where(positive, (f_upper - f_lower) / torch.where(positive, width, torch.ones_like(width)),
                            d_lower)
        chord = torch.minimum(torch.maximum(chord, torch.minimum(d_lower, d_upper)), peak)
        middle = lower / 2 + upper / 2
        d_middle = self.derivative(middle)
        crossing = (lower < 0) & (upper > 0)
        # crossing: the tangent at u passes below (l, f(l)) exactly when the chord is above f
        tangent_needed = crossing & (f_upper + d_upper * (lower - upper) - f_lower > 0)
        point = self._tangent_point(lower, upper, f_lower)
        d_point = self.derivative(point)
        use_chord = (upper <= 0) | (crossing & ~tangent_needed)
        slope = torch.where(use_chord, chord, torch.where(tangent_needed, d_point, d_middle))
        offset = torch.where(
            use_chord, _through(upper, f_upper, chord),
            torch.where(tangent_needed, _through(point, self.function(point), d_point),
                        _through(middle, self.function(middle), d_middle)),
        )
        return slope, offset

    def _tangent_point(self, lower: Tensor, upper: Tensor, f_lower: Tensor) -> Tensor:
        """A point d in [0, max(u, 0)] whose tangent passes on or above (l, f(l)), close to the smallest one.

        g(d) = f(d) + f'(d) (l - d) - f(l) grows with d on the concave part (g' = f''(d) (l - d) > 0 for
        l < 0 < d), so bisection keeping g(hi) >= 0 ends on a sound tangent point (used only where g(u) > 0).
        """
        with torch.no_grad():
            low = torch.zeros_like(lower)
            high = upper.clamp(min=0)
            for _ in range(_BISECTION_STEPS):
                middle = (low + high) / 2
                above = self.function(middle) + self.derivative(middle) * (lower - middle) - f_lower >= 0
                high = torch.where(above, middle, high)
                low = torch.where(above, low, middle)
        return high

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        raise NotApplicable(f"{self.layer} has no mixed-integer encoding (a smooth activation): the exact "
                            "method needs piecewise-linear layers such as ReLU, LeakyReLU and MaxPool2d")


class SigmoidOp(SShapedOp):
    """f(v) = 1 / (1 + exp(-v)); f'(v) = sigmoid(v) sigmoid(-v) (no cancellation in 1 - sigmoid(v))."""

    symmetry: ClassVar[float] = 1.0
    layer: ClassVar[str] = "Sigmoid"

    def function(self, v: Tensor) -> Tensor:
        return torch.sigmoid(v)

    def derivative(self, v: Tensor) -> Tensor:
        return torch.sigmoid(v) * torch.sigmoid(-v)


class TanhOp(SShapedOp):
    """f(v) = tanh(v); f'(v) = 1 / cosh(v)^2, computed as 4 sigmoid(2v) sigmoid(-2v) (no cancellation in
    1 - tanh(v)^2 and no overflow of cosh)."""

    symmetry: ClassVar[float] = 0.0
    layer: ClassVar[str] = "Tanh"

    def function(self, v: Tensor) -> Tensor:
        return torch.tanh(v)

    def derivative(self, v: Tensor) -> Tensor:
        return 4 * torch.sigmoid(2 * v) * torch.sigmoid(-2 * v)
