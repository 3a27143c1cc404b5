"""Every registered bound operator against the operator contract, table-driven over the registry.

Affine operators: ``adjoint`` is the transpose of ``linear``, ``abs_linear`` is |L| (against the dense
Jacobian) and ``forward`` is ``linear`` plus ``bias``. Non-linear operators, on random input bounds l <= u
(zero width, all negative, all positive, crossing, saturating, tied, tiny and huge) and many points v of
[l, u], compared with the torch layer itself: the interval image and every mode's relaxation contain f(v);
SYMBOLIC and NAIVE relaxations are parallel; a neuron not marked ``unstable`` has equal lower and upper
bounds; the symbolic and backward rules built on the relaxations contain f(v); optimisable slopes stay
sound whatever slopes are asked for; MILP encodings admit exactly f(x) for a fixed input and reach the
brute-force extrema over small boxes, and layers without one say so by name. Float32 tolerances follow the
usual error bound of a sum: 1e-5 * (1 + the sum of the absolute values of its terms).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from robustkit.errors import UnsupportedLayerError
from robustkit.nn import Normalize
from robustkit.verifiers import bounds, margin_bounds
from robustkit.verifiers.exact import affine_maps, encode
from robustkit.verifiers.graph import INPUT, Graph, Node, build_graph
from robustkit.verifiers.milp import minimise
from robustkit.verifiers.ops import (
    BACKWARD,
    NAIVE,
    OPERATORS,
    SYMBOLIC,
    AffineOp,
    BoundOp,
    NonlinearOp,
    NotApplicable,
    Relaxation,
)
from robustkit.verifiers.ops.registry import function_rule, lookup
from robustkit.verifiers.symstate import SymState
from tests.verifiers.nets import box_points

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only adds waiting

MODES = (SYMBOLIC, NAIVE, BACKWARD)


def _batchnorm() -> nn.Module:
    layer = nn.BatchNorm2d(2)
    with torch.no_grad():
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.3, 2.0)
        layer.weight.uniform_(-1.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


Factory = Callable[[], tuple[nn.Module, tuple[int, ...]]]
# every registered module type: instances (with the input shape they take) covering their settings
FACTORIES: dict[type[nn.Module], list[Factory]] = {
    nn.Linear: [lambda: (nn.Linear(6, 4), (6,)), lambda: (nn.Linear(5, 3, bias=False), (5,))],
    nn.Conv2d: [lambda: (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 6)),
                lambda: (nn.Conv2d(2, 4, 2, dilation=2, groups=2, bias=False), (2, 5, 5))],
    nn.ReLU: [lambda: (nn.ReLU(), (2, 3, 3))],
    nn.LeakyReLU: [lambda: (nn.LeakyReLU(0.1), (7,)), lambda: (nn.LeakyReLU(0.5), (2, 2, 2))],
    nn.Sigmoid: [lambda: (nn.Sigmoid(), (2, 9))],
    nn.Tanh: [lambda: (nn.Tanh(), (2, 9))],
    nn.MaxPool2d: [
        lambda: (nn.MaxPool2d(2), (2, 4, 4)),
        lambda: (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 5, 6)),
        lambda: (nn.MaxPool2d(2, stride=1, padding=1, dilation=2), (2, 4, 3)),
        lambda: (nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True), (1, 4, 5)),
    ],
    nn.Flatten: [lambda: (nn.Flatten(), (2, 3, 4))],
    Normalize: [lambda: (Normalize([0.1, 0.5], [0.3, 2.0]), (2, 3, 3))],
    nn.BatchNorm2d: [lambda: (_batchnorm(), (2, 3, 3))],
    nn.AvgPool2d: [lambda: (nn.AvgPool2d(2), (2, 4, 5)),
                   lambda: (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (1, 5, 5))],
    nn.AdaptiveAvgPool2d: [lambda: (nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7))],
}
# registered non-linear layers without a mixed-integer encoding (every other one must have an exact one)
NO_MILP = {nn.Sigmoid, nn.Tanh}


def build_op(module: nn.Module) -> BoundOp:
    entry = lookup(module)
    assert entry is not None
    return entry.build(module)


def cases(kind: type[BoundOp]) -> list:
    found = []
    for module_type in OPERATORS:
        for number, factory in enumerate(FACTORIES.get(module_type, [])):
            torch.manual_seed(number)
            module, shape = factory()
            module.eval()
            if isinstance(build_op(module), kind):
                found.append(pytest.param(module, shape, id=f"{module_type.__name__}-{number}"))
    return found


AFFINE, NONLINEAR = cases(AffineOp), cases(NonlinearOp)
EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def tolerance(*terms: torch.Tensor) -> torch.Tensor:
    """1e-5 * (1 + sum of |terms|): the float32 error bound of a short sum of these terms."""
    total = 1 + sum(t.abs() for t in terms)
    return 1e-5 * total


def test_every_registered_operator_has_a_factory():
    missing = [t.__name__ for t in OPERATORS if not FACTORIES.get(t)]
    assert not missing, f"registered layer types without a factory in FACTORIES: {missing}"


@pytest.mark.parametrize(("module", "shape"), AFFINE + NONLINEAR)
def test_operator_reproduces_its_layer(module, shape):
    op = build_op(module)
    x = torch.randn(3, *shape) * 3
    with torch.no_grad():
        expected, got = module(x), op.forward(x)
    assert op.out_shape(shape) == tuple(expected.shape[1:])
    assert torch.all((got - expected).abs() <= tolerance(expected))


def dense_jacobian(op: AffineOp, shape: tuple[int, ...]) -> torch.Tensor:
    """The (n_out, n_in) matrix of ``op.linear``, from an identity basis."""
    n_in = int(np.prod(shape))
    with torch.no_grad():
        return op.linear(torch.eye(n_in).view(n_in, *shape)).reshape(n_in, -1).T


@pytest.mark.parametrize(("module", "shape"), AFFINE)
def test_affine_adjoint_is_the_transpose_and_abs_linear_is_abs(module, shape):
    op = build_op(module)
    assert isinstance(op, AffineOp)
    out_shape = op.out_shape(shape)
    jacobian = dense_jacobian(op, shape)

    @EXAMPLES
    @given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), rows=st.integers(1, 3),
           scale=st.sampled_from([1e-3, 1.0, 30.0]))
    def run(seed, batch, rows, scale):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *shape), generator=generator) * scale
        lam = torch.randn((batch, rows, *out_shape), generator=generator)
        radius = torch.rand((batch, *shape), generator=generator) * scale
        with torch.no_grad():
            image, back = op.linear(x), op.adjoint(lam, shape)
            abs_image, forward = op.abs_linear(radius), op.forward(x)
            bias = op.bias(out_shape)
        assert back.shape == lam.shape[:2] + shape
        left = (lam * image.unsqueeze(1)).flatten(2).sum(2)  # <lam, L x>
        right = (back * x.unsqueeze(1)).flatten(2).sum(2)  # <L^T lam, x>
        size = (lam.abs().flatten(2) * (x.abs().flatten(1) @ jacobian.abs().T).unsqueeze(1)).sum(2)
        assert torch.all((left - right).abs() <= tolerance(size))
        expected_abs = radius.flatten(1) @ jacobian.abs().T
        assert torch.all((abs_image.flatten(1) - expected_abs).abs() <= tolerance(expected_abs))
        linear_part = x.flatten(1) @ jacobian.T
        assert torch.all((image.flatten(1) - linear_part).abs() <= tolerance(x.abs().flatten(1) @ jacobian.abs().T))
        expected_forward = image if bias is None else image + bias
        assert torch.allclose(forward, expected_forward, rtol=0, atol=1e-5)

    run()


# -- non-linear operators ------------------------------------------------------------------------------------

BOUND_KINDS = ("zero-width", "negative", "positive", "crossing", "saturating", "tied", "tiny", "huge", "mixed")


def random_bounds(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Input bounds (l, u) of ``shape`` of one kind ("mixed": every neuron of a random kind)."""
    def rand() -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    if kind == "mixed":
        choice = torch.randint(0, len(BOUND_KINDS) - 1, shape, generator=generator)
        pairs = [random_bounds(shape, k, generator) for k in BOUND_KINDS[:-1]]
        lower = torch.stack([p[0] for p in pairs]).gather(0, choice.unsqueeze(0))[0]
        upper = torch.stack([p[1] for p in pairs]).gather(0, choice.unsqueeze(0))[0]
        return lower, upper
    if kind == "zero-width":
        point = torch.randn(shape, generator=generator) * 5
        return point, point.clone()
    if kind == "negative":
        upper = -3 * rand()
        return upper - 3 * rand(), upper
    if kind == "positive":
        lower = 3 * rand()
        return lower, lower + 3 * rand()
    if kind == "crossing":
        return -3 * rand() - 1e-3, 3 * rand() + 1e-3
    if kind == "saturating":  # wide, past the point where the S-shaped functions are flat in float32
        return torch.full(shape, -30.0) - 10 * rand(), torch.full(shape, 40.0) * rand()
    if kind == "tied":  # integer bounds: many equal lower bounds in a pooling window
        lower = torch.randint(-2, 2, shape, generator=generator).float()
        return lower, lower + torch.randint(0, 2, shape, generator=generator).float()
    if kind == "tiny":
        lower = torch.randn(shape, generator=generator)
        return lower, lower + 1e-6 * rand()
    assert kind == "huge"
    lower = -torch.exp(rand() * 50)
    return lower, torch.where(rand() < 0.5, lower / 2, torch.exp(rand() * 50))


