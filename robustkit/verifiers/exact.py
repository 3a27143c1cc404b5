"""The ``exact`` method: complete verification by mixed-integer linear programming (MILP).

Each sample's network is encoded as in Tjeng, Xiao and Tedrake, *Evaluating Robustness of Neural Networks with
Mixed Integer Programming* (ICLR 2019, arXiv:1711.07356) and solved with ``scipy.optimize.milp`` (HiGHS): the
inputs are variables bounded by the box [max(x - eps, 0), min(x + eps, 1)]; affine layers map linear
expressions exactly (their sparse matrix is the Jacobian, ``op.linear`` of an identity basis), so affine chains
and skip connections need no variables; a ReLU with pre-activation bounds [l, u] (``symbolic`` or
``interval``) is 0 when u <= 0, one variable equal to its input when l >= 0, and otherwise a binary d with the
big-M encoding a >= 0, a >= z, a <= u d, a <= z - l (1 - d).

:meth:`ExactVerifier.verify` decides each sample. Margins f_y - f_j with a positive relaxation bound are done.
For the others, PGD (``attack_steps``; 0 switches the searches off) and then, per margin, the LP relaxation
(a sound bound, and the start of a targeted gradient search) look for a cheap counterexample; what remains is
minimised by MILP, weakest relaxation bound first, within ``time_limit`` seconds per sample, stopping at the
first counterexample. Statuses: ``verified`` (every MILP dual bound exceeds ``tolerance``), ``falsified`` (a
point of the box that a fresh forward pass misclassifies: the clean point, a search's or a MILP's solution),
``timeout``, and ``unknown`` (numerically borderline: a MILP minimum not above ``tolerance`` at a point the
model classifies correctly).

Margin bounds are the better of the MILP dual bound and the relaxation's (the bounds method's, improved by a
CROWN pass over the same pre-activation bounds). :meth:`ExactVerifier.spec_lower` (``margin_bounds``,
``logit_bounds``) solves each MILP to optimality: exact minima when solved in time. ``verify`` stops a MILP
once its sign is settled, so its margins are sound but not always exact. The bounds carry HiGHS' tolerances
(about 1e-6), hence ``tolerance``, and are **not differentiable**. Practical for networks with up to a few
hundred unstable ReLUs: small fully connected nets (784-50-50-10) and small conv nets at small eps.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> x = torch.full((1, 1, 1, 2), 0.5)
>>> result = ExactVerifier(time_limit=10.0).verify(model, x, model(x).argmax(1), eps=0.05)
>>> result.status[0].value in ("verified", "falsified")
True
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.gradients import cw_loss, gradient_steps, random_start
from robustkit.verifiers.base import (
    SpecResult,
    Status,
    VerificationResult,
    Verifier,
    check_offset,
    violated,
    worst_margin,
)
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds, make_context
from robustkit.verifiers.crown import CrownVerifier, crown_pass
from robustkit.verifiers.graph import INPUT, Graph, graph_forward, node_shapes
from robustkit.verifiers.milp import (
    BOUND_SLACK,
    AffineMap,
    Array,
    Expression,
    MilpBuilder,
    MilpEncoding,
    MilpOutcome,
    as_numpy,
    minimise,
)

logger = logging.getLogger(__name__)


_MIN_SLICE_S = 0.02  # a shorter MILP is not worth starting (presolve alone takes about as long)
_FIRST_SLICE = 1 / 16  # of the time limit: the most each MILP gets in the first pass (see ``_schedule``)
_ATTACK_RESTARTS = 2  # of the PGD search that precedes the MILPs of ``verify``
_MEMORY_LIMIT_GB = 4.0  # for the batched ``symbolic`` relaxation (the symbolic verifier's default)


def affine_maps(graph: Graph, input_shape: tuple[int, ...], like: Tensor) -> dict[int, AffineMap | None]:
    """What each node's MILP rule needs that depends only on the weights (``op.milp_map``: the sparse matrix
    and bias of affine layers), on ``like``'s device and dtype."""
    shapes = node_shapes(graph, input_shape)
    return {index: node.op.milp_map(shapes[node.inputs[0]], shapes[index], like)
            for index, node in enumerate(graph.nodes)}


