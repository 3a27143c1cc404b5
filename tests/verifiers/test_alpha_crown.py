"""alpha-CROWN and CROWN with CROWN intermediate bounds.

Soundness is checked where it could break: any slope in an operator's ``slope_range`` must give a sound
bound, for the specification (the final pass) and for the layer-by-layer passes (intermediate bounds), on
random networks and points of the box. The optimised bound must never be below CROWN's with the same
intermediate bounds, verified samples must resist PGD, and the bound must be differentiable in the model's
parameters.

Tolerance: every bound is a float32 sum of products over at most a few hundred terms whose magnitude is about
that of the value, so rounding stays far below 1e-4 * (1 + |value|) (the suite's tolerance, see
``test_soundness.tolerance``); comparisons that hold by construction (a running maximum) are exact.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustkit.errors import InputError
from robustkit.models import MODELS, build_model
from robustkit.verifiers import get_verifier, margin_bounds, ops
from robustkit.verifiers.alpha_crown import AlphaCrownOptions, alpha_crown_bound
from robustkit.verifiers.base import input_box, margin_spec
from robustkit.verifiers.crown import Rows, backward_bound, crown_pass, intermediate_bounds, layer_bounds
from robustkit.verifiers.graph import INPUT, build_graph
from robustkit.verifiers.interval import interval_pass
from tests.helpers import train_mnist_fc
from tests.verifiers.nets import box_points, networks
from tests.verifiers.test_soundness import tolerance

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def node_values(graph, x):
    """Every node's output on concrete inputs x (B, *shape), and the input itself at -1."""
    values = {INPUT: x}
    for index, node in enumerate(graph.nodes):
        values[index] = node.op.forward(*(values[source] for source in node.inputs))
    return values


def random_slopes(graph, pre, rows, generator):
    """Slopes uniform in every optimisable node's sound range, (B, rows, *shape)."""
    slopes = {}
    for index, (low, high) in pre.items():
        op = graph.nodes[index].op
        limits = op.slope_range(low, high)
        if limits is None:
            continue
        shape = (low.shape[0], rows, *low.shape[1:])
        share = torch.rand(shape, generator=generator)
        slopes[index] = limits[0].unsqueeze(1) + share * (limits[1] - limits[0]).unsqueeze(1)
    return slopes


def setup(net, eps, seed, batch=3):
    model, input_shape, classes = net
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *input_shape), generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    graph = build_graph(model)
    lower, upper = input_box(x, eps)
    points = box_points(x, eps, n_uniform=300, n_vertices=100, generator=generator)
    with torch.no_grad():
        values = node_values(graph, points.reshape(-1, *input_shape))
    return graph, x, y, lower, upper, margin_spec(y, classes), values, generator


@FAST
@given(net=networks(), eps=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 10**6))
def test_random_slopes_give_sound_final_and_intermediate_bounds(net, eps, seed):
    graph, x, _, lower, upper, spec, values, generator = setup(net, eps, seed)
    batch, count = x.shape[0], values[INPUT].shape[0] // x.shape[0]
    with torch.no_grad():
        _, layers = intermediate_bounds(graph, lower, upper, spec, "crown")
        pre = layers.pre_activation
        # the final pass: any sound slopes, per specification row
        bound = backward_bound(graph, lower, upper, spec, pre, random_slopes(graph, pre, spec.shape[1], generator))
        out = values[len(graph.nodes) - 1].reshape(batch, count, -1)
        actual = torch.einsum("bkn,bpn->bpk", spec, out)
        assert torch.all(actual >= bound.unsqueeze(1) - tolerance(bound.unsqueeze(1)))
        # the layer-by-layer passes: every unstable neuron's rows with their own random slopes
        rows = {index: Rows.where(graph.nodes[index].op.relaxation(*pre[index], ops.BACKWARD).unstable)
                for index in layers.rows}
        slopes = {index: random_slopes(graph, {j: pre[j] for j in pre if j < index}, 2 * found.count, generator)
                  for index, found in rows.items() if found.count}
        tightened = layer_bounds(graph, lower, upper, pre, rows, slopes).pre_activation
    for index, (low, high) in tightened.items():
        seen = values[graph.nodes[index].inputs[0]].reshape(batch, count, -1)
        low, high = low.flatten(1).unsqueeze(1), high.flatten(1).unsqueeze(1)
        assert torch.all(seen >= low - tolerance(low)), f"node {index}: a point below its lower bound"
        assert torch.all(seen <= high + tolerance(high)), f"node {index}: a point above its upper bound"


