"""Schedules shared by the trainers: training eps per batch, learning rate per epoch, MixTrain's weight a.

Every constant is a documented option with a default; schedules are plain functions of the position in
training (epoch, batch) or small state objects whose state is saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from robustkit.errors import InputError


@dataclass(frozen=True)
class EpsSchedule:
    """Training eps: 0 for ``warmup_epochs``, then a ramp to ``target`` over ``ramp_epochs`` (per batch),
    then constant. ``shape`` is ``linear`` or ``smooth`` (a smoothstep: slow start and end, as used for IBP
    training, which avoids destabilising the network when eps first grows)."""

    target: float
    warmup_epochs: int = 0
    ramp_epochs: int = 0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.shape not in ("linear", "smooth"):
            raise InputError(f"eps ramp must be 'linear' or 'smooth', got {self.shape!r}")
        if self.warmup_epochs < 0 or self.ramp_epochs < 0:
            raise InputError("warm-up and ramp epochs must be >= 0")

    def progress(self, epoch: int, batch: int, batches: int) -> float:
        """Fraction of the ramp done at this batch, in [0, 1]."""
        position = epoch + batch / max(batches, 1) - self.warmup_epochs
        if position < 0:
            return 0.0
        if self.ramp_epochs == 0:
            return 1.0
        return min(1.0, position / self.ramp_epochs)

    def __call__(self, epoch: int, batch: int, batches: int) -> float:
        if epoch < self.warmup_epochs:
            return 0.0
        t = self.progress(epoch, batch, batches)
        if self.shape == "smooth":
            t = t * t * (3 - 2 * t)
        return self.target * t

    def ramp_done(self, epoch: int) -> bool:
        """Whether the whole of ``epoch`` is trained at the target eps."""
        return epoch >= self.warmup_epochs + self.ramp_epochs


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per epoch: ``constant``, ``step`` (x ``gamma`` at each fraction of training in
    ``milestones``) or ``cosine`` (to ``lr * final_fraction``)."""

    lr: float
    kind: str = "step"
    epochs: int = 1
    milestones: tuple[float, ...] = (0.6, 0.85)
    gamma: float = 0.2
    final_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "step", "cosine"):
            raise InputError(f"lr schedule must be constant, step or cosine, got {self.kind!r}")
        if not math.isfinite(self.lr) or not self.lr > 0:
            raise InputError(f"learning rate must be a finite positive number, got {self.lr}")

    def __call__(self, epoch: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            passed = sum(epoch >= round(m * self.epochs) for m in self.milestones)
            return self.lr * self.gamma**passed
        t = epoch / max(self.epochs - 1, 1)
        low = self.lr * self.final_fraction
        return low + (self.lr - low) * (1 + math.cos(math.pi * t)) / 2


@dataclass
class AdaptiveWeight:
    """MixTrain's dynamic mixed training: the weight a of L = (1 - a) L_nat + a L_rob, set once per epoch.

    During the eps warm-up and ramp a stays at ``initial``. Afterwards, at the end of every epoch, with the
    clean accuracy and the estimated verified accuracy measured on a fixed subset of the training data:

    * clean accuracy within ``tolerance`` of the best clean accuracy seen since the ramp ended: the network
      can afford more robustness, so a <- min(maximum, a * ``increase``);
    * clean accuracy below that, and verified accuracy not better than its best: robustness is costing
      accuracy without paying off, so a <- max(minimum, a * ``decrease``);
    * otherwise (accuracy dropped but verified accuracy improved) a stays.

    Defaults: initial 0.5, increase 1.25, decrease 0.8, minimum 0.05, maximum 0.95, tolerance 0.01 (one
    percentage point of clean accuracy).
    """

    initial: float = 0.5
    increase: float = 1.25
    decrease: float = 0.8
    minimum: float = 0.05
    maximum: float = 0.95
    tolerance: float = 0.01
    value: float = -1.0
    best_clean: float = -1.0
    best_verified: float = -1.0

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.initial <= self.maximum <= 1:
            raise InputError("need 0 < minimum <= initial <= maximum <= 1 for the adaptive weight")
        if self.value < 0:
            self.value = self.initial

    def update(self, ramp_done: bool, clean: float, verified: float) -> float:
        """Set a for the next epoch from this epoch's measurements; returns it."""
        if not ramp_done:
            self.value = self.initial
            return self.value
        if self.best_clean < 0:
            self.best_clean, self.best_verified = clean, verified
            return self.value
        if clean >= self.best_clean - self.tolerance:
            self.value = min(self.maximum, self.value * self.increase)
        elif verified <= self.best_verified:
            self.value = max(self.minimum, self.value * self.decrease)
        self.best_clean = max(self.best_clean, clean)
        self.best_verified = max(self.best_verified, verified)
        return self.value

    def state(self) -> dict[str, float]:
        return {"value": self.value, "best_clean": self.best_clean, "best_verified": self.best_verified}

    def load(self, state: dict[str, float]) -> None:
        self.value, self.best_clean, self.best_verified = state["value"], state["best_clean"], state["best_verified"]


@dataclass
class GeometricWeight:
    """A fixed schedule for a (the authors' later code): ``initial`` (0.1) during the eps warm-up and ramp,
    then multiplied by ``factor`` (2.5) every ``every`` (5) epochs, capped at ``maximum`` (0.9)."""

    initial: float = 0.1
    factor: float = 2.5
    every: int = 5
    maximum: float = 0.9
    value: float = -1.0
    epochs_after_ramp: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum <= 1 or self.factor < 1 or self.every < 1:
            raise InputError("need 0 < initial <= maximum <= 1, factor >= 1 and every >= 1")
        if self.value < 0:
            self.value = self.initial

    def update(self, ramp_done: bool, clean: float, verified: float) -> float:
        if ramp_done:
            self.epochs_after_ramp += 1
            steps = self.epochs_after_ramp // self.every
            self.value = min(self.maximum, self.initial * self.factor**steps)
        return self.value

    def state(self) -> dict[str, float]:
        return {"value": self.value, "epochs_after_ramp": float(self.epochs_after_ramp)}

    def load(self, state: dict[str, float]) -> None:
        self.value, self.epochs_after_ramp = state["value"], int(state["epochs_after_ramp"])
