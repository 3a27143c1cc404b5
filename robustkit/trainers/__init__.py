"""Trainers: ``standard``, ``pgd`` (Madry), ``verifiable`` (robust loss on every sample) and ``mixtrain``.

>>> from robustkit.trainers import TRAINERS, TrainConfig
>>> sorted(TRAINERS)
['mixtrain', 'pgd', 'standard', 'verifiable']

``TRAINERS[name](**options).fit(model, train_split, monitor_split, TrainConfig(...))`` trains in place and
returns a :class:`TrainResult` with the per-epoch history. See DESIGN.md section 5.
"""

from __future__ import annotations

from typing import Any

from robustkit.registry import Registry
from robustkit.trainers.base import EpochRecord, TrainConfig, Trainer, TrainResult
from robustkit.trainers.mixtrain import MixTrainer
from robustkit.trainers.pgd import PGDTrainer
from robustkit.trainers.standard import StandardTrainer
from robustkit.trainers.verifiable import VerifiableTrainer

__all__ = [
    "TRAINERS", "EpochRecord", "MixTrainer", "PGDTrainer", "StandardTrainer", "TrainConfig", "TrainResult",
    "Trainer", "VerifiableTrainer", "get_trainer",
]

TRAINERS: Registry[type[Trainer]] = Registry("trainer")
TRAINERS.add("standard", StandardTrainer)
TRAINERS.add("pgd", PGDTrainer)
TRAINERS.add("verifiable", VerifiableTrainer)
TRAINERS.add("mixtrain", MixTrainer)


def get_trainer(name: str, **options: Any) -> Trainer:
    """A trainer from its registered name and options."""
    return TRAINERS[name](**options)
