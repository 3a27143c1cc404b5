"""``verifiable``: the robust loss on every sample (the MixTrain paper's "full verifiable training").

L = kappa * L_nat + (1 - kappa) * L_rob, where L_rob is the cross-entropy of the worst-case margins bounded
by ``method`` (any verifier with differentiable bounds): ``symbolic`` is the paper's verifiable training
(symbolic intervals), ``interval`` is IBP (Gowal et al., arXiv:1810.12715) and ``crown`` is CROWN-IBP style.
kappa moves linearly from ``kappa_start`` to ``kappa_end`` over the eps ramp (defaults 0 and 0: the robust
loss alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from robustkit.errors import InputError
from robustkit.trainers.base import LossParts, Trainer, TrainState, check_bound_method, natural_loss, robust_loss


@dataclass(frozen=True, kw_only=True)
class VerifiableTrainer(Trainer):
    """Verifiable training on every sample; see the module docstring."""

    name: ClassVar[str] = "verifiable"
    method: str = "symbolic"
    kappa_start: float = 0.0
    kappa_end: float = 0.0

    def __post_init__(self) -> None:
        check_bound_method(self.method, "the verifiable training method")
        if not (0 <= self.kappa_start <= 1 and 0 <= self.kappa_end <= 1):
            raise InputError("kappa must be in [0, 1]")

    def kappa(self, state: TrainState) -> float:
        return self.kappa_start + (self.kappa_end - self.kappa_start) * state.ramp_progress

    def bound_method(self) -> str | None:
        return self.method

    def weight(self, state: TrainState) -> float:
        return self.kappa(state)

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        natural, logits = natural_loss(state.net, x, y)
        robust = robust_loss(state.model, x, y, eps, self.method) if eps > 0 else natural
        kappa = self.kappa(state)
        loss = kappa * natural + (1 - kappa) * robust
        return LossParts(loss, float(natural.detach()), robust=float(robust.detach()),
                         correct=int((logits.argmax(1) == y).sum()), count=len(y))
