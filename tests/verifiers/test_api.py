"""The verifier API: validation, unsupported layers, traced user models, gradients, tightness, chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import InputError, UnknownNameError, UnsupportedLayerError
from robustkit.models import build_model
from robustkit.nn import Residual
from robustkit.verifiers import VERIFIERS, Status, bounds, get_verifier, margin_bounds, verify

FAST = ["interval", "symbolic", "symbolic-naive", "crown"]


@pytest.fixture(scope="module")
def small():
    return build_model("mnist_fc_small", seed=0).eval()


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), "0.1"])
def test_eps_out_of_range(small, method, eps):
    with pytest.raises(InputError, match="eps"):
        margin_bounds(small, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), eps, method=method)


def test_bad_inputs(small):
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(InputError, match="NaN"):
        verify(small, torch.full_like(x, float("nan")), torch.tensor([0, 1]), 0.1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        verify(small, x * 3, torch.tensor([0, 1]), 0.1)
    with pytest.raises(InputError, match="shape"):
        verify(small, x, torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(InputError, match="labels must be in"):
        verify(small, x, torch.tensor([0, 10]), 0.1)
    with pytest.raises(InputError, match="do not fit the model"):
        verify(small, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), 0.1)
    with pytest.raises(InputError, match="integer"):
        verify(small, x, torch.tensor([0.0, 1.0]), 0.1)


def test_unknown_method_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'symbolic'"):
        get_verifier("symbolc")


def test_unsupported_layers_are_all_listed():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.Softplus(),
                          nn.Sequential(nn.MaxPool1d(1)), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError) as info:
        bounds(model, torch.rand(1, 1, 2, 2), 0.1)
    assert info.value.layers == ["nn.GELU at model.2", "nn.Softplus at model.4", "nn.MaxPool1d at model.5.0"]
    assert "Supported layers" in str(info.value) and "Conv2d" in str(info.value)


def test_training_mode_batchnorm_and_dropout_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(8, 2))
    model.train()
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        bounds(model, torch.rand(1, 1, 4, 4), 0.1)
    model.eval()
    assert bounds(model, torch.rand(1, 1, 4, 4), 0.1).lower.shape == (1, 2)


class TracedNet(nn.Module):
    """A user's network with its own forward: functional ReLU, view-flatten, scalar affine, skip connection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.conv((x - 0.5) / 0.25))
        h = h.view(h.size(0), -1)
        h = torch.relu(self.fc(h))
        h = h + 2 * h.relu()
        return self.out(h) - 1.0


@pytest.mark.parametrize("method", FAST)
def test_user_model_with_own_forward_is_traced_and_sound(method):
    torch.manual_seed(0)
    model = TracedNet().eval()
    x = torch.rand(4, 1, 6, 6)
    result = bounds(model, x, 0.05, method=method)
    points = (x.unsqueeze(1) + 0.05 * (2 * torch.rand(4, 400, 1, 6, 6) - 1)).clamp(0, 1)
    with torch.no_grad():
        out = model(points.view(-1, 1, 6, 6)).view(4, 400, 3)
    assert torch.all(out >= result.lower.unsqueeze(1) - 1e-4) and torch.all(out <= result.upper.unsqueeze(1) + 1e-4)


def test_untraceable_and_unreproducible_models_are_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(UnsupportedLayerError, match="cannot be traced"):
        bounds(Branchy(), torch.rand(2, 1, 2, 2), 0.1)
    hooked = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 2)  # invisible in the structure
    with pytest.raises(UnsupportedLayerError, match="does not reproduce its outputs"):
        bounds(hooked, torch.rand(2, 1, 2, 2), 0.1)


@pytest.mark.parametrize("method", FAST)
def test_tightness_order_on_zoo_networks(method):
    del method  # the ordering is checked across all methods at once
    for name, shape in [("mnist_small", (1, 28, 28)), ("mnist_fc", (1, 28, 28)), ("cifar_small", (3, 32, 32))]:
        model = build_model(name, seed=1).eval()
        x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(2))
        y = torch.arange(6) % 10
        with torch.no_grad():
            got = {m: margin_bounds(model, x, y, 0.01, method=m) for m in FAST}
        assert torch.all(got["symbolic"] >= got["interval"] - 1e-5)
        assert torch.all(got["crown"] >= got["symbolic"] - 1e-5)
        assert torch.all(got["symbolic"] >= got["symbolic-naive"] - 0.5)  # not guaranteed, but SLR is tighter here
        assert float((got["symbolic"] - got["interval"]).mean()) > 0


