"""Mixed-integer linear programs of ReLU networks (Tjeng, Xiao and Tedrake, arXiv:1711.07356), solved with
``scipy.optimize.milp`` (HiGHS): the encoding used by the ``exact`` verifier (:mod:`robustkit.verifiers.exact`).

Each bound operator encodes itself (``op.milp``): affine layers become sparse matrices (``op.milp_map``, the
Jacobian of ``op.linear`` on identity bases), so chains of affine layers and skip connections need no
variables; a ReLU with pre-activation bounds [l, u] is fixed at 0 when u <= 0, equal to its input when l >= 0,
and otherwise a binary d with the big-M encoding a >= 0, a >= z, a <= u d, a <= z - l (1 - d). A layer without
an encoding (a smooth activation) raises :class:`~robustkit.verifiers.ops.base.NotApplicable`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]

# Relative widening of the relaxation's pre-activation bounds, computed in the model's precision (float32 sums
# of hundreds of terms), so that the big-M constraints never cut off a point of the box.
BOUND_SLACK = 1e-5
# HiGHS stops at a relative gap of 1e-4 by default; minima should be exact to about its precision. The RINS and
# RENS sub-MIP heuristics take most of the root node's time on these problems: without them, solves are 2-3x
# faster on small networks and decisions 2-7x faster on the MNIST benchmark network.
_SOLVER_OPTIONS = {"mip_rel_gap": 1e-6, "mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False}
# ``verify`` needs only the sign of each minimum. HiGHS stops once (best - bound) <= gap * |best|: for a positive
# best value once the bound exceeds a tenth of it, which skips most of the work for margins far from zero.
_DECISION_GAP = 0.9


@dataclass(frozen=True)
class AffineMap:
    """One affine layer as y = matrix @ x + bias over flattened neurons (matrix sparse, out x in)."""

    matrix: sp.csr_matrix
    bias: Array


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
    """The MILP of one sample: variables, constraints, and the outputs as expressions of the variables."""

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
class MilpBuilder:
    """Collects variables (bounds, integrality) and constraint rows while :func:`encode` walks the graph; the
    operators' ``milp`` rules append to it."""

    bounds: list[tuple[Array, Array, bool]] = field(default_factory=list)
    rows: list[tuple[sp.csr_matrix, Array, Array]] = field(default_factory=list)
    n_vars: int = 0

    def variables(self, lower: Array, upper: Array, integer: bool = False) -> int:
        """Append variables with these bounds; returns the index of the first."""
        self.bounds.append((lower, upper, integer))
        self.n_vars += int(lower.shape[0])
        return self.n_vars - int(lower.shape[0])

    def widen(self, matrix: sp.csr_matrix) -> sp.csr_matrix:
        """``matrix`` over all the variables there are now."""
        return _widen(matrix, self.n_vars)

    def unit(self, indices: NDArray[np.intp], scale: Array | float = 1.0) -> sp.csr_matrix:
        """Rows selecting the variables ``indices`` (times ``scale``), over all the variables there are now."""
        values = np.broadcast_to(np.asarray(scale, dtype=np.float64), indices.shape)
        return sp.csr_matrix((values, (np.arange(indices.size), indices)), shape=(indices.size, self.n_vars))

    def finish(self, output: Expression, n_input: int) -> MilpEncoding:
        """The encoding, every row and the outputs widened to the final number of variables."""
        columns = self.n_vars
        integrality = np.concatenate([np.full(lo.size, int(integer), dtype=np.int8) for lo, _, integer in self.bounds])
        return MilpEncoding(
            lower=np.concatenate([lo for lo, _, _ in self.bounds]),
            upper=np.concatenate([hi for _, hi, _ in self.bounds]), integrality=integrality,
            constraints=sp.csr_matrix(sp.vstack([_widen(m, columns) for m, _, _ in self.rows], format="csr")),
            row_lower=np.concatenate([lo for _, lo, _ in self.rows]),
            row_upper=np.concatenate([hi for _, _, hi in self.rows]),
            output=Expression(_widen(output.matrix, columns), output.const), n_input=n_input,
            n_binary=int(integrality.sum()),
        )


@dataclass(frozen=True)
class MilpOutcome:
    """One minimisation: the proven lower bound (-inf when none), the best value and the input part of its
    solution (None when none was found), and whether the solver finished (to its gap)."""

    bound: float
    value: float | None
    solution: Array | None
    optimal: bool


def minimise(encoding: MilpEncoding, objective: Array, time_limit: float, decide: bool = False,
             relaxed: bool = False) -> MilpOutcome:
    """Minimise ``objective @ f(x)`` (objective over the flat outputs) within ``time_limit`` seconds.

    With ``decide`` the solver stops once the sign of the minimum is settled (``_DECISION_GAP``); with
    ``relaxed`` the binaries range over [0, 1]: the LP relaxation, whose optimum is a weaker lower bound.
    """
    start = time.perf_counter()
    cost = np.asarray(encoding.output.matrix.T @ objective).ravel()
    const = float(encoding.output.const @ objective)
    if not np.any(cost):  # constant over the box (e.g. every neuron it depends on is inactive)
        return MilpOutcome(const, const, encoding.lower[:encoding.n_input].copy(), True)
    # the constant enters as a variable fixed at 1, so that HiGHS' relative gap is that of the true objective
    columns = cost.size + 1
    matrix = _widen(encoding.constraints, columns)
    constraints = [LinearConstraint(matrix, encoding.row_lower, encoding.row_upper)] if matrix.shape[0] else []
    options: dict[str, Any] = {**_SOLVER_OPTIONS, "time_limit": max(time_limit, 1e-3)}
    options.update({"mip_rel_gap": _DECISION_GAP} if decide else {})
    with warnings.catch_warnings():  # scipy passes the HiGHS options it does not know on verbatim, as wanted
        warnings.filterwarnings("ignore", message="Unrecognized options detected", category=RuntimeWarning)
        result: Any = milp(
            np.append(cost, const), bounds=Bounds(np.append(encoding.lower, 1.0), np.append(encoding.upper, 1.0)),
            integrality=np.zeros(columns, dtype=np.int8) if relaxed else np.append(encoding.integrality, 0),
            constraints=constraints, options=options,
        )
    solution = None if result.x is None else np.asarray(result.x[:encoding.n_input], dtype=np.float64)
    value = None if result.fun is None or result.x is None else float(result.fun)
    optimal = result.status == 0
    if result.status not in (0, 1):
        # every point of the box has a feasible completion, so infeasibility or failure is numerical trouble
        logger.warning("MILP ended with status %d (%s); it gives no bound", result.status, result.message)
        bound = -math.inf
    elif result.mip_dual_bound is not None and math.isfinite(result.mip_dual_bound):
        bound = float(result.mip_dual_bound)
    else:  # an LP reports no MILP dual bound: its optimum is the bound
        bound = value if optimal and value is not None else -math.inf
    logger.debug("MILP: status %d, value %s, bound %.6g, %.2fs, %d binaries", result.status, value, bound,
                 time.perf_counter() - start, encoding.n_binary)
    return MilpOutcome(bound, value, solution, optimal)


def as_numpy(t: Tensor) -> Array:
    return np.asarray(t.detach().reshape(-1).cpu().double().numpy(), dtype=np.float64)
