"""Projected gradient descent (Madry et al., *Towards Deep Learning Models Resistant to Adversarial Attacks*,
arXiv:1706.06083), L-inf and L2, with the cross-entropy or the Carlini-Wagner margin loss.

Threat model: white box; ``x`` (B, *shape) in [0, 1]; ``eps`` in input units. Each step moves along the sign
of the loss gradient (L-inf) or along the normalised gradient (L2) by ``step_size`` and projects back into
the eps-ball and [0, 1]. Every iterate is scored by its margin f_y - max_{j != y} f_j and each sample keeps
its best one; with ``early_stop`` a sample stops moving once it is misclassified. ``restarts`` repeats the
attack from fresh random starts on the samples still robust.

Defaults: 40 steps; step size ``rel_step_size * eps`` with ``rel_step_size`` = 0.01/0.3 for L-inf (0.01 per
step at eps 0.3, Madry's MNIST setting, also foolbox's default) and 0.025 for L2; random start; 1 restart.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> result = PGD(steps=10)(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.base import NORMS, Attack
from robustkit.errors import InputError
from robustkit.gradients import LOSSES, gradient_steps, random_start


@dataclass(frozen=True, kw_only=True)
class PGD(Attack):
    """Projected gradient descent; see the module docstring for the defaults."""

    name: ClassVar[str] = "pgd"
    norm: str = "linf"
    loss: str = "ce"
    steps: int = 40
    step_size: float | None = None
    rel_step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {tuple(LOSSES)}, got {self.loss!r}")
        if self.steps < 0 or self.restarts < 1:
            raise InputError("steps must be >= 0 and restarts >= 1")
        for value in (self.step_size, self.rel_step_size):
            if value is not None and not value > 0:
                raise InputError(f"step sizes must be positive, got {value}")

    @property
    def threat(self) -> str:
        return self.norm

    @property
    def attempts(self) -> int:
        return self.restarts

    def absolute_step(self, eps: float) -> float:
        if self.step_size is not None:
            return self.step_size
        default = 0.01 / 0.3 if self.norm == "linf" else 0.025
        relative = self.rel_step_size if self.rel_step_size is not None else default
        return relative * eps

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        start = random_start(x, eps, self.norm, generator) if self.random_start else x
        best, _ = gradient_steps(
            model, x, y, start, eps=eps, steps=self.steps, step_size=self.absolute_step(eps),
            loss=LOSSES[self.loss], norm=self.norm, early_stop=self.early_stop,
        )
        return best


@dataclass(frozen=True, kw_only=True)
class CWLinf(PGD):
    """``cw-linf``: PGD in the L-inf ball with the Carlini-Wagner margin loss (Carlini & Wagner,
    *Towards Evaluating the Robustness of Neural Networks*, arXiv:1608.04644)."""

    name: ClassVar[str] = "cw-linf"
    loss: str = "cw"