def sample_points(lower: torch.Tensor, upper: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Points (B, P, *shape) of [lower, upper]: uniform, vertices, and both corners exactly."""
    t = torch.rand((lower.shape[0], count, *lower.shape[1:]), generator=generator)
    t[:, : count // 4] = (t[:, : count // 4] < 0.5).float()
    t[:, 0], t[:, 1] = 0.0, 1.0
    low, high = lower.unsqueeze(1), upper.unsqueeze(1)
    points = torch.where(t == 1, high, low + (high - low) * t)
    return torch.minimum(torch.maximum(points, low), high)


def line_values(relax: Relaxation, points: torch.Tensor, upper_side: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower (or upper) line at the points, (B, P, n_out), and its tolerance."""
    b, p = points.shape[:2]
    flat = points.reshape(b, p, -1)
    if relax.index is not None:
        flat = flat.gather(2, relax.index.unsqueeze(1).expand(b, p, -1))
    slope = relax.upper_slope if upper_side else relax.lower_slope
    offset = relax.upper_offset if upper_side else relax.lower_offset
    product = slope.reshape(b, 1, -1) * flat
    constant = torch.zeros_like(product) if offset is None else offset.reshape(b, 1, -1).expand_as(product)
    value = product + constant
    return value, tolerance(product, constant, value)


def layer_outputs(module: nn.Module, points: torch.Tensor) -> torch.Tensor:
    b, p = points.shape[:2]
    with torch.no_grad():
        return module(points.reshape(b * p, *points.shape[2:])).reshape(b, p, -1)


def check_relaxations(module: nn.Module, op: NonlinearOp, lower: torch.Tensor, upper: torch.Tensor,
                      generator: torch.Generator) -> None:
    points = sample_points(lower, upper, 200, generator)
    f = layer_outputs(module, points)
    b, out_shape = lower.shape[0], op.out_shape(tuple(lower.shape[1:]))
    with torch.no_grad():
        low, high = op.interval_bounds(lower, upper)
    assert low.shape == high.shape == (b, *out_shape)
    assert torch.all(low.reshape(b, 1, -1) <= f + tolerance(f)), "a point below the interval bound"
    assert torch.all(f <= high.reshape(b, 1, -1) + tolerance(f)), "a point above the interval bound"
    for mode in MODES:
        with torch.no_grad():
            relax = op.relaxation(lower, upper, mode)
        for tensor in (relax.lower_slope, relax.upper_slope, relax.unstable, relax.lower_offset, relax.upper_offset):
            assert tensor is None or (tensor.shape == (b, *out_shape) and not tensor.isnan().any())
        if relax.index is not None:
            n_in = lower[0].numel()
            assert relax.index.shape == (b, int(np.prod(out_shape)))
            assert int(relax.index.min()) >= 0 and int(relax.index.max()) < n_in
        below, below_tol = line_values(relax, points, upper_side=False)
        above, above_tol = line_values(relax, points, upper_side=True)
        assert torch.all(below <= f + below_tol + tolerance(f)), f"{mode}: the lower line cuts off a point"
        assert torch.all(f <= above + above_tol + tolerance(f)), f"{mode}: the upper line cuts off a point"
        stable = ~relax.unstable.reshape(b, 1, -1).expand_as(f)
        assert torch.all((above - below)[stable] <= (above_tol + below_tol)[stable]), \
            f"{mode}: a neuron not marked unstable has different lower and upper bounds"
        if mode in (SYMBOLIC, NAIVE):
            assert torch.equal(relax.lower_slope, relax.upper_slope), f"{mode}: lines not parallel"


def check_rules(module: nn.Module, op: NonlinearOp, lower: torch.Tensor, upper: torch.Tensor,
                generator: torch.Generator) -> None:
    """The symbolic and backward rules (with optimisable slopes where the op has them) contain f(v)."""
    in_shape = tuple(lower.shape[1:])
    out_shape = op.out_shape(in_shape)
    points = sample_points(lower, upper, 200, generator)
    f = layer_outputs(module, points)
    b, p = points.shape[:2]
    for mode in (SYMBOLIC, NAIVE):
        with torch.no_grad():
            state = op.symbolic([SymState.from_box(lower, upper)], (lower, upper), 0, mode)
        center, radius = state.center.reshape(b, 1, -1), state.radius().reshape(b, 1, -1)
        slack = tolerance(center, radius, f)
        assert torch.all(center - radius <= f + slack) and torch.all(f <= center + radius + slack), mode
    coeff = torch.randn((b, 3, *out_shape), generator=generator)
    range_ = op.slope_range(lower, upper)
    choices: list[torch.Tensor | None] = [None]
    if range_ is not None:  # slopes inside and outside the range: the op clamps them
        lo, hi = range_
        spread = torch.rand((b, 3, *in_shape), generator=generator) * 3 - 1
        choices.append(lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * spread)
    for slopes in choices:
        with torch.no_grad():
            (incoming,), constant = op.backward(coeff, [in_shape], out_shape, (lower, upper), slopes)
        assert incoming.shape == (b, 3, *in_shape)
        terms = incoming.reshape(b, 1, 3, -1) * points.reshape(b, p, 1, -1)
        value = terms.sum(3) + (0 if constant is None else constant.unsqueeze(1))
        target = (coeff.reshape(b, 1, 3, -1) * f.unsqueeze(2)).sum(3)
        slack = 1e-5 * (1 + terms.abs().sum(3) + (coeff.reshape(b, 1, 3, -1) * f.unsqueeze(2)).abs().sum(3)
                        + (0 if constant is None else constant.abs().unsqueeze(1)))
        assert torch.all(value <= target + slack), "the backward bound exceeds coeff . f(v)"
        if slopes is not None:
            relax = op.with_slopes(op.relaxation(lower, upper, BACKWARD), slopes, lower, upper)
            for k in range(3):
                row = Relaxation(*(_row(t, k, lower.dim()) for t in (relax.lower_slope, relax.upper_slope)),
                                 relax.unstable, _row(relax.lower_offset, k, lower.dim()),
                                 _row(relax.upper_offset, k, lower.dim()), relax.index)
                below, below_tol = line_values(row, points, upper_side=False)
                assert torch.all(below <= f + below_tol + tolerance(f)), "an optimised slope cuts off a point"


def _row(value: torch.Tensor | None, k: int, dims: int) -> torch.Tensor | None:
    """Specification row k of a relaxation tensor that has one per row (B, K, *shape), else the tensor."""
    return value if value is None or value.dim() == dims else value[:, k]


@pytest.mark.parametrize(("module", "shape"), NONLINEAR)
def test_nonlinear_bounds_contain_the_layer(module, shape):
    op = build_op(module)
    assert isinstance(op, NonlinearOp)

    @EXAMPLES
    @given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3))
    def run(seed, batch):
        generator = torch.Generator().manual_seed(seed)
        for kind in BOUND_KINDS:
            lower, upper = random_bounds((batch, *shape), kind, generator)
            check_relaxations(module, op, lower, upper, generator)
            check_rules(module, op, lower, upper, generator)

    run()


