"""The worst-case ensemble: later attacks see only the samples still robust, the first success is kept, and the
lowest-margin point otherwise; members are validated when the ensemble is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import nn

from robustkit.attacks import PGD, Attack, CWLinf, FoolboxAttack, WorstCase, get_attack
from robustkit.errors import InputError, UnknownNameError

pytestmark = pytest.mark.usefixtures("single_thread")




@dataclass(frozen=True, kw_only=True)
class Shift(Attack):
    """Moves every sample by ``step`` times eps along a fixed direction (for a 2-pixel input) and records the
    samples it was called on."""

    name: ClassVar[str] = "shift"
    direction: tuple[float, float] = (0.0, 0.0)
    calls: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    def run(self, model, x, y, eps, generator):
        self.calls.append(x.clone())
        return x + eps * torch.tensor(self.direction).view(1, 1, 1, 2)


def identity_model() -> nn.Module:
    """Two classes with logits (x0, x1): the margin of class 0 is x0 - x1."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_first_success_is_kept_and_later_attacks_see_only_robust_samples():
    model = identity_model()
    # margins x0 - x1: 0.05, 0.15, 0.5; eps 0.1 moves each pixel by up to 0.1 (margin change up to 0.2)
    x = torch.tensor([[[[0.525, 0.475]]], [[[0.575, 0.425]]], [[[0.75, 0.25]]]])
    y = torch.zeros(3, dtype=torch.int64)
    weak = Shift(direction=(-0.6, 0.0))   # margin -0.06: breaks only the first sample
    strong = Shift(direction=(-1.0, 1.0))  # margin -0.2: breaks the second too, not the third
    tiny = Shift(direction=(-0.1, 0.0))    # margin -0.01: helps nobody, but lowers the third margin least
    ensemble = WorstCase(attacks=[weak, strong, tiny])
    result = ensemble(model, x, y, eps=0.1)
    assert result.success.tolist() == [True, True, False]
    # the first sample keeps the point of the first attack that broke it, not the stronger later one
    assert torch.allclose(result.x_adv[0], x[0] + torch.tensor([-0.06, 0.0]).view(1, 1, 2))
    assert torch.allclose(result.x_adv[1], x[1] + torch.tensor([-0.1, 0.1]).view(1, 1, 2))
    # the unbroken sample ends at its lowest-margin point over all attacks (the strong shift's)
    assert torch.allclose(result.x_adv[2], x[2] + torch.tensor([-0.1, 0.1]).view(1, 1, 2))
    assert result.margin[2] == pytest.approx(0.3)
    assert [len(c) for c in weak.calls] == [3]
    assert torch.equal(strong.calls[0], x[1:])  # only what the weak attack left robust
    assert torch.equal(tiny.calls[0], x[2:])


def test_ensemble_is_at_least_as_strong_as_each_member(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    members = [PGD(steps=10, random_start=False), CWLinf(steps=10, random_start=False)]
    single = [m(trained_fc, x, y, eps=0.05) for m in members]
    worst = WorstCase(attacks=members)(trained_fc, x, y, eps=0.05)
    assert torch.all(worst.success[single[0].success])  # the first member runs on the same points
    union = single[0].success | single[1].success
    assert abs(int(worst.success.sum()) - int(union.sum())) <= 1  # float noise of the smaller batch aside
    assert worst.robust_accuracy <= min(r.robust_accuracy for r in single)
    assert 0 < int(worst.success.sum()) < 100


def test_skipped_when_nothing_is_left():
    model = identity_model()
    x = torch.tensor([[[[0.3, 0.7]]], [[[0.2, 0.8]]]])  # both already misclassified as class 1
    unused = Shift()
    result = WorstCase(attacks=[unused])(model, x, torch.zeros(2, dtype=torch.int64), eps=0.1)
    assert result.success.tolist() == [True, True] and unused.calls == []
    assert torch.equal(result.x_adv, x)


def test_members_given_by_name_pair_or_instance():
    by_name = WorstCase(attacks=["pgd", ("cw-linf", {"steps": 7})])
    by_instance = WorstCase(attacks=(PGD(), CWLinf(steps=7)))
    assert by_name == by_instance and hash(by_name) == hash(by_instance)
    assert by_name.members == (PGD(), CWLinf(steps=7))
    assert repr(by_name).startswith("WorstCase(attacks=(PGD(norm='linf'")
    nested = get_attack("worst-case", attacks=[("foolbox", {"attack": "LinfPGD", "options": {"steps": 5}})])
    assert nested.members == (FoolboxAttack(attack="LinfPGD", options={"steps": 5}),)
    assert hash(nested) == hash(WorstCase(attacks=[FoolboxAttack(options={"steps": 5})]))


def test_threat_is_the_members_and_must_be_shared():
    assert WorstCase(attacks=[PGD(norm="l2"), ("cw-l2", {"norm": "l2"})]).threat == "l2"
    with pytest.raises(InputError, match="share one threat norm"):
        WorstCase(attacks=["pgd", ("pgd", {"norm": "l2"})])


def test_bad_members_fail_when_built():
    with pytest.raises(UnknownNameError, match="Did you mean 'pgd'"):
        WorstCase(attacks=["pgdd"])
    with pytest.raises(InputError, match="at least one attack"):
        WorstCase(attacks=[])
    with pytest.raises(InputError, match="list of attacks"):
        WorstCase(attacks="pgd")
    with pytest.raises(InputError, match="a worst-case member is"):
        WorstCase(attacks=[("pgd", 3)])
    with pytest.raises(InputError, match="steps"):
        WorstCase(attacks=[("pgd", {"steps": -1})])
