"""The ``bab`` method: complete verification by branch and bound on top of optimised linear bounds.

A property ``P(x)``: for some group g of specification rows, ``C_r f(x) + d_r > 0`` for every row r of g (one
group for robustness: the margins f_y - f_j; several for a disjunction). Over a box it is

* **verified** when every sub-problem of a partition of the box is bounded above zero (a sound proof: every
  bound is a valid lower bound over its sub-problem, and the sub-problems cover the box);
* **falsified** at a point of the box that violates every group, found by an attack or as a bound's minimiser
  and always re-checked by a forward pass of the model;
* **timeout** when ``time_limit`` seconds pass first, **memory** when the open sub-problems would exceed the
  domain budget (``memory_limit_gb``), **unknown** when neither applies but nothing more can be split.

**ReLU splitting** (the default when the network has piecewise-linear layers, ``branch_point`` of the
operator): a sub-problem fixes some unstable neurons to one linear piece (v >= 0 or v <= 0). Its bound is
alpha-CROWN with beta-CROWN multipliers (Wang et al., *Beta-CROWN*, arXiv:2103.06624): the intermediate bounds
are those of the root (valid on every sub-problem), clamped at the split neurons; each split constraint
s * v >= 0 enters the backward pass as a Lagrangian term -beta * s * v with a free beta >= 0 per specification
row, optimised with the slopes by projected Adam (``iterations`` steps, ``lr_alpha``, ``lr_beta``), warm-started
from the parent's. ``refine_intermediate=True`` also recomputes every sub-problem's intermediate bounds by
CROWN's layer-by-layer passes over its clamped bounds (kept per sub-problem, so they only tighten): measured on
the hardest row of a normally trained 784-256-256-10 MNIST net at eps 0.05 (root bound -3.65, 120 s, one AMD
EPYC thread), the multipliers alone bounded 190,000 sub-problems and raised the worst bound to -0.96, the
recomputed bounds 15,000 sub-problems to -1.43: the passes cost more than they tighten, so the default is off.
A child's bound is never below its parent's (the parent's bound is valid on the child). With ``per_row`` (the
default) a conjunction's rows that the root leaves open are decided one after the other (hardest first), each
by a branch and bound of its own whose sub-problems need to prove one row, not all (with one row left open,
the rows the root proved no longer ride along in the sub-problems' passes: 4x the sub-problems per second on
the net above). A sub-problem with every unstable neuron split is linear: it is decided by linear programs
(scipy's HiGHS) in float64, whose minimiser is a counterexample candidate.

Branching: ``babsr`` scores every unstable neuron by the relaxation gap a split removes, weighted by the
backward coefficients of the specification rows not yet proven (the BaBSR heuristic of Bunel et al.,
arXiv:1909.06588, in CROWN form); ``fsb`` (filtered smart branching, De Palma et al., arXiv:2104.06718) takes
the ``fsb_candidates`` best-scored neurons and picks the one whose two children have the best worst bound,
estimated by one backward pass each. The open sub-problems with the lowest bound are split first, in batches
of ``batch_size``.

**Input splitting** (``split="input"``, or ``"auto"`` when the network has fewer than ``input_split_below``
inputs or no splittable layer): a sub-problem is a smaller box, bounded by alpha-CROWN afresh; the box is
halved along the input with the largest width times gradient.

Falsification: PGD on the property's violation at the root (``attack_steps`` x ``attack_restarts``), every
sub-problem's bound minimiser checked by a forward pass, and PGD from the most promising sub-problems' points
every ``attack_every`` batches. A proof whose smallest sub-problem bound is within float32 rounding error of
zero (``NEAR_ZERO``) is redone in float64. Deterministic given ``seed`` (and the thread count).

>>> import torch
>>> from robustkit.models import build_model
>>> from robustkit.verifiers import verify
>>> model = build_model("mnist_fc_small", seed=0).eval()
>>> x = torch.rand(1, 1, 28, 28)
>>> y = model(x).argmax(1)
>>> result = verify(model, x, y, eps=0.001, method="bab", time_limit=30)
>>> result.status[0].value
'verified'
"""

from __future__ import annotations

import copy
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.verifiers import ops
from robustkit.verifiers.alpha_crown import AlphaCrownOptions, alpha_crown_bound
from robustkit.verifiers.base import (
    NEAR_ZERO,
    SpecResult,
    Status,
    VerificationResult,
    Verifier,
    check_labels,
    check_offset,
    input_box,
    margin_spec,
    output_size,
    validate_eps,
    validate_inputs,
)
from robustkit.verifiers.context import BoundContext, BoundResult, LayerBounds, make_context
from robustkit.verifiers.crown import Bounds, backward_bound, check_intermediate, intermediate_bounds, layer_bounds
from robustkit.verifiers.graph import INPUT, Graph, build_graph, node_shapes

logger = logging.getLogger(__name__)

__all__ = ["BabVerifier", "Outcome", "Problem"]

BRANCHING = ("babsr", "fsb")
SPLITS = ("auto", "relu", "input")
_BETAS = (0.9, 0.999)
#: Adam's learning rate for the root's slopes (alpha-crown's default); sub-problems start from their parent's
#: optimised slopes and take ``lr_alpha``
ROOT_LR = 0.5


@dataclass(frozen=True, eq=False)
class Problem:
    """One property over one box: ``rows`` (R, n_out) and ``offsets`` (R,) with group ids ``group`` (R,):
    the property holds at x when, for some group, every row r of it has rows[r] @ f(x) + offsets[r] > 0."""

    lower: Tensor
    upper: Tensor
    rows: Tensor
    offsets: Tensor
    group: Tensor

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1

    def value(self, bounds: Tensor) -> Tensor:
        """Per domain (D,), max over groups of the min over the group's rows of ``bounds`` (D, R): > 0 means
        the property holds on the domain (for lower bounds) or at the point (for values)."""
        index = self.group.unsqueeze(0).expand_as(bounds)
        worst = torch.full((bounds.shape[0], self.n_groups), math.inf, device=bounds.device, dtype=bounds.dtype)
        worst = worst.scatter_reduce(1, index, bounds, reduce="amin")
        return worst.max(1).values

    def violation(self, outputs: Tensor) -> Tensor:
        """The property's value at points with ``outputs`` (N, n_out): <= 0 at a counterexample."""
        values = outputs @ self.rows.to(outputs.dtype).T + self.offsets.to(outputs.dtype)
        return self.value(values)


