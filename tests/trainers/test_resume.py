"""Exact resume: 2 epochs uninterrupted equal 1 epoch, an interruption, and a resumed second epoch, bit for bit,
for every trainer; a checkpoint written with other settings is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from robustkit.data import Dataset
from robustkit.errors import InputError
from robustkit.models import build_model
from robustkit.trainers import TRAINERS, EpochRecord, TrainConfig, get_trainer
from tests.trainers.conftest import same_number

# options that make each trainer use its random generators: pgd's random start, mixtrain's sampling of k points
OPTIONS: dict[str, dict[str, Any]] = {
    "standard": {}, "pgd": {"steps": 5}, "verifiable": {"method": "interval"}, "mixtrain": {"k": 4},
}
TIMES = {"train_time_s", "epoch_time_s", "eval_time_s"}


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C after the first epoch's checkpoint was written."""


def stop_after_first_epoch(record: EpochRecord) -> None:
    if record.epoch == 1:
        raise Interrupted


def config(**changes: Any) -> TrainConfig:
    # ramp over the first epoch, so the eps schedule's position matters after resuming
    base = TrainConfig(epochs=2, batch_size=40, eps=0.1, ramp_epochs=1, val_size=20, val_pgd_steps=3, seed=5)
    return dataclasses.replace(base, **changes)


def without_times(record: EpochRecord) -> dict[str, float]:
    return {k: v for k, v in record.to_dict().items() if k not in TIMES}


def test_every_trainer_is_covered() -> None:
    assert set(OPTIONS) == set(TRAINERS)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_resume_gives_bit_identical_weights(name: str, mnist5k: Dataset, tmp_path: Path) -> None:
    train = mnist5k.train.subset(0, 120)  # 3 batches of 40
    uninterrupted = get_trainer(name, **OPTIONS[name]).fit(
        build_model("mnist_fc_small", seed=0), train, mnist5k.test, config(), checkpoint=tmp_path / "a.pt"
    )

    checkpoint = tmp_path / "b.pt"
    with pytest.raises(Interrupted):
        get_trainer(name, **OPTIONS[name]).fit(
            build_model("mnist_fc_small", seed=0), train, mnist5k.test, config(), checkpoint=checkpoint,
            on_epoch=stop_after_first_epoch,
        )
    torch.manual_seed(1234)  # the global random state must come from the checkpoint, not from this process
    fresh = build_model("mnist_fc_small", seed=99)  # and the weights too
    seen: list[int] = []
    resumed = get_trainer(name, **OPTIONS[name]).fit(
        fresh, train, mnist5k.test, config(), checkpoint=checkpoint, resume=True,
        on_epoch=lambda record: seen.append(record.epoch),
    )

    assert seen == [2]  # only the epoch left is trained (and reported)
    expected = uninterrupted.model.state_dict()
    got = resumed.model.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [r.epoch for r in resumed.history] == [1, 2]
    for a, b in zip(uninterrupted.history, resumed.history, strict=True):
        mine, theirs = without_times(a), without_times(b)
        assert all(same_number(mine[k], theirs[k]) for k in mine), (mine, theirs)
    # the resumed run's clock continues from the checkpoint's
    assert resumed.history[1].train_time_s > resumed.history[0].train_time_s
    # the last checkpoints of both runs hold the same weights and optimizer step count
    ours, theirs = (torch.load(path, weights_only=True) for path in (checkpoint, tmp_path / "a.pt"))
    assert ours["epoch"] == theirs["epoch"] == 2
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in got)
    assert torch.equal(ours["generators"]["sample"][0], theirs["generators"]["sample"][0])


def test_resume_without_a_checkpoint_file_starts_from_scratch(mnist5k: Dataset, tmp_path: Path) -> None:
    train = mnist5k.train.subset(0, 80)
    first = get_trainer("standard").fit(build_model("mnist_fc_small", seed=0), train, None, config(val_size=0))
    second = get_trainer("standard").fit(build_model("mnist_fc_small", seed=0), train, None, config(val_size=0),
                                         checkpoint=tmp_path / "none.pt", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("trainer", "options", "changes", "fragment"),
    [
        ("mixtrain", {"k": 3}, {}, "k"),                      # a trainer option
        ("mixtrain", {"k": 4}, {"lr": 0.01}, "lr"),           # a TrainConfig field
        ("mixtrain", {"k": 4}, {"seed": 6}, "seed"),
        ("pgd", {"steps": 5}, {}, "written by the 'mixtrain' trainer"),
    ],
)
def test_resume_with_different_settings_is_refused(
    trainer: str, options: dict[str, Any], changes: dict[str, Any], fragment: str, mnist5k: Dataset, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "c.pt"
    train = mnist5k.train.subset(0, 80)
    with pytest.raises(Interrupted):
        get_trainer("mixtrain", k=4).fit(build_model("mnist_fc_small", seed=0), train, None, config(val_size=0),
                                         checkpoint=checkpoint, on_epoch=stop_after_first_epoch)
    with pytest.raises(InputError, match="cannot resume") as error:
        get_trainer(trainer, **options).fit(build_model("mnist_fc_small", seed=0), train, None,
                                            config(val_size=0, **changes), checkpoint=checkpoint, resume=True)
    assert fragment in str(error.value)


def test_a_file_that_is_not_a_training_checkpoint_is_refused(mnist5k: Dataset, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(build_model("mnist_fc_small", seed=0).state_dict(), checkpoint)
    with pytest.raises(InputError, match="not a robustkit training checkpoint"):
        get_trainer("standard").fit(build_model("mnist_fc_small", seed=0), mnist5k.train.subset(0, 40), None,
                                    config(val_size=0), checkpoint=checkpoint, resume=True)