@pytest.mark.parametrize(("module", "shape"), NONLINEAR)
def test_bounds_through_the_layer_have_finite_gradients(module, shape):
    """Margin bounds of a small net around the layer, with saturating weights, at eps 0 (zero-width bounds),
    0.1 and 1: finite, and with finite gradients for every parameter (no 0 * inf in unused branches)."""
    torch.manual_seed(0)
    if len(shape) == 3:
        before, input_shape = nn.Conv2d(1, shape[0], 3, padding=1), (1, *shape[1:])
    else:
        before, input_shape = nn.Sequential(nn.Flatten(), nn.Linear(4, int(np.prod(shape)))), (1, 2, 2)
    with torch.no_grad():
        out_size = module(torch.zeros(1, *shape)).numel() if len(shape) == 3 else int(np.prod(shape))
    model = nn.Sequential(before, module, nn.Flatten(), nn.Linear(out_size, 3)).eval()
    with torch.no_grad():
        for parameter in before.parameters():
            parameter.mul_(30)
    x = torch.rand(2, *input_shape)
    for eps in (0.0, 0.1, 1.0):
        for method in ("interval", "symbolic", "symbolic-naive", "crown"):
            model.zero_grad()
            found = margin_bounds(model, x, torch.tensor([0, 1]), eps, method=method)
            found.sum().backward()
            assert torch.isfinite(found).all(), (method, eps)
            for name, parameter in model.named_parameters():
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), (method, eps, name)


