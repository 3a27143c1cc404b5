"""One bound context per call, and the layer bounds that methods pass to each other.

A :class:`BoundContext` holds what every method needs and validates it once: the model's graph, the input box
``lower <= x <= upper`` (any box, not only an eps-ball) and the specification ``C f(x)`` whose rows are to be
bounded from below (the margins f_y - f_j for robustness, any linear rows otherwise). Methods compute a
:class:`BoundResult` on it through :meth:`BoundContext.run`, which memoises results per verifier: a method that
takes its intermediate bounds from another (``crown`` from ``symbolic``) finds that result instead of
computing it again, which is how :func:`robustkit.verifiers.verify_many` shares work between methods.

:class:`LayerBounds` is the explicit pre-activation bounds object: for every non-linear node of the graph,
sound bounds of that node's input over the box.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers.graph import Graph, build_graph, check_reproduces, node_shapes

if TYPE_CHECKING:
    from robustkit.verifiers.base import Verifier


@dataclass(frozen=True, eq=False)
class LayerBounds(Mapping[int, tuple[Tensor, Tensor]]):
    """Sound bounds (lower, upper), each (B, *shape), of the input of every non-linear node, keyed by node."""

    bounds: Mapping[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __getitem__(self, node: int) -> tuple[Tensor, Tensor]:
        return self.bounds[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self.bounds)

    def __len__(self) -> int:
        return len(self.bounds)

    def intersect(self, other: Mapping[int, tuple[Tensor, Tensor]]) -> LayerBounds:
        """The tighter of both bounds for every node both hold (both are sound, so their intersection is)."""
        merged = dict(self.bounds)
        for node, (low, high) in other.items():
            if node in merged:
                mine_low, mine_high = merged[node]
                low, high = torch.maximum(mine_low, low), torch.minimum(mine_high, high)
                merged[node] = (low, torch.maximum(high, low))
            else:
                merged[node] = (low, high)
        return LayerBounds(merged)

    def detach(self) -> LayerBounds:
        return LayerBounds({node: (low.detach(), high.detach()) for node, (low, high) in self.bounds.items()})


@dataclass(frozen=True, eq=False)
class BoundResult:
    """What a method computed on a context: ``spec_lower`` (B, K), sound lower bounds of every specification
    row, the layer bounds it used (empty for methods that need none) and the seconds it took, those of the
    results it built on included."""

    spec_lower: Tensor
    layer_bounds: LayerBounds
    seconds: float = 0.0


@dataclass(eq=False)
class BoundContext:
    """A validated bound problem: ``graph`` over the box [lower, upper] (B, *input_shape) with specification
    rows ``spec`` (B, K, n_outputs). Build it with :func:`make_context` (or :meth:`piece` of another)."""

    graph: Graph
    lower: Tensor
    upper: Tensor
    spec: Tensor
    _results: dict[Verifier, BoundResult] = field(default_factory=dict, repr=False)
    _running: list[float] = field(default_factory=list, repr=False)
    #: seconds of computation spent on this context (each memoised result counted once)
    spent: float = field(default=0.0, repr=False)

    @property
    def batch(self) -> int:
        return int(self.lower.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.lower.shape[1:])

    def run(self, verifier: Verifier) -> BoundResult:
        """``verifier``'s result on this context, computed once (memoised per verifier configuration)."""
        found = self._results.get(verifier)
        if found is not None:
            if self._running:  # a method building on a memoised result: charge it that result's time
                self._running[-1] += found.seconds
            return found
        start = time.perf_counter()
        self._running.append(0.0)
        try:
            result = verifier.bound(self)
        finally:
            reused = self._running.pop()
        seconds = time.perf_counter() - start + reused
        result = BoundResult(result.spec_lower, result.layer_bounds, seconds)
        self._results[verifier] = result
        if self._running:  # the caller's clock saw this computation, but not the results it reused
            self._running[-1] += reused
        else:
            self.spent += seconds - reused
        return result

    def piece(self, start: int, stop: int) -> BoundContext:
        """The samples start..stop-1 as a context of their own (no memoised results)."""
        return BoundContext(self.graph, self.lower[start:stop], self.upper[start:stop], self.spec[start:stop])


def all_finite(value: Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity: its sum is finite unless one is there (or
    finite values overflow, which the elementwise check then settles); the sum is 5x cheaper on the hot path."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor")
    if value.numel() and not all_finite(value):
        raise InputError(f"{name} contains NaN or infinite values")
    return value


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which precision the model computes (its first floating-point tensor), else CPU float32."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def output_size(graph: Graph, input_shape: tuple[int, ...]) -> int:
    """Number of outputs of the graph for inputs of ``input_shape``; a clear error when they do not fit."""
    try:
        last = node_shapes(graph, input_shape)[len(graph.nodes) - 1]
    except RuntimeError as exc:
        raise InputError(f"inputs of shape {input_shape} do not fit the model: {str(exc).splitlines()[0]}") from None
    if len(last) != 1:
        raise InputError(f"the model must output a vector of logits per sample, got shape {last}")
    return last[0]


def make_context(model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor, box_checked: bool = False,
                 graph: Graph | None = None) -> BoundContext:
    """Validate a bound problem and build its context.

    ``lower`` and ``upper`` (B, *input_shape) are any box with lower <= upper; ``spec`` is (B, K, n_outputs),
    or (K, n_outputs) for the same rows on every sample. Everything is moved to the model's device and dtype.
    ``box_checked``: the caller built the box itself from validated inputs (finite, lower <= upper, batched,
    as :func:`robustkit.verifiers.base.input_box` does), so those elementwise checks are skipped. ``graph``: the
    model's :func:`build_graph`, when the caller has it (each lookup walks the model's modules).
    """
    if not box_checked:
        lower, upper = _check_tensor("lower", lower), _check_tensor("upper", upper)
        if lower.shape != upper.shape:
            raise InputError(f"lower and upper must have the same shape, got {tuple(lower.shape)} and "
                             f"{tuple(upper.shape)}")
        if lower.dim() < 2 or lower.shape[0] == 0:
            raise InputError(f"the box needs a non-empty batch dimension, got shape {tuple(lower.shape)}")
        if bool((lower > upper).any()):
            raise InputError("the box must have lower <= upper everywhere")
    spec = _check_tensor("spec", spec)
    device, dtype = model_device_dtype(model)
    lower, upper = lower.to(device=device, dtype=dtype), upper.to(device=device, dtype=dtype)
    graph = build_graph(model) if graph is None else graph
    outputs = output_size(graph, tuple(lower.shape[1:]))
    if spec.dim() == 2:
        spec = spec.unsqueeze(0).expand(lower.shape[0], -1, -1)
    if spec.dim() != 3 or spec.shape[0] != lower.shape[0] or spec.shape[2] != outputs or spec.shape[1] == 0:
        raise InputError(f"spec must have shape (batch={lower.shape[0]}, rows, outputs={outputs}) or "
                         f"(rows, {outputs}), "
                         f"got {tuple(spec.shape)}")
    check_reproduces(graph, model, lower[:2])
    return BoundContext(graph, lower, upper, spec.to(device=device, dtype=dtype))
