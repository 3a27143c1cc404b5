"""Every registered attack: results inside the ball and [0, 1], successes re-checked, model state untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks import ATTACKS, PGD, get_attack
from robustkit.errors import InputError

# fast settings per attack; every registered attack must appear here
FAST_OPTIONS = {
    "pgd": {"steps": 20},
    "pgd-l2": {"norm": "l2", "steps": 20},
    "cw-linf": {"steps": 20},
    "cw-l2": {"steps": 30, "binary_search_steps": 3},
    "cw-l2-l2": {"norm": "l2", "steps": 30, "binary_search_steps": 3},
    "interval": {"inner_steps": 10, "iterations": 2, "restarts": 1},
    "foolbox": {"attack": "LinfPGD", "options": {"steps": 10}},
    "worst-case": {"attacks": ["pgd", "cw-linf"]},
    "apgd": {"steps": 20},
    "apgd-l2": {"norm": "l2", "steps": 20},
    "square": {"n_queries": 300},
    "fab": {"steps": 20, "n_target_classes": 3},
    "autoattack": {"version": "fast"},
}


def registered(key: str) -> str:
    return key.removesuffix("-l2") if key not in ATTACKS else key


def cases():
    return [pytest.param(registered(k), v, id=k) for k, v in FAST_OPTIONS.items() if registered(k) in ATTACKS]


def test_every_registered_attack_has_a_case():
    assert set(ATTACKS) <= {registered(k) for k in FAST_OPTIONS}


@pytest.mark.parametrize(("name", "options"), cases())
def test_result_is_inside_the_ball_and_really_misclassified(name, options, trained_fc, mnist):
    attack = get_attack(name, **options)
    x, y = mnist.test.x[:64], mnist.test.y[:64]
    eps = 1.0 if attack.threat == "l2" else 0.1
    result = attack(trained_fc, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    delta = (result.x_adv - x).flatten(1)
    if attack.threat == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-5
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    with torch.no_grad():
        prediction = trained_fc(result.x_adv).argmax(1)
    assert torch.equal(result.success, prediction != y)
    assert torch.equal(result.prediction, prediction)
    assert torch.all((result.margin < 0) == result.success)
    with torch.no_grad():
        clean_wrong = trained_fc(x).argmax(1) != y
    assert torch.all(result.success[clean_wrong])  # clean-misclassified points count as broken
    assert 0 < int(result.success.sum()) < 64  # a real attack on a real net: some broken, some not


@pytest.mark.parametrize(("name", "options"), cases())
def test_model_state_is_left_as_found(name, options, trained_fc, mnist):
    model = trained_fc
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[1].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    flags = [p.requires_grad for p in model.parameters()]
    get_attack(name, **options)(model, mnist.test.x[:8], mnist.test.y[:8], eps=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "3.weight")
    assert not model.training
    model[1].weight.requires_grad_(True)
    model[3].weight.grad = None


def test_same_generator_seed_gives_the_same_result(trained_fc, mnist):
    x, y = mnist.test.x[:32], mnist.test.y[:32]
    first = PGD(steps=10)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(3))
    second = PGD(steps=10)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.x_adv, second.x_adv)


def test_restarts_only_help(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    one = PGD(steps=10, restarts=1)(trained_fc, x, y, eps=0.08, generator=torch.Generator().manual_seed(1))
    five = PGD(steps=10, restarts=5)(trained_fc, x, y, eps=0.08, generator=torch.Generator().manual_seed(1))
    assert torch.all(five.success[one.success])  # the first restart is the same run
    assert five.robust_accuracy <= one.robust_accuracy


def test_stronger_eps_breaks_more(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    accuracies = [PGD(steps=20)(trained_fc, x, y, eps=e).robust_accuracy for e in (0.0, 0.05, 0.1, 0.2)]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] < accuracies[0]


@pytest.mark.parametrize(("options", "match"), [
    ({"norm": "l3"}, "norm"), ({"loss": "mse"}, "loss"), ({"steps": -1}, "steps"), ({"step_size": 0.0}, "positive"),
])
def test_bad_options(options, match):
    with pytest.raises(InputError, match=match):
        PGD(**options)


def test_stray_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        PGD(stepz=3)


def test_bad_inputs(trained_fc, mnist):
    x, y = mnist.test.x[:4], mnist.test.y[:4]
    with pytest.raises(InputError, match="eps"):
        PGD()(trained_fc, x, y, eps=1.5)
    with pytest.raises(InputError, match="NaN"):
        PGD()(trained_fc, torch.full_like(x, float("nan")), y, eps=0.1)
    with pytest.raises(InputError, match="labels"):
        PGD()(trained_fc, x, torch.tensor([0, 1, 2, 10]), eps=0.1)
    with pytest.raises(InputError, match="integer"):
        PGD()(trained_fc, x, y.float(), eps=0.1)


def test_repr_identifies_the_configuration():
    assert repr(PGD(steps=7)).startswith("PGD(norm='linf', loss='ce', steps=7")


def test_pgd_on_an_identity_classifier_finds_the_nearest_flip():
    """A linear 2-class model f = (x0, x1) flattened: the margin is x_y - x_other; PGD must find the flip
    exactly when the ball reaches the decision boundary."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[[[0.6, 0.4]]], [[[0.55, 0.45]]]])
    y = torch.tensor([0, 0])
    result = PGD(steps=20, step_size=0.01, random_start=False)(model, x, y, eps=0.07)
    assert result.success.tolist() == [False, True]
