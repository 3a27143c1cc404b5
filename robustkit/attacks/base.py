"""What every attack shares: validation, the threat model's projection, restarts and the success re-check.

An attack is pure configuration (a frozen, keyword-only dataclass); the model comes at call time:
``attack(model, x, y, eps=0.1, generator=g) -> AttackResult``. The base class validates the inputs, leaves
the model's parameters, ``.grad``, ``requires_grad`` flags and train/eval modes exactly as it found them,
runs the attack (with restarts on the samples still robust, keeping each sample's best point), projects the
result into the threat model's ball and [0, 1], and re-checks success with a fresh forward pass. A concrete
attack implements one method, :meth:`Attack.run`.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.errors import InputError
from robustkit.gradients import margins, project

NORMS = ("linf", "l2")


@dataclass(frozen=True, eq=False)
class AttackResult:
    """Outcome of an attack on a batch.

    ``x_adv`` is always inside the eps-ball (of ``norm``) around x and inside [0, 1]; ``success`` is True
    where a fresh forward pass misclassifies ``x_adv`` (clean-misclassified samples are successes with
    ``x_adv = x``); ``margin`` is f_y - max_{j != y} f_j at ``x_adv`` (negative where broken).
    """

    attack: str
    eps: float
    norm: str
    x_adv: Tensor
    success: Tensor
    margin: Tensor
    prediction: Tensor
    time_s: float

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples the attack did not break (clean-misclassified ones count as broken)."""
        return float((~self.success).float().mean())


@contextmanager
def preserved_model(model: nn.Module) -> Iterator[None]:
    """Freeze the parameters for the attack and restore ``requires_grad``, ``.grad`` and modes afterwards."""
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    grads = [p.grad for p in parameters]
    modes = [(m, m.training) for m in model.modules()]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag, grad in zip(parameters, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode


def default_generator(device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    return generator


@dataclass(frozen=True, kw_only=True)
class Attack(ABC):
    """Base of all attacks: configuration only; call it with a model and a batch."""

    name: ClassVar[str]
    # True for attacks that never use the model's gradients (score- or decision-based, such as Square): points they
    # break that no gradient attack broke are a sign of gradient masking (robustkit.attacks.preflight)
    gradient_free: ClassVar[bool] = False

    @property
    def threat(self) -> str:
        """The norm of the threat model (``linf`` or ``l2``)."""
        return "linf"

    @property
    def attempts(self) -> int:
        """How many times :meth:`run` is tried on the samples still robust (restarts)."""
        return 1

    @abstractmethod
    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """Candidate adversarial points for the batch (projected and re-checked by the caller)."""

    def validate_eps(self, eps: float) -> float:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(float(eps)) or eps < 0:
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        if self.threat == "linf" and eps > 1:
            raise InputError(f"L-inf eps must be in [0, 1] (inputs live in [0, 1]), got {eps}")
        return float(eps)

    def prepare(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator | None
    ) -> tuple[float, Tensor, Tensor, torch.Generator]:
        """The validated eps, batch (on the model's device) and generator of a call; warns (on behalf of the
        caller of ``__call__``) when the model is in training mode."""
        eps = self.validate_eps(eps)
        x, y = validate_batch(model, x, y)
        generator = generator if generator is not None else default_generator(x.device)
        if model.training:
            warnings.warn("the model is in training mode; attacks normally run on a model in eval mode",
                          stacklevel=3)
        return eps, x, y, generator

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, generator: torch.Generator | None = None
    ) -> AttackResult:
        start = time.perf_counter()
        eps, x, y, generator = self.prepare(model, x, y, eps, generator)
        with preserved_model(model), torch.no_grad():
            logits = model(x)
            if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
                raise InputError(f"labels must be in [0, {logits.shape[1] - 1}]")
            best = x.clone()
            best_margin = margins(logits, y)
            for _ in range(self.attempts):
                todo = best_margin >= 0
                if not bool(todo.any()):
                    break
                candidate = project(self.run(model, x[todo], y[todo], eps, generator), x[todo], eps, self.threat)
                candidate_margin = margins(model(candidate), y[todo])
                better = candidate_margin < best_margin[todo]
                index = todo.nonzero().squeeze(1)[better]
                best[index] = candidate[better]
                best_margin[index] = candidate_margin[better]
            final_logits = model(best)
        final_margin = margins(final_logits, y)
        prediction = final_logits.argmax(1)
        return AttackResult(
            attack=repr(self), eps=eps, norm=self.threat, x_adv=best, success=prediction != y,
            margin=final_margin, prediction=prediction, time_s=time.perf_counter() - start,
        )


def validate_batch(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs in [0, 1] without NaN and integer labels of matching length, on the model's device."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise InputError("x must be a non-empty floating-point tensor of shape (batch, *input_shape)")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or infinite values")
    if float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6:
        raise InputError(f"x must lie in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.shape != (x.shape[0],):
        raise InputError(f"y must be an integer tensor of shape ({x.shape[0]},)")
    device = next((t.device for t in list(model.parameters()) + list(model.buffers())), x.device)
    return x.to(device).clamp(0, 1), y.to(device=device, dtype=torch.int64)