@pytest.mark.parametrize("kind", [nn.Sigmoid, nn.Tanh])
def test_s_shaped_bounds_at_the_extremes(kind):
    """Saturation and degenerate intervals: no NaN, exact at l == u, the constant interval beyond 1e30."""
    op = build_op(kind())
    assert isinstance(op, NonlinearOp)
    lower = torch.tensor([[-30.0, -1e4, 0.0, -1e38, -torch.inf, 2.0, 1e-7, -5.0]])
    upper = torch.tensor([[40.0, 1e4, 0.0, 1e38, torch.inf, 2.0, 2e-7, -5.0]])
    f_lower, f_upper = op.interval_bounds(lower, upper)
    for mode in MODES:
        relax = op.relaxation(lower, upper, mode)
        for tensor in (relax.lower_slope, relax.upper_slope, relax.lower_offset, relax.upper_offset):
            assert tensor is not None and not tensor.isnan().any()
        assert relax.unstable.tolist() == [[True, True, False, True, True, False, True, False]]
        for j in (2, 5, 7):  # zero width: both lines pass through (l, f(l))
            for slope, offset in ((relax.lower_slope, relax.lower_offset), (relax.upper_slope, relax.upper_offset)):
                assert offset is not None
                value = slope[0, j] * lower[0, j] + offset[0, j]
                assert abs(float(value - f_lower[0, j])) <= 1e-6
        for j in (3, 4):  # beyond +-1e30: the constant interval
            assert float(relax.lower_slope[0, j]) == 0 == float(relax.upper_slope[0, j])
            assert relax.lower_offset is not None and relax.upper_offset is not None
            assert float(relax.lower_offset[0, j]) == float(f_lower[0, j])
            assert float(relax.upper_offset[0, j]) == float(f_upper[0, j])
    crown = op.relaxation(lower, upper, BACKWARD)
    symbolic = op.relaxation(lower, upper, SYMBOLIC)
    # on [-30, 40] DeepPoly's parallel lines are flat, [f(l), f(u)]; CROWN's tangent lines are tighter at 0
    assert crown.upper_offset is not None and symbolic.upper_offset is not None
    assert crown.lower_offset is not None and symbolic.lower_offset is not None
    assert float(crown.upper_offset[0, 0]) < float(symbolic.upper_offset[0, 0]) - 0.1
    assert float(crown.lower_offset[0, 0]) > float(symbolic.lower_offset[0, 0]) + 0.1


