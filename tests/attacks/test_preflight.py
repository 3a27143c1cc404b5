"""Pre-flight checks on models that mask gradients, randomise or output probabilities, and on one that does none
of it (no false alarms); the gradient-free check on hand-made masks and on a rounding network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks import PGD, Square
from robustkit.attacks.preflight import (
    CHECKS,
    MAX_POINTS,
    OUTPUT_CHANGE_TOLERANCE,
    gradient_flags,
    gradient_free_gap,
    preflight,
)
from robustkit.errors import InputError
from tests.helpers import RandomSearch

pytestmark = pytest.mark.usefixtures("single_thread")


class RoundInput(nn.Module):
    """Quantises the image to 5 grey levels: a step function, so the input gradient is exactly zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


class NoisyLogits(nn.Module):
    """Adds Gaussian noise of standard deviation ``sigma`` to the logits of ``net`` on every call, in any mode."""

    def __init__(self, net: nn.Module, sigma: float) -> None:
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits + self.sigma * torch.randn_like(logits)


class SquareRoot(nn.Module):
    """sqrt of the pixels: infinite derivative at the black pixels every MNIST image has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


class Constant(nn.Module):
    """Logits that do not depend on the input at all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(10.0).expand(x.shape[0], 10)


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def points(mnist):
    return mnist.test.x[:300], mnist.test.y[:300]


def test_a_plain_trained_net_raises_no_alarm(trained_fc, points):
    x, y = points
    report = preflight(trained_fc, x, y)
    assert report.warnings == () and report.flagged == ()
    assert report.n_checked == MAX_POINTS
    assert report.output_kind == "logits" and not report.randomised_outputs
    assert report.output_change < OUTPUT_CHANGE_TOLERANCE / 100  # on the CPU, bit for bit: 0
    assert report.zero_gradient_fraction == 0.0
    assert report.training_modules == () and not report.train_mode
    assert all(report.warning(check) is None for check in CHECKS)


