"""Nothing non-finite passes silently: a diverging training run, a model whose logits are NaN on the evaluated
data (in attack, verify and the bench alike) and a checkpoint of integer tensors each stop with one line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from robustkit.bench.config import EvaluationSettings
from robustkit.bench.evaluate import evaluate_model
from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.errors import NonFiniteError
from robustkit.models import build_model
from robustkit.models.loading import load_model
from robustkit.trainers.standard import StandardTrainer
from tests.helpers import error_after_output, one_line_error

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["--model", "mnist_fc_small", "--eps", "0.1", "--n-train", "80", "--batch-size", "40", "--val-size", "10"]

# Finite on robustkit's probe (every pixel 0.5: 3e38 - 3e38 = 0) but inf - inf = NaN on digits whose two central
# pixels are bright (40 of the first 100 mnist5k test images).
OVERFLOW_NET = """
import torch
from torch import nn


def build():
    hidden, out = nn.Linear(784, 2), nn.Linear(2, 10)
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.bias.zero_()
        hidden.weight[:, [14 * 28 + 14, 13 * 28 + 14]] = 3e38
        out.weight.zero_()
        out.bias.zero_()
        out.weight[:, 0] = 1.0
        out.weight[:, 1] = -1.0
    return nn.Sequential(nn.Flatten(), hidden, out)
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["--quiet", *args])


@pytest.fixture
def overflow_net(tmp_path: Path) -> str:
    path = tmp_path / "overflow_net.py"
    path.write_text(OVERFLOW_NET)
    return f"{path}:build"


def test_infinite_learning_rate_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    one_line_error(run("train", "--trainer", "standard", *SMALL, "--lr", "inf", "--out", str(tmp_path / "run")),
                   "--lr", "'inf' is not a finite number")
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_with_one_line_and_writes_no_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = error_after_output(run("train", "--trainer", "standard", *SMALL, "--lr", "1e30", "--out", str(out)),
                              "training diverged at epoch 1, batch", "learning rate 1e+30")
    assert "no epoch finished" in line
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()


def test_nan_loss_in_the_second_epoch_keeps_the_first_epochs_checkpoint_and_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = StandardTrainer.batch_loss

    def nan_in_epoch_two(self, x, y, eps, state):  # type: ignore[no-untyped-def]
        parts = plain(self, x, y, eps, state)
        if state.epoch == 1:
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(StandardTrainer, "batch_loss", nan_in_epoch_two)
    out = tmp_path / "run"
    line = error_after_output(run("train", "--trainer", "standard", *SMALL, "--epochs", "2", "--out", str(out)),
                              "training diverged at epoch 2, batch 1 of 2: the loss is nan")
    assert str(out / "checkpoint.pt") in line and "last good epoch (1)" in line
    with (out / "history.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and all(bool(torch.isfinite(t).all()) for t in saved["model"].values())
    assert not (out / "model.pt").exists()


def non_finite_samples(spec: str, start: int, n: int) -> list[int]:
    """The indices of the test samples on which the model's logits are not finite (computed independently)."""
    dataset = load_dataset("mnist5k")
    model = load_model(spec, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    with torch.no_grad():
        finite = torch.isfinite(model(dataset.test.x[start : start + n])).all(1)
    return [start + int(i) for i in (~finite).nonzero().flatten()]


@pytest.mark.parametrize("command", [["attack", "--attack", "pgd"], ["verify", "--method", "interval"]])
def test_nan_logits_on_the_evaluated_data_are_refused(command: list[str], overflow_net: str, tmp_path: Path) -> None:
    bad = non_finite_samples(overflow_net, 100, 60)
    assert 0 < len(bad) < 60  # the model is fine on some samples, and on robustkit's load-time probe
    one_line_error(run(command[0], "--model", overflow_net, "--eps", "0.1", *command[1:], "--start", "100",
                        "--n-examples", "60", "--out", str(tmp_path / "run")),
                    f"the model returns NaN or infinite logits on {len(bad)} of 60 samples of the mnist5k "
                    f"test split (sample {', '.join(map(str, bad[:5]))}, ...)")
    assert not list((tmp_path / "run").glob("*.csv"))


def test_bench_evaluation_refuses_nan_logits(overflow_net: str) -> None:
    dataset = load_dataset("mnist5k")
    model = load_model(overflow_net, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    settings = EvaluationSettings(pgd_steps=1, pgd_restarts=1, cw_steps=1, eps_sweep=(), batch_size=30)
    bad = non_finite_samples(overflow_net, 0, 100)
    with pytest.raises(NonFiniteError, match=f"NaN or infinite logits on {len(bad)} of 100 samples of the mnist5k"):
        evaluate_model(model, dataset, dataset.test.subset(0, 100), 0.1, settings, seed=0)


def test_checkpoint_of_integer_tensors_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "ints.pt"
    torch.save({k: v.round().long() for k, v in build_model("mnist_fc_small").state_dict().items()}, weights)
    line = one_line_error(run("verify", "--model", "mnist_fc_small", "--checkpoint", str(weights), "--eps", "0.1",
                              "--method", "interval"),
                          str(weights), "non-floating-point tensors", "1.weight (int64)")
    assert "floating-point weights" in line