@pytest.mark.parametrize("kind", [nn.Sigmoid, nn.Tanh])
def test_s_shaped_crossing_lines_touch_the_function(kind):
    """CROWN's crossing-case lines are tangent (or chords): tight, touching f somewhere on [l, u]."""
    op = build_op(kind())
    assert isinstance(op, NonlinearOp)
    generator = torch.Generator().manual_seed(0)
    lower, upper = -4 * torch.rand(1, 50, generator=generator) - 0.1, 4 * torch.rand(1, 50, generator=generator) + 0.1
    relax = op.relaxation(lower, upper, BACKWARD)
    grid = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.linspace(0, 1, 20001).view(1, -1, 1)
    f = op.forward(grid)
    assert relax.upper_offset is not None and relax.lower_offset is not None
    gap_up = (relax.upper_slope.unsqueeze(1) * grid + relax.upper_offset.unsqueeze(1) - f).amin(1)
    gap_down = (f - relax.lower_slope.unsqueeze(1) * grid - relax.lower_offset.unsqueeze(1)).amin(1)
    assert torch.all(gap_up >= -1e-6) and torch.all(gap_up <= 1e-3)
    assert torch.all(gap_down >= -1e-6) and torch.all(gap_down <= 1e-3)


# -- mixed-integer encodings ---------------------------------------------------------------------------------