@FAST
@given(net=networks(), eps=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 10**6),
       intermediate=st.sampled_from(["symbolic", "interval", "crown", "crown+symbolic"]))
def test_alpha_crown_is_never_below_crown_with_the_same_intermediates(net, eps, seed, intermediate):
    graph, _, _, lower, upper, spec, _, _ = setup(net, eps, seed)
    with torch.no_grad():
        plain = crown_pass(graph, lower, upper, spec, intermediate)[0]
        options = AlphaCrownOptions(iterations=4, intermediate=intermediate, early_stop=False)
        tight = alpha_crown_bound(graph, lower, upper, spec, options)
    assert torch.all(tight >= plain)  # a running maximum that starts at crown's bound: exact


def test_crown_intermediates_are_sound_and_tighter_than_interval():
    """CROWN's layer-by-layer bounds lie inside interval arithmetic's at every node (up to rounding), and so
    do the bounds of the specification; a model that interval arithmetic bounds loosely gains."""
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(6, 12), torch.nn.ReLU()]
    layers += [torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(12, 3))
    model = torch.nn.Sequential(*layers).eval()
    graph = build_graph(model)
    x = torch.rand(8, 1, 2, 3)
    lower, upper = input_box(x, 0.1)
    spec = margin_spec(torch.randint(0, 3, (8,)), 3)
    with torch.no_grad():
        box = interval_pass(graph, lower, upper, spec)
        bound, pre = crown_pass(graph, lower, upper, spec, "crown")
    for index, (low, high) in pre.items():
        assert torch.all(low >= box.pre_activation[index][0] - tolerance(low))
        assert torch.all(high <= box.pre_activation[index][1] + tolerance(high))
    assert torch.all(bound >= box.spec_lower - tolerance(bound))
    deepest = max(pre)
    gain = (pre[deepest][1] - pre[deepest][0]) < 0.9 * (box.pre_activation[deepest][1] - box.pre_activation[deepest][0])
    assert bool(gain.any())