def test_a_rounding_step_is_flagged_and_pgd_breaks_almost_nothing_there(trained_fc, points):
    x, y = points[0][:100], points[1][:100]
    rounded = nn.Sequential(RoundInput(), trained_fc).eval()
    report = preflight(rounded, x, y)
    assert report.flagged == ("zero_gradient",)
    assert int(report.ce_gradient_zero.sum()) == 100 and int(report.margin_gradient_zero.sum()) == 100
    assert report.warnings[0].startswith("zero or non-finite input gradients on 100 of 100 checked points")
    assert "gradient masking" in report.warnings[0]

    with torch.no_grad():
        clean_wrong = int((rounded(x).argmax(1) != y).sum())
        assert 80 <= 100 - clean_wrong <= 95  # the quantised net still classifies: the masking, not the net, is broken
    eps, generator = 0.15, torch.Generator().manual_seed(0)
    plain = PGD(steps=20)(trained_fc, x, y, eps=eps, generator=generator)
    masked = PGD(steps=20)(rounded, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert int(masked.success.sum()) <= clean_wrong + 3  # zero gradients: only the random start moves
    assert int(plain.success.sum()) >= clean_wrong + 40  # the same net without the step is not robust at all

    # the gradient-free Square attack breaks what PGD cannot (check e)
    search = Square(n_queries=300)(rounded, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    gap = gradient_free_gap(masked.success, search.success)
    assert gap.count == int((search.success & ~masked.success).sum()) >= 50
    assert gap.warning is not None and gap.warning.startswith(f"a gradient-free attack broke {gap.count} of 100 points")


def test_dropout_in_train_mode_is_randomised_and_in_train_mode(points):
    x, y = points
    model = dropout_net().train()
    state = torch.get_rng_state()
    report = preflight(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the passes ran on a forked random state
    assert report.flagged == ("randomised_outputs", "train_mode")
    assert report.output_change > 0.05  # dropout of half the hidden units moves the logits a lot
    assert report.training_modules == ("", "0", "1", "2", "3", "4")
    assert "6 of 6 modules: the model itself (Sequential), '0' (Flatten), '1' (Linear), ..." in report.warnings[1]
    assert model.training and all(m.training for m in model.modules())  # modes left as found
    assert preflight(model.eval(), x, y).warnings == ()  # the same net in eval mode is deterministic


@pytest.mark.parametrize(("sigma", "randomised"), [(1e-2, True), (1e-9, False)])
def test_noise_is_flagged_above_float32_noise_only(trained_fc, points, sigma, randomised):
    x, y = points
    report = preflight(NoisyLogits(trained_fc, sigma).eval(), x, y)
    with torch.no_grad():
        scale = float(trained_fc(x[report.indices]).abs().max())
    # the largest of 2 x 1000 differences of two N(0, sigma^2) draws is about 4.5 sigma * sqrt(2)
    assert 2 * sigma / scale < report.output_change < 10 * sigma / scale
    assert report.randomised_outputs is randomised
    assert report.flagged == (("randomised_outputs",) if randomised else ())
    assert OUTPUT_CHANGE_TOLERANCE == 1e-5


def test_softmax_outputs_are_flagged_and_log_softmax_outputs_are_not(trained_fc, points):
    x, y = points
    probabilities = preflight(nn.Sequential(trained_fc, nn.Softmax(dim=1)).eval(), x, y)
    assert probabilities.output_kind == "probabilities" and probabilities.flagged == ("output_kind",)
    assert "look like probabilities, not logits (on all 100 checked points" in probabilities.warnings[0]
    assert probabilities.zero_gradient_fraction < 0.1  # small gradients, but not zero: only check b fires
    log_probabilities = preflight(nn.Sequential(trained_fc, nn.LogSoftmax(dim=1)).eval(), x, y)
    # log-softmax shifts each row by a constant: cross-entropy, margin and their gradients are unchanged
    assert log_probabilities.output_kind == "log-probabilities" and log_probabilities.warnings == ()


def test_non_finite_and_disconnected_gradients_are_flagged(trained_fc, points):
    x, y = points[0][:20], points[1][:20]
    ce_zero, margin_zero = gradient_flags(nn.Sequential(SquareRoot(), trained_fc).eval(), x, y)
    assert bool(ce_zero.all()) and bool(margin_zero.all())  # d sqrt / dx is infinite at the black pixels
    ce_zero, margin_zero = gradient_flags(Constant(), x, y)
    assert bool(ce_zero.all()) and bool(margin_zero.all())
    ce_zero, margin_zero = gradient_flags(trained_fc, x, y)
    assert not bool(ce_zero.any()) and not bool(margin_zero.any())


def test_a_few_masked_points_stay_below_the_threshold(trained_fc, points):
    """Check c warns above 10% of the checked points: 10 rounded points of 100 do not, 11 do."""
    x, y = points[0][:100].clone(), points[1][:100]

    class RoundSome(nn.Module):
        def __init__(self, count: int) -> None:
            super().__init__()
            self.count = count

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            rounded = torch.cat([RoundInput()(images[: self.count]), images[self.count:]])
            return trained_fc(rounded)

    assert preflight(RoundSome(10).eval(), x, y).flagged == ()
    eleven = preflight(RoundSome(11).eval(), x, y)
    assert eleven.flagged == ("zero_gradient",) and eleven.zero_gradient_fraction == 0.11
    assert eleven.zero_gradient[:11].all() and not eleven.zero_gradient[11:].any()


def test_model_state_is_left_as_found(trained_fc, points):
    x, y = points[0][:30], points[1][:30]
    model = dropout_net().eval()
    model[3].train()
    model[1].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = preflight(model, x, y)
    assert report.training_modules == ("3",) and report.flagged == ("randomised_outputs", "train_mode")
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_checked_subset(trained_fc, points):
    x, y = points
    first = preflight(trained_fc, x, y, generator=torch.Generator().manual_seed(1))
    again = preflight(trained_fc, x, y, generator=torch.Generator().manual_seed(1))
    other = preflight(trained_fc, x, y, generator=torch.Generator().manual_seed(2))
    assert first.n_checked == 100 and len(set(first.indices.tolist())) == 100
    assert first.indices.tolist() == sorted(first.indices.tolist())
    assert 0 <= int(first.indices.min()) <= int(first.indices.max()) < 300
    assert torch.equal(first.indices, again.indices) and not torch.equal(first.indices, other.indices)
    assert preflight(trained_fc, x[:40], y[:40]).indices.tolist() == list(range(40))
    assert preflight(trained_fc, x, y, max_points=7).n_checked == 7
    with pytest.raises(InputError, match="max_points"):
        preflight(trained_fc, x, y, max_points=0)
    with pytest.raises(InputError, match="labels"):
        preflight(trained_fc, x[:4], torch.tensor([0, 1, 2, 10]))
    with pytest.raises(InputError, match="unknown pre-flight check"):
        first.warning("randomized_outputs")


def test_gradient_free_gap_on_hand_made_masks():
    gradient = torch.tensor([True, False, False, True, False, False])
    free = torch.tensor([True, True, False, False, True, False])
    gap = gradient_free_gap(gradient, free)
    assert gap.points.tolist() == [False, True, False, False, True, False] and gap.count == 2
    assert gap.warning == ("a gradient-free attack broke 2 of 6 points that no gradient attack broke: a sign of "
                           "gradient masking (the gradient attacks' robust accuracy overestimates the robustness)")
    none = gradient_free_gap(gradient, gradient & free)
    assert none.count == 0 and none.warning is None
    with pytest.raises(InputError, match="boolean"):
        gradient_free_gap(gradient.long(), free)
    with pytest.raises(InputError, match="one entry per sample"):
        gradient_free_gap(gradient, free[:5])


def test_only_gradient_free_attacks_say_so():
    assert not PGD.gradient_free and Square.gradient_free and RandomSearch.gradient_free