def one_layer(op: BoundOp, shape: tuple[int, ...]) -> tuple[Graph, dict]:
    graph = Graph((Node(op, (INPUT,)),))
    return graph, affine_maps(graph, shape, torch.zeros(1))


@pytest.mark.parametrize(("module", "shape"), NONLINEAR)
def test_milp_encoding_admits_exactly_the_layer(module, shape):
    """Input fixed at x, the layer's input bounds [l, u] around it: every output's MILP minimum and maximum
    are f(x). Layers without an encoding refuse by name."""
    op = build_op(module)
    graph, maps = one_layer(op, shape)
    name = type(module).__name__
    if type(module) in NO_MILP:
        point = np.zeros(int(np.prod(shape)))
        with pytest.raises(NotApplicable, match=name):
            encode(graph, maps, point, point, {0: (point - 1, point + 1)})
        return

    @settings(max_examples=5, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["crossing", "tied", "mixed"]))
    def run(seed, kind):
        generator = torch.Generator().manual_seed(seed)
        lower, upper = random_bounds((1, *shape), kind, generator)
        lower, upper = lower.clamp(-10, 10), upper.clamp(-10, 10)
        x = sample_points(lower, upper, 3, generator)[:, 2]
        with torch.no_grad():
            expected = module(x).flatten().double().numpy()
        point = x.flatten().double().numpy()
        encoding = encode(graph, maps, point, point, {0: (lower.flatten().double().numpy(),
                                                          upper.flatten().double().numpy())})
        outputs = torch.randperm(expected.size, generator=generator)[:6].tolist()
        for o in outputs:
            objective = np.zeros(expected.size)
            objective[o] = 1.0
            low, high = minimise(encoding, objective, 10.0), minimise(encoding, -objective, 10.0)
            assert low.optimal and high.optimal and low.value is not None and high.value is not None
            slack = 1e-5 * (1 + abs(expected[o]))
            assert abs(low.value - expected[o]) <= slack and abs(-high.value - expected[o]) <= slack, name

    run()


