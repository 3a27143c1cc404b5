"""``standard``: cross-entropy on clean inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from robustkit.trainers.base import LossParts, Trainer, TrainState, natural_loss


@dataclass(frozen=True, kw_only=True)
class StandardTrainer(Trainer):
    """Plain training: minimise the cross-entropy of the clean batch."""

    name: ClassVar[str] = "standard"

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        loss, logits = natural_loss(state.net, x, y)
        return LossParts(loss, float(loss.detach()), correct=int((logits.argmax(1) == y).sum()), count=len(y))
