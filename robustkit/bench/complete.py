"""The bench's complete stage: a complete verifier decides the undecided band, under a per-sample time budget.

After the relaxations and the attacks, every test sample is in one of three groups: verified by the best
relaxation, falsified (broken by an attack, clean-misclassified samples included), or neither, the *undecided
band*. Only the band goes to the complete verifier (``evaluation.complete``; ``auto`` takes the strongest one the
registry :data:`robustkit.verifiers.VERIFIERS` has that applies to the model, in the order of
:data:`~robustkit.bench.config.COMPLETE_PREFERENCE`), :data:`CHUNK` samples per call with at most
``evaluation.complete_time_limit`` seconds per sample, so the progress lines keep coming. A sample it falsifies
counts as falsified only when its counterexample passes the re-check (inside the eps-ball with
:data:`~robustkit.evaluation.TOLERANCE` of slack, in [0, 1], and misclassified by a fresh forward pass); one
that fails the re-check stays undecided, with a logged warning. Timeouts, memory stops and unknowns stay
undecided.

:func:`combine_band` joins the stages into the three fractions the bench records: ``verified_complete``
(verified by the best relaxation or by the complete stage), ``falsified`` (broken by an attack or falsified by
the complete stage) and ``undecided`` (the rest); a sample both verified and falsified is a soundness bug and
raises :class:`BandInvariantError`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustkit.bench.config import COMPLETE_PREFERENCE
from robustkit.errors import InputError
from robustkit.evaluation import TOLERANCE, EvalData, model_device
from robustkit.progress import format_seconds, log, progress
from robustkit.reports.records import BAND_METRICS

if TYPE_CHECKING:
    from robustkit.parallel import WorkerPool
    from robustkit.verifiers import VerificationResult

__all__ = [
    "BAND_METRICS", "CHUNK", "Band", "BandInvariantError", "CompleteChoice", "CompleteRun", "check_counterexamples",
    "choose_complete", "combine_band", "complete_methods", "complete_problem", "run_complete",
]

logger = logging.getLogger(__name__)

CHUNK = 10  # samples per call of the complete verifier: one progress step each


class BandInvariantError(RuntimeError):
    """A sample counted as both verified and falsified: an internal error, the sign of a soundness bug in a
    verifier or an attack (a sound verifier never proves a sample that has a re-checked adversarial example)."""


@dataclass(frozen=True)
class CompleteChoice:
    """The complete stage's verifier (None: no stage) and, without one, why not (one line)."""

    method: str | None
    reason: str = ""


def complete_methods() -> tuple[str, ...]:
    """The registered complete verifiers, strongest first: those of ``COMPLETE_PREFERENCE`` in its order, then
    any other complete verifier in registry order."""
    from robustkit.verifiers import VERIFIERS

    names = [name for name in VERIFIERS if VERIFIERS[name].complete]
    rank = {name: position for position, name in enumerate(COMPLETE_PREFERENCE)}
    return tuple(sorted(names, key=lambda name: rank.get(name, len(rank))))  # stable: registry order after


def _why_not(method: str, model: nn.Module) -> str | None:
    from robustkit.verifiers import VERIFIERS
    from robustkit.verifiers.graph import build_graph

    return VERIFIERS[method]().applicable(build_graph(model))


def choose_complete(setting: str, model: nn.Module) -> CompleteChoice:
    """The verifier of ``evaluation.complete = setting`` for ``model``: none for ``off``, the first applicable
    one of :func:`complete_methods` for ``auto`` (none when none applies, with every one's reason), the named one
    otherwise (an :class:`~robustkit.errors.InputError` when it does not apply)."""
    if setting == "off":
        return CompleteChoice(None, "evaluation.complete is off")
    if setting != "auto":
        problem = complete_problem(setting, model)
        if problem is not None:
            raise InputError(f"bench config: evaluation.complete: {problem}")
        return CompleteChoice(setting)
    reasons = []
    for method in complete_methods():
        why = _why_not(method, model)
        if why is None:
            return CompleteChoice(method)
        reasons.append(f"{method}: {why}")
    return CompleteChoice(None, "no complete verifier applies (" + ("; ".join(reasons) or "none registered") + ")")


