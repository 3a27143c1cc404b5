"""Targeted FAB: the box-constrained L-inf projection against a linear program, and the minimal L-inf distance
on linear classifiers, where it is known in closed form (or from a linear program when the box binds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from robustkit.attacks import FAB
from robustkit.attacks.fab import linf_projection
from robustkit.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")


def smallest_linf_move(point: np.ndarray, w: np.ndarray, b: float) -> float | None:
    """min ||d||_inf subject to w . (point + d) = b and point + d in [0, 1], by linear programming (None when
    infeasible)."""
    n = point.size
    cost = np.r_[np.zeros(n), 1.0]
    box = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    bounds = [(-p, 1 - p) for p in point] + [(0, None)]
    solved = linprog(cost, A_ub=box, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0][None], b_eq=[b - w @ point],
                     bounds=bounds)
    return float(solved.x[-1]) if solved.status == 0 else None


def test_projection_is_the_linear_programs_optimum():
    generator = torch.Generator().manual_seed(0)
    unreachable = 0
    for trial in range(60):
        n = 1 + trial % 7
        point = torch.rand(1, n, generator=generator, dtype=torch.float64)
        point[0, : n // 3] = (point[0, : n // 3] > 0.5).double()  # some coordinates on the box's faces
        w = torch.randn(1, n, generator=generator, dtype=torch.float64)
        w[0, -1] = 0.0 if trial % 4 == 0 else w[0, -1]
        b = (w * point).sum(1) + torch.randn(1, generator=generator, dtype=torch.float64)
        move = linf_projection(point, w, b)[0].numpy()
        moved = point[0].numpy() + move
        assert moved.min() >= -1e-12 and moved.max() <= 1 + 1e-12
        optimum = smallest_linf_move(point[0].numpy(), w[0].numpy(), float(b))
        if optimum is None:  # out of reach: the corner of the box that gets closest
            unreachable += 1
            towards = np.sign(float(b) - float((w * point).sum()))
            best = linprog(-towards * w[0].numpy(), bounds=[(-p, 1 - p) for p in point[0].numpy()]).x
            assert w[0].numpy() @ move == pytest.approx(w[0].numpy() @ best, abs=1e-9)
        else:
            assert w[0].numpy() @ moved == pytest.approx(float(b), abs=1e-9)
            assert np.abs(move).max() == pytest.approx(optimum, abs=1e-9)
    assert 0 < unreachable < 60


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0])).eval()
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


def test_fab_finds_the_minimal_linf_distance_of_a_linear_classifier():
    """For f = W x + c the closest misclassified point in L-inf is at distance min_t (f_y - f_t) / ||W_y - W_t||_1
    when the box [0, 1] does not bind."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 20, generator=generator)
    x = 0.5 + 0.05 * (torch.rand(6, 1, 1, 20, generator=generator) - 0.5)
    bias = torch.zeros(4)
    model = linear_model(weight, bias)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    gaps = logits.gather(1, y[:, None]) - logits  # f_y - f_t
    norms = (weight[y][:, None, :] - weight[None, :, :]).abs().sum(2)  # ||W_y - W_t||_1
    distance = torch.where(gaps > 0, gaps / norms.clamp(min=1e-12), torch.inf).amin(1)
    assert float(distance.max()) < 0.4  # the box does not bind
    eps = float(distance.max()) * 1.1
    result = FAB(n_target_classes=3, steps=100)(model, x, y, eps=eps)
    found = (result.x_adv - x).flatten(1).abs().amax(1)
    assert bool(result.success.all())
    assert torch.all(found >= distance * (1 - 1e-4))  # nothing closer exists
    assert torch.all(found <= distance * 1.01)  # and FAB comes within 1% (the overshoot eta keeps it ~0.5% above)
    # below the minimal distance nothing can be found, and FAB must not claim it
    short = FAB(n_target_classes=3, steps=30)(model, x, y, eps=float(distance.min()) * 0.95)
    assert not bool(short.success.any())


def test_fab_matches_the_linear_program_when_the_box_binds():
    # two classes, margin f_0 - f_1 = w . x + c; near the box's faces the move is cut by [0, 1]
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(12, generator=generator)
    x = torch.where(w > 0, 0.03, 0.97).view(1, 1, 1, 12)  # little room in the direction that lowers the margin
    x[..., :4] = 0.5
    c = 0.6 - float((w * x.flatten()).sum())  # margin 0.6 at x
    model = linear_model(torch.stack([w, torch.zeros(12)]), torch.tensor([c, 0.0]))
    optimum = smallest_linf_move(x.flatten().double().numpy(), w.double().numpy(), -c)
    assert optimum is not None and optimum > 0.6 / float(w.abs().sum()) * 1.05  # the box does bind
    result = FAB(n_target_classes=1, steps=100)(model, x, torch.tensor([0]), eps=min(1.0, optimum * 1.2))
    found = float((result.x_adv - x).abs().max())
    assert bool(result.success.all())
    assert optimum * (1 - 1e-4) <= found <= optimum * 1.01


def test_fab_on_the_fixture_net_is_deterministic_and_breaks_points(trained_fc, mnist):
    x, y = mnist.test.x[:48], mnist.test.y[:48]
    first = FAB(steps=20, n_target_classes=2)(trained_fc, x, y, eps=0.08)
    second = FAB(steps=20, n_target_classes=2)(trained_fc, x, y, eps=0.08)
    assert torch.equal(first.x_adv, second.x_adv)
    with torch.no_grad():
        clean_wrong = int((trained_fc(x).argmax(1) != y).sum())
    assert int(first.success.sum()) >= clean_wrong + 10
    restarted = FAB(steps=20, n_target_classes=2, restarts=2)(trained_fc, x, y, eps=0.08)
    assert torch.all(restarted.success[first.success])  # the first restart starts from x, as without restarts


def test_bad_options():
    for options in ({"steps": 0}, {"eta": 0.5}, {"beta": 1.0}, {"alpha_max": 2.0}, {"n_target_classes": 0}):
        with pytest.raises(InputError):
            FAB(**options)
