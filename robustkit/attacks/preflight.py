"""Pre-flight checks: signs that gradient attacks will overestimate a model's robustness (gradient masking).

``preflight(model, x, y) -> PreflightReport`` runs four checks on up to :data:`MAX_POINTS` (100) points of the
batch (all of them when there are fewer; otherwise a random subset drawn with ``generator``, by default one
seeded with 0). It calls the model as the attacks will, in its current train/eval mode, and leaves its
parameters, ``.grad``, ``requires_grad`` flags, modes and the global random state as it found them. Each failed
check adds one readable line to ``warnings``; a well-behaved model gives ``warnings == ()``.

a. **Randomised outputs** (``randomised_outputs``): two identical forward passes on the same batch differ by more
   than :data:`OUTPUT_CHANGE_TOLERANCE` (1e-5) of the logit scale (the largest absolute logit). float32 rounds
   each operation to 2^-24 (6e-8) relative; repeated passes over the same batch on one backend agree bit for bit
   or, where a backend reorders its reductions between calls, differ by a few units in the last place of the
   largest partial sums, orders of magnitude below 1e-5 of the logit scale for networks of any usual size. A
   randomised defence (noise layers, dropout at test time, random input transforms) changes the logits far more
   (1e-3 relative or more), and an attack on one random draw overestimates its robustness.
b. **Probabilities instead of logits** (``output_kind``): every row is non-negative and sums to 1 within
   :data:`PROBABILITY_TOLERANCE` (1e-4; the rounding error of a float32 softmax over K classes is about
   K * 2^-24, below 1e-4 for up to ~1,600 classes, while a logit model meets the test on every row only by
   construction). Cross-entropy on probabilities (a second softmax) flattens the gradients that attacks
   follow. Rows whose logsumexp is 0 within the same tolerance are reported as ``log-probabilities`` without a
   warning: log-softmax adds one constant per row to the logits, which changes neither the cross-entropy nor
   the margin nor their gradients, so such a model masks nothing.
c. **Zero or non-finite input gradients** (``ce_gradient_zero``, ``margin_gradient_zero``, per checked point):
   the gradient with respect to the input of the cross-entropy loss, or of the margin f_y - max_{j != y} f_j, is
   exactly zero in every entry or holds NaN or infinity. It warns when more than :data:`ZERO_GRADIENT_THRESHOLD`
   (10%) of the checked points are affected: a ReLU network has a zero input gradient only where every path is
   inactive and a saturated cross-entropy only at margins beyond about 100, both rare, whereas a
   non-differentiable step (rounding, thresholding, a quantised input) or a saturated layer zeroes the
   gradient on most points, and gradient attacks cannot move there.
d. **Train mode** (``training_modules``): some module of the model is in training mode, so dropout and batch
   normalisation behave as in training (random, or dependent on the batch).

:func:`gradient_free_gap` is the fifth check, run after the attacks on per-sample success masks: points that a
gradient-free attack (one whose class sets ``gradient_free = True``, such as Square) broke and no gradient
attack did. Any such point is a sign of gradient masking.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
>>> x, y = torch.rand(8, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
>>> preflight(model, x, y).warnings
()
>>> report = preflight(nn.Sequential(model, nn.Softmax(dim=1)).eval(), x, y)
>>> report.output_kind, len(report.warnings)
('probabilities', 1)
>>> gradient_free_gap(torch.tensor([True, False, False]), torch.tensor([True, True, False])).count
1
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from robustkit.attacks.base import preserved_model, validate_batch
from robustkit.errors import InputError
from robustkit.gradients import ce_loss, margins

__all__ = [
    "CHECKS", "MAX_POINTS", "OUTPUT_CHANGE_TOLERANCE", "PROBABILITY_TOLERANCE", "ZERO_GRADIENT_THRESHOLD",
    "GradientFreeGap", "OutputKind", "PreflightReport", "gradient_flags", "gradient_free_gap", "preflight",
]

MAX_POINTS = 100
OUTPUT_CHANGE_TOLERANCE = 1e-5
PROBABILITY_TOLERANCE = 1e-4
ZERO_GRADIENT_THRESHOLD = 0.1
# the names of checks a to d, in the order of their warnings
CHECKS = ("randomised_outputs", "output_kind", "zero_gradient", "train_mode")
MAX_NAMED = 3  # modules named in the train-mode warning

OutputKind = Literal["logits", "probabilities", "log-probabilities"]


@dataclass(frozen=True, eq=False)
class PreflightReport:
    """The pre-flight checks of a model on ``indices`` (positions in the batch checked); see the module docstring.

    ``flagged`` names the failed checks (of :data:`CHECKS`) and ``warnings`` holds their messages, in that order.

    ``output_change`` is the largest change between the two identical passes relative to the logit scale (inf
    when one pass gave a non-finite value where the other did not); ``ce_gradient_zero`` and
    ``margin_gradient_zero`` are per checked point (on the CPU).
    """

    indices: Tensor
    randomised_outputs: bool
    output_change: float
    output_kind: OutputKind
    ce_gradient_zero: Tensor
    margin_gradient_zero: Tensor
    training_modules: tuple[str, ...]
    flagged: tuple[str, ...]
    warnings: tuple[str, ...]

    def warning(self, check: str) -> str | None:
        """The warning of ``check`` (one of :data:`CHECKS`), or None when it passed."""
        if check not in CHECKS:
            raise InputError(f"unknown pre-flight check {check!r}; the checks are {', '.join(CHECKS)}")
        return dict(zip(self.flagged, self.warnings, strict=True)).get(check)

    @property
    def n_checked(self) -> int:
        """How many points were checked."""
        return int(self.indices.numel())

    @property
    def zero_gradient(self) -> Tensor:
        """Per checked point: the cross-entropy or the margin gradient is zero or non-finite."""
        return self.ce_gradient_zero | self.margin_gradient_zero

    @property
    def zero_gradient_fraction(self) -> float:
        """Share of the checked points with a zero or non-finite gradient (check c)."""
        return int(self.zero_gradient.sum()) / max(self.n_checked, 1)

    @property
    def train_mode(self) -> bool:
        """Whether any module of the model is in training mode (check d)."""
        return bool(self.training_modules)


@dataclass(frozen=True, eq=False)
class GradientFreeGap:
    """Check e: ``points`` (per sample) broken by a gradient-free attack and by no gradient attack."""

    points: Tensor
    warning: str | None

    @property
    def count(self) -> int:
        """How many such points."""
        return int(self.points.sum())


def _bad(gradient: Tensor | None, like: Tensor) -> Tensor:
    """Per point: the gradient is zero in every entry or holds a non-finite value (None: not connected)."""
    if gradient is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    flat = gradient.flatten(1)
    return (flat == 0).all(1) | ~torch.isfinite(flat).all(1)


def _forked_random_state(device: torch.device) -> AbstractContextManager[object]:
    """The global random state (of the CPU and of ``device``) restored afterwards: a randomised model's draws
    here do not change the random numbers that the attacks see."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def gradient_flags(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per point (on the model's device): whether the input gradient of the cross-entropy loss, and that of the
    margin f_y - max_{j != y} f_j, is exactly zero or non-finite (check c). The model's state and the global
    random state are preserved."""
    x, y = validate_batch(model, x, y)
    with preserved_model(model), _forked_random_state(x.device), torch.enable_grad():
        point = x.detach().requires_grad_(True)
        logits = model(point)
        if logits.dim() != 2 or int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise InputError(f"the model must return (batch, classes) outputs and labels must be in [0, classes - 1], "
                             f"got outputs of shape {tuple(logits.shape)} and labels up to {int(y.max())}")
        if not logits.requires_grad:  # the outputs do not depend on the input through autograd at all
            return _bad(None, x), _bad(None, x)
        (ce_gradient,) = torch.autograd.grad(ce_loss(logits, y).sum(), point, retain_graph=True, allow_unused=True)
        (margin_gradient,) = torch.autograd.grad(margins(logits, y).sum(), point, allow_unused=True)
    return _bad(ce_gradient, x), _bad(margin_gradient, x)


def _output_change(first: Tensor, second: Tensor) -> float:
    """The largest difference between two passes relative to the largest absolute finite logit."""
    finite_first, finite_second = torch.isfinite(first), torch.isfinite(second)
    if not torch.equal(finite_first, finite_second):
        return math.inf
    if not bool(finite_first.any()):
        return 0.0
    change = float((first - second)[finite_first].abs().max())
    scale = max(float(first[finite_first].abs().max()), float(second[finite_first].abs().max()))
    if change == 0:
        return 0.0
    return change / scale if scale > 0 else math.inf


def _output_kind(logits: Tensor) -> OutputKind:
    if logits.shape[1] < 2 or not bool(torch.isfinite(logits).all()):
        return "logits"
    if bool((logits >= 0).all()) and float((logits.sum(1) - 1).abs().max()) <= PROBABILITY_TOLERANCE:
        return "probabilities"
    if float(torch.logsumexp(logits.double(), 1).abs().max()) <= PROBABILITY_TOLERANCE:
        return "log-probabilities"
    return "logits"


def _module_label(name: str, module: nn.Module) -> str:
    return f"the model itself ({type(module).__name__})" if name == "" else f"'{name}' ({type(module).__name__})"


def _warnings(report: PreflightReport, modules: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
    """``(check, warning)`` for every failed check, in the order of :data:`CHECKS`."""
    n = report.n_checked
    lines = []
    if report.randomised_outputs:
        lines.append((
            "randomised_outputs",
            f"randomised outputs: two identical forward passes differ by up to {report.output_change:.3g} of the "
            f"logit scale (float32 noise stays below {OUTPUT_CHANGE_TOLERANCE:g}): a randomised model or defence, "
            "whose robustness an attack on one random draw overestimates (attack the expectation over draws)",
        ))
    if report.output_kind == "probabilities":
        lines.append((
            "output_kind",
            f"the outputs look like probabilities, not logits (on all {n} checked points every row is non-negative "
            "and sums to 1): cross-entropy on probabilities flattens the gradients attacks follow; attack the "
            "logits (remove the final softmax)",
        ))
    bad = int(report.zero_gradient.sum())
    if bad > ZERO_GRADIENT_THRESHOLD * n:
        lines.append((
            "zero_gradient",
            f"zero or non-finite input gradients on {bad} of {n} checked points (cross-entropy "
            f"{int(report.ce_gradient_zero.sum())}, margin {int(report.margin_gradient_zero.sum())}; more than "
            f"{ZERO_GRADIENT_THRESHOLD:.0%}): a sign of gradient masking (a non-differentiable or saturated step); "
            "gradient attacks cannot move there, so check with a gradient-free attack",
        ))
    if report.train_mode:
        training = [(name, module) for name, module in modules if module.training]
        named = ", ".join(_module_label(name, module) for name, module in training[:MAX_NAMED])
        more = ", ..." if len(training) > MAX_NAMED else ""
        lines.append((
            "train_mode",
            f"the model is in training mode ({len(training)} of {len(modules)} modules: {named}{more}): dropout "
            "and batch normalisation behave as in training; call model.eval() before attacking",
        ))
    return lines


def preflight(
    model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None, max_points: int = MAX_POINTS,
) -> PreflightReport:
    """Checks a to d of the module docstring on up to ``max_points`` points of ``(x, y)``."""
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise InputError(f"max_points must be a positive integer, got {max_points!r}")
    n = x.shape[0] if isinstance(x, Tensor) and x.dim() >= 2 else 0
    if n > max_points and isinstance(y, Tensor) and y.shape == (n,):  # else validate_batch names the problem
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(n, generator=generator, device=generator.device)
        indices = order[:max_points].sort().values.cpu()
        x, y = x[indices.to(x.device)], y[indices.to(y.device)]
    else:
        indices = torch.arange(n)
    x, y = validate_batch(model, x, y)  # only the checked points are copied to the model's device
    modules = list(model.named_modules())
    with preserved_model(model), _forked_random_state(x.device), torch.no_grad():
        first, second = model(x), model(x)
    change = _output_change(first, second)
    ce_zero, margin_zero = gradient_flags(model, x, y)
    report = PreflightReport(
        indices=indices, randomised_outputs=change > OUTPUT_CHANGE_TOLERANCE, output_change=change,
        output_kind=_output_kind(first), ce_gradient_zero=ce_zero.cpu(), margin_gradient_zero=margin_zero.cpu(),
        training_modules=tuple(name for name, module in modules if module.training), flagged=(), warnings=(),
    )
    failed = _warnings(report, modules)
    return replace(report, flagged=tuple(c for c, _ in failed), warnings=tuple(w for _, w in failed))


def gradient_free_gap(gradient_broken: Tensor, gradient_free_broken: Tensor) -> GradientFreeGap:
    """Check e: the points broken by a gradient-free attack (``gradient_free_broken``, per sample) that no gradient
    attack broke (``gradient_broken``, per sample: broken by any of them), with a warning when there are any."""
    for name, mask in (("gradient_broken", gradient_broken), ("gradient_free_broken", gradient_free_broken)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise InputError(f"{name} must be a 1-D boolean tensor (one success flag per sample)")
    if gradient_broken.shape != gradient_free_broken.shape:
        raise InputError(f"the masks must have one entry per sample each, got {gradient_broken.shape[0]} and "
                         f"{gradient_free_broken.shape[0]}")
    points = gradient_free_broken & ~gradient_broken.to(gradient_free_broken.device)
    count, n = int(points.sum()), points.numel()
    warning = None
    if count:
        warning = (f"a gradient-free attack broke {count} of {n} points that no gradient attack broke: a sign of "
                   "gradient masking (the gradient attacks' robust accuracy overestimates the robustness)")
    return GradientFreeGap(points=points, warning=warning)
