"""The ``exact`` method: complete verification by mixed-integer linear programming (MILP).

The network of one sample is encoded as a MILP as in Tjeng, Xiao and Tedrake, *Evaluating Robustness of
Neural Networks with Mixed Integer Programming* (ICLR 2019, arXiv:1711.07356) and solved with
``scipy.optimize.milp`` (HiGHS):

* the input pixels are variables bounded by the box [max(x - eps, 0), min(x + eps, 1)];
* an affine layer maps the linear expressions of its input exactly (its matrix is the layer's Jacobian,
  obtained by applying the bound operator to an identity basis, kept sparse), so chains of affine layers
  and skip connections need no variables of their own;
* a ReLU with pre-activation bounds [l, u] from the relaxation (``symbolic`` or ``interval``) is fixed at 0
  when u <= 0, is the identity (one variable and one equality) when l >= 0, and otherwise gets a binary
  variable d and the big-M encoding a >= 0, a >= z, a <= u d, a <= z - l (1 - d).

:meth:`ExactVerifier.verify` minimises each margin f_y - f_j whose relaxation bound is not already positive,
weakest bound first, under a per-sample time limit, and stops at the first counterexample. Statuses:
``verified`` (every margin's MILP dual bound exceeds ``tolerance``), ``falsified`` (a MILP solution, clipped
to the box, is misclassified by a forward pass of the model itself; the clean point when it is already
misclassified), ``timeout`` (time ran out before a decision) and ``unknown`` (numerically borderline: the MILP
says the margin is not positive, but the forward pass does not misclassify its solution).

The margin bounds reported are the better of the MILP dual bound and the relaxation bound (the bounds
method's, improved by a CROWN backward pass with the same pre-activation bounds), so they are never looser
than the relaxation and equal the exact minimum when a MILP is solved to optimality. They carry HiGHS'
floating-point feasibility tolerances (about 1e-6), which is why ``tolerance`` separates verified from
borderline. Exact bounds are **not differentiable**: :meth:`ExactVerifier.spec_lower` returns constants.

Networks with up to a few hundred unstable ReLUs are practical: small fully connected nets (784-50-50-10)
and small conv nets at small eps.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> x = torch.full((1, 1, 1, 2), 0.5)
>>> y = model(x).argmax(1)
>>> result = ExactVerifier(time_limit=10.0).verify(model, x, y, eps=0.05)
>>> result.status[0].value in ("verified", "falsified")
True
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers import ops
from robustkit.verifiers.base import (
    Status,
    VerificationResult,
    Verifier,
    check_labels,
    input_box,
    margin_spec,
    output_size,
    worst_margin,
)
from robustkit.verifiers.crown import backward_bound
from robustkit.verifiers.graph import INPUT, Graph, graph_forward, node_shapes
from robustkit.verifiers.interval import interval_pass
from robustkit.verifiers.symbolic import symbolic_chunk, symbolic_pass

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]

# Jacobians are built from identity bases in chunks of at most this many output values, so a conv layer of a
# CIFAR-sized input never materialises its dense (in_numel x out_numel) Jacobian at once.
_CHUNK_VALUES = 1 << 22
# HiGHS stops at a relative gap of 1e-4 by default; the reported minima should be exact to solver precision.
_MIP_REL_GAP = 1e-7
# ``verify`` only needs the sign of each minimum: HiGHS stops once (best - bound) <= gap * |best|, i.e. for a
# positive best value once the bound exceeds a tenth of it, and for a negative one (a counterexample, which
# ends the search anyway) once the bound is within twice of it. This skips most of the work of closing the
# gap of margins that are far from zero.
_DECISION_GAP = 0.9
# A slice of the time budget shorter than this is not worth a new MILP (presolve alone takes about as long).
_MIN_SLICE_S = 0.02
# The first pass over a sample's MILPs gives each at most this fraction of the time limit; see ``_schedule``.
_FIRST_SLICE = 1 / 16
# Relative widening of the relaxation's pre-activation bounds, which are computed in the model's precision
# (float32 sums of hundreds of terms), so that the big-M constraints never cut off a point of the box.
_BOUND_SLACK = 1e-5
# PGD restarts of the counterexample search that precedes the MILPs of ``verify``.
_ATTACK_RESTARTS = 2
# Memory for the batched ``symbolic`` relaxation (the same budget as the symbolic verifier's default).
_MEMORY_LIMIT_GB = 4.0


@dataclass(frozen=True)
class AffineMap:
    """One affine layer as y = matrix @ x + bias over flattened neurons (matrix sparse, out x in)."""

    matrix: sp.csr_matrix
    bias: Array


def affine_maps(graph: Graph, input_shape: tuple[int, ...], like: Tensor) -> dict[int, AffineMap | None]:
    """The sparse matrix and bias of every affine node (None for reshapes that keep the flat order).

    The matrix is the Jacobian of the layer's linear part, i.e. ``op.linear`` applied to an identity basis of
    its input (computed on ``like``'s device and dtype), transposed.
    """
    shapes = node_shapes(graph, input_shape)
    maps: dict[int, AffineMap | None] = {}
    with torch.no_grad():
        for index, node in enumerate(graph.nodes):
            op = node.op
            if not isinstance(op, ops.AffineOp):
                continue
            if isinstance(op, ops.FlattenOp | ops.IdentityOp):
                maps[index] = None  # a flattened tensor keeps the row-major order the encoding uses
                continue
            in_shape, out_shape = shapes[node.inputs[0]], shapes[index]
            n_in, n_out = ops.numel(in_shape), ops.numel(out_shape)
            step = max(1, _CHUNK_VALUES // max(n_out, 1))
            blocks = []
            for start in range(0, n_in, step):
                stop = min(n_in, start + step)
                basis = torch.zeros(stop - start, n_in, device=like.device, dtype=like.dtype)
                basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                jacobian = op.linear(basis.view(-1, *in_shape)).reshape(stop - start, n_out)
                blocks.append(sp.csr_matrix(jacobian.cpu().double().numpy()))
            matrix = sp.csr_matrix(sp.vstack(blocks).T)
            bias_tensor = op.bias(out_shape)
            bias = (np.zeros(n_out) if bias_tensor is None
                    else bias_tensor.detach().reshape(-1).cpu().double().numpy())
            maps[index] = AffineMap(matrix, np.asarray(bias, dtype=np.float64))
    return maps


def _widen(matrix: sp.csr_matrix, columns: int) -> sp.csr_matrix:
    """The same rows over more variables (variables are only ever appended)."""
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], columns))


@dataclass
class Expression:
    """Neurons as affine functions of the MILP variables: value = matrix @ v + const."""

    matrix: sp.csr_matrix
    const: Array


@dataclass
class MilpEncoding:
    """The MILP of one sample: variables, constraints and the output layer as expressions of the variables."""

    lower: Array
    upper: Array
    integrality: NDArray[np.int8]
    constraints: sp.csr_matrix
    row_lower: Array
    row_upper: Array
    output: Expression
    n_input: int
    n_binary: int


@dataclass
class _Builder:
    lower: list[Array] = field(default_factory=list)
    upper: list[Array] = field(default_factory=list)
    integer: list[NDArray[np.int8]] = field(default_factory=list)
    rows: list[sp.csr_matrix] = field(default_factory=list)
    row_lower: list[Array] = field(default_factory=list)
    row_upper: list[Array] = field(default_factory=list)
    n_vars: int = 0

    def variables(self, lower: Array, upper: Array, integer: bool = False) -> int:
        """Append variables with these bounds; returns the index of the first."""
        first = self.n_vars
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(np.full(lower.shape[0], int(integer), dtype=np.int8))
        self.n_vars += lower.shape[0]
        return first

    def constrain(self, matrix: sp.csr_matrix, lower: Array, upper: Array) -> None:
        self.rows.append(matrix)
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def relu(self, pre: Expression, low: Array, high: Array) -> Expression:
        """Encode relu(pre) with per-neuron bounds [low, high]; returns the output as an expression."""
        n = low.shape[0]
        inactive = high <= 0
        active = (low >= 0) & ~inactive
        crossing = ~inactive & ~active
        act, cross = np.flatnonzero(active), np.flatnonzero(crossing)
        n_act, n_cross = act.size, cross.size
        # the bounds were computed in the model's precision: widened, they never cut off a point of the box
        low = low - _BOUND_SLACK * (1 + np.abs(low))
        high = high + _BOUND_SLACK * (1 + np.abs(high))
        # one variable per active neuron (it equals its pre-activation), a and d per crossing neuron
        first = self.variables(np.concatenate([low[act], np.zeros(n_cross)]),
                               np.concatenate([high[act], high[cross]]))
        binary = self.variables(np.zeros(n_cross), np.ones(n_cross), integer=True)
        columns = self.n_vars
        matrix = _widen(pre.matrix, columns)

        def unit(indices: NDArray[np.intp], scale: Array | float = 1.0) -> sp.csr_matrix:
            values = np.broadcast_to(np.asarray(scale, dtype=np.float64), indices.shape)
            return sp.csr_matrix((values, (np.arange(indices.size), indices)), shape=(indices.size, columns))

        if n_act:
            # v - z = 0 with z = M v' + c, i.e. v - M v' = c
            self.constrain(unit(first + np.arange(n_act)) - matrix[act], pre.const[act], pre.const[act])
        if n_cross:
            a = first + n_act + np.arange(n_cross)
            d = binary + np.arange(n_cross)
            z = matrix[cross]
            c, lo, hi = pre.const[cross], low[cross], high[cross]
            self.constrain(unit(a) - z, c, np.full(n_cross, np.inf))  # a >= z
            self.constrain(unit(a) - z - unit(d, lo), np.full(n_cross, -np.inf), c - lo)  # a <= z - l (1 - d)
            self.constrain(unit(a) - unit(d, hi), np.full(n_cross, -np.inf), np.zeros(n_cross))  # a <= u d
        out_rows = np.concatenate([act, cross])
        out_cols = np.concatenate([first + np.arange(n_act), first + n_act + np.arange(n_cross)])
        out = sp.csr_matrix((np.ones(out_rows.size), (out_rows, out_cols)), shape=(n, columns))
        return Expression(out, np.zeros(n))

    def finish(self, output: Expression, n_input: int) -> MilpEncoding:
        columns = self.n_vars
        if self.rows:
            constraints = sp.csr_matrix(sp.vstack([_widen(m, columns) for m in self.rows]))
            row_lower, row_upper = np.concatenate(self.row_lower), np.concatenate(self.row_upper)
        else:
            constraints = sp.csr_matrix((0, columns))
            row_lower, row_upper = np.zeros(0), np.zeros(0)
        integrality = np.concatenate(self.integer)
        return MilpEncoding(
            lower=np.concatenate(self.lower), upper=np.concatenate(self.upper), integrality=integrality,
            constraints=constraints, row_lower=row_lower, row_upper=row_upper,
            output=Expression(_widen(output.matrix, columns), output.const), n_input=n_input,
            n_binary=int(integrality.sum()),
        )


def encode(graph: Graph, maps: dict[int, AffineMap | None], lower: Array, upper: Array,
           pre_activation: dict[int, tuple[Array, Array]]) -> MilpEncoding:
    """The MILP of one sample over the flat input box [lower, upper] with flat pre-activation bounds."""
    builder = _Builder()
    n_input = lower.shape[0]
    builder.variables(lower, upper)
    values: dict[int, Expression] = {INPUT: Expression(sp.identity(n_input, format="csr"), np.zeros(n_input))}
    remaining = {key: len(users) for key, users in graph.consumers().items()}
    for index, node in enumerate(graph.nodes):
        op = node.op
        if isinstance(op, ops.AffineOp):
            source = values[node.inputs[0]]
            layer = maps[index]
            if layer is None:
                value = source
            else:
                value = Expression(sp.csr_matrix(layer.matrix @ _widen(source.matrix, builder.n_vars)),
                                   layer.matrix @ source.const + layer.bias)
        elif isinstance(op, ops.ReLUOp):
            low, high = pre_activation[index]
            value = builder.relu(values[node.inputs[0]], low, high)
        elif isinstance(op, ops.AddOp):
            first, second = (values[i] for i in node.inputs)
            value = Expression(sp.csr_matrix(_widen(first.matrix, builder.n_vars)
                                             + _widen(second.matrix, builder.n_vars)), first.const + second.const)
        else:
            raise TypeError(f"no MILP rule for {type(op).__name__}")
        values[index] = value
        for source_index in set(node.inputs):
            remaining[source_index] -= node.inputs.count(source_index)
            if remaining[source_index] == 0:
                del values[source_index]
    return builder.finish(values[len(graph.nodes) - 1], n_input)


@dataclass(frozen=True)
class MilpOutcome:
    """One minimisation of ``objective @ f(x)``: the proven lower bound (-inf when none), the best value found
    and the input part of its solution (None when none was found), and whether it was solved to optimality."""

    bound: float
    value: float | None
    solution: Array | None
    optimal: bool


def minimise(encoding: MilpEncoding, objective: Array, time_limit: float, decide: bool = False,
             relaxed: bool = False) -> MilpOutcome:
    """Minimise ``objective @ f(x)`` (objective over the flat outputs) within ``time_limit`` seconds.

    With ``decide`` the solver stops as soon as the sign of the minimum is settled (see ``_DECISION_GAP``)
    instead of closing the gap to the exact minimum; with ``relaxed`` the binaries may take any value in
    [0, 1]: the LP relaxation, whose optimum is a (weaker) lower bound of the minimum.
    """
    start = time.perf_counter()
    cost = np.asarray(encoding.output.matrix.T @ objective).ravel()
    const = float(encoding.output.const @ objective)
    if not np.any(cost):
        # constant over the box (e.g. every neuron it depends on is inactive): no solver needed
        return MilpOutcome(const, const, encoding.lower[:encoding.n_input].copy(), True)
    # the constant enters as a variable fixed at 1, so HiGHS's relative gap is that of the true objective
    columns = cost.size + 1
    matrix = _widen(encoding.constraints, columns)
    constraints = [LinearConstraint(matrix, encoding.row_lower, encoding.row_upper)] if matrix.shape[0] else []
    result: Any = milp(
        np.append(cost, const),
        integrality=np.zeros(columns, dtype=np.int8) if relaxed else np.append(encoding.integrality, 0),
        bounds=Bounds(np.append(encoding.lower, 1.0), np.append(encoding.upper, 1.0)), constraints=constraints,
        options={"time_limit": max(time_limit, 1e-3), "mip_rel_gap": _DECISION_GAP if decide else _MIP_REL_GAP},
    )
    solution = None if result.x is None else np.asarray(result.x[:encoding.n_input], dtype=np.float64)
    value = None if result.fun is None or result.x is None else float(result.fun)
    dual = result.mip_dual_bound
    if result.status not in (0, 1):
        # infeasible or failed: the encoding admits every point of the box, so this is numerical trouble
        logger.warning("MILP ended with status %d (%s); it gives no bound", result.status, result.message)
        bound, optimal = -math.inf, False
    else:
        optimal = result.status == 0
        if dual is not None and math.isfinite(dual):
            bound = float(dual)
        else:  # an LP (no binaries) reports no MILP dual bound: its optimum is the bound
            bound = value if optimal and value is not None else -math.inf
    logger.debug("MILP: status %d, value %s, bound %.6g, %.2fs, %d binaries", result.status, value, bound,
                 time.perf_counter() - start, encoding.n_binary)
    return MilpOutcome(bound, value, solution, optimal)


def _schedule(tasks: list[int], deadline: float, first: float,
              attempt: Callable[[int, float], bool | None]) -> list[int]:
    """Run ``attempt(task, seconds)`` on every task within the deadline; returns the unfinished tasks.

    A first pass gives each task at most ``first`` seconds, so that the many easy MILPs are done before a hard
    one can eat the budget; later passes share what is left equally among the unfinished tasks. HiGHS cannot
    resume a MILP, so a retry starts from scratch and is made only with at least 1.5 times the time of the
    last attempt. ``attempt`` returns True when the task is done, False when it ran out of time, and None to
    stop everything.
    """
    pending, cap = list(tasks), first
    last: dict[int, float] = {}
    while pending:
        unfinished: list[int] = []
        attempted = False
        for position, task in enumerate(pending):
            budget = min(cap, (deadline - time.perf_counter()) / (len(pending) - position))
            if budget < max(_MIN_SLICE_S, 1.5 * last.get(task, 0.0)):
                unfinished.append(task)  # not enough time left to do better than the last attempt
                continue
            last[task], attempted = budget, True
            verdict = attempt(task, budget)
            if verdict is None:
                return []
            if not verdict:
                unfinished.append(task)
        if not attempted:
            return unfinished
        pending, cap = unfinished, math.inf
    return []


@dataclass(frozen=True, kw_only=True)
class ExactVerifier(Verifier):
    """Complete verification by MILP (big-M ReLU encoding, HiGHS); see the module docstring.

    ``time_limit`` is the budget in seconds per sample for all its MILPs together (in :meth:`spec_lower`: per
    sample, for all its specification rows); ``bounds_method`` (``"symbolic"`` or ``"interval"``) supplies the
    ReLU bounds of the encoding; a margin counts as proven positive when its MILP bound exceeds ``tolerance``.
    """

    name: ClassVar[str] = "exact"
    time_limit: float = 60.0
    bounds_method: str = "symbolic"
    tolerance: float = 1e-5
    attack_steps: int = 100

    def __post_init__(self) -> None:
        for option in ("time_limit", "tolerance"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"exact {option} must be a finite number, got {value!r}")
        if isinstance(self.attack_steps, bool) or not isinstance(self.attack_steps, int) or self.attack_steps < 0:
            raise InputError(f"exact attack_steps must be an integer >= 0, got {self.attack_steps!r}")
        if self.time_limit <= 0:
            raise InputError(f"exact time_limit must be positive (seconds), got {self.time_limit}")
        if self.tolerance < 0:
            raise InputError(f"exact tolerance must be >= 0, got {self.tolerance}")
        if self.bounds_method not in ("symbolic", "interval"):
            raise InputError(f"exact bounds_method must be 'symbolic' or 'interval', got {self.bounds_method!r}")

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        if self.bounds_method == "symbolic":
            return symbolic_chunk(graph, input_shape, _MEMORY_LIMIT_GB)
        return None

    def relaxation(self, graph: Graph, lower: Tensor, upper: Tensor,
                   spec: Tensor) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
        """Relaxation bounds (B, K) of ``spec @ f`` and the pre-activation bounds of every ReLU node.

        The bound is the better of the bounds method's and a CROWN backward pass over the same pre-activation
        bounds: it decides which margins need a MILP, and the order in which they are tried.
        """
        with torch.no_grad():
            if self.bounds_method == "symbolic":
                symbolic = symbolic_pass(graph, lower, upper, spec)
                base, pre = symbolic.spec_lower, symbolic.pre_activation
            else:
                interval = interval_pass(graph, lower, upper, spec)
                base, pre = interval.spec_lower, interval.pre_activation
            return torch.maximum(base, backward_bound(graph, lower, upper, spec, pre)), pre

    @staticmethod
    def _encode(graph: Graph, maps: dict[int, AffineMap | None], lower: Tensor, upper: Tensor,
                pre: dict[int, tuple[Tensor, Tensor]], sample: int) -> MilpEncoding:
        bounds = {index: (_numpy(low[sample]), _numpy(high[sample])) for index, (low, high) in pre.items()}
        return encode(graph, maps, _numpy(lower[sample]), _numpy(upper[sample]), bounds)

    @staticmethod
    def _clip(solution: Array, lower: Tensor, upper: Tensor) -> Tensor:
        """A MILP solution as a model input (1, *shape), inside the box despite the solver's tolerances."""
        point = torch.from_numpy(solution).to(device=lower.device, dtype=lower.dtype).view(1, *lower.shape)
        return torch.minimum(torch.maximum(point, lower.unsqueeze(0)), upper.unsqueeze(0))

    def _trusted(self, bound: float, actual: float) -> float:
        """The MILP bound, or -inf when the true value at the MILP's own solution lies below it."""
        if bound > actual + self.tolerance + _BOUND_SLACK * (1 + abs(actual)):
            logger.warning("MILP bound %.6g exceeds the value %.6g at its own solution: numerical trouble, "
                           "keeping the relaxation bound", bound, actual)
            return -math.inf
        return bound

    def spec_lower(self, graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor) -> Tensor:
        """Lower bounds (B, K) of ``spec[b] @ f(x')`` over the box by one MILP per sample and row.

        Each row's bound is its MILP dual bound (the exact minimum when solved within the time budget), never
        below the relaxation bound. The result is a constant: exact bounds are not differentiable.
        """
        relax, pre = self.relaxation(graph, lower, upper, spec)
        best = relax.detach().clone()
        rows = spec.detach().reshape(spec.shape[0], spec.shape[1], -1).cpu().double().numpy()
        with torch.no_grad():
            maps = affine_maps(graph, tuple(lower.shape[1:]), lower)
            for sample in range(lower.shape[0]):
                deadline = time.perf_counter() + self.time_limit
                encoding = self._encode(graph, maps, lower, upper, pre, sample)

                def attempt(k: int, seconds: float, sample: int = sample, encoding: MilpEncoding = encoding) -> bool:
                    outcome = minimise(encoding, rows[sample, k], seconds)
                    bound = outcome.bound
                    if outcome.solution is not None:
                        point = self._clip(outcome.solution, lower[sample], upper[sample])
                        actual = graph_forward(graph, point).flatten().double().cpu().numpy() @ rows[sample, k]
                        bound = self._trusted(bound, float(actual))
                    best[sample, k] = max(float(best[sample, k]), bound)
                    return outcome.optimal

                wanted = [k for k in range(rows.shape[1]) if np.any(rows[sample, k])]
                left = _schedule(wanted, deadline, _FIRST_SLICE * self.time_limit, attempt)
                if left:
                    logger.info("sample %d: time limit reached, %d rows keep a partial bound", sample, len(left))
        return best

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        """Decide every sample: verified, falsified (with a counterexample), timeout or unknown."""
        with torch.no_grad():
            graph, x, labels, eps = self._prepare(model, x, y, eps)
            assert labels is not None
            prediction = model(x).argmax(1)
        num_classes = output_size(graph, tuple(x.shape[1:]))
        check_labels(labels, num_classes)
        lower, upper = input_box(x, eps)
        spec = margin_spec(labels, num_classes).to(x.dtype)
        batch = x.shape[0]
        margins = torch.zeros(batch, num_classes, dtype=torch.float64)
        counterexample = torch.full_like(x, float("nan"))
        status: list[Status] = []
        seconds: list[float] = []
        maps = affine_maps(graph, tuple(x.shape[1:]), x)
        size = self.chunk_size(graph, tuple(x.shape[1:])) or batch
        for first in range(0, batch, size):
            start = time.perf_counter()
            part = slice(first, min(batch, first + size))
            relax, pre = self.relaxation(graph, lower[part], upper[part], spec[part])
            margins[part] = relax.detach().cpu().double()
            margins[torch.arange(first, part.stop), labels[part].cpu()] = 0.0
            undecided = (prediction[part] == labels[part]) & (worst_margin(relax, labels[part]) <= 0)
            adversarial = self._attack(model, x[part], labels[part], eps, undecided)
            piece = _Piece(graph, maps, x[part], lower[part], upper[part], pre, eps)
            shared = (time.perf_counter() - start) / relax.shape[0]  # the batched work, shared equally
            for offset in range(relax.shape[0]):
                sample, began = first + offset, time.perf_counter()
                label = int(labels[sample])
                point: Tensor | None = None
                if int(prediction[sample]) != label:
                    outcome, point = Status.FALSIFIED, x[sample : sample + 1]
                elif adversarial is not None and not bool(adversarial[offset].isnan().any()):
                    outcome, point = Status.FALSIFIED, adversarial[offset : offset + 1]
                else:
                    outcome, point = self._decide(model, piece, offset, label, margins[sample])
                status.append(outcome)
                if point is not None:
                    counterexample[sample] = point[0]
                seconds.append(time.perf_counter() - began + shared)
                logger.info("sample %d: %s in %.2fs", sample, outcome.value, seconds[-1])
        margins_lower = margins.to(x.dtype)
        return VerificationResult(
            method=self.name, eps=eps, status=tuple(status), margin_lower=worst_margin(margins_lower, labels.cpu()),
            margins_lower=margins_lower, prediction=prediction.cpu(), time_s=torch.tensor(seconds),
            counterexample=counterexample.cpu(),
        )

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, todo: Tensor) -> Tensor | None:
        """Counterexamples (B, *shape) found by PGD for the ``todo`` samples, NaN rows where none was found.

        A gradient search settles most non-robust samples in milliseconds, where the MILP would have to find
        and prove a negative minimum. Its points count only after the attack's own re-check (a fresh forward
        pass that misclassifies them), exactly like the MILP's.
        """
        if self.attack_steps == 0 or eps == 0 or not bool(todo.any()):
            return None
        # imported here: the attacks build on the bound engine, so the engine must not import them at load time
        from robustkit.attacks.pgd import PGD

        index = todo.nonzero().squeeze(1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the model is in training mode")
            found = PGD(loss="cw", steps=self.attack_steps, restarts=_ATTACK_RESTARTS)(model, x[index], y[index],
                                                                                        eps=eps)
        points = torch.full_like(x, float("nan"))
        points[index[found.success]] = found.x_adv[found.success].to(x.dtype)
        return points

    def _decide(self, model: nn.Module, piece: _Piece, sample: int, label: int,
                row: Tensor) -> tuple[Status, Tensor | None]:
        """Decide one correctly classified sample by MILP; raises its margin bounds ``row`` in place."""
        deadline = time.perf_counter() + self.time_limit
        # weakest relaxation bound first: the likeliest counterexample, and the hardest proof
        pending = [j for j in torch.argsort(row).tolist() if j != label and float(row[j]) <= 0]
        if not pending:
            return Status.VERIFIED, None
        encoding = self._encode(piece.graph, piece.maps, piece.lower, piece.upper, piece.pre, sample)
        logger.debug("%d margins need a MILP with %d binaries", len(pending), encoding.n_binary)
        lower, upper = piece.lower[sample], piece.upper[sample]

        def objective(j: int) -> Array:
            vector = np.zeros(row.shape[0])
            vector[label], vector[j] = 1.0, -1.0
            return vector

        # the LP relaxation first: a sound bound tighter than the relaxation's, and a start for a targeted search
        starts: dict[int, Tensor] = {}
        for j in pending:
            outcome = minimise(encoding, objective(j), deadline - time.perf_counter(), relaxed=True)
            if outcome.solution is not None:
                starts[j] = self._clip(outcome.solution, lower, upper)
                with torch.no_grad():
                    logits = model(starts[j])[0].double()
                row[j] = max(float(row[j]), self._trusted(outcome.bound, float(logits[label] - logits[j])))
        point = self._search(model, piece.x[sample], piece.eps, label, starts)
        if point is not None:
            return Status.FALSIFIED, point
        pending = [j for j in pending if float(row[j]) <= self.tolerance]
        found: list[Tensor] = []
        borderline: list[int] = []
        exact: set[int] = set()  # margins whose sign the decision gap left open: solved to optimality

        def attempt(j: int, seconds: float) -> bool | None:
            end = time.perf_counter() + seconds
            while True:
                outcome = minimise(encoding, objective(j), end - time.perf_counter(), decide=j not in exact)
                bound = outcome.bound
                if outcome.solution is not None:
                    point = self._clip(outcome.solution, lower, upper)
                    with torch.no_grad():
                        logits = model(point)[0].double()
                    if bool((logits > logits[label]).any()):  # only a real misclassification falsifies
                        found.append(point)
                        return None
                    bound = self._trusted(bound, float(logits[label] - logits[j]))
                row[j] = max(float(row[j]), bound)
                if bound > self.tolerance:
                    return True
                if not outcome.optimal:
                    return False
                if j in exact:
                    logger.warning("class %d: the MILP minimum %s is not above the tolerance, but the model does "
                                   "not misclassify its solution (numerically borderline)", j, outcome.value)
                    borderline.append(j)
                    return True
                exact.add(j)
                if end - time.perf_counter() < _MIN_SLICE_S:
                    return False

        unfinished = _schedule(pending, deadline, _FIRST_SLICE * self.time_limit, attempt)
        if found:
            return Status.FALSIFIED, found[0]
        if unfinished:
            return Status.TIMEOUT, None
        return (Status.UNKNOWN if borderline else Status.VERIFIED), None

    def _search(self, model: nn.Module, x: Tensor, eps: float, label: int, starts: dict[int, Tensor]) -> Tensor | None:
        """A targeted gradient search for each class j from the LP optimum of f_y - f_j; a misclassified point
        (1, *shape) or None. Counterexamples deep in a corner of the box, which PGD from the clean point misses,
        are usually a few steps away from the LP optimum."""
        if not starts or self.attack_steps == 0:
            return None
        from robustkit.attacks.pgd import gradient_steps  # see _attack

        targets = torch.tensor(list(starts), device=x.device)
        labels = torch.full_like(targets, label)

        def targeted(logits: Tensor, y: Tensor) -> Tensor:
            return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)

        centre = x.unsqueeze(0).expand(len(starts), *x.shape)
        best, margin = gradient_steps(model, centre, labels, torch.cat(list(starts.values())), eps=eps,
                                      steps=self.attack_steps, step_size=eps / 25, loss=targeted)
        for index in torch.nonzero(margin < 0).flatten().tolist():
            with torch.no_grad():
                if int(model(best[index : index + 1]).argmax(1)) != label:  # the re-check, as for every point
                    return best[index : index + 1]
        return None


@dataclass(frozen=True)
class _Piece:
    """What the samples of one piece of a batch share in :meth:`ExactVerifier.verify`."""

    graph: Graph
    maps: dict[int, AffineMap | None]
    x: Tensor
    lower: Tensor
    upper: Tensor
    pre: dict[int, tuple[Tensor, Tensor]]
    eps: float


def _numpy(t: Tensor) -> Array:
    return np.asarray(t.detach().reshape(-1).cpu().double().numpy(), dtype=np.float64)
