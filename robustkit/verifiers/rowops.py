"""Products and sums over the generator rows of symbolic intervals without row-sized temporaries.

A dense block of the symbolic state is (B, m, N): m generator rows over N neurons per sample, hundreds of MB
for ``mnist_small``. Autograd's own rules for the two operations every ReLU layer applies to it make
temporaries of that size: the backward pass of ``rows * factor`` (one factor per neuron) reduces
``grad * rows`` over the rows, that of ``rows * magnitude`` (one factor per row) over the neurons, and
``rows.abs().sum(1)`` (the half-widths) holds ``|rows|``, its backward ``sign(rows)`` besides the result.
On Linux each fresh tensor that large is new memory the kernel pages in and zero-fills (see
:mod:`robustkit.allocator`), which costs more than the arithmetic. The functions here compute the same
values with those reductions taken over ``CHUNK`` rows at a time, so the temporaries stay small; outputs that
are row-sized by nature (the scaled rows, the rows' gradient) are still made once.

The numbers are those of the plain expressions up to float32 summation order: the reductions add the rows in
the same sequence, chunk after chunk. Without gradients (verification, the interval attack's boxes) the plain
expressions run, so those bounds are exactly those of before and do not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

CHUNK = 16  # rows per step of a chunked reduction: (B, 16, N) temporaries, a few MB


def _sum_over_rows(term: Callable[[slice], Tensor], rows: int) -> Tensor:
    """The sum over dim 1 of ``term`` (a slice of the rows -> (B, c, N)), taken CHUNK rows at a time."""
    total = term(slice(0, CHUNK)).sum(1)
    for start in range(CHUNK, rows, CHUNK):
        total += term(slice(start, start + CHUNK)).sum(1)
    return total


def _row_dot(first: Tensor, second: Tensor) -> Tensor:
    """``(first * second).sum(2)`` for (B, m, N) tensors, over CHUNK rows at a time."""
    return torch.cat([(first[:, start : start + CHUNK] * second[:, start : start + CHUNK]).sum(2)
                      for start in range(0, first.shape[1], CHUNK)], dim=1)


class _Scale(torch.autograd.Function):
    """Rows (B, m, N) times ``factor`` broadcast along ``dim``: 1 for one factor per neuron (B, N), 2 for one
    per row (B, m)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, factor: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(rows, factor)
        ctx.dim = dim
        return rows * factor.unsqueeze(dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        rows, factor = ctx.saved_tensors
        grad_rows = grad * factor.unsqueeze(ctx.dim) if ctx.needs_input_grad[0] else None
        grad_factor = None
        if ctx.needs_input_grad[1]:
            grad_factor = (_sum_over_rows(lambda part: grad[:, part] * rows[:, part], rows.shape[1])
                           if ctx.dim == 1 else _row_dot(grad, rows))
        return grad_rows, grad_factor, None


class _AbsSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        return _sum_over_rows(lambda part: rows[:, part].abs(), rows.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (rows,) = ctx.saved_tensors
        return torch.sgn(rows).mul_(grad.unsqueeze(1))  # abs's subgradient, 0 at 0, as torch's own


def _records(*tensors: Tensor) -> bool:
    """Whether autograd records an operation on these (non-empty) tensors: only then are the chunked versions
    used, since the row-sized temporaries they avoid are those of the backward pass; without gradients the
    plain expressions give the numbers of before, independent of how the work is split over threads."""
    return torch.is_grad_enabled() and tensors[0].shape[1] > 0 and any(t.requires_grad for t in tensors)


def _flat(rows: Tensor) -> Tensor:
    return rows.reshape(rows.shape[0], rows.shape[1], -1)


def scale_columns(rows: Tensor, factor: Tensor) -> Tensor:
    """``rows * factor.unsqueeze(1)``: rows (B, m, *shape) times one factor per neuron, ``factor`` (B, *shape)."""
    if not _records(rows, factor) or factor.shape[0] != rows.shape[0]:
        return rows * factor.unsqueeze(1)
    scaled: Tensor = _Scale.apply(_flat(rows), factor.reshape(factor.shape[0], -1), 1)  # type: ignore[no-untyped-call]
    return scaled.view(rows.shape)


def scale_rows(rows: Tensor, magnitude: Tensor) -> Tensor:
    """``rows`` (B, m, *shape) times one factor per row, ``magnitude`` (B, m)."""
    if not _records(rows, magnitude) or magnitude.shape != rows.shape[:2]:
        return rows * magnitude.view(*magnitude.shape, *([1] * (rows.dim() - 2)))
    scaled: Tensor = _Scale.apply(_flat(rows), magnitude, 2)  # type: ignore[no-untyped-call]
    return scaled.view(rows.shape)


def abs_sum(rows: Tensor) -> Tensor:
    """``rows.abs().sum(1)`` of rows (B, m, N): the half-widths the rows give every neuron, (B, N)."""
    if not _records(rows):
        return rows.abs().sum(1)
    total: Tensor = _AbsSum.apply(rows)  # type: ignore[no-untyped-call]
    return total