def complete_problem(setting: str, model: nn.Module) -> str | None:
    """Why the complete verifier named by ``setting`` cannot run on ``model`` (None when it can, and for ``auto``
    and ``off``, which never fail): the bench checks this before training."""
    from robustkit.verifiers import VERIFIERS

    if setting in ("auto", "off"):
        return None
    if setting not in VERIFIERS or not VERIFIERS[setting].complete:
        return f"{setting!r} is not a complete verifier of this robustkit"
    why = _why_not(setting, model)
    return None if why is None else f"{setting} does not apply to the model: {why}"


def check_counterexamples(model: nn.Module, x: Tensor, y: Tensor, eps: float, counterexample: Tensor | None,
                          claimed: Tensor) -> tuple[Tensor, list[tuple[int, str]]]:
    """Per sample: whether the claimed counterexample (rows of ``counterexample`` where ``claimed``) is finite,
    inside the eps-ball around ``x`` (``TOLERANCE`` of slack), in [0, 1], and misclassified by a fresh forward
    pass (False where not claimed); and ``(position in x, why)`` for every claimed sample that fails."""
    accepted = torch.zeros(len(y), dtype=torch.bool)
    positions = claimed.nonzero().flatten()
    if not len(positions):
        return accepted, []
    if counterexample is None:
        return accepted, [(p, "reported falsified without a counterexample") for p in positions.tolist()]
    points = counterexample[positions].detach().cpu().to(x.dtype)
    flat = points.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(finite.view(-1, *([1] * (points.dim() - 1))), points, x[positions])
    distance = (safe - x[positions]).abs().flatten(1).amax(1)
    inside = finite & (distance <= eps + TOLERANCE) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
    with torch.no_grad():
        logits = model(safe.to(model_device(model))).cpu()
    prediction = logits.argmax(1)
    wrong = torch.isfinite(logits).all(1) & (prediction != y[positions])
    problems = []
    for row, position in enumerate(positions.tolist()):
        if inside[row] and wrong[row]:
            accepted[position] = True
            continue
        what = ("not finite" if not finite[row] else "outside the eps-ball or [0, 1]" if not inside[row]
                else "classified correctly by a fresh forward pass")
        problems.append((position, f"counterexample {what} (L-inf distance {float(distance[row]):.6g}, eps {eps:g}, "
                                   f"prediction {int(prediction[row])}, label {int(y[position])})"))
    return accepted, problems


@dataclass(frozen=True, eq=False)
class CompleteRun:
    """The complete stage on one model: the verifier (None: none ran, ``reason`` says why), its budget per
    sample, the band it ran on (positions among the N samples), its per-sample verified and falsified masks (N,;
    falsified only with a re-checked counterexample), the re-check failures and the stage's seconds."""

    method: str | None
    reason: str
    time_limit: float
    band: Tensor
    verified: Tensor
    falsified: Tensor
    rejected: tuple[str, ...]
    time_s: float
    #: band samples the verifier ran on (fewer than the band when the cell's budget ran out)
    attempted: int = 0
    budget: float = 0.0

    def config(self) -> str:
        """What ran, as the ``config`` text of the band's results rows (JSON: method, time_limit per sample in
        seconds, band size; method null and the reason when no complete verifier ran)."""
        if self.method is None:
            return json.dumps({"method": None, "reason": self.reason})
        found: dict[str, object] = {"method": self.method, "time_limit": self.time_limit, "band": len(self.band)}
        if self.budget > 0:
            found.update(budget=self.budget, attempted=self.attempted)
        return json.dumps(found)