def test_row_chunks_do_not_change_the_bounds():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    torch.manual_seed(1)
    model = model.eval()
    graph = build_graph(model)
    x = torch.rand(4, 1, 6, 6)
    lower, upper = input_box(x, 0.05)
    with torch.no_grad():
        whole = layer_bounds(graph, lower, upper).pre_activation
        one_row = layer_bounds(graph, lower, upper, memory_limit_gb=1e-12).pre_activation  # one row per pass
    for index in whole:
        for a, b in zip(whole[index], one_row[index], strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def trained():
    """mnist_fc_small after one epoch of Adam, and 40 test points of mnist5k."""
    from robustkit.data import load_dataset

    data = load_dataset("mnist5k").test
    return train_mnist_fc(1, 1e-3), data.x[:40], data.y[:40]


def test_verified_samples_resist_pgd_and_alpha_crown_is_tighter(trained):
    from robustkit.attacks import PGD

    model, x, y = trained
    eps = 0.03
    crown = get_verifier("crown").verify(model, x, y, eps)
    alpha = get_verifier("alpha-crown", iterations=10).verify(model, x, y, eps)
    attacked = PGD(steps=40, restarts=2)(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert not bool((alpha.verified & attacked.success).any()), "alpha-crown verified a sample that PGD breaks"
    assert bool((alpha.margin_lower >= crown.margin_lower - tolerance(crown.margin_lower)).all())
    assert int(alpha.verified.sum()) >= int(crown.verified.sum())
    assert float(alpha.margin_lower.mean()) > float(crown.margin_lower.mean())


def test_early_stop_keeps_the_verified_samples_and_the_others_bounds(trained):
    model, x, y = trained
    kept = margin_bounds(model, x, y, 0.03, method="alpha-crown", iterations=6)
    full = margin_bounds(model, x, y, 0.03, method="alpha-crown", iterations=6, early_stop=False)
    verified = kept.detach().masked_fill(torch.eye(10, dtype=torch.bool)[y], 1.0).min(1).values > 0
    assert bool(verified.any()) and not bool(verified.all())
    assert torch.equal(verified, full.detach().masked_fill(torch.eye(10, dtype=torch.bool)[y], 1.0).min(1).values > 0)
    close = torch.isclose(kept[~verified], full[~verified], rtol=1e-4, atol=1e-4)
    assert bool(close.all())


@pytest.mark.parametrize("optimize_intermediate", [False, True])
def test_gradient_flows_to_the_parameters(trained, optimize_intermediate):
    model, x, y = trained
    x, y = x[:6], y[:6]
    verifier = get_verifier("alpha-crown", iterations=4, optimize_intermediate=optimize_intermediate)
    with torch.no_grad():
        value = verifier.margin_bounds(model, x, y, 0.03)
    model.zero_grad(set_to_none=True)
    bound = verifier.margin_bounds(model, x, y, 0.03)
    assert torch.allclose(bound.detach(), value, rtol=1e-5, atol=1e-5)
    torch.nn.functional.cross_entropy(-bound, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads if g is not None)
    model.zero_grad(set_to_none=True)


def test_optimised_intermediate_slopes_tighten_further(trained):
    model, x, y = trained
    graph = build_graph(model)
    lower, upper = input_box(x[:8], 0.04)
    spec = margin_spec(y[:8], 10)
    with torch.no_grad():
        final_only = alpha_crown_bound(graph, lower, upper, spec, AlphaCrownOptions(iterations=8))
        both = alpha_crown_bound(graph, lower, upper, spec, AlphaCrownOptions(iterations=8, optimize_intermediate=True))
    assert float((both - final_only).sum()) > 0


@pytest.mark.parametrize("options", [
    {"iterations": -1}, {"iterations": 2.5}, {"lr": 0.0}, {"intermediate": "exact"},
    {"intermediate": "symbolic", "optimize_intermediate": True}, {"memory_limit_gb": 0},
])
def test_bad_options_are_refused(options):
    with pytest.raises(InputError):
        get_verifier("alpha-crown", **options)


def test_unknown_crown_intermediate_is_refused():
    with pytest.raises(InputError, match="crown\\+symbolic"):
        get_verifier("crown", intermediate="deeppoly")


@FAST
@given(net=networks(), eps=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 10**6))
def test_crown_symbolic_intermediates_are_never_below_symbolic_ones(net, eps, seed):
    """Tighter intermediate bounds can loosen CROWN's bound (its adaptive slopes change with them), so
    ``crown+symbolic`` keeps crown's bound with symbolic intermediates: it and alpha-crown are never below it."""
    graph, _, _, lower, upper, spec, _, _ = setup(net, eps, seed)
    with torch.no_grad():
        symbolic = crown_pass(graph, lower, upper, spec, "symbolic")[0]
        both = crown_pass(graph, lower, upper, spec, "crown+symbolic")[0]
        tight = alpha_crown_bound(graph, lower, upper, spec, AlphaCrownOptions(iterations=2))
    assert torch.all(both >= symbolic)
    assert torch.all(tight >= symbolic)


# the large CIFAR and ImageNet networks take minutes each on 2 cores (the symbolic intermediate pass over a
# 3072- or 12288-dimensional input): slow tests, run with -m slow
LARGE = ("cifar_large", "cifar_resnet", "imagenet200_resnet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in MODELS])
def test_every_zoo_network_gets_sound_bounds_never_below_crown(name):
    """alpha-crown on each zoo architecture (untrained weights, a small box so that some but not all ReLUs are
    unstable): sampled points of the box respect the bound, and it is never below CROWN's with the same
    intermediate bounds."""
    spec = MODELS[name]
    model = build_model(name, seed=3).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, *spec.input_shape, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
        graph = build_graph(model)
        lower, upper = input_box(x, 0.002)
        rows = margin_spec(y, spec.num_classes)
        plain = crown_pass(graph, lower, upper, rows, "crown+symbolic")[0]
        tight = alpha_crown_bound(graph, lower, upper, rows, AlphaCrownOptions(iterations=3, early_stop=False))
        points = box_points(x, 0.002, n_uniform=40, n_vertices=24, generator=generator)
        out = model(points.reshape(-1, *spec.input_shape))
    assert torch.all(tight >= plain)
    actual = torch.einsum("kn,pn->pk", rows[0], out)
    assert torch.all(actual >= tight - tolerance(tight)), "a sampled point below alpha-crown's bound"
    stated = rows[0].abs().sum(1) > 0
    assert bool(torch.isfinite(tight[:, stated]).all())
