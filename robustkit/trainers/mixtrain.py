"""``mixtrain``: MixTrain (Wang, Chen, Abdou, Jana, *MixTrain: Scalable Training of Verifiably Robust Neural
Networks*, arXiv:1811.02625).

* Stochastic robust approximation: in every batch, ``k`` points (default 5, of a batch of 50) drawn at
  random (without replacement unless ``replace``) get the robust loss from sound ``symbolic`` bounds; the
  whole batch gets the natural loss.
* Dynamic mixed training: L = (1 - a) * L_nat + a * L_rob, with a set once per epoch by ``schedule``:
  ``adaptive`` (default; :class:`~robustkit.trainers.schedules.AdaptiveWeight`, driven by clean accuracy and
  the estimated verified accuracy on a fixed subset of ``schedule_size`` training samples, measured at the
  end of each epoch and counted as training time) or ``geometric``
  (:class:`~robustkit.trainers.schedules.GeometricWeight`). a is logged per epoch.

Under torchrun each process draws ceil(k / processes) points from its share of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustkit.data import Split
from robustkit.errors import InputError
from robustkit.trainers.base import LossParts, Trainer, TrainState, check_bound_method, natural_loss, robust_loss
from robustkit.trainers.schedules import AdaptiveWeight, GeometricWeight


@dataclass(frozen=True, kw_only=True)
class MixTrainer(Trainer):
    """MixTrain; see the module docstring for the algorithm and defaults."""

    name: ClassVar[str] = "mixtrain"
    k: int = 5
    replace: bool = False
    method: str = "symbolic"
    schedule: str = "adaptive"
    schedule_size: int = 100
    initial_weight: float | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.schedule not in ("adaptive", "geometric"):
            raise InputError(f"schedule must be adaptive or geometric, got {self.schedule!r}")
        check_bound_method(self.method, "the MixTrain bound method")
        if self.schedule_size < 1:
            raise InputError("schedule_size must be >= 1")

    def _weight(self, state: TrainState) -> AdaptiveWeight | GeometricWeight:
        if "weight" not in state.extra:
            kind = AdaptiveWeight if self.schedule == "adaptive" else GeometricWeight
            state.extra["weight"] = kind() if self.initial_weight is None else kind(initial=self.initial_weight)
        schedule: AdaptiveWeight | GeometricWeight = state.extra["weight"]
        return schedule

    def bound_method(self) -> str | None:
        return self.method

    def weight(self, state: TrainState) -> float:
        return self._weight(state).value

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        natural, logits = natural_loss(state.net, x, y)
        share = min(len(y), math.ceil(self.k / state.dist.world))
        if self.replace:
            chosen = torch.randint(0, len(y), (share,), generator=state.sample_generator)
        else:
            chosen = torch.randperm(len(y), generator=state.sample_generator)[:share]
        chosen = chosen.to(x.device)
        if eps > 0:
            robust = robust_loss(state.model, x[chosen], y[chosen], eps, self.method)
        else:  # at eps 0 the robust loss of a point is its natural loss
            robust = torch.nn.functional.cross_entropy(logits[chosen], y[chosen])
        a = self.weight(state)
        loss = (1 - a) * natural + a * robust
        return LossParts(loss, float(natural.detach()), robust=float(robust.detach()),
                         correct=int((logits.argmax(1) == y).sum()), count=len(y))

    def end_epoch(self, state: TrainState, train: Split, ramp_done: bool) -> None:
        from robustkit.verifiers import verify

        schedule = self._weight(state)
        clean = verified = 0.0
        if ramp_done and self.schedule == "adaptive":
            subset = train.subset(0, self.schedule_size)
            device = next(state.model.parameters()).device
            x, y = subset.x.to(device), subset.y.to(device)
            state.model.eval()
            result = verify(state.model, x, y, state.eval_eps, method=self.method)
            state.model.train()
            clean = float((result.prediction == y.cpu()).float().mean())
            verified = float(result.verified.float().mean())
        schedule.update(ramp_done, clean, verified)

    def state_dict(self, state: TrainState) -> dict[str, Any]:
        return dict(self._weight(state).state())

    def load_state_dict(self, state: TrainState, saved: dict[str, Any]) -> None:
        if saved:
            self._weight(state).load(saved)