def run_complete(model: nn.Module, data: EvalData, eps: float, choice: CompleteChoice, time_limit: float,
                 band: Tensor, budget: float = 0.0, pool: WorkerPool | None = None) -> CompleteRun:
    """Run ``choice``'s verifier on the samples of the boolean mask ``band`` (N,), :data:`CHUNK` per call of
    :func:`robustkit.verifiers.verify` with ``time_limit`` seconds per sample, the chunks in the processes of
    ``pool`` when given (one chunk per worker at a time); see the module docstring. With ``budget`` > 0 no chunk
    starts after ``budget`` seconds: the samples not reached stay undecided. Counterexamples are re-checked here,
    whoever found them."""
    from robustkit.verifiers import Status

    n = data.n
    positions = band.nonzero().flatten()
    verified = torch.zeros(n, dtype=torch.bool)
    falsified = torch.zeros(n, dtype=torch.bool)
    if choice.method is None:
        return CompleteRun(None, choice.reason, time_limit, positions, verified, falsified, (), 0.0)
    started = time.perf_counter()
    chunks = [positions[i:i + CHUNK] for i in range(0, len(positions), CHUNK)]

    def keep_going() -> bool:
        return budget <= 0 or time.perf_counter() - started < budget

    context = (model, data.split.x, data.split.y, eps, choice.method, time_limit)

    def in_order() -> Iterator[tuple[int, VerificationResult]]:
        for index, chunk in enumerate(chunks):
            if not keep_going():
                return
            yield index, _complete_task(context, chunk)

    results = (pool.run(_complete_task, context, chunks, keep_going=keep_going)
               if pool is not None and len(chunks) > 1 else in_order())
    rejected = []
    attempted = 0
    for index, result in progress(results, total=len(chunks), desc=f"complete {choice.method}", unit="chunk"):
        chunk = chunks[index]
        attempted += len(chunk)
        y = data.split.y[chunk]
        proven = torch.tensor([s is Status.VERIFIED for s in result.status], dtype=torch.bool)
        verified[chunk] = proven & (result.prediction.detach().cpu() == y)
        claimed = torch.tensor([s is Status.FALSIFIED for s in result.status], dtype=torch.bool)
        accepted, problems = check_counterexamples(model, data.split.x[chunk], y, eps, result.counterexample,
                                                   claimed)
        falsified[chunk] = accepted
        for position, why in problems:
            message = (f"{choice.method} at eps {eps:g}, test sample {data.start + int(chunk[position])}: {why}; "
                       "counted as undecided")
            logger.warning("complete stage: %s", message)
            rejected.append(message)
    seconds = time.perf_counter() - started
    reached = "" if attempted == len(positions) else f" ({attempted} reached within the {budget:g} s budget)"
    log(f"  stage complete {choice.method} on the {len(positions)} undecided samples{reached} (at most "
        f"{time_limit:g} s each): {format_seconds(seconds)}")
    return CompleteRun(choice.method, "", time_limit, positions, verified, falsified, tuple(rejected), seconds,
                       attempted, budget)


def _complete_task(context: tuple[nn.Module, Tensor, Tensor, float, str, float], chunk: Tensor) -> VerificationResult:
    """One chunk of :func:`run_complete`: the complete verifier on the samples at ``chunk``."""
    from robustkit.verifiers import verify

    model, x, y, eps, method, time_limit = context
    return verify(model, x[chunk], y[chunk], eps, method=method, time_limit=time_limit)


@dataclass(frozen=True, eq=False)
class Band:
    """Per sample (N,): verified (by the best relaxation or the complete stage), falsified (by an attack or the
    complete stage) and undecided (neither); disjoint, covering every sample."""

    verified: Tensor
    falsified: Tensor
    undecided: Tensor

    def fractions(self) -> dict[str, float]:
        """``verified_complete``, ``falsified`` and ``undecided`` as exact shares of the N samples."""
        n = max(self.verified.numel(), 1)
        return {metric: int(mask.sum()) / n for metric, mask in
                zip(BAND_METRICS, (self.verified, self.falsified, self.undecided), strict=True)}


def combine_band(verified_relaxation: Tensor, broken: Tensor, complete_verified: Tensor, complete_falsified: Tensor,
                 indices: Sequence[int] | None = None) -> Band:
    """Join the stages' per-sample masks (N,) into a :class:`Band`; ``broken`` is the attacks' worst case with the
    clean-misclassified samples. A sample both verified and falsified raises :class:`BandInvariantError` naming
    it (``indices``: the samples' test-split indices, default their positions) and which stages decided it."""
    verified = verified_relaxation | complete_verified
    falsified = broken | complete_falsified
    both = verified & falsified
    if bool(both.any()):
        names = list(range(len(both))) if indices is None else list(indices)
        details = []
        for position in both.nonzero().flatten().tolist()[:5]:
            by = [stage for stage, mask in (("the best relaxation", verified_relaxation),
                                            ("the complete stage", complete_verified)) if mask[position]]
            against = [stage for stage, mask in (("an attack or its clean prediction", broken),
                                                 ("the complete stage", complete_falsified)) if mask[position]]
            details.append(f"test sample {names[position]} verified by {' and '.join(by)} but falsified by "
                           f"{' and '.join(against)}")
        raise BandInvariantError(f"internal error, a soundness bug: {int(both.sum())} sample(s) both verified and "
                                 f"falsified ({'; '.join(details)})")
    return Band(verified, falsified, ~verified & ~falsified)
