"""What every verifier shares: input validation, the input box, the specification, capabilities and results.

A verifier bounds the rows of a linear specification ``C f(x')`` from below for every x' in an input box
(:class:`~robustkit.verifiers.context.BoundContext`). For robustness the box is B = [max(x - eps, 0),
min(x + eps, 1)] and the rows are the margins m_j = f_y(x') - f_j(x'): a sample is *verified* when every
margin's lower bound is > 0, and *falsified* when a point of B is shown to be misclassified (the clean point
itself, or a counterexample of a complete method, always re-checked by a forward pass). For any box and any
specification ``C f(x) + d > 0`` see :meth:`Verifier.spec_bounds` and :meth:`Verifier.verify_spec`.

Verifiers declare their capabilities (``differentiable``: the bounds carry gradients and can be a training
loss; ``complete``: every sample is decided given time; :meth:`Verifier.applicable`: whether the method can
handle a graph at all), so that trainers, the bench and the CLI ask the registry instead of keeping lists.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers.context import (
    BoundContext,
    BoundResult,
    LayerBounds,
    all_finite,
    make_context,
    model_device_dtype,
    output_size,
)
from robustkit.verifiers.graph import Graph, build_graph

__all__ = [
    "BoundContext", "BoundResult", "LayerBounds", "LogitBounds", "SpecResult", "Status", "VerificationResult",
    "Verifier", "check_labels", "input_box", "margin_spec", "output_size", "result_from_margins", "validate_eps",
    "validate_inputs", "worst_margin",
]


class Status(StrEnum):
    """Verification outcome of one sample."""

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    #: a complete method stopped because its open sub-problems would exceed its memory budget
    MEMORY = "memory"


@dataclass(frozen=True, eq=False)
class LogitBounds:
    """Sound lower and upper bounds (B, K) of every logit over the input box."""

    lower: Tensor
    upper: Tensor


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """Per-sample outcome of a verifier on a batch.

    ``margin_lower`` (B,) is the sound lower bound of min_{j != y} f_y - f_j; ``margins_lower`` (B, K) holds
    the bound of each f_y - f_j (0 at j = y). ``time_s`` is the time spent per sample (batched methods share
    the batch's time equally) and ``counterexample`` (B, *shape) holds, for falsified samples, a point of the
    box that the model misclassifies (NaN rows elsewhere).
    """

    method: str
    eps: float
    status: tuple[Status, ...]
    margin_lower: Tensor
    margins_lower: Tensor
    prediction: Tensor
    time_s: Tensor
    counterexample: Tensor | None = None

    @property
    def verified(self) -> Tensor:
        """Boolean mask of verified samples."""
        return torch.tensor([s is Status.VERIFIED for s in self.status], dtype=torch.bool)

    def count(self, status: Status | str) -> int:
        """How many samples ended with ``status``."""
        wanted = Status(status)
        return sum(s is wanted for s in self.status)


def validate_eps(eps: float) -> float:
    """eps as a float in [0, 1] (input space), or a clear :class:`InputError`."""
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise InputError("eps must be a single number")
        eps = float(eps.item())
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise InputError(f"eps must be a number in [0, 1], got {type(eps).__name__}")
    value = float(eps)
    if not math.isfinite(value) or value < 0 or value > 1:
        raise InputError(f"eps must be in [0, 1] (inputs live in [0, 1]), got {eps}")
    return value


def validate_inputs(model: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Check a batch: float NCHW-like tensor in [0, 1] without NaN, labels matching; moved to the model."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point tensor of shape (batch, *input_shape)")
    if x.dim() < 2:
        raise InputError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("x is an empty batch")
    smallest, largest = (float(value) for value in torch.aminmax(x.detach()))  # NaN when x holds one
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        raise InputError("x contains NaN or infinite values")
    if smallest < -1e-6 or largest > 1 + 1e-6:
        raise InputError(f"x must lie in [0, 1], got values in [{smallest:.4g}, {largest:.4g}]")
    device, dtype = model_device_dtype(model)
    x = x.to(device=device, dtype=dtype).clamp(0, 1)
    if y is not None:
        if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError("y must be an integer tensor of labels")
        if y.shape != (x.shape[0],):
            raise InputError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        y = y.to(device=device, dtype=torch.int64)
    return x, y


def input_box(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The L-inf ball of radius eps around x, clipped to [0, 1]."""
    return (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)


def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """Rows e_y - e_j (B, K, K): row j is the margin f_y - f_j; row y is zero."""
    eye = torch.eye(num_classes, device=y.device)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    return spec


def check_labels(y: Tensor, num_classes: int) -> None:
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise InputError(f"labels must be in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")


@dataclass(frozen=True, eq=False)
class SpecResult:
    """Per-sample outcome of verifying ``C f(x) + d > 0`` (every row) over a box.

    ``lower`` (B, K) holds sound lower bounds of the rows; ``counterexample`` (B, *shape) a point of the box
    where some row is <= 0, re-checked by a forward pass, for falsified samples (NaN rows elsewhere).
    """

    method: str
    status: tuple[Status, ...]
    lower: Tensor
    time_s: Tensor
    counterexample: Tensor

    @property
    def verified(self) -> Tensor:
        """Boolean mask of verified samples."""
        return torch.tensor([s is Status.VERIFIED for s in self.status], dtype=torch.bool)


class Verifier(ABC):
    """A bound method. Subclasses implement :meth:`bound` on a context; configuration is keyword-only and
    frozen (a verifier is hashable by its configuration, which is how contexts memoise its results).

    ``margin_bounds``, ``logit_bounds`` and ``spec_bounds`` are differentiable in the model parameters when
    ``differentiable`` (trainers use them as losses); ``verify`` and ``verify_spec`` run without gradients and
    return per-sample statuses.
    """

    name: ClassVar[str]
    #: whether the bounds carry gradients to the model's parameters (usable as a robust training loss)
    differentiable: ClassVar[bool] = True
    #: whether ``verify`` decides every sample (verified or falsified) when it has the time
    complete: ClassVar[bool] = False

    @abstractmethod
    def bound(self, ctx: BoundContext) -> BoundResult:
        """Sound lower bounds (B, K) of ``ctx.spec[b] @ f(x')`` over ctx's box, and the layer bounds used.
        Called through ``ctx.run(verifier)``, which memoises it."""

    def applicable(self, graph: Graph) -> str | None:
        """None when the method can bound ``graph``, else why not (one line)."""
        return None

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        """Largest number of samples bounded at once (None: no limit); methods with large per-sample
        memory override it so that a big batch is processed in pieces."""
        return None

    def check_applicable(self, graph: Graph) -> None:
        """Raise a clear :class:`InputError` when the method cannot bound ``graph``."""
        reason = self.applicable(graph)
        if reason is not None:
            raise InputError(f"{self.name} is not applicable to this model: {reason}")

    def bound_context(self, ctx: BoundContext) -> Tensor:
        """``spec_lower`` of the whole context, in pieces of at most :meth:`chunk_size` samples."""
        self.check_applicable(ctx.graph)
        size = self.chunk_size(ctx.graph, ctx.input_shape)
        if size is None or size >= ctx.batch:
            return ctx.run(self).spec_lower
        return torch.cat([ctx.piece(i, i + size).run(self).spec_lower for i in range(0, ctx.batch, size)])

    def spec_bounds(self, model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor,
                    offset: Tensor | None = None) -> Tensor:
        """Sound lower bounds (B, K) of ``spec @ f(x) + offset`` for all x in the box [lower, upper].

        ``spec`` is (B, K, n_outputs) or (K, n_outputs); ``offset`` is (B, K), (K,) or None (zero)."""
        ctx = make_context(model, lower, upper, spec)
        found = self.bound_context(ctx)
        return found if offset is None else found + check_offset(offset, found)

    def verify_spec(self, model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor | list[Tensor],
                    offset: Tensor | list[Tensor] | None = None) -> SpecResult:
        """Verify ``spec @ f(x) + offset > 0`` (every row) for all x in the box, per sample.

        A list of specifications (and of offsets) is their disjunction: a sample is verified when one of them
        is. Falsified means a point of the box (the box's centre here; complete methods search further)
        violates every one of them, re-checked by a forward pass."""
        start = time.perf_counter()
        specs = spec if isinstance(spec, list) else [spec]
        offsets: list[Tensor | None] = list(offset) if isinstance(offset, list) else [offset] * len(specs)
        if len(offsets) != len(specs) or not specs:
            raise InputError("verify_spec needs one offset per specification of the disjunction")
        with torch.no_grad():
            bounds = [self.spec_bounds(model, lower, upper, s, o) for s, o in zip(specs, offsets, strict=True)]
            device, dtype = model_device_dtype(model)
            lower, upper = lower.to(device=device, dtype=dtype), upper.to(device=device, dtype=dtype)
            centre = (lower + upper) / 2
            broken = violated(model, centre, specs, offsets)
        verified = torch.stack([(b > 0).all(1) for b in bounds]).any(0).cpu()
        status = tuple(Status.VERIFIED if v else (Status.FALSIFIED if f else Status.UNKNOWN)
                       for v, f in zip(verified.tolist(), broken.tolist(), strict=True))
        counterexample = torch.full_like(centre, float("nan"))
        counterexample[broken.to(centre.device)] = centre[broken.to(centre.device)]
        elapsed = time.perf_counter() - start
        return SpecResult(self.name, status, torch.cat(bounds, 1).cpu(), torch.full((centre.shape[0],),
                          elapsed / centre.shape[0]), counterexample.cpu())

    def _eps_context(self, model: nn.Module, x: Tensor, y: Tensor | None,
                     eps: float) -> tuple[BoundContext, Tensor, Tensor | None, float]:
        """The context of the eps-box around x: margin rows for labels y, or +-every logit without labels."""
        eps = validate_eps(eps)
        x, y = validate_inputs(model, x, y)
        graph = build_graph(model)
        num_classes = output_size(graph, tuple(x.shape[1:]))
        if y is None:
            eye = torch.eye(num_classes, device=x.device, dtype=x.dtype)
            spec = torch.cat([eye, -eye])
        else:
            check_labels(y, num_classes)
            spec = margin_spec(y, num_classes).to(x.dtype)
        lower, upper = input_box(x, eps)  # finite, ordered and batched: x is validated, eps in [0, 1]
        return make_context(model, lower, upper, spec, box_checked=True, graph=graph), x, y, eps

    def margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """Lower bounds (B, K) of f_y - f_j over the eps-box around each x; 0 at j = y."""
        ctx, _, _, _ = self._eps_context(model, x, y, eps)
        return self.bound_context(ctx)

    def logit_bounds(self, model: nn.Module, x: Tensor, eps: float) -> LogitBounds:
        """Lower and upper bounds of every logit over the eps-box around each x."""
        ctx, _, _, _ = self._eps_context(model, x, None, eps)
        both = self.bound_context(ctx)
        num_classes = both.shape[1] // 2
        return LogitBounds(lower=both[:, :num_classes], upper=-both[:, num_classes:])

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        """Verify every sample of the batch; misclassified clean points are falsified by themselves."""
        start = time.perf_counter()
        with torch.no_grad():
            ctx, x, labels, eps = self._eps_context(model, x, y, eps)
            assert labels is not None
            logits = model(x)
            margins = recheck_near_zero(self, model, x, labels, eps, logits, self.bound_context(ctx))
        return result_from_margins(self.name, eps, x, labels, logits, margins, time.perf_counter() - start)


#: float32 bounds are not rounded outward: a computed bound can exceed the true one by the accumulated rounding
#: error, about n * 2**-24 times the magnitudes summed (n terms per neuron, over the layers). For the networks
#: robustkit bounds (up to ~10**4 terms per neuron, a few layers, magnitudes up to the logits') that stays below
#: 1e-3 * (1 + max |logit|); a positive margin bound under that is re-computed in float64 before it counts.
NEAR_ZERO = 1e-3


def recheck_near_zero(verifier: Verifier, model: nn.Module, x: Tensor, labels: Tensor, eps: float,
                      logits: Tensor, margins: Tensor) -> Tensor:
    """``margins`` with the rows of samples whose worst margin bound is positive but within the float32 error
    allowance (``NEAR_ZERO``) of zero replaced by the same method's bounds computed in float64."""
    if margins.dtype == torch.float64:
        return margins
    worst = worst_margin(margins, labels)
    near = (worst > 0) & (worst <= NEAR_ZERO * (1 + logits.abs().max(1).values))
    if not bool(near.any()):
        return margins
    precise = copy.deepcopy(model).double()
    ctx, _, _, _ = verifier._eps_context(precise, x[near].double(), labels[near], eps)
    margins = margins.clone()
    # a positive float64 bound too small for float32 becomes 0: not verified, as it should be
    margins[near] = verifier.bound_context(ctx).to(margins.dtype)
    return margins


def check_offset(offset: Tensor, like: Tensor) -> Tensor:
    """``offset`` validated (finite, floating point) and shaped like ``like`` (B, K) or its rows (K,)."""
    if not isinstance(offset, Tensor) or not offset.is_floating_point() or not all_finite(offset):
        raise InputError("offset must be a finite floating-point tensor")
    offset = offset.to(device=like.device, dtype=like.dtype)
    if offset.shape not in (like.shape, like.shape[1:]):
        raise InputError(f"offset must have shape {tuple(like.shape)} or {tuple(like.shape[1:])}, "
                         f"got {tuple(offset.shape)}")
    return offset


def violated(model: nn.Module, points: Tensor, specs: list[Tensor], offsets: list[Tensor | None]) -> Tensor:
    """Per sample, whether ``points`` violates every specification of the disjunction (some row <= 0 in each),
    by a fresh forward pass. (B,) bool on the CPU."""
    with torch.no_grad():
        outputs = model(points)
    broken = torch.ones(points.shape[0], dtype=torch.bool, device=outputs.device)
    for spec, offset in zip(specs, offsets, strict=True):
        rows = spec.to(outputs.device, outputs.dtype)
        values = torch.einsum("bkn,bn->bk" if rows.dim() == 3 else "kn,bn->bk", rows, outputs)
        if offset is not None:
            values = values + check_offset(offset, values)
        broken &= (values <= 0).any(1)
    return broken.cpu()


def result_from_margins(
    method: str, eps: float, x: Tensor, labels: Tensor, logits: Tensor, margins: Tensor, elapsed: float
) -> VerificationResult:
    """The per-sample outcome of a relaxation: verified where every margin bound is > 0, falsified where the
    clean point is misclassified (it is its own counterexample), unknown otherwise."""
    prediction = logits.argmax(1)
    worst = worst_margin(margins, labels)
    status = tuple(
        Status.FALSIFIED if p != t else (Status.VERIFIED if m > 0 else Status.UNKNOWN)
        for p, t, m in zip(prediction.tolist(), labels.tolist(), worst.tolist(), strict=True)
    )
    counterexample = torch.full_like(x, float("nan"))
    wrong = prediction != labels
    counterexample[wrong] = x[wrong]
    return VerificationResult(
        method=method, eps=eps, status=status, margin_lower=worst.cpu(), margins_lower=margins.cpu(),
        prediction=prediction.cpu(), time_s=torch.full((x.shape[0],), elapsed / x.shape[0]),
        counterexample=counterexample.cpu(),
    )


def worst_margin(margins: Tensor, labels: Tensor) -> Tensor:
    """min over j != y of the margin bounds (B, K) -> (B,)."""
    masked = margins.clone()
    masked[torch.arange(labels.shape[0], device=labels.device), labels] = float("inf")
    return masked.min(1).values
