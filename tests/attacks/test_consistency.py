"""Attacks against verifiers and against foolbox: verified implies not broken; our PGD matches foolbox's."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from robustkit.attacks import ATTACKS, PGD, get_attack
from robustkit.verifiers import Status, verify
from robustkit.verifiers.base import margin_spec
from robustkit.verifiers.symbolic import box_bounds

ATTACK_OPTIONS = {
    "pgd": {"steps": 30, "restarts": 2},
    "cw-linf": {"steps": 30},
    "cw-l2": {"steps": 50, "binary_search_steps": 3},
    "interval": {"inner_steps": 20, "iterations": 2},
    "foolbox": {"attack": "LinfPGD", "options": {"steps": 20}},
    "worst-case": {"attacks": ["pgd", "interval"]},
    "apgd": {"steps": 30, "loss": "dlr", "targeted": True, "n_target_classes": 3},
    "square": {"n_queries": 250},
    "fab": {"steps": 20, "n_target_classes": 2},
    "autoattack": {"version": "fast"},
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_verified_samples_are_never_broken(name, trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    eps = 0.02
    verified = verify(trained_fc, x, y, eps, method="crown").verified
    assert 20 < int(verified.sum()) < 100  # a meaningful mix
    result = get_attack(name, **ATTACK_OPTIONS[name])(trained_fc, x, y, eps=eps)
    assert not bool((result.success & verified).any())
    assert int(result.success.sum()) > 0


@pytest.mark.parametrize("name", list(ATTACKS))
def test_falsified_by_exact_or_broken_implies_not_verified_symbolic(name, trained_fc, mnist):
    x, y = mnist.test.x[100:160], mnist.test.y[100:160]
    result = get_attack(name, **ATTACK_OPTIONS[name])(trained_fc, x, y, eps=0.05)
    statuses = verify(trained_fc, x, y, 0.05, method="symbolic").status
    assert not any(s is Status.VERIFIED for s, broken in zip(statuses, result.success.tolist(), strict=True) if broken)


def test_pgd_agrees_with_foolbox_linf_pgd(trained_fc, mnist):
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    foolbox = pytest.importorskip("foolbox")
    x, y = mnist.test.x[:300], mnist.test.y[:300]
    eps, steps, step = 0.08, 40, 0.004
    ours = PGD(steps=steps, step_size=step, random_start=False, early_stop=False)(trained_fc, x, y, eps=eps)
    for p in trained_fc.parameters():
        p.requires_grad_(False)
    try:
        fmodel = foolbox.PyTorchModel(trained_fc, bounds=(0, 1))
        attack = foolbox.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)
        _, _, success = attack(fmodel, x, y, epsilons=eps)
    finally:
        for p in trained_fc.parameters():
            p.requires_grad_(True)
            p.grad = None
    theirs = 1 - float(success.float().mean())
    assert abs(ours.robust_accuracy - theirs) <= 0.01, (ours.robust_accuracy, theirs)


def test_interval_gradient_is_the_exact_gradient_of_a_linear_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).eval()
    x = torch.rand(3, 1, 2, 3)
    lower, upper = (x - 0.05).clamp(min=0), (x + 0.05).clamp(max=1)
    y = torch.tensor([0, 1, 2])
    found = box_bounds(model, lower, upper, margin_spec(y, 4), coefficients=True)
    radius = ((upper - lower) / 2).flatten(1)
    weight = model[1].weight
    for i in range(3):
        for j in range(4):
            expected = (weight[y[i]] - weight[j]) * radius[i]
            assert torch.allclose(found.input_coefficients[i, j].flatten(), expected, atol=1e-6)


def test_interval_gradient_matches_autograd_where_no_relu_crosses():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(2, 1, 2, 3)
    radius = 1e-5  # so small that no ReLU crosses
    lower, upper = (x - radius).clamp(min=0), (x + radius).clamp(max=1)
    y = torch.tensor([0, 2])
    found = box_bounds(model, lower, upper, margin_spec(y, 3), coefficients=True)
    point = x.clone().requires_grad_(True)
    logits = model(point)
    for i in range(2):
        for j in range(3):
            (grad,) = torch.autograd.grad(logits[i, y[i]] - logits[i, j], point, retain_graph=True)
            scale = ((upper - lower) / 2)[i]
            assert torch.allclose(found.input_coefficients[i, j], grad[i] * scale, atol=1e-9)