def encode(graph: Graph, maps: dict[int, AffineMap | None], lower: Array, upper: Array,
           pre_activation: dict[int, tuple[Array, Array]]) -> MilpEncoding:
    """The MILP of one sample over the flat input box [lower, upper] with flat pre-activation bounds."""
    builder = MilpBuilder()
    n_input = lower.shape[0]
    builder.variables(lower, upper)
    builder.rows.append((sp.csr_matrix((0, n_input)), np.zeros(0), np.zeros(0)))  # a network without ReLU
    values: dict[int, Expression] = {INPUT: Expression(sp.identity(n_input, format="csr"), np.zeros(n_input))}
    remaining = {key: len(users) for key, users in graph.consumers().items()}
    for index, node in enumerate(graph.nodes):
        inputs = [values[source] for source in node.inputs]
        values[index] = node.op.milp(builder, inputs, pre_activation.get(index), maps.get(index))
        for used in set(node.inputs):
            remaining[used] -= node.inputs.count(used)
            if remaining[used] == 0:
                del values[used]  # free expressions no node needs any more
    return builder.finish(values[len(graph.nodes) - 1], n_input)


def _schedule(tasks: list[int], deadline: float, first: float,
              attempt: Callable[[int, float], bool | None]) -> list[int]:
    """Run ``attempt(task, seconds)`` on every task within the deadline; returns the unfinished tasks.

    A first pass gives each task at most ``first`` seconds, so that the many easy MILPs are done before a hard
    one eats the budget; later passes share what is left equally among the unfinished tasks. HiGHS cannot
    resume a MILP, so a retry starts from scratch and is only made with 1.5 times the time of the last try.
    ``attempt`` returns True when the task is done, False when out of time, and None to stop everything.
    """
    pending, cap = list(tasks), first
    last: dict[int, float] = {}
    while pending:
        unfinished: list[int] = []
        attempted = False
        for position, task in enumerate(pending):
            budget = min(cap, (deadline - time.perf_counter()) / (len(pending) - position))
            if budget < max(_MIN_SLICE_S, 1.5 * last.get(task, 0.0)):
                unfinished.append(task)
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


