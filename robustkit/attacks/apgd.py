"""Auto-PGD (Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks*, arXiv:2003.01690), L-inf and L2, with the cross-entropy or the DLR loss, untargeted
or targeted.

Threat model: white box; ``x`` (B, *shape) in [0, 1]; ``eps`` in input units. APGD is PGD without a step-size
parameter. Step k takes z = P(x_k + eta * sign(grad)) (the normalised gradient for L2) and moves with momentum,
x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})), P the projection onto the eps-ball and
[0, 1]. The step size eta starts at 2 eps and is halved at the checkpoints w_j = ceil(p_j * steps), p_0 = 0,
p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (:func:`checkpoints`; 22, 41, 57, 70, 80, 87, 93
and 99 for 100 steps), for each sample where

1. fewer than ``rho`` of the steps since the last checkpoint increased the loss, or
2. the step size was not halved at the last checkpoint and the best loss has not grown since then (from the
   second checkpoint on, as in the reference code);

a halving sample restarts from its best point (highest loss so far) with the gradient there. Losses:
``ce`` (cross-entropy) and ``dlr``, the difference of logits ratio -(z_y - max_{i != y} z_i) /
(z_pi1 - z_pi3 + 1e-12) (pi sorts the logits in decreasing order; needs 3 classes). With ``targeted`` the
attack runs once per target class t, the ``n_target_classes`` classes with the highest clean logits other
than y, each on the samples still robust, ascending the targeted DLR loss -(z_y - z_t) /
(z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (needs 4 classes), or -CE(z, t) for ``loss="ce"``. AutoAttack's
APGD-CE is ``APGD()``, its APGD-T ``APGD(loss="dlr", targeted=True)``.

Each sample stops at its first misclassified iterate (``early_stop``; the samples left keep the trajectory they
would have had, up to floating-point effects of the batch size, so this only saves time); a sample never broken
returns its highest-loss point. ``restarts`` repeats the attack from fresh uniform random starts in the ball on
the samples still robust (for targeted runs, each restart goes through all target classes). All randomness
comes from the generator.

Defaults, from the paper and AutoAttack's standard version: 100 steps, 1 restart, initial step 2 eps,
momentum alpha = 0.75 (no momentum on the first step), rho = 0.75, 9 target classes, random start. Where the
paper and the reference code differ or the code adds detail: condition 1 counts strictly fewer than rho (the
paper; the code uses at most), the first loss comparison after a halving is against the restart point's loss
(the paper's x_{k+1} = x_max), and the random start is uniform in the ball (robustkit's shared
:func:`~robustkit.gradients.random_start`; the code scales uniform noise so that its largest coordinate is eps).

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> result = APGD(steps=10)(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
>>> checkpoints(100)
(22, 41, 57, 70, 80, 87, 93, 99)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import NORMS, Attack
from robustkit.errors import InputError
from robustkit.gradients import margins, project, random_start

__all__ = ["APGD", "checkpoints", "dlr_loss", "targeted_dlr_loss"]

APGD_LOSSES = ("ce", "dlr")
# a loss to maximise from (logits, true labels, target labels); untargeted losses ignore the targets
Loss = Callable[[Tensor, Tensor, Tensor], Tensor]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12) per sample (to maximise; positive when broken)."""
    top = logits.topk(3, dim=1).values
    return -margins(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) per sample (to maximise)."""
    top = logits.topk(4, dim=1).values
    difference = logits.gather(1, y.unsqueeze(1)).squeeze(1) - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return -difference / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def _ce(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _targeted_ce(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    return -F.cross_entropy(logits, target, reduction="none")


def _dlr(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    return dlr_loss(logits, y)


def checkpoints(steps: int) -> tuple[int, ...]:
    """The iterations w_j = ceil(p_j * steps) after which APGD checks its step size (distinct, in 1..steps)."""
    found: list[int] = []
    previous, current = 0, 22  # p_j in hundredths, so that the recursion is exact
    while current <= 100:
        iteration = -(-current * steps // 100)
        if iteration >= 1 and (not found or iteration > found[-1]):
            found.append(iteration)
        previous, current = current, current + max(current - previous - 3, 6)
    return tuple(found)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _select(mask: Tensor, chosen: Tensor, other: Tensor) -> Tensor:
    """Per sample, ``chosen`` where ``mask`` else ``other``: ``torch.where`` with the (B,) mask broadcast over the
    sample is about 3x slower on CPU than ``lerp`` with 0/1 weights, which is exact (lerp computes end - (end -
    start) * 0 for weight 1) for finite values; the loop does this twice per step."""
    return torch.lerp(other, chosen, _view(mask.to(other.dtype), other))


@dataclass(frozen=True, kw_only=True)
class APGD(Attack):
    """Auto-PGD; see the module docstring for the algorithm and the defaults."""

    name: ClassVar[str] = "apgd"
    norm: str = "linf"
    loss: str = "ce"
    targeted: bool = False
    n_target_classes: int = 9
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.loss not in APGD_LOSSES:
            raise InputError(f"loss must be one of {APGD_LOSSES}, got {self.loss!r}")
        if self.steps < 1 or self.restarts < 1 or self.n_target_classes < 1:
            raise InputError("steps, restarts and n_target_classes must be >= 1")
        if not (0 < self.rho <= 1 and 0 < self.momentum <= 1):
            raise InputError(f"rho and momentum must be in (0, 1], got {self.rho} and {self.momentum}")

    @property
    def threat(self) -> str:
        return self.norm

    @property
    def attempts(self) -> int:
        return self.restarts

    def loss_function(self, n_classes: int) -> Loss:
        """The per-sample loss that the attack ascends."""
        needed = 4 if self.targeted else 3
        if self.loss == "dlr" and n_classes < needed:
            kind = "targeted DLR" if self.targeted else "DLR"
            raise InputError(f"the {kind} loss needs at least {needed} classes, the model has {n_classes}")
        if self.loss == "dlr":
            return targeted_dlr_loss if self.targeted else _dlr
        return _targeted_ce if self.targeted else _ce

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        if not self.targeted:  # one sample tells the number of classes
            loss = self.loss_function(model(x[:1]).shape[1])
            return self.ascend(model, x, y, y, eps, generator, loss)[0]
        logits = model(x)
        loss = self.loss_function(logits.shape[1])
        # the targets: the classes other than y, in decreasing order of their clean logits
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        targets = others.argsort(1, descending=True)[:, : min(self.n_target_classes, logits.shape[1] - 1)]
        best = x.clone()
        best_margin = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        robust = torch.ones_like(y, dtype=torch.bool)
        for column in range(targets.shape[1]):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            points, broken = self.ascend(model, x[index], y[index], targets[index, column], eps, generator, loss)
            margin = torch.where(broken, float("-inf"), margins(model(points), y[index]))
            better = margin < best_margin[index]
            best[index[better]] = points[better]
            best_margin[index[better]] = margin[better]
            robust[index[broken]] = False
        return best

    def ascend(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, eps: float, generator: torch.Generator,
        loss: Loss,
    ) -> tuple[Tensor, Tensor]:
        """One APGD run from a random start: each sample's first misclassified iterate (or, if it has none, its
        highest-loss point) and whether it was misclassified."""
        out = random_start(x, eps, self.norm, generator)
        broken = torch.zeros_like(y, dtype=torch.bool)
        logits, value, grad = _loss_and_gradient(model, out, y, target, loss)
        run = _Run(
            index=torch.arange(x.shape[0], device=x.device), x=x, y=y, target=target,
            lower=(x - eps).clamp(min=0), upper=(x + eps).clamp(max=1), point=out.clone(), previous=out.clone(),
            grad=grad, value=value, value_before=value, best=out.clone(), best_grad=grad.clone(), best_value=value,
            increases=torch.zeros_like(value), best_at_check=value, halved_at_check=torch.ones_like(broken),
            step=torch.full_like(value, 2 * eps),
        )
        marks, last_mark = set(checkpoints(self.steps)), 0
        for iteration in range(self.steps + 1):
            if iteration > 0:
                run.increases += run.value > run.value_before
                run.value_before = run.value
                improved = run.value > run.best_value
                run.best = _select(improved, run.point, run.best)
                run.best_grad = _select(improved, run.grad, run.best_grad)
                run.best_value = torch.maximum(run.value, run.best_value)
            fooled = logits.argmax(1) != run.y
            if bool(fooled.any()):
                first = fooled & ~broken[run.index]
                out[run.index[first]] = run.point[first]
                broken[run.index[first]] = True
                if self.early_stop:
                    if bool(fooled.all()):
                        return out, broken
                    run.keep(~fooled)
                    logits = logits[~fooled]
            if iteration == self.steps:
                break
            if iteration in marks:
                self.check_step_size(run, iteration - last_mark)
                last_mark = iteration
            logits = self.take_step(model, run, eps, loss, gradient=iteration + 1 < self.steps)
        robust = ~broken[run.index]
        out[run.index[robust]] = run.best[robust]
        return out, broken

    def check_step_size(self, run: _Run, window: int) -> None:
        """At a checkpoint: halve the step of the samples meeting condition 1 or 2 and restart them from their
        best point."""
        halve = (run.increases < self.rho * window) | (~run.halved_at_check & (run.best_value <= run.best_at_check))
        run.step = torch.where(halve, run.step / 2, run.step)
        run.point = _select(halve, run.best, run.point)
        run.grad = _select(halve, run.best_grad, run.grad)
        run.value_before = torch.where(halve, run.best_value, run.value_before)
        run.increases = torch.zeros_like(run.increases)
        run.best_at_check, run.halved_at_check = run.best_value, halve

    def take_step(self, model: nn.Module, run: _Run, eps: float, loss: Loss, gradient: bool = True) -> Tensor:
        """One step with momentum (none on the first); updates the run and returns the logits at the new point.

        Without ``gradient`` (the last step, whose gradient no step would follow) only the loss is computed there:
        a forward pass instead of a forward and a backward one, and ``run.grad`` keeps the previous gradient,
        which nothing reads after the last step."""
        if self.norm == "linf":
            direction = run.grad.sign()
        else:
            direction = run.grad / _view(run.grad.flatten(1).norm(dim=1).clamp(min=1e-12), run.grad)
        moved = self.clip(torch.addcmul(run.point, _view(run.step, run.point), direction), run, eps)
        if run.steps_taken > 0:  # alpha z + (1 - alpha)(2 x_k - x_{k-1}) = x_k + alpha (z - x_k) + (1 - alpha)(...)
            moved = self.clip(torch.lerp((run.point - run.previous).add_(run.point), moved, self.momentum), run, eps)
        run.previous, run.point = run.point, moved
        run.steps_taken += 1
        if not gradient:
            logits: Tensor = model(moved)
            run.value = loss(logits, run.y, run.target)
            return logits
        logits, run.value, run.grad = _loss_and_gradient(model, moved, run.y, run.target, loss)
        return logits

    def clip(self, candidate: Tensor, run: _Run, eps: float) -> Tensor:
        """Projection onto the eps-ball and [0, 1] (in place for L-inf: ``candidate`` is always a fresh tensor)."""
        return candidate.clamp_(run.lower, run.upper) if self.norm == "linf" else project(candidate, run.x, eps, "l2")


@dataclass(eq=False)
class _Run:
    """The per-sample state of the samples still running in :meth:`APGD.ascend`, compacted when some break."""

    index: Tensor
    x: Tensor
    y: Tensor
    target: Tensor
    lower: Tensor
    upper: Tensor
    point: Tensor
    previous: Tensor
    grad: Tensor
    value: Tensor
    value_before: Tensor
    best: Tensor
    best_grad: Tensor
    best_value: Tensor
    increases: Tensor
    best_at_check: Tensor
    halved_at_check: Tensor
    step: Tensor
    steps_taken: int = 0

    def keep(self, mask: Tensor) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                setattr(self, field.name, value[mask])


def _loss_and_gradient(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, loss: Loss) -> tuple[Tensor, ...]:
    """Logits, per-sample loss and its input gradient at x: one forward and one backward pass."""
    point = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(point)
        value = loss(logits, y, target)
        (grad,) = torch.autograd.grad(value.sum(), point)
    return logits.detach(), value.detach(), grad
