"""Auto-PGD: the DLR losses on hand-made logits, the paper's checkpoints, the step-size rule, and strength
against PGD with the same number of steps."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from robustkit.attacks import APGD, PGD
from robustkit.attacks.apgd import _Run, checkpoints, dlr_loss, targeted_dlr_loss
from robustkit.errors import InputError
from robustkit.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_dlr_loss_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
    # sorted: 3 > 2 > 1 > 0, so z_pi1 - z_pi3 = 2; y = 0 is on top (margin 1), y = 1 is not (margin 1 - 3)
    assert dlr_loss(logits, torch.tensor([0, 1])).tolist() == pytest.approx([-0.5, 1.0])
    # targeted, y = 0, t = 3: -(3 - 0) / (3 - (1 + 0) / 2); t = 2: -(3 - 2) / 2.5
    assert targeted_dlr_loss(logits, torch.tensor([0, 0]), torch.tensor([3, 2])).tolist() == pytest.approx([-1.2, -0.4])


def test_dlr_loss_is_shift_and_scale_invariant():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    y, t = torch.arange(16) % 10, (torch.arange(16) + 3) % 10
    assert torch.allclose(dlr_loss(7 * logits - 2, y), dlr_loss(logits, y), atol=1e-5)
    assert torch.allclose(targeted_dlr_loss(7 * logits - 2, y, t), targeted_dlr_loss(logits, y, t), atol=1e-5)


def paper_checkpoints(steps: int) -> list[int]:
    """w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), exactly."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(q * steps) for q in p[1:] if q <= 1})


@pytest.mark.parametrize("steps", [100, 50, 37, 10, 1000])
def test_checkpoints_are_the_papers_sequence(steps):
    assert list(checkpoints(steps)) == paper_checkpoints(steps)
    assert checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)


def test_step_size_is_halved_under_either_condition_and_restarts_from_the_best_point():
    # window of 10 steps: sample 0 increased 7 times (< 0.75 * 10: condition 1); sample 1 increased 8 times but
    # neither improved its best loss nor halved at the last checkpoint (condition 2); sample 2 improved; sample 3
    # did not improve but was halved last time (condition 2 needs an unchanged step size)
    n = 4
    point, best = torch.zeros(n, 1, 1, 2), torch.ones(n, 1, 1, 2)
    run = _Run(
        index=torch.arange(n), x=point, y=torch.zeros(n, dtype=torch.long), target=torch.zeros(n, dtype=torch.long),
        lower=point, upper=best, point=point, previous=point, grad=torch.zeros(n, 1, 1, 2), value=torch.zeros(n),
        value_before=torch.zeros(n), best=best, best_grad=torch.ones(n, 1, 1, 2),
        best_value=torch.tensor([1.0, 1.0, 2.0, 1.0]), increases=torch.tensor([7.0, 8.0, 8.0, 8.0]),
        best_at_check=torch.tensor([1.0, 1.0, 1.0, 1.0]), halved_at_check=torch.tensor([False, False, False, True]),
        step=torch.full((n,), 0.2),
    )
    APGD().check_step_size(run, window=10)
    assert run.step.tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert run.halved_at_check.tolist() == [True, True, False, False]
    assert run.point[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # restarted from the best point
    assert run.grad[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # with the gradient there
    assert run.increases.tolist() == [0.0] * n


def test_apgd_breaks_at_least_as_many_points_as_pgd_with_equal_steps(trained_fc, mnist):
    x, y = mnist.test.x[:200], mnist.test.y[:200]
    for eps in (0.03, 0.06):
        pgd = PGD(steps=50)(trained_fc, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
        for attack in (APGD(steps=50), APGD(steps=50, loss="dlr")):
            apgd = attack(trained_fc, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
            assert int(apgd.success.sum()) >= int(pgd.success.sum()), (attack, eps)


class Counted(nn.Module):
    """The wrapped network, counting the rows it sees with and without autograd."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = {True: 0, False: 0}

    def forward(self, x):
        self.rows[torch.is_grad_enabled()] += x.shape[0]
        return self.inner(x)


def test_one_forward_and_backward_pass_per_step_and_fewer_once_samples_break(trained_fc, mnist):
    x, y = mnist.test.x[:40], mnist.test.y[:40]
    model = Counted(trained_fc).eval()
    with torch.no_grad():
        correct = int((trained_fc(x).argmax(1) == y).sum())
    result = APGD(steps=30)(model, x, y, eps=0.0)  # nothing can break: every sample takes every step
    assert not bool(result.success[trained_fc(x).argmax(1) == y].any())
    # the start and the first 29 steps with their backward pass; the 30th step's point needs only its loss
    assert model.rows[True] == 30 * correct
    assert model.rows[False] == 2 * 40 + 2 * correct + 1  # clean, final, re-check, last step; one for the classes
    model.rows = {True: 0, False: 0}
    APGD(steps=30)(model, x, y, eps=0.1)  # most samples break within a few steps and stop there
    assert model.rows[True] < 0.5 * 30 * correct


def test_targeted_apgd_breaks_at_least_as_many_points_as_its_first_target(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    one = APGD(steps=20, loss="dlr", targeted=True, n_target_classes=1)(trained_fc, x, y, eps=0.04)
    three = APGD(steps=20, loss="dlr", targeted=True, n_target_classes=3)(trained_fc, x, y, eps=0.04)
    assert torch.all(three.success[one.success])  # the first target is the same run in both
    assert int(three.success.sum()) > int(one.success.sum())


def test_same_seed_same_result_and_l2_stays_in_its_ball(trained_fc, mnist):
    x, y = mnist.test.x[:32], mnist.test.y[:32]
    for attack, eps in ((APGD(steps=10), 0.05), (APGD(steps=10, norm="l2", loss="dlr"), 0.8)):
        first = attack(trained_fc, x, y, eps=eps, generator=torch.Generator().manual_seed(5))
        second = attack(trained_fc, x, y, eps=eps, generator=torch.Generator().manual_seed(5))
        assert torch.equal(first.x_adv, second.x_adv)
    assert float((first.x_adv - x).flatten(1).norm(dim=1).max()) <= 0.8 + 1e-5


def test_dlr_needs_enough_classes_and_bad_options_are_refused():
    model = build_model("toy2d", seed=0).eval()  # 3 classes
    x, y = torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1])
    APGD(steps=3, loss="dlr")(model, x, y, eps=0.1)  # untargeted DLR needs 3
    with pytest.raises(InputError, match="at least 4 classes"):
        APGD(steps=3, loss="dlr", targeted=True)(model, x, y, eps=0.1)
    for options in ({"loss": "cw"}, {"norm": "l1"}, {"steps": 0}, {"rho": 1.5}, {"n_target_classes": 0}):
        with pytest.raises(InputError):
            APGD(**options)
