"""``pgd``: Madry et al.'s adversarial training (*Towards Deep Learning Models Resistant to Adversarial Attacks*,
arXiv:1706.06083): minimise the cross-entropy at PGD adversarial examples of the current training radius.

The adversarial examples are searched with :class:`robustkit.attacks.PGD` (``steps`` steps of ``step_size``,
default 2.5 * eps / steps, from a random start) on the model in eval mode, so that batch-norm statistics are
not updated by the search; the loss is then taken in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustkit.errors import InputError
from robustkit.trainers.base import LossParts, Trainer, TrainState


@dataclass(frozen=True, kw_only=True)
class PGDTrainer(Trainer):
    """Adversarial training with PGD; see the module docstring."""

    name: ClassVar[str] = "pgd"
    steps: int = 40
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or (self.step_size is not None and not self.step_size > 0):
            raise InputError("pgd training needs steps >= 1 and a positive step size")

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        from robustkit.attacks import PGD

        if eps > 0:
            step = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
            attack = PGD(steps=self.steps, step_size=step, random_start=self.random_start, early_stop=False)
            state.model.eval()
            x_adv = attack(state.model, x, y, eps=eps, generator=state.attack_generator).x_adv
            state.model.train()
        else:
            x_adv = x
        logits = state.net(x_adv)
        loss = F.cross_entropy(logits, y)
        return LossParts(loss, float("nan"), robust=float(loss.detach()), correct=int((logits.argmax(1) == y).sum()),
                         count=len(y))
