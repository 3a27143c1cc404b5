"""The ``exact`` verifier (MILP): exact minima against dense grids, statuses, counterexamples, tightness
against the relaxations, conv/residual/normalize networks and the time limit."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from robustkit.errors import InputError
from robustkit.models import build_model
from robustkit.nn import Normalize, Residual
from robustkit.verifiers import VERIFIERS, Status, bounds, get_verifier, margin_bounds, verify
from robustkit.verifiers.exact import ExactVerifier
from tests.verifiers.nets import box_points, pgd_points

GRID = 300


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only adds waiting


def sector_labels(points: torch.Tensor) -> torch.Tensor:
    """Three classes by the angle around the centre of the unit square (boundaries cross every box size)."""
    angle = torch.atan2(points[:, 1] - 0.5, points[:, 0] - 0.5) + math.pi
    return (angle / (2 * math.pi / 3)).long().clamp(max=2)


def trained_toy2d(seed: int) -> nn.Module:
    """The zoo's 2-16-16-3 network briefly trained on the sector problem, so its boundaries cross the plane."""
    model = build_model("toy2d", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(256, 2, generator=generator)
    labels = sector_labels(points)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(80):
        loss = nn.functional.cross_entropy(model(points.view(-1, 1, 1, 2)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def random_net(seed: int, hidden: int = 10) -> nn.Module:
    """A random 2-h-h-3 network with enlarged weights (random init alone is nearly constant on the square)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 3))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.eval()


def two_input_nets() -> list[tuple[str, nn.Module]]:
    return [("toy2d-trained-0", trained_toy2d(0)), ("toy2d-trained-1", trained_toy2d(1)),
            ("random-2", random_net(2)), ("random-3", random_net(3, hidden=14))]


@pytest.fixture(scope="module")
def nets() -> list[tuple[str, nn.Module]]:
    return two_input_nets()


def lipschitz(model: nn.Module, row: torch.Tensor) -> float:
    """Upper bound of the L-inf -> |.| Lipschitz constant of row @ f for a Linear/ReLU stack."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        constant = float((row @ linears[-1].weight).abs().sum())
        for layer in linears[:-1]:
            constant *= float(layer.weight.abs().sum(1).max())
    return constant


def grid_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum over a GRID x GRID grid (corners included) of every margin f_y - f_j, (B, K), and the grid's
    L-inf covering radius per sample (every box point is that close to a grid point)."""
    lower, upper = (x - eps).clamp(min=0).view(-1, 2), (x + eps).clamp(max=1).view(-1, 2)
    minima, radius = [], []
    for b in range(x.shape[0]):
        axes = [torch.linspace(float(lower[b, i]), float(upper[b, i]), GRID, dtype=torch.float64) for i in range(2)]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 1, 1, 2)
        with torch.no_grad():
            out = model(points.float()).double()
        minima.append((out[:, y[b]].unsqueeze(1) - out).min(0).values)
        radius.append(float((upper[b] - lower[b]).max()) / (GRID - 1) / 2)
    return torch.stack(minima), torch.tensor(radius, dtype=torch.float64)


def centres(n: int, seed: int) -> torch.Tensor:
    points = torch.rand(n, 1, 1, 2, generator=torch.Generator().manual_seed(seed))
    points[0] = 0.5  # the point where the three sectors meet
    return points


@pytest.mark.parametrize("eps", [0.03, 0.15])
def test_exact_minimum_matches_a_dense_grid(nets, eps):
    """The MILP optimum of each margin lies between the grid minimum minus its resolution slack and it."""
    verifier = ExactVerifier(time_limit=20.0)
    eye = torch.eye(3)
    for name, model in nets:
        x = centres(5, seed=len(name))
        with torch.no_grad():
            y = model(x).argmax(1)
        exact = margin_bounds(model, x, y, eps, method=verifier).double()
        grid, radius = grid_margins(model, x, y, eps)
        for b in range(x.shape[0]):
            for j in range(3):
                if j == int(y[b]):
                    assert exact[b, j] == 0
                    continue
                slack = lipschitz(model, eye[y[b]] - eye[j]) * float(radius[b])
                assert exact[b, j] <= grid[b, j] + 1e-5, f"{name} sample {b} class {j}: above a grid value"
                assert exact[b, j] >= grid[b, j] - slack - 1e-5, f"{name} sample {b} class {j}: below the grid"


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_statuses_agree_with_the_grid_and_decide_everything(nets, eps):
    """With the gradient searches switched off, the MILP alone must verify or falsify every sample."""
    for name, model in nets:
        x = centres(8, seed=7)
        with torch.no_grad():
            y = model(x).argmax(1)
        y[-1] = (y[-1] + 1) % 3  # a clean-misclassified point: falsified by itself
        result = verify(model, x, y, eps, method=ExactVerifier(time_limit=20.0, attack_steps=0))
        grid, radius = grid_margins(model, x, y, eps)
        worst = grid.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), math.inf).min(1).values
        eye = torch.eye(3)
        for b in range(x.shape[0]):
            status = result.status[b]
            assert status in (Status.VERIFIED, Status.FALSIFIED), f"{name} sample {b}: undecided ({status})"
            if float(worst[b]) < 0:
                assert status is not Status.VERIFIED, f"{name} sample {b}: verified but the grid breaks it"
            if status is Status.VERIFIED:
                assert float(worst[b]) > 0 and float(result.margin_lower[b]) > 0
            slack = max(lipschitz(model, eye[y[b]] - eye[j]) for j in range(3)) * float(radius[b])
            if float(worst[b]) > slack + 1e-5:
                assert status is Status.VERIFIED, f"{name} sample {b}: robust on the grid, not verified"
            if float(worst[b]) < -1e-4:
                assert status is Status.FALSIFIED, f"{name} sample {b}: the grid breaks it, not falsified"
        assert result.status[-1] is Status.FALSIFIED and torch.equal(result.counterexample[-1], x[-1])
        check_counterexamples(model, x, y, eps, result)


def check_counterexamples(model, x, y, eps, result) -> None:
    """Every falsified sample's counterexample is in the clipped box and really misclassified."""
    assert result.counterexample is not None and result.counterexample.shape == x.shape
    for b, status in enumerate(result.status):
        point = result.counterexample[b]
        if status is not Status.FALSIFIED:
            assert torch.isnan(point).all()
            continue
        assert float((point - x[b]).abs().max()) <= eps + 1e-6
        assert float(point.min()) >= 0 and float(point.max()) <= 1
        with torch.no_grad():
            assert int(model(point.unsqueeze(0)).argmax(1)) != int(y[b])


def test_counterexamples_on_a_wider_network_are_real():
    """A 16-16-12-4 network trained on a linear teacher: gradient searches and MILPs both falsify for real."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    data = torch.rand(256, 1, 4, 4)
    labels = (data.flatten(1) @ torch.randn(16, 4)).argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(120):
        loss = nn.functional.cross_entropy(model(data), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = torch.rand(12, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    for eps in (0.05, 0.1):
        statuses = []
        for steps in (0, 20):  # the MILP alone, and with the gradient searches first
            result = verify(model, x, y, eps, method=ExactVerifier(time_limit=10.0, attack_steps=steps))
            assert all(s in (Status.VERIFIED, Status.FALSIFIED) for s in result.status)
            check_counterexamples(model, x, y, eps, result)
            statuses.append(result.status)
            assert result.time_s.shape == (12,) and bool((result.time_s > 0).all())
        assert statuses[0] == statuses[1]  # complete either way
        # verified samples survive a gradient search toward every class
        points = torch.stack([pgd_points(model, x, eps, -torch.eye(4)[j].expand(12, 4)) for j in range(4)], 1)
        with torch.no_grad():
            broken = (model(points.view(-1, 1, 4, 4)).argmax(1).view(12, 4) != y.unsqueeze(1)).any(1)
        assert not bool((broken & result.verified).any())
    assert 0 < result.count(Status.FALSIFIED) < 12


def test_exact_is_at_least_as_tight_as_every_relaxation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 5)).eval()
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 5
    gain = 0.0
    for eps in (0.01, 0.05, 0.1):
        exact = margin_bounds(model, x, y, eps, method=ExactVerifier(time_limit=10.0))
        relaxations = {m: margin_bounds(model, x, y, eps, method=m).detach() for m in ("interval", "symbolic", "crown")}
        for method, bound in relaxations.items():
            assert torch.all(exact >= bound - 1e-6), f"exact is looser than {method} at eps {eps}"
        gain = max(gain, float((exact - relaxations["crown"]).max()))
        # verify stops each MILP once its sign is known: its bounds lie between the relaxations' and the minima
        result = verify(model, x, y, eps, method=ExactVerifier(time_limit=10.0, attack_steps=20))
        assert torch.all(result.margins_lower <= exact + 1e-5)
        for method, bound in relaxations.items():
            assert torch.all(result.margins_lower >= bound - 1e-6), method
        masked = result.margins_lower.clone()
        masked[torch.arange(6), y] = math.inf
        assert torch.equal(result.margin_lower, masked.min(1).values)
    assert gain > 1e-2  # and really tighter than the tightest relaxation somewhere


def small_resnet() -> nn.Module:
    """Normalize, conv, a residual block with a conv skip, batch norm (eval), pooling and two linear layers."""
    torch.manual_seed(5)
    block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    batchnorm = nn.BatchNorm2d(2)
    with torch.no_grad():
        batchnorm.running_mean.uniform_(-0.3, 0.3)
        batchnorm.running_var.uniform_(0.5, 1.5)
        batchnorm.weight.uniform_(0.5, 1.5)
        batchnorm.bias.uniform_(-0.2, 0.2)
    model = nn.Sequential(
        Normalize([0.4], [0.3]), nn.Conv2d(1, 2, 3, stride=1, padding=1), nn.ReLU(),
        Residual(block, nn.Conv2d(2, 2, 1)), nn.ReLU(), batchnorm, nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 3),
    )
    return model.eval()


def test_conv_residual_normalize_network_against_dense_sampling():
    model = small_resnet()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 6, 6, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.05
    verifier = ExactVerifier(time_limit=20.0)
    exact = margin_bounds(model, x, y, eps, method=verifier)
    points = box_points(x, eps, n_uniform=3000, n_vertices=1000, generator=generator)
    searched = torch.stack([pgd_points(model, x, eps, torch.eye(3)[j] - torch.eye(3)[y]) for j in range(3)], 1)
    points = torch.cat([points, searched], 1)
    with torch.no_grad():
        out = model(points.reshape(-1, 1, 6, 6)).reshape(3, points.shape[1], 3)
    sampled = (out.gather(2, y.view(3, 1, 1).expand(-1, points.shape[1], 1)) - out).min(1).values
    assert torch.all(sampled >= exact - 1e-5), "a sampled point lies below the exact bound"
    crown = margin_bounds(model, x, y, eps, method="crown").detach()
    assert torch.all(exact >= crown - 1e-6)
    # the exact bound is attained: the gradient search gets close to it, the relaxation may not
    assert float((sampled - exact).max()) < 0.05 * (1 + float(sampled.abs().max()))
    logit = bounds(model, x[:1], 0.02, method=verifier)
    near = box_points(x[:1], 0.02, n_uniform=1000, n_vertices=500, generator=generator)
    with torch.no_grad():
        near_out = model(near.reshape(-1, 1, 6, 6))
    assert torch.all(near_out >= logit.lower - 1e-5) and torch.all(near_out <= logit.upper + 1e-5)
    assert torch.all(logit.lower >= bounds(model, x[:1], 0.02, method="crown").lower.detach() - 1e-6)
    result = verify(model, x, y, 0.2, method=verifier)
    check_counterexamples(model, x, y, 0.2, result)
    assert all(s in (Status.VERIFIED, Status.FALSIFIED) for s in result.status)
    wide = box_points(x, 0.2, n_uniform=2000, n_vertices=1000, generator=generator)
    with torch.no_grad():
        broken = (model(wide.reshape(-1, 1, 6, 6)).argmax(1).view(3, -1) != y.unsqueeze(1)).any(1)
    assert not bool((broken & result.verified).any())


def test_tiny_time_limit_times_out_or_decides_correctly():
    model = build_model("mnist_fc_small", seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.03
    start = time.perf_counter()
    result = verify(model, x, y, eps, method=ExactVerifier(time_limit=0.05, attack_steps=0))
    assert time.perf_counter() - start < 20
    assert result.count(Status.TIMEOUT) >= 1  # the relaxation leaves margins the MILP cannot settle in 50 ms
    assert all(s is not Status.UNKNOWN for s in result.status)
    assert all(float(t) < 0.05 + 1.0 for t in result.time_s)
    check_counterexamples(model, x, y, eps, result)
    if any(s is Status.VERIFIED for s in result.status):
        points = torch.stack([pgd_points(model, x, eps, -torch.eye(10)[j].expand(3, 10)) for j in range(10)], 1)
        with torch.no_grad():
            broken = (model(points.view(-1, 1, 28, 28)).argmax(1).view(3, 10) != y.unsqueeze(1)).any(1)
        assert not bool((broken & result.verified).any())
    # the bounds of a timed-out sample are still sound: never above the value at any sampled point
    points = box_points(x, eps, n_uniform=200, n_vertices=200, generator=generator)
    with torch.no_grad():
        out = model(points.reshape(-1, 1, 28, 28)).reshape(3, -1, 10)
    actual = out.gather(2, y.view(3, 1, 1).expand(-1, out.shape[1], 1)) - out
    assert torch.all(actual >= result.margins_lower.unsqueeze(1) - 1e-5)


def test_eps_zero_gives_the_margins_themselves():
    model = trained_toy2d(0)
    x = centres(6, seed=2)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    exact = margin_bounds(model, x, y, 0.0, method=ExactVerifier())
    assert torch.allclose(exact, logits.gather(1, y.unsqueeze(1)) - logits, atol=1e-5)
    assert all(s is Status.VERIFIED for s in verify(model, x, y, 0.0, method="exact").status)


def test_registered_and_options_validated():
    assert VERIFIERS["exact"] is ExactVerifier
    verifier = get_verifier("exact", time_limit=5, bounds_method="interval")
    assert verifier == ExactVerifier(time_limit=5, bounds_method="interval") and "time_limit=5" in repr(verifier)
    for options in ({"time_limit": 0}, {"time_limit": math.inf}, {"time_limit": True}, {"tolerance": -1.0},
                    {"tolerance": math.nan}, {"bounds_method": "crown"}, {"attack_steps": -1},
                    {"attack_steps": 2.5}):
        with pytest.raises(InputError):
            ExactVerifier(**options)
    with pytest.raises(TypeError):
        ExactVerifier(timelimit=3)  # a misspelled option is an error, not ignored
    with pytest.raises(TypeError):
        ExactVerifier(5.0)  # keyword-only


def test_interval_bounds_method_gives_the_same_exact_minima(nets):
    _, model = nets[0]
    x = centres(4, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    symbolic = margin_bounds(model, x, y, 0.1, method=ExactVerifier(bounds_method="symbolic"))
    interval = margin_bounds(model, x, y, 0.1, method=ExactVerifier(bounds_method="interval"))
    assert torch.allclose(symbolic, interval, atol=1e-5)  # looser big-M constants, same optimum