@pytest.mark.parametrize("method", ["interval", "symbolic", "crown"])
def test_bounds_are_differentiable_in_the_parameters(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    model = model.double().eval()
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    params = dict(model.named_parameters())
    for parameter in params.values():
        parameter.requires_grad_(True)
    margins = margin_bounds(model, x, y, 0.1, method=method)
    F.cross_entropy(-margins, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert any(float(p.grad.abs().sum()) > 0 for p in params.values())
    # finite differences along a random direction agree with the gradient
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    analytic = sum(float((params[n].grad * d).sum()) for n, d in direction.items())
    step = 1e-6
    with torch.no_grad():
        for n, p in params.items():
            p.add_(step * direction[n])
        plus = float(F.cross_entropy(-margin_bounds(model, x, y, 0.1, method=method), y))
        for n, p in params.items():
            p.sub_(2 * step * direction[n])
        minus = float(F.cross_entropy(-margin_bounds(model, x, y, 0.1, method=method), y))
    assert abs((plus - minus) / (2 * step) - analytic) < 1e-4 * (1 + abs(analytic))


def test_chunked_bounds_equal_whole_batch_bounds():
    model = build_model("mnist_small", seed=4).eval()
    x = torch.rand(7, 1, 28, 28)
    y = torch.arange(7)
    whole = margin_bounds(model, x, y, 0.02, method="symbolic")
    tiny_budget = get_verifier("symbolic", memory_limit_gb=0.05)  # a few samples per piece
    pieces = margin_bounds(model, x, y, 0.02, method=tiny_budget)
    assert torch.allclose(whole, pieces, atol=1e-5)


def test_verify_statuses_and_counterexamples():
    model = build_model("toy2d", seed=2).eval()
    x = torch.rand(20, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3
    result = verify(model, x, y, 0.0, method="interval")
    assert result.status[0] is Status.FALSIFIED and torch.equal(result.counterexample[0], x[0])
    assert all(s is Status.VERIFIED for s in result.status[1:])  # eps 0: a correct point is verified
    assert result.count("verified") == 19 and result.time_s.shape == (20,)
    assert torch.isnan(result.counterexample[1:]).all()


def test_residual_identity_skip_and_pooling_are_supported():
    torch.manual_seed(1)
    block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(block, None), nn.ReLU(),
                          nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.rand(3, 1, 6, 6)
    for method in FAST:
        got = bounds(model, x, 0.05, method=method)
        points = (x.unsqueeze(1) + 0.05 * (2 * torch.rand(3, 300, 1, 6, 6) - 1)).clamp(0, 1)
        with torch.no_grad():
            out = model(points.view(-1, 1, 6, 6)).view(3, 300, 3)
        assert torch.all(out >= got.lower.unsqueeze(1) - 1e-4) and torch.all(out <= got.upper.unsqueeze(1) + 1e-4)


def test_registry_names():
    assert {"interval", "symbolic", "symbolic-naive", "crown"} <= set(VERIFIERS)


def _resnet_with_everything():
    torch.manual_seed(3)
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    batchnorm = nn.BatchNorm2d(4)
    with torch.no_grad():
        batchnorm.running_mean.uniform_(-0.3, 0.3)
        batchnorm.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), batchnorm, Residual(block, None), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 4, stride=2, padding=1), nn.ReLU()), nn.Conv2d(4, 4, 2, stride=2)),
        nn.ReLU(), nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 5),
    ).eval()


@pytest.mark.parametrize("case", ["mnist_small", "cifar_small", "resnet"])
@pytest.mark.parametrize("eps", [0.005, 0.05, 0.3])
def test_tiled_rows_give_exactly_the_dense_bounds(case, eps):
    """Tiles only skip zeros: the bounds (and their gradients) equal those of dense generator rows.

    The claim is algebraic, so it is checked in float64: tiled and dense rows sum the same products in another
    order, and each result is then within n * 2**-53 * (sum of |products|) of the exact value. With at most
    ~10**5 products per entry that is below 1e-10 relative to the largest entry, so a tolerance of 1e-8 can
    only be crossed by a real difference (float32, whose rounding differs between CPUs, would need a bound of
    about 1e-3 and hide real errors of that size).
    """
    from robustkit.verifiers.base import input_box, margin_spec
    from robustkit.verifiers.graph import build_graph
    from robustkit.verifiers.symbolic import symbolic_pass

    if case == "resnet":
        model, shape = _resnet_with_everything(), (2, 12, 12)
    else:
        model, shape = build_model(case, seed=2).eval(), ((1, 28, 28) if case.startswith("mnist") else (3, 32, 32))
    model = model.double()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([0, 2])
    lower, upper = input_box(x, eps)
    classes = 5 if case == "resnet" else 10
    spec = margin_spec(y, classes).double()
    results = []
    for tiles_per_side in (0, 2, 5):
        model.zero_grad()
        bound = symbolic_pass(build_graph(model), lower, upper, spec, tiles_per_side=tiles_per_side)
        bound.spec_lower.sum().backward()
        results.append((bound.spec_lower.detach(), [p.grad.clone() for p in model.parameters()]))
    for bound, grads in results[1:]:
        assert torch.allclose(bound, results[0][0], rtol=0, atol=1e-8 * (1 + float(results[0][0].abs().max())))
        for got, expected in zip(grads, results[0][1], strict=True):
            assert torch.allclose(got, expected, rtol=0, atol=1e-8 * (1 + float(expected.abs().max())))


def test_verify_many_equals_separate_calls():
    from robustkit.verifiers import verify_many

    model = build_model("mnist_small", seed=5).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    y = torch.arange(6)
    many = verify_many(model, x, y, 0.005, ["interval", "symbolic", "crown", "symbolic-naive"])
    assert list(many) == ["interval", "symbolic", "crown", "symbolic-naive"]
    for name, result in many.items():
        alone = verify(model, x, y, 0.005, method=name)
        assert result.status == alone.status
        assert torch.allclose(result.margins_lower, alone.margins_lower, atol=1e-6)