@dataclass(frozen=True, kw_only=True)
class ExactVerifier(Verifier):
    """Complete verification by MILP (big-M ReLU encoding, HiGHS); see the module docstring.

    ``time_limit``: seconds per sample for all its work (in :meth:`spec_lower`: per sample for all its rows);
    ``bounds_method``: ``"symbolic"`` or ``"interval"``, the source of the ReLU bounds; ``tolerance``: how far
    above 0 a MILP bound must be to prove a margin; ``attack_steps``: PGD steps of the counterexample searches
    that precede the MILPs of :meth:`verify` (0: only MILP solutions falsify).
    """

    name: ClassVar[str] = "exact"
    differentiable: ClassVar[bool] = False
    complete: ClassVar[bool] = True
    time_limit: float = 60.0
    bounds_method: str = "symbolic"
    tolerance: float = 1e-5
    attack_steps: int = 100

    def __post_init__(self) -> None:
        for option, low in (("time_limit", 1e-3), ("tolerance", 0.0)):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf:
                raise InputError(f"exact {option} must be a finite number >= {low:g}, got {value!r}")
        if isinstance(self.attack_steps, bool) or not isinstance(self.attack_steps, int) or self.attack_steps < 0:
            raise InputError(f"exact attack_steps must be an integer >= 0, got {self.attack_steps!r}")
        if self.bounds_method not in ("symbolic", "interval"):
            raise InputError(f"exact bounds_method must be 'symbolic' or 'interval', got {self.bounds_method!r}")

    def chunk_size(self, graph: Graph, input_shape: tuple[int, ...]) -> int | None:
        return self._relaxation().chunk_size(graph, input_shape)

    def applicable(self, graph: Graph) -> str | None:
        missing = sorted({type(node.op).__name__.removesuffix("Op") for node in graph.nodes
                          if not node.op.milp_encodable})
        return f"no mixed-integer encoding of {', '.join(missing)}" if missing else None

    def _relaxation(self) -> CrownVerifier:
        return CrownVerifier(intermediate=self.bounds_method, memory_limit_gb=_MEMORY_LIMIT_GB)

    def relaxation(self, graph: Graph, lower: Tensor, upper: Tensor,
                   spec: Tensor) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
        """Relaxation bounds (B, K) of ``spec @ f`` and the pre-activation bounds of every non-linear node.

        The bound is the better of the bounds method's and a CROWN backward pass over the same pre-activation
        bounds: it decides which margins need a MILP, and in which order.
        """
        with torch.no_grad():
            return crown_pass(graph, lower, upper, spec, self.bounds_method, _MEMORY_LIMIT_GB)

    @staticmethod
    def _encode(graph: Graph, maps: dict[int, AffineMap | None], lower: Tensor, upper: Tensor,
                pre: dict[int, tuple[Tensor, Tensor]], sample: int) -> MilpEncoding:
        bounds = {index: (as_numpy(low[sample]), as_numpy(high[sample])) for index, (low, high) in pre.items()}
        return encode(graph, maps, as_numpy(lower[sample]), as_numpy(upper[sample]), bounds)

    def _check(self, forward: Callable[[Tensor], Tensor], outcome: MilpOutcome, lower: Tensor, upper: Tensor,
               objective: Array) -> tuple[Tensor | None, Tensor, float]:
        """The solution as a point (1, *shape) of the box (clipped: the solver has tolerances), the outputs
        there (flat, float64) and the outcome's bound, or -inf when the outputs there refute the bound."""
        if outcome.solution is None:
            return None, torch.zeros(0, dtype=torch.float64), outcome.bound
        point = torch.from_numpy(outcome.solution).to(device=lower.device, dtype=lower.dtype).view(1, *lower.shape)
        point = torch.minimum(torch.maximum(point, lower.unsqueeze(0)), upper.unsqueeze(0))
        with torch.no_grad():
            outputs = forward(point).flatten().double().cpu()
        actual = float(outputs.numpy() @ objective)
        if outcome.bound > actual + self.tolerance + BOUND_SLACK * (1 + abs(actual)):
            logger.warning("MILP bound %.6g exceeds the value %.6g at its own solution: numerical trouble, "
                           "keeping the relaxation bound", outcome.bound, actual)
            return point, outputs, -math.inf
        return point, outputs, outcome.bound

    def bound(self, ctx: BoundContext) -> BoundResult:
        bounds, _, _ = self._solve(ctx.graph, ctx.lower, ctx.upper, ctx.spec)
        return BoundResult(bounds, LayerBounds())

    def _solve(self, graph: Graph, lower: Tensor, upper: Tensor, spec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Lower bounds (B, K) of ``spec[b] @ f(x')`` over the box by one MILP per sample and row.

        Each bound is the MILP dual bound (the exact minimum when solved in time), never below the relaxation
        bound. The result is a constant: exact bounds are not differentiable. Also returns, per sample, the
        solution (a point of the box, (B, *shape), NaN where none) with the smallest value of any row there,
        and whether every MILP of the sample finished within the time limit ((B,) bool).
        """
        relax, pre = self.relaxation(graph, lower, upper, spec)
        best = relax.detach().clone()
        points = torch.full_like(lower, float("nan"))
        finished = torch.ones(lower.shape[0], dtype=torch.bool)
        rows = spec.detach().reshape(spec.shape[0], spec.shape[1], -1).cpu().double().numpy()
        maps = affine_maps(graph, tuple(lower.shape[1:]), lower)
        for sample in range(lower.shape[0]):
            deadline = time.perf_counter() + self.time_limit
            encoding = self._encode(graph, maps, lower, upper, pre, sample)
            lowest = [math.inf]

            def attempt(k: int, seconds: float, sample: int = sample, encoding: MilpEncoding = encoding,
                        lowest: list[float] = lowest) -> bool:
                outcome = minimise(encoding, rows[sample, k], seconds)
                point, outputs, bound = self._check(lambda p: graph_forward(graph, p), outcome, lower[sample],
                                                    upper[sample], rows[sample, k])
                best[sample, k] = max(float(best[sample, k]), bound)
                if point is not None and float(outputs.numpy() @ rows[sample, k]) < lowest[0]:
                    lowest[0] = float(outputs.numpy() @ rows[sample, k])
                    points[sample] = point[0]
                return outcome.optimal

            wanted = [k for k in range(rows.shape[1]) if np.any(rows[sample, k])]
            if _schedule(wanted, deadline, _FIRST_SLICE * self.time_limit, attempt):
                logger.info("sample %d: time limit reached, some rows keep a partial bound", sample)
                finished[sample] = False
        return best, points, finished

    def verify_spec(self, model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor | list[Tensor],
                    offset: Tensor | list[Tensor] | None = None) -> SpecResult:
        """Decide ``spec @ f(x) + offset > 0`` over the box per sample by one MILP per row (a list: the
        disjunction, verified when one specification is): verified when every row's MILP bound exceeds
        ``tolerance``, falsified at a MILP solution that a forward pass shows to violate every specification,
        timeout when a MILP ran out of time (``time_limit`` per sample and specification), unknown otherwise
        (numerically borderline)."""
        start = time.perf_counter()
        specs = spec if isinstance(spec, list) else [spec]
        offsets: list[Tensor | None] = list(offset) if isinstance(offset, list) else [offset] * len(specs)
        if len(offsets) != len(specs) or not specs:
            raise InputError("verify_spec needs one offset per specification of the disjunction")
        proven: list[Tensor] = []
        candidates: list[Tensor] = []
        bounds: list[Tensor] = []
        finished = torch.ones(lower.shape[0], dtype=torch.bool)
        with torch.no_grad():
            for rows, shift in zip(specs, offsets, strict=True):
                ctx = make_context(model, lower, upper, rows)
                self.check_applicable(ctx.graph)
                found, points, done = self._solve(ctx.graph, ctx.lower, ctx.upper, ctx.spec)
                finished &= done
                if shift is not None:
                    found = found + check_offset(shift, found)
                bounds.append(found.cpu())
                proven.append((found > self.tolerance).all(1).cpu())
                candidates.append(points)
            verified = torch.stack(proven).any(0)
            counterexample = torch.full_like(candidates[0], float("nan"))
            for points in candidates:
                usable = ~points.flatten(1).isnan().any(1)
                if bool(usable.any()):
                    broken = violated(model, torch.where(usable.view(-1, *[1] * (points.dim() - 1)), points,
                                                         ctx.lower), specs, offsets) & usable.cpu()
                    fresh = broken & counterexample.flatten(1).isnan().any(1).cpu()
                    counterexample[fresh.to(points.device)] = points[fresh.to(points.device)]
        falsified = ~counterexample.flatten(1).isnan().any(1).cpu()
        status = tuple(Status.VERIFIED if v else Status.FALSIFIED if f else Status.UNKNOWN if d else Status.TIMEOUT
                       for v, f, d in zip(verified.tolist(), falsified.tolist(), finished.tolist(), strict=True))
        elapsed = time.perf_counter() - start
        return SpecResult(self.name, status, torch.cat(bounds, 1), torch.full((len(status),), elapsed / len(status)),
                          counterexample.cpu())

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        """Decide every sample: verified, falsified (with a counterexample), timeout or unknown."""
        with torch.no_grad():
            ctx, x, labels, eps = self._eps_context(model, x, y, eps)
            assert labels is not None
            self.check_applicable(ctx.graph)
            prediction = model(x).argmax(1)
        graph, lower, upper, spec = ctx.graph, ctx.lower, ctx.upper, ctx.spec
        num_classes = spec.shape[2]
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
            margins[part] = relax.cpu().double()
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
                elif not bool(adversarial[offset].isnan().any()):
                    outcome, point = Status.FALSIFIED, adversarial[offset : offset + 1]
                else:
                    # the whole sample within the time limit, with 2% to spare: HiGHS overshoots a little
                    deadline = began + 0.98 * self.time_limit - shared
                    outcome, point = self._decide(model, piece, offset, label, margins[sample], deadline)
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

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, todo: Tensor) -> Tensor:
        """Points (B, *shape) where a PGD search with the CW margin loss (random starts, ``_ATTACK_RESTARTS``
        of them) misclassifies the ``todo`` samples, re-checked by a forward pass, NaN elsewhere: most
        non-robust samples settle here in milliseconds."""
        points = torch.full_like(x, float("nan"))
        if self.attack_steps == 0 or eps == 0 or not bool(todo.any()):
            return points
        index = todo.nonzero().squeeze(1)
        generator = torch.Generator(device=x.device).manual_seed(0)
        step = eps * 0.01 / 0.3  # PGD's default step (0.01 at eps 0.3, Madry et al.'s MNIST setting)
        for _ in range(_ATTACK_RESTARTS):
            if index.numel() == 0:
                break
            start = random_start(x[index], eps, "linf", generator)
            best, _ = gradient_steps(model, x[index], y[index], start, eps=eps, steps=self.attack_steps,
                                     step_size=step, loss=cw_loss)
            with torch.no_grad():
                broken = model(best).argmax(1) != y[index]
            points[index[broken]] = best[broken].to(x.dtype)
            index = index[~broken]
        return points

    def _decide(self, model: nn.Module, piece: _Piece, sample: int, label: int, row: Tensor,
                deadline: float) -> tuple[Status, Tensor | None]:
        """Decide one correctly classified sample; raises its margin bounds ``row`` in place."""
        # weakest relaxation bound first: the likeliest counterexample, and the hardest proof
        pending = [j for j in torch.argsort(row).tolist() if j != label and float(row[j]) <= 0]
        if not pending:
            return Status.VERIFIED, None
        encoding = self._encode(piece.graph, piece.maps, piece.lower, piece.upper, piece.pre, sample)
        logger.debug("%d margins need a MILP with %d binaries", len(pending), encoding.n_binary)
        lower, upper = piece.lower[sample], piece.upper[sample]
        objectives = {j: np.eye(row.shape[0])[label] - np.eye(row.shape[0])[j] for j in pending}
        starts: dict[int, Tensor] = {}
        for j in pending:  # the LP relaxation: a sound bound, and where to start a targeted search
            if deadline - time.perf_counter() < _MIN_SLICE_S:
                break
            start, _, bound = self._check(model, minimise(encoding, objectives[j], deadline - time.perf_counter(),
                                                          relaxed=True), lower, upper, objectives[j])
            row[j] = max(float(row[j]), bound)
            if start is not None:
                starts[j] = start
        point = self._search(model, piece.x[sample], piece.eps, label, starts)
        if point is not None:
            return Status.FALSIFIED, point
        found: list[Tensor] = []
        borderline: list[int] = []
        exact: set[int] = set()  # margins the decision gap left open: solved to optimality

        def attempt(j: int, seconds: float) -> bool | None:
            end = time.perf_counter() + seconds
            while True:
                outcome = minimise(encoding, objectives[j], end - time.perf_counter(), decide=j not in exact)
                point, logits, bound = self._check(model, outcome, lower, upper, objectives[j])
                if point is not None and bool((logits > logits[label]).any()):  # really misclassified
                    found.append(point)
                    return None
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

        pending = [j for j in pending if float(row[j]) <= self.tolerance]
        unfinished = _schedule(pending, deadline, _FIRST_SLICE * self.time_limit, attempt)
        if found:
            return Status.FALSIFIED, found[0]
        if unfinished:
            return Status.TIMEOUT, None
        return (Status.UNKNOWN if borderline else Status.VERIFIED), None

    def _search(self, model: nn.Module, x: Tensor, eps: float, label: int, starts: dict[int, Tensor]) -> Tensor | None:
        """A point (1, *shape) that a targeted gradient search from the LP optimum of f_y - f_j finds and the
        model misclassifies, or None. Counterexamples in a corner of the box, which PGD from the clean point
        misses, are usually a few steps away from the LP optimum."""
        if not starts or self.attack_steps == 0:
            return None
        targets = torch.tensor(list(starts), device=x.device)

        def targeted(logits: Tensor, y: Tensor) -> Tensor:
            return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)

        centre = x.unsqueeze(0).expand(len(starts), *x.shape)
        best, margin = gradient_steps(model, centre, torch.full_like(targets, label), torch.cat(list(starts.values())),
                                      eps=eps, steps=self.attack_steps, step_size=eps / 25, loss=targeted)
        for index in torch.nonzero(margin < 0).flatten().tolist():
            with torch.no_grad():
                if int(model(best[index : index + 1]).argmax(1)) != label:  # the re-check, as for every point
                    return best[index : index + 1]
        return None