@dataclass(frozen=True, eq=False)
class Outcome:
    """How one property ended: the status, a sound lower bound per row over the box, a re-checked
    counterexample (falsified only) and counts for the report."""

    status: Status
    lower: Tensor
    counterexample: Tensor | None
    domains: int
    seconds: float


@dataclass(eq=False)
class _Domain:
    """One open sub-problem of ReLU splitting: the split signs per node (int8, -1 / 0 / +1, of the node input's
    shape), its bound per row and the warm-start slopes and multipliers (R, *shape) per node."""

    splits: dict[int, Tensor]
    lower: Tensor
    alpha: dict[int, Tensor]
    beta: dict[int, Tensor]
    pre: dict[int, Bounds]
    scores: dict[int, Tensor] = field(default_factory=dict)
    point: Tensor | None = None
    depth: int = 0


@dataclass(frozen=True)
class BabVerifier(Verifier):
    """Branch and bound (see the module docstring); every option is keyword-only and validated."""

    name: ClassVar[str] = "bab"
    differentiable: ClassVar[bool] = False
    complete: ClassVar[bool] = True

    time_limit: float = 60.0
    branching: str = "babsr"
    split: str = "auto"
    input_split_below: int = 20
    batch_size: int = 64
    iterations: int = 10
    root_iterations: int = 20
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    intermediate: str = "crown+symbolic"
    fsb_candidates: int = 3
    attack_steps: int = 50
    attack_restarts: int = 5
    attack_every: int = 10
    memory_limit_gb: float = 4.0
    per_row: bool = True
    refine_intermediate: bool = False
    tolerance: float = 1e-5
    seed: int = 0
    #: called with (event, data) at every batch; tests use it to check every sub-problem's bound
    monitor: Callable[[str, dict[str, Tensor]], None] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_intermediate(self.intermediate)
        if self.branching not in BRANCHING:
            raise InputError(f"bab branching must be one of {', '.join(map(repr, BRANCHING))}, got {self.branching!r}")
        if self.split not in SPLITS:
            raise InputError(f"bab split must be one of {', '.join(map(repr, SPLITS))}, got {self.split!r}")
        for key in ("time_limit", "lr_alpha", "lr_beta", "memory_limit_gb", "tolerance"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or not value > 0):
                raise InputError(f"bab {key} must be a finite number > 0, got {value!r}")
        for key, least in (("batch_size", 1), ("iterations", 0), ("root_iterations", 0), ("fsb_candidates", 1),
                           ("attack_steps", 0), ("attack_restarts", 0), ("attack_every", 1),
                           ("input_split_below", 0), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"bab {key} must be an integer >= {least}, got {value!r}")

    # -- the Verifier interface -------------------------------------------------------------------------------

    def _root_options(self) -> AlphaCrownOptions:
        return AlphaCrownOptions(iterations=self.root_iterations, lr=ROOT_LR, intermediate=self.intermediate,
                                 memory_limit_gb=self.memory_limit_gb)

    def bound(self, ctx: BoundContext) -> BoundResult:
        """The root's bound (alpha-CROWN): what ``spec_bounds`` returns; ``verify`` and ``verify_spec`` search."""
        return BoundResult(alpha_crown_bound(ctx.graph, ctx.lower, ctx.upper, ctx.spec, self._root_options()),
                           LayerBounds())

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        """Decide every sample within ``time_limit`` seconds each; misclassified clean points are falsified by
        themselves."""
        eps = validate_eps(eps)
        x, labels = validate_inputs(model, x, y)
        assert labels is not None
        graph = build_graph(model)
        num_classes = output_size(graph, tuple(x.shape[1:]))
        check_labels(labels, num_classes)
        with torch.no_grad():
            logits = model(x)
        lower, upper = input_box(x, eps)
        make_context(model, lower[:1], upper[:1], margin_spec(labels[:1], num_classes)[0].to(x.dtype))
        prediction = logits.argmax(1)
        status, margins, times = [], torch.zeros(x.shape[0], num_classes), torch.zeros(x.shape[0])
        counterexample = torch.full_like(x, float("nan")).cpu()
        for b in range(x.shape[0]):
            clock = time.perf_counter()
            label = int(labels[b])
            if int(prediction[b]) != label:
                status.append(Status.FALSIFIED)
                counterexample[b] = x[b].cpu()
                margins[b] = (logits[b, label] - logits[b]).cpu()
                margins[b, label] = 0.0
            else:
                keep = [j for j in range(num_classes) if j != label]
                rows = margin_spec(labels[b:b + 1], num_classes)[0, keep].to(x.dtype)
                problem = Problem(lower[b:b + 1], upper[b:b + 1], rows, torch.zeros(len(keep), dtype=x.dtype,
                                  device=x.device), torch.zeros(len(keep), dtype=torch.long, device=x.device))
                outcome = self.decide(model, graph, problem)
                status.append(outcome.status)
                margins[b, keep] = outcome.lower.cpu().to(margins.dtype)
                if outcome.counterexample is not None:
                    counterexample[b] = outcome.counterexample.cpu()
            times[b] = time.perf_counter() - clock
        worst = margins.clone()
        worst[torch.arange(x.shape[0]), labels.cpu()] = math.inf
        return VerificationResult(self.name, eps, tuple(status), worst.min(1).values, margins, prediction.cpu(),
                                  times, counterexample)

    def verify_spec(self, model: nn.Module, lower: Tensor, upper: Tensor, spec: Tensor | list[Tensor],
                    offset: Tensor | list[Tensor] | None = None) -> SpecResult:
        """Decide ``spec @ f(x) + offset > 0`` (every row; a list: the disjunction) over the box, per sample,
        within ``time_limit`` seconds each."""
        specs = spec if isinstance(spec, list) else [spec]
        offsets: list[Tensor | None] = list(offset) if isinstance(offset, list) else [offset] * len(specs)
        if len(offsets) != len(specs) or not specs:
            raise InputError("verify_spec needs one offset per specification of the disjunction")
        contexts = [make_context(model, lower, upper, s) for s in specs]
        graph, lower, upper = contexts[0].graph, contexts[0].lower, contexts[0].upper
        shifts = []
        for ctx, shift in zip(contexts, offsets, strict=True):
            zero = torch.zeros(ctx.spec.shape[:2], device=lower.device, dtype=lower.dtype)
            shifts.append(zero if shift is None else zero + check_offset(shift, zero))
        status, bounds, times = [], [], []
        counterexample = torch.full_like(lower, float("nan"))
        for b in range(lower.shape[0]):
            clock = time.perf_counter()
            rows = torch.cat([ctx.spec[b] for ctx in contexts])
            shift = torch.cat([s[b] for s in shifts])
            group = torch.cat([torch.full((ctx.spec.shape[1],), g, dtype=torch.long, device=lower.device)
                               for g, ctx in enumerate(contexts)])
            outcome = self.decide(model, graph, Problem(lower[b:b + 1], upper[b:b + 1], rows, shift, group))
            status.append(outcome.status)
            bounds.append(outcome.lower.cpu())
            if outcome.counterexample is not None:
                counterexample[b] = outcome.counterexample
            times.append(time.perf_counter() - clock)
        return SpecResult(self.name, tuple(status), torch.stack(bounds), torch.tensor(times), counterexample.cpu())

    # -- one property ---------------------------------------------------------------------------------------

    def decide(self, model: nn.Module, graph: Graph, problem: Problem, deadline: float | None = None,
               precise: bool = False) -> Outcome:
        """Branch and bound on one property (see the module docstring) until ``deadline`` (perf_counter)."""
        start = time.perf_counter()
        deadline = start + self.time_limit if deadline is None else deadline
        with torch.no_grad():
            search = _Search(self, model, graph, problem, deadline)
            outcome = search.run()
        if (outcome.status is Status.VERIFIED and not precise
                and search.settled_min <= NEAR_ZERO * (1 + search.scale)):
            # the proof's tightest sub-problem is within float32 rounding error of zero: redo it in float64
            logger.info("bab: smallest proven bound %.3g is within float32 error; re-deciding in float64",
                        search.settled_min)
            double = copy.deepcopy(model).double()
            again = Problem(problem.lower.double(), problem.upper.double(), problem.rows.double(),
                            problem.offsets.double(), problem.group)
            outcome = self.decide(double, build_graph(double), again, deadline, precise=True)
            if outcome.counterexample is not None:
                outcome = Outcome(outcome.status, outcome.lower, outcome.counterexample.to(problem.lower.dtype),
                                  outcome.domains, outcome.seconds)
        return Outcome(outcome.status, outcome.lower.to(problem.lower.dtype), outcome.counterexample,
                       outcome.domains, time.perf_counter() - start)