@pytest.mark.parametrize(("module", "shape"), [c for c in NONLINEAR if type(c.values[0]) not in NO_MILP])
def test_milp_minimum_matches_brute_force(module, shape):
    """Three inputs free in their bounds, the others fixed: the MILP minimum of a random objective equals the
    brute-force minimum over every combination of the breakpoints (all bounds and 0), where piecewise-linear
    layers attain their extrema."""
    op = build_op(module)
    graph, maps = one_layer(op, shape)
    n_in = int(np.prod(shape))

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["crossing", "tied", "mixed"]))
    def run(seed, kind):
        generator = torch.Generator().manual_seed(seed)
        lower, upper = random_bounds((n_in,), kind, generator)
        lower, upper = lower.clamp(-10, 10), upper.clamp(-10, 10)
        start = int(torch.randint(0, n_in - 2, (1,), generator=generator))
        free = torch.zeros(n_in, dtype=torch.bool)
        free[start : start + 3] = True
        fixed = lower + (upper - lower) * torch.rand(n_in, generator=generator)
        lower, upper = torch.where(free, lower, fixed), torch.where(free, upper, fixed)
        breakpoints = torch.cat([lower, upper, torch.zeros(1)]).unique()
        choices = [breakpoints[(breakpoints >= lower[i]) & (breakpoints <= upper[i])] for i in range(start, start + 3)]
        grid = torch.cartesian_prod(*choices)
        points = lower.repeat(grid.shape[0], 1)
        points[:, start : start + 3] = grid
        with torch.no_grad():
            outputs = module(points.view(-1, *shape)).flatten(1).double()
        objective = torch.randn(outputs.shape[1], generator=generator).double()
        brute = float((outputs @ objective).min())
        low, high = lower.double().numpy(), upper.double().numpy()
        outcome = minimise(encode(graph, maps, low, high, {0: (low, high)}), objective.numpy(), 10.0)
        assert outcome.optimal and outcome.value is not None
        slack = 1e-5 * (1 + float((outputs.abs() @ objective.abs()).max()))
        assert outcome.bound <= brute + slack, "the MILP bound is above a reachable value"
        assert abs(outcome.value - brute) <= slack

    run()


@pytest.mark.parametrize("layer", [nn.Sigmoid, nn.Tanh])
def test_exact_refuses_smooth_activations_by_name(layer):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), layer(), nn.Linear(3, 2)).eval()
    with pytest.raises(Exception, match=layer.__name__):
        bounds(model, torch.rand(2, 1, 2, 2), 0.1, method="exact")


# -- traced code ---------------------------------------------------------------------------------------------


class TracedActivations(nn.Module):
    """A user's network spelling the new layers as functions and tensor methods."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.conv(x) * 3)
        h = F.leaky_relu(h - 0.5, 0.2)
        h = F.max_pool2d(h, 2)
        h = h.tanh()
        return self.fc(torch.flatten(h, 1))


def test_traced_functions_become_the_registered_operators():
    torch.manual_seed(0)
    model = TracedActivations().eval()
    graph = build_graph(model)
    kinds = [type(node.op).__name__ for node in graph.nodes]
    assert kinds == ["Conv2dOp", "ScalarAffineOp", "SigmoidOp", "ScalarAffineOp", "LeakyReLUOp", "MaxPool2dOp",
                     "TanhOp", "FlattenOp", "LinearOp"]
    assert graph.nodes[4].op.negative_slope == pytest.approx(0.2)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 6, 6, generator=generator)
    points = box_points(x, 0.05, n_uniform=700, n_vertices=300, generator=generator)
    with torch.no_grad():
        out = model(points.reshape(-1, 1, 6, 6)).reshape(3, points.shape[1], 4)
    for method in ("interval", "symbolic", "symbolic-naive", "crown"):
        with torch.no_grad():
            found = bounds(model, x, 0.05, method=method)
        low, high = found.lower.unsqueeze(1), found.upper.unsqueeze(1)
        assert torch.all(out >= low - tolerance(low)) and torch.all(out <= high + tolerance(high)), method


def test_max_pool_with_indices_is_refused():
    class Indices(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, 2, return_indices=True)[0].flatten(1)

    with pytest.raises(UnsupportedLayerError, match="max_pool2d_with_indices"):
        build_graph(Indices())
    with pytest.raises(UnsupportedLayerError, match=r"nn.MaxPool2d at model.0 \(return_indices=True"):
        build_graph(nn.Sequential(nn.MaxPool2d(2, return_indices=True)))
    rule = function_rule(F.max_pool2d)
    assert rule is not None
    assert "return_indices" in str(rule((2,), {"return_indices": True}))
    assert isinstance(rule((3, 2, 1), {"ceil_mode": True}), NonlinearOp)
    assert "more than half" in str(rule((2,), {"padding": 2}))
