"""A non-finite loss or non-finite weights stop training at once, naming the epoch and the batch, and the last good
checkpoint stays as it was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from robustkit.data import Dataset
from robustkit.errors import NonFiniteError
from robustkit.models import build_model
from robustkit.trainers import TrainConfig
from robustkit.trainers.base import LossParts, TrainState, load_checkpoint
from robustkit.trainers.standard import StandardTrainer

CONFIG = TrainConfig(epochs=3, batch_size=40, eps=0.1, val_size=10, val_pgd_steps=2, seed=1)


@dataclass(frozen=True, kw_only=True)
class NaNLossAt(StandardTrainer):
    """Standard training whose loss turns NaN at one (0-based) epoch and batch."""

    name: ClassVar[str] = "standard"
    epoch: int = 1
    batch: int = 2

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        parts = super().batch_loss(x, y, eps, state)
        batch = state.extra.setdefault("batch", {}).setdefault(state.epoch, 0)
        state.extra["batch"][state.epoch] += 1
        if (state.epoch, batch) == (self.epoch, self.batch):
            parts.loss = parts.loss * float("nan")
        return parts


@dataclass(frozen=True, kw_only=True)
class NaNGradientAt(StandardTrainer):
    """Standard training whose first layer's gradient turns NaN in one epoch: the loss stays finite."""

    name: ClassVar[str] = "standard"
    epoch: int = 0

    def batch_loss(self, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossParts:
        parts = super().batch_loss(x, y, eps, state)
        if state.epoch == self.epoch:
            first = next(state.model.parameters())
            first.register_hook(lambda grad: grad * float("nan"))
        return parts


def test_nan_loss_stops_at_its_batch_and_keeps_the_last_good_checkpoint(mnist5k: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    trainer = NaNLossAt(epoch=1, batch=2)
    seen = []
    model = build_model("mnist_fc_small", seed=0)
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(model, mnist5k.train.subset(0, 200), mnist5k.test, CONFIG, checkpoint=path,
                    on_epoch=seen.append)
    message = str(caught.value)
    assert "training diverged at epoch 2, batch 3 of 5" in message and "the loss is nan" in message
    assert str(path) in message and "last good epoch (1)" in message
    assert [record.epoch for record in seen] == [1]
    saved = load_checkpoint(path, trainer, CONFIG)
    assert saved["epoch"] == 1 and [row["epoch"] for row in saved["history"]] == [1]
    assert all(bool(torch.isfinite(t).all()) for t in saved["model"].values())


def test_non_finite_weights_after_a_step_stop_training(mnist5k: Dataset, tmp_path: Path) -> None:
    model = build_model("mnist_fc_small", seed=0)
    with pytest.raises(NonFiniteError) as caught:
        NaNGradientAt(epoch=0).fit(model, mnist5k.train.subset(0, 200), None, CONFIG,
                                   checkpoint=tmp_path / "checkpoint.pt")
    message = str(caught.value)
    assert "training diverged at epoch 1, batch 1 of 5" in message
    assert "the optimizer step left NaN or infinite weights in 1.weight (learning rate 0.001" in message
    assert "no epoch finished" in message and not (tmp_path / "checkpoint.pt").exists()


def test_a_huge_learning_rate_diverges_with_a_clear_error(mnist5k: Dataset) -> None:
    model = build_model("mnist_fc_small", seed=0)
    config = TrainConfig(epochs=1, batch_size=40, lr=1e30, eps=0.1, val_size=0)
    with pytest.raises(NonFiniteError, match=r"training diverged at epoch 1, batch \d+ of 5: .*learning rate 1e\+30"):
        StandardTrainer().fit(model, mnist5k.train.subset(0, 200), None, config)


def test_infinite_learning_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="learning rate must be a finite positive number, got inf"):
        TrainConfig(lr=float("inf"))