class _Budget(Exception):
    """The open sub-problems would exceed the memory budget."""


class _Search:
    """The state of one branch and bound run."""

    def __init__(self, options: BabVerifier, model: nn.Module, graph: Graph, problem: Problem,
                 deadline: float) -> None:
        self.o, self.model, self.graph, self.p, self.deadline = options, model, graph, problem, deadline
        self.shapes = node_shapes(graph, tuple(problem.lower.shape[1:]))
        self.generator = torch.Generator(device=problem.lower.device).manual_seed(options.seed)
        self.spec = problem.rows.unsqueeze(0)  # (1, R, n_out)
        self.counter = itertools.count()
        self.settled_min = math.inf
        self.settled_rows = torch.full((problem.rows.shape[0],), math.inf, dtype=problem.lower.dtype,
                                       device=problem.lower.device)
        self._graph64: Graph | None = None
        self.domains = 0
        self.batches = 0
        #: the logits' magnitude at the box's centre (set by :meth:`run`): the float32 error allowance's scale
        self.scale = 0.0
        self.found: Tensor | None = None

    # -- helpers -----------------------------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        return time.perf_counter() >= self.deadline

    def check_points(self, points: Tensor) -> bool:
        """Forward pass at candidate points (N, *shape) inside the box; keeps the first counterexample."""
        if points.shape[0] == 0:
            return False
        points = torch.minimum(torch.maximum(points, self.p.lower), self.p.upper)
        values = self.p.violation(self.model(points))
        broken = torch.nonzero(values <= 0).flatten()
        if broken.numel():
            self.found = points[int(broken[0])].detach().clone()
            return True
        return False

    def attack(self, starts: Tensor, steps: int) -> bool:
        """PGD (signed gradient steps, step size decaying from a quarter of the box width) on the violation."""
        if steps == 0 or starts.shape[0] == 0:
            return self.check_points(starts)
        width = (self.p.upper - self.p.lower)
        x = starts.clone()
        for step in range(steps):
            if self.out_of_time():
                break
            with torch.enable_grad():
                x.requires_grad_(True)
                values = self.p.violation(self.model(x))
                (grad,) = torch.autograd.grad(values.sum(), x)
            x = x.detach()
            if bool((values.detach() <= 0).any()) and self.check_points(x):
                return True
            size = 0.25 * width * (1 - step / steps) + 0.01 * width
            x = torch.minimum(torch.maximum(x - size * grad.sign(), self.p.lower), self.p.upper)
        return self.check_points(x)

    def random_points(self, n: int) -> Tensor:
        noise = torch.rand((n, *self.p.lower.shape[1:]), generator=self.generator, device=self.p.lower.device,
                           dtype=self.p.lower.dtype)
        return self.p.lower + noise * (self.p.upper - self.p.lower)

    def outcome(self, status: Status, lower: Tensor) -> Outcome:
        found = self.found if status is Status.FALSIFIED else None
        return Outcome(status, lower.flatten(), found, self.domains, 0.0)

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        o, p = self.o, self.p
        centre = (p.lower + p.upper) / 2
        outputs = self.model(centre)
        self.scale = float(outputs.abs().max())
        if bool(p.violation(outputs)[0] <= 0):
            self.found = centre[0].clone()
            return self.outcome(Status.FALSIFIED, torch.full((p.rows.shape[0],), -math.inf))
        base, layers = intermediate_bounds(self.graph, p.lower, p.upper, self.spec, o.intermediate,
                                           o.memory_limit_gb)
        self.pre = layers.pre_activation
        self.splittable = [i for i in self.pre
                           if getattr(self.graph.nodes[i].op, "branch_point", None) is not None]
        self.sloped: dict[int, tuple[Tensor, Tensor]] = {}
        for index, (low, high) in self.pre.items():
            op = self.graph.nodes[index].op
            assert isinstance(op, ops.NonlinearOp)
            limits = op.slope_range(low, high)
            if limits is not None:
                self.sloped[index] = (limits[0].unsqueeze(1), limits[1].unsqueeze(1))
        root = self.root_domain(base)
        if self.verified(root.lower.unsqueeze(0))[0]:
            self.settle(root.lower.unsqueeze(0))
            return self.outcome(Status.VERIFIED, root.lower)
        n_inputs = ops.numel(tuple(p.lower.shape[1:]))
        starts = torch.cat([centre, self.random_points(o.attack_restarts)]) if o.attack_restarts else centre
        if root.point is not None:
            starts = torch.cat([root.point.unsqueeze(0), starts])
        if self.attack(starts, o.attack_steps):
            return self.outcome(Status.FALSIFIED, root.lower)
        if self.out_of_time():
            return self.outcome(Status.TIMEOUT, root.lower)
        use_input = o.split == "input" or (o.split == "auto" and (n_inputs < o.input_split_below
                                                                   or not self.has_unstable(root)))
        open_rows = (root.lower <= 0).nonzero().flatten().tolist()
        if o.per_row and p.n_groups == 1 and p.rows.shape[0] > 1:
            return self.row_by_row(root.lower, open_rows)  # also one open row: the proven ones leave the passes
        try:
            if use_input:
                return self.input_split(root.lower)
            return self.relu_split(root)
        except _Budget:
            return self.outcome(Status.MEMORY, root.lower)

    def row_by_row(self, root: Tensor, open_rows: list[int]) -> Outcome:
        """A conjunction holds when each of its rows does: every row the root leaves open is its own branch and
        bound (hardest first, one deadline), whose sub-problems then need to prove (and pay the backward passes
        of) one row instead of all. The first row falsified falsifies the property (its counterexample violates
        the conjunction); the first one left undecided ends the search with its status."""
        p = self.p
        lower = root.clone()
        domains = 0
        for row in sorted(open_rows, key=lambda r: float(root[r])):
            single = Problem(p.lower, p.upper, p.rows[row:row + 1], p.offsets[row:row + 1], p.group[row:row + 1])
            search = _Search(self.o, self.model, self.graph, single, self.deadline)
            found = search.run()
            domains += search.domains
            self.domains = domains
            lower[row] = torch.maximum(lower[row], found.lower[0])
            if found.status is Status.FALSIFIED:
                self.found = found.counterexample
                return self.outcome(Status.FALSIFIED, lower)
            if found.status is not Status.VERIFIED:
                return self.outcome(found.status, lower)
            self.settled_min = min(self.settled_min, search.settled_min)
        self.settled_rows = torch.minimum(self.settled_rows, lower)
        return self.outcome(Status.VERIFIED, lower)

    def verified(self, bounds: Tensor) -> Tensor:
        return self.p.value(bounds) > 0

    def settle(self, bounds: Tensor) -> None:
        """Record the bounds (D, R) of proven sub-problems: the smallest proven value decides whether the
        proof is redone in float64, and the per-row minimum is a lower bound of each row on the proven part."""
        if bounds.shape[0]:
            self.settled_min = min(self.settled_min, float(self.p.value(bounds).min()))
            self.settled_rows = torch.minimum(self.settled_rows, bounds.min(0).values.to(self.settled_rows.dtype))

    def lower_bound(self, open_bounds: list[Tensor], root: Tensor) -> Tensor:
        """A sound lower bound per row over the box: the minimum over the open and the proven sub-problems
        (they cover the box), or the root's bound where that is tighter (both are valid everywhere)."""
        found = self.settled_rows
        if open_bounds:
            found = torch.minimum(found, torch.stack(open_bounds).min(0).values)
        return torch.maximum(found, root)

    # -- ReLU splitting -------------------------------------------------------------------------------------

    def clamped(self, splits: dict[int, Tensor], base: dict[int, Bounds] | None = None) -> dict[int, Bounds]:
        """Bounds (D, *shape) of every non-linear node's input with the split neurons clamped: of ``base`` (the
        sub-problems' own bounds), by default the root's."""
        batch = next(iter(splits.values())).shape[0] if splits else 1
        pre = {}
        for index, (low, high) in (self.pre if base is None else base).items():
            low, high = low.expand(batch, *low.shape[1:]), high.expand(batch, *high.shape[1:])
            if index in splits:
                sign = splits[index]
                low = torch.where(sign > 0, low.clamp(min=0.0), low)
                high = torch.where(sign < 0, high.clamp(max=0.0), high)
            pre[index] = (low, high)
        return pre

    def evaluate(self, lower: Tensor, upper: Tensor, pre: dict[int, Bounds], alpha: dict[int, Tensor],
                 beta: dict[int, Tensor], splits: dict[int, Tensor], record: dict[int, Tensor] | None = None
                 ) -> Tensor:
        batch = lower.shape[0]
        spec = self.spec.expand(batch, -1, -1)
        terms = {index: -beta[index] * splits[index].unsqueeze(1).to(lower.dtype) for index in beta}
        found = backward_bound(self.graph, lower, upper, spec, pre, alpha, input_terms=terms, record=record)
        return found + self.p.offsets

    def refined(self, splits: dict[int, Tensor], base: dict[int, Bounds]) -> dict[int, Bounds]:
        """The sub-problems' bounds of every non-linear node's input: ``base`` (their parents' bounds) clamped
        at the splits and, with ``refine_intermediate``, tightened by CROWN's layer-by-layer passes over those
        clamped bounds (split neurons are linear there, so the later layers' bounds tighten); every bound is
        valid on its sub-problem, so intersecting them stays sound."""
        pre = self.clamped(splits, base)
        if not self.o.refine_intermediate or len(pre) < 2:
            return pre
        batch = next(iter(splits.values())).shape[0]
        lower = self.p.lower.expand(batch, *self.p.lower.shape[1:])
        upper = self.p.upper.expand(batch, *self.p.upper.shape[1:])
        found = layer_bounds(self.graph, lower, upper, pre, memory_limit_gb=self.o.memory_limit_gb).pre_activation
        return self.clamped(splits, found)

    def optimize(self, splits: dict[int, Tensor], alpha: dict[int, Tensor], beta: dict[int, Tensor],
                 iterations: int, lr_alpha: float, pre: dict[int, Bounds], start: Tensor | None = None
                 ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor], dict[int, Tensor]]:
        """Projected Adam on the slopes and multipliers of a batch of sub-problems with input bounds ``pre``;
        the best bound (D, R) per row (never below ``start``), the slopes and multipliers that gave it, and the
        last pass's record."""
        batch = next(iter(alpha.values())).shape[0] if alpha else (next(iter(splits.values())).shape[0]
                                                                    if splits else 1)
        lower = self.p.lower.expand(batch, *self.p.lower.shape[1:])
        upper = self.p.upper.expand(batch, *self.p.upper.shape[1:])
        values = {("a", k): v.clone() for k, v in alpha.items()}
        values.update({("b", k): v.clone() for k, v in beta.items()})
        moments = {key: (torch.zeros_like(v), torch.zeros_like(v)) for key, v in values.items()}
        best = None if start is None else start.clone()
        best_values = {key: v.clone() for key, v in values.items()}
        record: dict[int, Tensor] = {}
        for step in range(iterations + 1):
            leaves = {key: v.requires_grad_(step < iterations) for key, v in values.items()}
            record = {}
            with torch.enable_grad():
                bound = self.evaluate(lower, upper, pre, {k: leaves["a", k] for k in alpha},
                                      {k: leaves["b", k] for k in beta}, splits, record)
                grads = None
                if step < iterations and bound.requires_grad:
                    open_rows = ~self.verified(bound.detach())
                    grads = torch.autograd.grad((bound * open_rows.unsqueeze(1)).sum(), list(leaves.values()),
                                                allow_unused=True)
            bound = bound.detach()
            record = {k: v.detach() for k, v in record.items()}
            improved = torch.ones_like(bound, dtype=torch.bool) if best is None else bound > best
            best = bound if best is None else torch.where(improved, bound, best)
            for key, value in values.items():
                mask = improved.reshape(*improved.shape, *([1] * (value.dim() - 2)))
                best_values[key] = torch.where(mask, value.detach(), best_values[key])
            if grads is None or bool(self.verified(best).all()):
                break
            beta1, beta2 = _BETAS
            for (key, value), grad in zip(list(values.items()), grads, strict=True):
                if grad is None:
                    continue
                first, second = moments[key]
                first = beta1 * first + (1 - beta1) * grad
                second = beta2 * second + (1 - beta2) * grad * grad
                moments[key] = (first, second)
                move = (first / (1 - beta1 ** (step + 1))) / ((second / (1 - beta2 ** (step + 1))).sqrt() + 1e-8)
                if key[0] == "a":
                    low, high = self.sloped[key[1]]
                    updated = torch.minimum(torch.maximum(value.detach() + lr_alpha * move, low), high)
                else:
                    updated = (value.detach() + self.o.lr_beta * move).clamp(min=0.0)
                values[key] = updated
        assert best is not None
        return (best, {k: best_values["a", k] for k in alpha}, {k: best_values["b", k] for k in beta}, record)

    def root_domain(self, base: Tensor) -> _Domain:
        splits = {i: torch.zeros((1, *self.pre[i][0].shape[1:]), dtype=torch.int8, device=base.device)
                  for i in self.splittable}
        alpha = {}
        for index in self.sloped:
            op = self.graph.nodes[index].op
            assert isinstance(op, ops.NonlinearOp)
            slope = op.relaxation(*self.pre[index], ops.BACKWARD).lower_slope
            alpha[index] = slope.unsqueeze(1).expand(-1, self.p.rows.shape[0], *slope.shape[1:]).clone()
        start = base + self.p.offsets
        pre = self.clamped(splits)
        best, alpha, _, record = self.optimize(splits, alpha, {}, self.o.root_iterations, ROOT_LR, pre, start)
        beta = {i: torch.zeros((1, self.p.rows.shape[0], *self.pre[i][0].shape[1:]), device=base.device,
                               dtype=base.dtype) for i in self.splittable}
        domain = _Domain({i: s[0] for i, s in splits.items()}, best[0], {k: v[0] for k, v in alpha.items()},
                         {k: v[0] for k, v in beta.items()}, {i: (low[0], high[0]) for i, (low, high) in pre.items()})
        self.annotate([domain], best, record, splits, pre)
        return domain

    def has_unstable(self, domain: _Domain) -> bool:
        return any(bool(score.gt(-math.inf).any()) for score in domain.scores.values())

    def annotate(self, domains: list[_Domain], bounds: Tensor, record: dict[int, Tensor],
                 splits: dict[int, Tensor], pre: dict[int, Bounds]) -> None:
        """Branching scores of the unsplit unstable neurons (-inf elsewhere) and the bound's minimiser."""
        open_rows = (bounds <= 0).to(bounds.dtype)  # rows not yet proven carry the score
        open_rows = torch.where(open_rows.sum(1, keepdim=True) > 0, open_rows, torch.ones_like(open_rows))
        scores = {}
        for index in self.splittable:
            low, high = pre[index]
            coeff = record[index]  # (D, R, *shape) on the layer's output
            weights = open_rows.reshape(*open_rows.shape, *([1] * (coeff.dim() - 2)))
            unstable = (low < 0) & (high > 0) & (splits[index] == 0)
            width = (high - low).clamp(min=1e-12)
            intercept = torch.where(unstable, -low * high / width, torch.zeros_like(low))
            upper_gap = (coeff.clamp(max=0).abs() * weights).sum(1) * intercept
            lower_gap = (coeff.clamp(min=0) * weights).sum(1) * torch.minimum(high, -low).clamp(min=0) * unstable
            score = upper_gap + 0.5 * lower_gap
            scores[index] = torch.where(unstable, score, torch.full_like(score, -math.inf))
        coeff = record[INPUT]  # (D, R, *in_shape)
        worst = torch.where(open_rows > 0, bounds, torch.full_like(bounds, math.inf)).argmin(1)
        chosen = coeff[torch.arange(coeff.shape[0]), worst]
        points = torch.where(chosen > 0, self.p.lower, self.p.upper)
        for d, domain in enumerate(domains):
            domain.scores = {index: score[d] for index, score in scores.items()}
            domain.point = points[d]

    def choose(self, batch: list[_Domain]) -> list[tuple[int, int]]:
        """The neuron (node, flat index) to split in each domain."""
        flat = [torch.cat([d.scores[i].flatten() for i in self.splittable]) for d in batch]
        sizes = [self.pre[i][0][0].numel() for i in self.splittable]
        offsets = np.cumsum([0, *sizes])

        def locate(position: int) -> tuple[int, int]:
            k = int(np.searchsorted(offsets, position, side="right") - 1)
            return self.splittable[k], position - int(offsets[k])

        if self.o.branching == "babsr":
            return [locate(int(f.argmax())) for f in flat]
        k = self.o.fsb_candidates
        candidates = []
        for f in flat:
            count = min(k, int(torch.isfinite(f).sum()))
            top = torch.topk(f, max(count, 1)).indices.tolist()
            candidates.append([locate(t) for t in top])
        # estimate both children of every candidate with one pass at the parent's slopes and multipliers
        children, owners = [], []
        for d, (domain, options) in enumerate(zip(batch, candidates, strict=True)):
            for c, (node, index) in enumerate(options):
                for sign in (1, -1):
                    splits = {i: s.clone() for i, s in domain.splits.items()}
                    splits[node].view(-1)[index] = sign
                    children.append((domain, splits))
                    owners.append((d, c))
        stacked = {i: torch.stack([s[i] for _, s in children]) for i in self.splittable}
        alpha = {i: torch.stack([dom.alpha[i] for dom, _ in children]) for i in self.sloped}
        beta = {i: torch.stack([dom.beta[i] for dom, _ in children]) for i in self.splittable}
        count = len(children)
        base = self.stacked_pre([dom for dom, _ in children])
        bounds = self.evaluate(self.p.lower.expand(count, *self.p.lower.shape[1:]),
                               self.p.upper.expand(count, *self.p.upper.shape[1:]), self.clamped(stacked, base),
                               alpha, beta, stacked)
        parents = torch.stack([dom.lower for dom, _ in children])
        values = self.p.value(torch.maximum(bounds, parents))
        worst: dict[tuple[int, int], float] = {}
        for (d, c), value in zip(owners, values.tolist(), strict=True):
            worst[d, c] = min(worst.get((d, c), math.inf), value)
        picks = []
        for d, options in enumerate(candidates):
            scored = [worst[d, c] for c in range(len(options))]
            picks.append(options[scored.index(max(scored))])
        return picks

    @staticmethod
    def stacked_pre(domains: list[_Domain]) -> dict[int, Bounds]:
        """The domains' own bounds of every non-linear node's input, stacked (D, *shape)."""
        return {i: (torch.stack([d.pre[i][0] for d in domains]), torch.stack([d.pre[i][1] for d in domains]))
                for i in domains[0].pre}

    def domain_bytes(self, root: _Domain) -> int:
        values = sum(v.numel() for v in root.alpha.values()) + sum(v.numel() for v in root.beta.values())
        values += sum(2 * low.numel() for low, _ in root.pre.values())
        return 4 * values + sum(v.numel() for v in root.splits.values()) + 512

    def relu_split(self, root: _Domain) -> Outcome:
        o, p = self.o, self.p
        budget = max(2 * o.batch_size, int(o.memory_limit_gb * 2**30 // self.domain_bytes(root)))
        queue: list[tuple[float, int, _Domain]] = [(float(p.value(root.lower.unsqueeze(0))), 0, root)]
        self.domains = 1
        open_min = root.lower
        while queue:
            if self.out_of_time():
                return self.outcome(Status.TIMEOUT, self.open_lower(queue, open_min))
            batch = [heapq.heappop(queue)[2] for _ in range(min(o.batch_size, len(queue)))]
            splittable = [d for d in batch if self.has_unstable(d)]
            leaves = [d for d in batch if not self.has_unstable(d)]
            for leaf in leaves:
                decided = self.linear_leaf(leaf)
                if decided is None:
                    return self.outcome(Status.UNKNOWN, self.open_lower(queue, open_min))
                if decided is False:
                    return self.outcome(Status.FALSIFIED, self.open_lower(queue, open_min))
            if not splittable:
                continue
            picks = self.choose(splittable)
            children, parents = [], []
            for domain, (node, index) in zip(splittable, picks, strict=True):
                for sign in (1, -1):
                    splits = {i: s.clone() for i, s in domain.splits.items()}
                    splits[node].view(-1)[index] = sign
                    children.append(_Domain(splits, domain.lower, domain.alpha, domain.beta, domain.pre,
                                            depth=domain.depth + 1))
                    parents.append(domain.lower)
            stacked = {i: torch.stack([c.splits[i] for c in children]) for i in self.splittable}
            alpha = {i: torch.stack([c.alpha[i] for c in children]) for i in self.sloped}
            beta = {i: torch.stack([c.beta[i] for c in children]) for i in self.splittable}
            start = torch.stack(parents)
            pre = self.refined(stacked, self.stacked_pre(children))
            bounds, alpha, beta, record = self.optimize(stacked, alpha, beta, o.iterations, o.lr_alpha, pre, start)
            self.annotate(children, bounds, record, stacked, pre)
            for c, child in enumerate(children):
                child.pre = {i: (low[c], high[c]) for i, (low, high) in pre.items()}
                child.lower = bounds[c]
                child.alpha = {i: v[c] for i, v in alpha.items()}
                child.beta = {i: v[c] for i, v in beta.items()}
            self.batches += 1
            self.domains += len(children)
            proven = self.verified(bounds)
            if o.monitor is not None:
                o.monitor("batch", {"lower": bounds, "proven": proven,
                                    **{f"splits{i}": s for i, s in stacked.items()}})
            self.settle(bounds[proven])
            points = torch.stack([c.point for c in children if c.point is not None])
            if self.check_points(points):
                return self.outcome(Status.FALSIFIED, self.open_lower(queue, open_min))
            if self.batches % o.attack_every == 0 and o.attack_steps:
                order = torch.argsort(self.p.value(bounds))[: max(o.attack_restarts, 1)]
                if self.attack(points[order], o.attack_steps):
                    return self.outcome(Status.FALSIFIED, self.open_lower(queue, open_min))
            for c, child in enumerate(children):
                if not bool(proven[c]):
                    heapq.heappush(queue, (float(self.p.value(bounds[c:c + 1])), next(self.counter) + 1, child))
            if len(queue) > budget:
                logger.warning("bab: %d open sub-problems exceed the domain budget of %d (memory_limit_gb=%s)",
                               len(queue), budget, o.memory_limit_gb)
                raise _Budget
        return self.outcome(Status.VERIFIED, self.lower_bound([], root.lower))

    def open_lower(self, queue: list[tuple[float, int, _Domain]], root: Tensor) -> Tensor:
        return self.lower_bound([d.lower for _, _, d in queue], root)

    # -- linear leaves ------------------------------------------------------------------------------------------

    def linear_leaf(self, domain: _Domain) -> bool | None:
        """Decide a sub-problem whose every neuron is stable or split (the network is affine on it) by linear
        programs in float64: True (proven), False (counterexample found) or None (neither, numerically)."""
        from scipy.optimize import linprog

        p = self.p
        forms, constraints = self.affine_forms(domain)
        if forms is None:
            return None
        matrix, const = forms  # outputs = matrix @ x + const, float64
        rows = p.rows.double().cpu().numpy()
        offsets = p.offsets.double().cpu().numpy()
        objective, shift = rows @ matrix, rows @ const + offsets
        lower = p.lower.flatten().double().cpu().numpy()
        upper = p.upper.flatten().double().cpu().numpy()
        a_ub = b_ub = None
        if constraints:
            a_ub = -np.concatenate([c[0] for c in constraints])
            b_ub = np.concatenate([c[1] for c in constraints])
        minima, points = [], []
        for r in range(rows.shape[0]):
            found = linprog(objective[r], A_ub=a_ub, b_ub=b_ub, bounds=np.stack([lower, upper], 1), method="highs")
            if found.status == 2:  # infeasible: the splits exclude every point
                return True
            if found.status != 0:
                return None
            minima.append(found.fun + shift[r])
            points.append(found.x)
        minima_t = torch.tensor(minima).unsqueeze(0)
        margin = self.o.tolerance * (1 + abs(self.scale))
        if bool(p.value(minima_t - margin) > 0):
            self.settle(minima_t.to(p.lower.dtype))
            return True
        candidates = torch.tensor(np.stack(points), dtype=p.lower.dtype, device=p.lower.device)
        if self.check_points(candidates.view(-1, *p.lower.shape[1:])):
            return False
        return None

    def affine_forms(self, domain: _Domain) -> tuple[tuple[np.ndarray, np.ndarray] | None,
                                                     list[tuple[np.ndarray, np.ndarray]]]:
        """The network's outputs as one affine function of the flat input on the domain (float64), and the
        split constraints s * (A x + c) >= 0 as pairs (s A, s c); None when a layer is not piecewise linear."""
        n = ops.numel(tuple(self.p.lower.shape[1:]))
        dtype = torch.float64
        shape = tuple(self.p.lower.shape[1:])
        basis = torch.eye(n, dtype=dtype, device=self.p.lower.device).view(n, *shape)
        values: dict[int, tuple[Tensor, Tensor]] = {INPUT: (basis, torch.zeros((1, *shape), dtype=dtype,
                                                                                  device=basis.device))}
        constraints = []
        pre = self.clamped({i: s.unsqueeze(0) for i, s in domain.splits.items()}, self.stacked_pre([domain]))
        if self._graph64 is None:  # the layers in float64, so that the linear programs see exact forms
            self._graph64 = build_graph(copy.deepcopy(self.model).double())
        for index, node in enumerate(self._graph64.nodes):
            op = node.op
            inputs = [values[source] for source in node.inputs]
            if isinstance(op, ops.AffineOp):
                (lin, const), = inputs
                values[index] = (op.linear(lin), op.forward(const))
            elif isinstance(op, ops.AddOp):
                values[index] = (torch.stack([v[0] for v in inputs]).sum(0), torch.stack([v[1] for v in inputs]).sum(0))
            elif getattr(op, "branch_point", None) is not None and index in pre:
                (lin, const), = inputs
                low, high = (b[0].to(dtype) for b in pre[index])
                if bool(((low < 0) & (high > 0)).any()):
                    return None, []
                leak = float(getattr(op, "negative_slope", 0.0))
                slope = torch.where(low >= 0, torch.ones_like(low), torch.full_like(low, leak))
                if index in domain.splits:
                    sign = domain.splits[index].to(dtype)
                    chosen = sign != 0
                    if bool(chosen.any()):
                        flat_lin = lin.reshape(n, -1)[:, chosen.flatten()].T.cpu().numpy()
                        flat_const = const.reshape(-1)[chosen.flatten()].cpu().numpy()
                        s = sign.flatten()[chosen.flatten()].cpu().numpy()
                        constraints.append((s[:, None] * flat_lin, s * flat_const))
                values[index] = (lin * slope, const * slope)
            else:
                return None, []
        lin, const = values[len(self.graph.nodes) - 1]
        return (lin.reshape(n, -1).T.cpu().numpy(), const.reshape(-1).cpu().numpy()), constraints

    # -- input splitting ----------------------------------------------------------------------------------------

    def input_split(self, root_lower: Tensor) -> Outcome:
        o, p = self.o, self.p
        options = AlphaCrownOptions(iterations=o.iterations, lr=0.5, intermediate=o.intermediate,
                                    memory_limit_gb=o.memory_limit_gb)
        n_inputs = ops.numel(tuple(p.lower.shape[1:]))
        budget = max(2 * o.batch_size, int(o.memory_limit_gb * 2**30 // (16 * n_inputs + 4 * p.rows.shape[0] + 256)))
        queue: list[tuple[float, int, Tensor, Tensor, Tensor]] = [
            (float(p.value(root_lower.unsqueeze(0))), 0, p.lower[0], p.upper[0], root_lower)]
        self.domains = 1
        while queue:
            if self.out_of_time():
                return self.outcome(Status.TIMEOUT, self.open_boxes(queue, root_lower))
            batch = [heapq.heappop(queue) for _ in range(min(o.batch_size, len(queue)))]
            lows = torch.stack([b[2] for b in batch])
            highs = torch.stack([b[3] for b in batch])
            centres = (lows + highs) / 2
            with torch.enable_grad():
                probe = centres.clone().requires_grad_(True)
                values = p.violation(self.model(probe))
                (grad,) = torch.autograd.grad(values.sum(), probe)
            if bool((values <= 0).any()) and self.check_points(centres):
                return self.outcome(Status.FALSIFIED, self.open_boxes(queue, root_lower))
            score = ((highs - lows) * (grad.abs() + 1e-6)).flatten(1)
            dim = score.argmax(1)
            children_low, children_high, parents = [], [], []
            for d in range(len(batch)):
                low, high = lows[d].flatten().clone(), highs[d].flatten().clone()
                mid = (low[dim[d]] + high[dim[d]]) / 2
                left_high, right_low = high.clone(), low.clone()
                left_high[dim[d]], right_low[dim[d]] = mid, mid
                children_low += [low.view_as(lows[d]), right_low.view_as(lows[d])]
                children_high += [left_high.view_as(lows[d]), high.view_as(lows[d])]
                parents += [batch[d][4], batch[d][4]]
            clo, chi = torch.stack(children_low), torch.stack(children_high)
            spec = self.spec.expand(clo.shape[0], -1, -1)
            bounds = alpha_crown_bound(self.graph, clo, chi, spec, options) + p.offsets
            bounds = torch.maximum(bounds, torch.stack(parents))
            self.batches += 1
            self.domains += clo.shape[0]
            proven = self.verified(bounds)
            if o.monitor is not None:
                o.monitor("boxes", {"lower": bounds, "proven": proven, "box_lower": clo, "box_upper": chi})
            self.settle(bounds[proven])
            if self.check_points((clo + chi) / 2):
                return self.outcome(Status.FALSIFIED, self.open_boxes(queue, root_lower))
            if self.batches % o.attack_every == 0 and o.attack_steps:
                order = torch.argsort(p.value(bounds))[: max(o.attack_restarts, 1)]
                if self.attack(((clo + chi) / 2)[order], o.attack_steps):
                    return self.outcome(Status.FALSIFIED, self.open_boxes(queue, root_lower))
            for c in range(clo.shape[0]):
                if not bool(proven[c]):
                    heapq.heappush(queue, (float(p.value(bounds[c:c + 1])), next(self.counter) + 1, clo[c], chi[c],
                                           bounds[c]))
            if len(queue) > budget:
                logger.warning("bab: %d open boxes exceed the domain budget of %d (memory_limit_gb=%s)",
                               len(queue), budget, o.memory_limit_gb)
                raise _Budget
        return self.outcome(Status.VERIFIED, self.lower_bound([], root_lower))

    def open_boxes(self, queue: list[tuple[float, int, Tensor, Tensor, Tensor]], root: Tensor) -> Tensor:
        return self.lower_bound([entry[4] for entry in queue], root)
