"""What every verifier shares: input validation, the input box, the margin specification and results.

A verifier bounds the margins m_j = f_y(x') - f_j(x') from below for every x' in the box
B = [max(x - eps, 0), min(x + eps, 1)]. A sample is *verified* when every margin's lower bound is > 0, and
*falsified* when a point of B is shown to be misclassified (the clean point itself, or a counterexample of
the exact method, always re-checked by a forward pass).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers.graph import Graph, build_graph, check_reproduces, node_shapes


class Status(StrEnum):
    """Verification outcome of one sample."""

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"


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


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def validate_inputs(model: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Check a batch: float NCHW-like tensor in [0, 1] without NaN, labels matching; moved to the model."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point tensor of shape (batch, *input_shape)")
    if x.dim() < 2:
        raise InputError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("x is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or infinite values")
    if float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6:
        raise InputError(f"x must lie in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    device, dtype = _model_device_dtype(model)
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


class Verifier(ABC):
    """A bound method. Subclasses implement :meth:`spec_lower`; configuration is keyword-only.

    ``margin_bounds`` and ``logit_bounds`` are differentiable in the model parameters (trainers use them as
    losses); ``verify`` runs without gradients and returns per-sample statuses.
    """

    name: ClassVar[str]

    @abstractmethod
    def spec_lower(self, graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor) -> Tensor:
        """Sound lower bounds (B, K) of ``spec[b] @ f(x')`` over the box [lower, upper]; spec is (B, K, N)."""

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        """Largest number of samples bounded at once (None: no limit); methods with large per-sample
        memory override it so that a big batch is processed in pieces."""
        return None

    def _chunked(self, graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor) -> Tensor:
        size = self.chunk_size(graph, tuple(lower.shape[1:]))
        if size is None or size >= lower.shape[0]:
            return self.spec_lower(graph, lower, upper, spec)
        pieces = [
            self.spec_lower(graph, lower[i : i + size], upper[i : i + size], spec[i : i + size])
            for i in range(0, lower.shape[0], size)
        ]
        return torch.cat(pieces)

    def _prepare(
        self, model: nn.Module, x: Tensor, y: Tensor | None, eps: float
    ) -> tuple[Graph, Tensor, Tensor | None, float]:
        eps = validate_eps(eps)
        graph = build_graph(model)
        x, y = validate_inputs(model, x, y)
        output_size(graph, tuple(x.shape[1:]))  # a clear error when the inputs do not fit the model
        check_reproduces(graph, model, x[:2])
        return graph, x, y, eps

    def margin_bounds(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """Lower bounds (B, K) of f_y - f_j over the eps-box around each x; 0 at j = y."""
        graph, x, labels, eps = self._prepare(model, x, y, eps)
        assert labels is not None
        num_classes = output_size(graph, tuple(x.shape[1:]))
        check_labels(labels, num_classes)
        lower, upper = input_box(x, eps)
        spec = margin_spec(labels, num_classes).to(x.dtype)
        return self._chunked(graph, lower, upper, spec)

    def logit_bounds(self, model: nn.Module, x: Tensor, eps: float) -> LogitBounds:
        """Lower and upper bounds of every logit over the eps-box around each x."""
        graph, x, _, eps = self._prepare(model, x, None, eps)
        num_classes = output_size(graph, tuple(x.shape[1:]))
        eye = torch.eye(num_classes, device=x.device, dtype=x.dtype)
        spec = torch.cat([eye, -eye]).unsqueeze(0).expand(x.shape[0], -1, -1)
        lower, upper = input_box(x, eps)
        both = self._chunked(graph, lower, upper, spec)
        return LogitBounds(lower=both[:, :num_classes], upper=-both[:, num_classes:])

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        """Verify every sample of the batch; misclassified clean points are falsified by themselves."""
        start = time.perf_counter()
        with torch.no_grad():
            _, x, labels, eps = self._prepare(model, x, y, eps)
            assert labels is not None
            logits = model(x)
            check_labels(labels, logits.shape[1])
            margins = self.margin_bounds(model, x, labels, eps)
        return result_from_margins(self.name, eps, x, labels, logits, margins, time.perf_counter() - start)


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


def output_size(graph: Graph, input_shape: tuple[int, ...]) -> int:
    """Number of outputs (classes) of the graph for inputs of ``input_shape``."""
    try:
        last = node_shapes(graph, input_shape)[len(graph.nodes) - 1]
    except RuntimeError as exc:
        raise InputError(f"inputs of shape {input_shape} do not fit the model: {str(exc).splitlines()[0]}") from None
    if len(last) != 1:
        raise InputError(f"the model must output a vector of logits per sample, got shape {last}")
    return last[0]
