"""2-D max pooling: each output is the largest input of its window, y = max_{j in W} x_j.

Given input bounds [l, u], let i* be the window's input with the largest lower bound and
U' = max_{j in W, j != i*} u_j (-inf for a window of one input). Then x_{i*} <= y <= max(x_{i*}, U'), and

* **interval**: [maxpool(l), maxpool(u)] (max is monotone in every input);
* the window is *dominated* when l_{i*} >= U': then y = x_{i*} exactly (slope 1, no offset) in every mode;
  the relaxation's ``index`` holds i* (flat over C*H*W) per output and ``unstable`` the other windows, where
* **BACKWARD**: lower x_{i*}, upper the constant max_j u_j;
* **SYMBOLIC**: lower x_{i*}, upper x_{i*} + (U' - l_{i*}) (parallel; y - x_{i*} <= U' - x_{i*} <= U' - l_{i*});
* **NAIVE**: the constant interval [l_{i*}, max_j u_j].

The MILP encoding is that of Tjeng, Xiao and Tedrake (arXiv:1711.07356, section 4.2): a dominated window is
x_{i*} itself; otherwise the candidates are the inputs that can be the largest (j = i* or u_j > l_{i*}), and a
variable y with binaries d_j, sum_j d_j = 1, y >= x_j and y <= x_j + (U - l_j)(1 - d_j), U = max_j u_j.

Padding positions are never candidates: torch pads max pooling with -inf, and so do the windows here.
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
from robustkit.verifiers.ops.affine import _pair
from robustkit.verifiers.ops.base import BACKWARD, NAIVE, Bounds, NonlinearOp, Relaxation

Pair = tuple[int, int]


class MaxPool2dOp(NonlinearOp):
    """``nn.MaxPool2d`` (any kernel, stride, padding, dilation, ceil_mode; without return_indices)."""

    milp_encodable: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, nn.MaxPool2d) and not module.return_indices
        self.kernel = _pair(module.kernel_size)
        self.stride = _pair(module.stride if module.stride is not None else module.kernel_size)
        self.padding = _pair(module.padding)
        self.dilation = _pair(module.dilation)
        self.ceil_mode = bool(module.ceil_mode)

    def forward(self, *inputs: Tensor) -> Tensor:
        return F.max_pool2d(inputs[0], self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def interval_bounds(self, lower: Tensor, upper: Tensor) -> Bounds:
        return self.forward(lower), self.forward(upper)

    def windows(self, x: Tensor, fill: float, out_size: Pair) -> Tensor:
        """The inputs of every window, (*lead, C, OH, OW, kh * kw) for x (*lead, C, H, W), padded with ``fill``
        exactly where torch pads (the symmetric padding, and past the right and bottom edges for ceil_mode)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        height, width = x.shape[-2:]
        extra_h = max(0, (out_size[0] - 1) * sh + span_h - (height + 2 * ph))
        extra_w = max(0, (out_size[1] - 1) * sw + span_w - (width + 2 * pw))
        padded = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=fill)
        found = padded.unfold(-2, span_h, sh).unfold(-2, span_w, sw)  # (..., OH', OW', span_h, span_w)
        found = found[..., : out_size[0], : out_size[1], ::dh, ::dw]
        return found.reshape(*found.shape[:-2], kh * kw)

    def _positions(self, in_shape: Sequence[int], out_size: Pair, device: torch.device) -> Tensor:
        """The flat input index (over H * W) of every window entry, -1 for padding: (OH, OW, kh * kw)."""
        height, width = int(in_shape[-2]), int(in_shape[-1])
        plane = torch.arange(height * width, device=device).view(height, width)
        return self.windows(plane, -1, out_size)

    def relaxation(self, lower: Tensor, upper: Tensor, mode: str) -> Relaxation:
        b, c, h, w = lower.shape
        # choose among real inputs only: an infinite lower bound must not tie with the -inf padding
        choice = lower.clamp(min=torch.finfo(lower.dtype).min)
        _, plane_index = F.max_pool2d(choice, self.kernel, self.stride, self.padding, self.dilation,
                                      self.ceil_mode, return_indices=True)
        out_size = (int(plane_index.shape[2]), int(plane_index.shape[3]))
        channel_start = (torch.arange(c, device=lower.device) * (h * w)).view(1, c, 1, 1)
        index = (plane_index + channel_start).reshape(b, -1)
        chosen_lower = lower.reshape(b, -1).gather(1, index).view(plane_index.shape)
        upper_max = self.forward(upper)
        entries = self.windows(upper, -torch.inf, out_size)
        positions = self._positions(lower.shape, out_size, lower.device)
        others = entries.masked_fill(positions == plane_index.unsqueeze(-1), -torch.inf).amax(-1)
        dominated = chosen_lower >= others
        unstable = ~dominated
        one, zero = torch.ones_like(chosen_lower), torch.zeros_like(chosen_lower)
        exact = dominated.to(lower.dtype)
        if mode == BACKWARD:
            return Relaxation(one, exact, unstable, upper_offset=torch.where(dominated, zero, upper_max), index=index)
        if mode == NAIVE:
            return Relaxation(exact, exact, unstable, lower_offset=torch.where(dominated, zero, chosen_lower),
                              upper_offset=torch.where(dominated, zero, upper_max), index=index)
        return Relaxation(one, one, unstable, upper_offset=torch.where(dominated, zero, others - chosen_lower),
                          index=index)

    def milp_map(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], like: Tensor) -> AffineMap:
        """The windows as a 0/1 matrix (outputs x inputs, flat): which inputs each output takes the max of."""
        channels, height, width = in_shape
        out_size = (int(out_shape[1]), int(out_shape[2]))
        positions = self._positions(in_shape, out_size, torch.device("cpu")).flatten(0, 1)  # (OH * OW, kh * kw)
        plane_out = positions.shape[0]
        rows, slots = torch.nonzero(positions >= 0, as_tuple=True)
        plane_rows, plane_cols = rows.numpy(), positions[rows, slots].numpy()
        shift = np.arange(channels)[:, None]
        all_rows = (plane_rows[None, :] + shift * plane_out).ravel()
        all_cols = (plane_cols[None, :] + shift * height * width).ravel()
        matrix = sp.csr_matrix((np.ones(all_rows.size), (all_rows, all_cols)),
                               shape=(channels * plane_out, channels * height * width))
        return AffineMap(matrix, np.zeros(channels * plane_out))

    def milp(self, builder: MilpBuilder, inputs: Sequence[Expression], bounds: Any, layer: AffineMap | None
             ) -> Expression:
        """Dominated windows are x_{i*} (no variable); the others a variable y and one binary per candidate
        (see the module docstring), with the bounds widened by ``BOUND_SLACK`` so no point of the box is cut."""
        assert layer is not None
        (pre,) = inputs
        low, high = bounds
        member = sp.csr_matrix(layer.matrix)
        member.sort_indices()
        n_out = member.shape[0]
        starts, cols = member.indptr[:-1], member.indices
        rows = np.repeat(np.arange(n_out), np.diff(member.indptr))
        best = np.maximum.reduceat(low[cols], starts)
        first_best = np.flatnonzero(low[cols] == best[rows])
        _, pick = np.unique(rows[first_best], return_index=True)
        chosen = cols[first_best[pick]]  # i* of every window
        low_w = low - BOUND_SLACK * (1 + np.abs(low))
        high_w = high + BOUND_SLACK * (1 + np.abs(high))
        candidate = (cols == chosen[rows]) | (high_w[cols] > low_w[chosen[rows]])
        free = np.flatnonzero(np.bincount(rows[candidate], minlength=n_out) > 1)  # windows that need a y
        pairs = np.flatnonzero(candidate & np.isin(rows, free))
        pair_window, pair_input = rows[pairs], cols[pairs]
        top = np.maximum.reduceat(high_w[cols], starts)  # U of every window
        first = builder.variables(low_w[chosen[free]], top[free])
        binary = builder.variables(np.zeros(pairs.size), np.ones(pairs.size), integer=True)
        y_of = np.full(n_out, -1)
        y_of[free] = first + np.arange(free.size)
        slot_of = np.full(n_out, -1)
        slot_of[free] = np.arange(free.size)
        matrix, unit = builder.widen(pre.matrix), builder.unit
        y, d = y_of[pair_window], binary + np.arange(pairs.size)
        big = top[pair_window] - low_w[pair_input]
        const, infinite = pre.const[pair_input], np.full(pairs.size, np.inf)
        choose_one = sp.csr_matrix((np.ones(pairs.size), (slot_of[pair_window], d)), shape=(free.size, builder.n_vars))
        builder.rows += [
            (unit(y) - matrix[pair_input], const, infinite),  # y >= x_j
            (unit(y) - matrix[pair_input] + unit(d, big), -infinite, const + big),  # y <= x_j + (U - l_j)(1 - d_j)
            (choose_one, np.ones(free.size), np.ones(free.size)),  # sum_j d_j = 1
        ]
        fixed = np.setdiff1d(np.arange(n_out), free)
        select = sp.csr_matrix((np.ones(fixed.size), (fixed, chosen[fixed])), shape=(n_out, matrix.shape[0]))
        own = sp.csr_matrix((np.ones(free.size), (free, y_of[free])), shape=(n_out, builder.n_vars))
        out_const = np.zeros(n_out)
        out_const[fixed] = pre.const[chosen[fixed]]
        return Expression(sp.csr_matrix(select @ matrix + own), out_const)
