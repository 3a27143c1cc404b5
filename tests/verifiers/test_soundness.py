"""Soundness of every registered bound method, table-driven over the registry.

Random networks (linear, conv, residual, normalize, batch norm, average and max pooling layers; ReLU,
LeakyReLU, Sigmoid and Tanh activations), random inputs and eps: more than 1,000 points of each box (uniform,
vertices, the centre and sign-gradient searches) must give outputs inside the method's logit bounds and
margins above its margin bounds. ``exact`` gets only networks whose layers have a mixed-integer encoding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustkit.verifiers import VERIFIERS, Status, bounds, get_verifier, margin_bounds, verify
from tests.verifiers.nets import ACTIVATIONS, PIECEWISE_LINEAR, box_points, networks, pgd_points

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only adds waiting

pytestmark = pytest.mark.usefixtures("single_thread")

# options that keep each method fast on the random nets; every registered method must be listed
METHOD_OPTIONS: dict[str, dict] = {
    "interval": {},
    "symbolic": {},
    "symbolic-naive": {},
    "crown": {},
    "crown-interval": {"intermediate": "interval"},
    "crown-crown": {"intermediate": "crown"},
    "alpha-crown": {"iterations": 5},
    "exact": {"time_limit": 5.0},
    "bab": {"time_limit": 5.0, "root_iterations": 3, "iterations": 3, "attack_steps": 10, "attack_restarts": 2},
}
# cases that run a registered method with other options: case id -> method name
VARIANTS = {"crown-interval": "crown", "crown-crown": "crown"}
EXAMPLES = {"exact": 6, "bab": 8}
# the layers each method can take (``exact`` needs mixed-integer encodings: no smooth activations)
ACTIVATIONS_OF = {"exact": PIECEWISE_LINEAR}


def method_cases():
    cases = []
    for key, options in METHOD_OPTIONS.items():
        name = VARIANTS.get(key, key)
        if name in VERIFIERS:
            cases.append(pytest.param(name, options, id=key))
    return cases


def test_every_registered_method_has_a_soundness_case():
    covered = {VARIANTS.get(key, key) for key in METHOD_OPTIONS}
    assert set(VERIFIERS) <= covered


def tolerance(values: torch.Tensor) -> torch.Tensor:
    return 1e-4 * (1 + values.abs())


def check_sound(model, input_shape, classes, eps, method, options, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((3, *input_shape), generator=generator)
    y = torch.randint(0, classes, (3,), generator=generator)
    verifier = get_verifier(method, **options)
    with torch.no_grad():
        logit = bounds(model, x, eps, method=verifier)
        margins = margin_bounds(model, x, y, eps, method=verifier)
    assert torch.all(logit.lower <= logit.upper + 1e-5)
    points = box_points(x, eps, n_uniform=700, n_vertices=300, generator=generator)
    directions = torch.randn((8, 3, classes), generator=generator)
    searched = torch.stack([pgd_points(model, x, eps, d) for d in directions], dim=1)
    points = torch.cat([points, searched], dim=1)  # 1,009 points per sample
    assert points.shape[1] >= 1000
    with torch.no_grad():
        out = model(points.reshape(-1, *input_shape)).reshape(3, points.shape[1], classes)
    low, high = logit.lower.unsqueeze(1), logit.upper.unsqueeze(1)
    assert torch.all(out >= low - tolerance(low)), f"{method}: a point below the lower bound"
    assert torch.all(out <= high + tolerance(high)), f"{method}: a point above the upper bound"
    true_logit = out.gather(2, y.view(3, 1, 1).expand(-1, points.shape[1], 1))
    actual_margins = true_logit - out  # (3, P, K): f_y - f_j
    assert torch.all(actual_margins >= margins.unsqueeze(1) - tolerance(margins.unsqueeze(1)))
    assert torch.all(margins.gather(1, y.view(3, 1)) == 0)


@pytest.mark.parametrize(("method", "options"), method_cases())
def test_bounds_contain_sampled_outputs(method, options):
    @settings(max_examples=EXAMPLES.get(method, 25), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(net=networks(activations=ACTIVATIONS_OF.get(method, ACTIVATIONS), maxpool=True),
           eps=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5]), seed=st.integers(0, 10**6))
    def run(net, eps, seed):
        model, input_shape, classes = net
        check_sound(model, input_shape, classes, eps, method, options, seed)

    run()


@pytest.mark.parametrize(("method", "options"), method_cases())
def test_zoo_networks_are_bounded_soundly(method, options):
    from robustkit.models import MODELS, build_model

    names = ["mnist_fc_small", "toy2d"] if method == "exact" else ["mnist_small", "cifar_small", "toy2d"]
    for name in names:
        spec = MODELS[name]
        model = build_model(name, seed=3).eval()
        check_sound(model, spec.input_shape, spec.num_classes, 0.005, method, options, seed=1)


@pytest.mark.parametrize(("method", "options"), method_cases())
def test_single_affine_layer_is_exact(method, options):
    """One linear layer: every method must give the closed form W c -+ |W| r exactly."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    x = torch.rand(5, 1, 2, 3)
    eps = 0.1
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    center, radius = ((lower + upper) / 2).flatten(1), ((upper - lower) / 2).flatten(1)
    weight, bias = layer[1].weight, layer[1].bias
    with torch.no_grad():
        expected_lower = center @ weight.T + bias - radius @ weight.abs().T
        expected_upper = center @ weight.T + bias + radius @ weight.abs().T
        got = bounds(layer, x, eps, method=get_verifier(method, **options))
    assert torch.allclose(got.lower, expected_lower, atol=1e-5)
    assert torch.allclose(got.upper, expected_upper, atol=1e-5)


@pytest.mark.parametrize(("method", "options"), method_cases())
def test_verified_samples_resist_attack_and_falsified_ones_are_real(method, options):
    """Per sample: verified implies not attackable; a falsified sample has a real counterexample."""
    from robustkit.models import build_model

    torch.manual_seed(5)
    model = build_model("toy2d", seed=5).eval()
    x = torch.rand(60, 1, 1, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % 3  # some clean points misclassified: falsified by themselves
    for eps in (0.01, 0.05, 0.2):
        result = verify(model, x, y, eps, method=get_verifier(method, **options))
        # a dense grid of the 2-d box is a complete attack for practical purposes
        grid = torch.linspace(0, 1, 61)
        offsets = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2) * 2 - 1
        for i in range(x.shape[0]):
            points = (x[i].reshape(1, 2) + eps * offsets).clamp(0, 1)
            with torch.no_grad():
                broken = bool((model(points.view(-1, 1, 1, 2)).argmax(1) != y[i]).any())
            if result.status[i] is Status.VERIFIED:
                assert not broken, f"{method} verified sample {i} at eps {eps} but the grid breaks it"
            if result.status[i] is Status.FALSIFIED:
                assert result.counterexample is not None
                point = result.counterexample[i]
                assert float((point - x[i]).abs().max()) <= eps + 1e-6
                assert float(point.min()) >= 0 and float(point.max()) <= 1
                with torch.no_grad():
                    assert int(model(point.unsqueeze(0)).argmax(1)) != int(y[i])
