"""Any input box and any linear specification, for every registered method; contexts, capabilities and
the paper-faithful symbolic option."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustkit.errors import InputError
from robustkit.models import build_model
from robustkit.verifiers import (
    VERIFIERS,
    Status,
    differentiable_methods,
    get_verifier,
    make_context,
    margin_bounds,
    spec_bounds,
    verify,
    verify_many,
    verify_spec,
)
from tests.verifiers.nets import networks
from tests.verifiers.test_soundness import METHOD_OPTIONS, method_cases


def _box(shape: tuple[int, ...], batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random box anywhere (not inside [0, 1], not centred on anything), with some zero-width coordinates."""
    a = torch.randn((batch, *shape), generator=generator) * 2
    width = torch.rand((batch, *shape), generator=generator) * 0.4
    width[torch.rand(width.shape, generator=generator) < 0.1] = 0.0
    return a, a + width


def _points(lower: torch.Tensor, upper: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform points and vertices of each box: (B, P, *shape)."""
    b = lower.shape[0]
    shape = (b, count, *lower.shape[1:])
    uniform = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(shape, generator=generator)
    pick = torch.rand(shape, generator=generator) < 0.5
    vertices = torch.where(pick, upper.unsqueeze(1), lower.unsqueeze(1))
    return torch.cat([uniform, vertices], 1)


@pytest.mark.parametrize(("method", "options"), method_cases())
def test_arbitrary_boxes_and_specifications_are_bounded_soundly(method, options):
    @settings(max_examples=4 if method == "exact" else 15, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(net=networks(kinds=("fc", "conv") if method == "exact" else ("fc", "conv", "resnet")),
           seed=st.integers(0, 10**6), rows=st.integers(1, 4))
    def run(net, seed, rows):
        model, input_shape, classes = net
        generator = torch.Generator().manual_seed(seed)
        lower, upper = _box(input_shape, 2, generator)
        spec = torch.randn((2, rows, classes), generator=generator)
        offset = torch.randn((2, rows), generator=generator)
        with torch.no_grad():
            found = spec_bounds(model, lower, upper, spec, offset, method=get_verifier(method, **options))
            points = _points(lower, upper, 400, generator)
            outputs = model(points.flatten(0, 1)).view(2, points.shape[1], classes)
        values = torch.einsum("bkn,bpn->bpk", spec, outputs) + offset.unsqueeze(1)
        slack = 1e-4 * (1 + values.abs())
        assert torch.all(values >= found.unsqueeze(1) - slack), f"{method}: a point of the box below its bound"

    run()


def test_specification_of_margins_gives_the_margin_bounds():
    model = build_model("mnist_fc_small", seed=0).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 4, 7])
    eps = 0.02
    spec = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    for method in ("interval", "symbolic", "crown"):
        with torch.no_grad():
            assert torch.equal(spec_bounds(model, lower, upper, spec, method=method),
                               margin_bounds(model, x, y, eps, method=method))


def test_verify_spec_statuses_and_counterexamples():
    """A property that holds is verified by exact; one that fails is falsified with a re-checked point."""
    model = build_model("toy2d", seed=0).eval()
    lower, upper = torch.full((1, 1, 1, 2), 0.4), torch.full((1, 1, 1, 2), 0.45)
    with torch.no_grad():
        centre = model((lower + upper) / 2)[0]
    top = int(centre.argmax())
    other = (top + 1) % 3
    row = torch.zeros(1, 3)
    row[0, top], row[0, other] = 1.0, -1.0
    holds = verify_spec(model, lower, upper, row, method="exact", time_limit=5.0)
    bounds_only = verify_spec(model, lower, upper, row, method="crown")
    assert holds.status[0] is Status.VERIFIED or bounds_only.status[0] is not Status.VERIFIED
    # the same row shifted past its true minimum must fail, and exact must show where
    shift = -float(spec_bounds(model, lower, upper, row, method="exact", time_limit=5.0)) - 1.0
    broken = verify_spec(model, lower, upper, row, torch.tensor([shift]), method="exact", time_limit=5.0)
    assert broken.status[0] is Status.FALSIFIED
    point = broken.counterexample[0]
    assert bool(((point >= lower[0] - 1e-6) & (point <= upper[0] + 1e-6)).all())
    with torch.no_grad():
        value = model(point.unsqueeze(0))[0] @ row[0] + shift
    assert float(value) <= 0
    for method in ("interval", "symbolic", "crown"):
        assert verify_spec(model, lower, upper, row, torch.tensor([shift]), method=method).status[0] \
            is not Status.VERIFIED


def test_a_disjunction_is_verified_when_one_of_its_specifications_is():
    model = build_model("toy2d", seed=0).eval()
    lower, upper = torch.full((1, 1, 1, 2), 0.2), torch.full((1, 1, 1, 2), 0.25)
    true_row = torch.tensor([[0.0, 0.0, 0.0]])
    never = verify_spec(model, lower, upper, true_row, torch.tensor([-1.0]), method="interval")
    assert never.status[0] is Status.FALSIFIED  # 0 - 1 > 0 fails everywhere, at the centre as well
    either = verify_spec(model, lower, upper, [true_row, true_row], [torch.tensor([-1.0]), torch.tensor([1.0])],
                         method="interval")
    assert either.status[0] is Status.VERIFIED


@pytest.mark.parametrize("bad", [
    ("lower", lambda lo, up, s: (up + 1, up, s), "lower <= upper"),
    ("shape", lambda lo, up, s: (lo, up[..., :1], s), "same shape"),
    ("nan", lambda lo, up, s: (lo * float("nan"), up, s), "NaN"),
    ("spec", lambda lo, up, s: (lo, up, s[..., :2]), "spec must have shape"),
])
def test_bad_boxes_and_specifications_get_clear_errors(bad):
    model = build_model("toy2d", seed=0).eval()
    lower, upper, spec = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 3)
    _, change, message = bad
    with pytest.raises(InputError, match=message):
        spec_bounds(model, *change(lower, upper, spec), method="interval")


def test_paper_faithful_symbolic_matches_the_published_analysis_in_closed_form():
    """relu(relu(x)) on x in [-1, 1]. The published analysis: the first ReLU gives 0.5 x + 0.25 + 0.25 e1, whose
    bounds [-0.5, 1] make the second ReLU cross (slope 2/3), so the lower bound is (2/3)(-0.5) = -1/3. With the
    interval intersection the second ReLU's input is in [0, 1] (stable) and the output bound is max(-0.5, 0) = 0."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 1),
                                torch.nn.ReLU(), torch.nn.Linear(1, 1)).eval()
    with torch.no_grad():
        for layer in (model[1], model[3], model[5]):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
    lower, upper, row = torch.full((1, 1, 1, 1), -1.0), torch.ones(1, 1, 1, 1), torch.ones(1, 1)
    with torch.no_grad():
        paper = spec_bounds(model, lower, upper, row, method="symbolic", intersect=False)
        default = spec_bounds(model, lower, upper, row, method="symbolic")
        brute = model(torch.linspace(-1, 1, 201).view(-1, 1, 1, 1)).min()
    assert abs(float(paper) + 1 / 3) < 1e-6
    assert float(default) == 0.0
    assert float(brute) >= float(default)


def test_verify_many_shares_the_symbolic_pass_and_equals_separate_calls():
    model = build_model("mnist_small", seed=1).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    methods = ["interval", "symbolic", "crown", "symbolic-naive"]
    together = verify_many(model, x, y, 0.01, methods)
    for name in methods:
        alone = verify(model, x, y, 0.01, method=name)
        assert torch.equal(together[name].margins_lower, alone.margins_lower)
        assert together[name].status == alone.status
    # crown's time includes the symbolic pass it built on
    assert float(together["crown"].time_s.sum()) >= float(together["symbolic"].time_s.sum()) * 0.99


def test_a_context_memoises_results_per_verifier_configuration():
    model = build_model("toy2d", seed=0).eval()
    lower, upper = torch.zeros(2, 1, 1, 2), torch.full((2, 1, 1, 2), 0.5)
    ctx = make_context(model, lower, upper, torch.eye(3))
    calls = []
    symbolic = get_verifier("symbolic")
    original = type(symbolic).bound

    def counting(self, context):
        calls.append(self)
        return original(self, context)

    type(symbolic).bound = counting
    try:
        first = ctx.run(symbolic)
        ctx.run(get_verifier("symbolic"))  # equal configuration: memoised
        ctx.run(get_verifier("crown"))  # crown's intermediate symbolic: memoised too
        ctx.run(get_verifier("symbolic", intersect=False))  # another configuration: computed
    finally:
        type(symbolic).bound = original
    assert len(calls) == 2
    assert ctx.run(symbolic) is first


def test_capabilities_come_from_the_registry():
    assert "exact" not in differentiable_methods()
    assert {"interval", "symbolic", "crown"} <= set(differentiable_methods())
    assert VERIFIERS["exact"].complete and not VERIFIERS["crown"].complete
    for name in VERIFIERS:
        key = name if name in METHOD_OPTIONS else next(k for k in METHOD_OPTIONS if k.startswith(name))
        assert key in METHOD_OPTIONS


def test_exact_is_not_applicable_without_a_milp_encoding():
    from robustkit.verifiers import ops
    from robustkit.verifiers.graph import build_graph

    class Smooth(ops.NonlinearOp):  # a layer with relaxations but no MILP encoding
        def forward(self, *inputs):
            return torch.sigmoid(inputs[0])

    model = build_model("toy2d", seed=0).eval()
    graph = build_graph(model)
    assert get_verifier("exact").applicable(graph) is None
    patched = type(graph)(tuple(type(n)(Smooth(), n.inputs) if isinstance(n.op, ops.ReLUOp) else n
                                for n in graph.nodes))
    reason = get_verifier("exact").applicable(patched)
    assert reason is not None and "Smooth" in reason


def test_near_zero_margins_are_rechecked_in_float64():
    """A positive float32 margin bound within the rounding allowance of 0 counts only if float64 agrees."""
    from dataclasses import dataclass
    from typing import ClassVar

    from robustkit.verifiers import BoundResult, LayerBounds, Verifier

    seen: list[torch.dtype] = []

    @dataclass(frozen=True)
    class Borderline(Verifier):
        """Bounds every margin by +1e-6 in float32 and by -1e-6 in float64 (as rounding could make it)."""

        name: ClassVar[str] = "borderline"

        def bound(self, ctx):
            seen.append(ctx.lower.dtype)
            value = 1e-6 if ctx.lower.dtype == torch.float32 else -1e-6
            return BoundResult(torch.full(ctx.spec.shape[:2], value, dtype=ctx.lower.dtype), LayerBounds())

    @dataclass(frozen=True)
    class Comfortable(Borderline):
        name: ClassVar[str] = "comfortable"

        def bound(self, ctx):
            seen.append(ctx.lower.dtype)
            return BoundResult(torch.full(ctx.spec.shape[:2], 5.0, dtype=ctx.lower.dtype), LayerBounds())

    model = build_model("toy2d", seed=0).eval()
    x = torch.full((2, 1, 1, 2), 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = Borderline().verify(model, x, y, 0.01)
    assert seen == [torch.float32, torch.float64]
    assert all(s is Status.UNKNOWN for s in result.status)
    assert bool((result.margin_lower < 0).all())
    seen.clear()
    assert all(s is Status.VERIFIED for s in Comfortable().verify(model, x, y, 0.01).status)
    assert seen == [torch.float32]  # far from zero: no re-check


@pytest.mark.parametrize("options", [{"method": "crown", "intermediate": "crown"},
                                     {"method": "alpha-crown", "iterations": 3, "optimize_intermediate": True}])
def test_layer_by_layer_crown_handles_max_pooling_behind_a_relu(options):
    """CROWN's per-layer passes bound a max-pooling layer's inputs (its relaxation's mask is over its outputs)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(18, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x, y, eps = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1]), 0.1
    points = (x.unsqueeze(1) + eps * (2 * torch.rand(2, 2000, 1, 6, 6, generator=torch.Generator().manual_seed(2))
                                      - 1)).clamp(0, 1)
    with torch.no_grad():
        found = margin_bounds(model, x, y, eps, **options)
        out = model(points.flatten(0, 1)).view(2, 2000, 3)
    actual = out.gather(2, y.view(2, 1, 1).expand(-1, 2000, 1)) - out
    assert torch.all(actual >= found.unsqueeze(1) - 1e-4 * (1 + found.abs().unsqueeze(1)))


@pytest.mark.parametrize(("values", "expected"), [
    ([0.0, 1.0, -2.5], True),
    ([0.0, float("nan"), 1.0], False),
    ([float("inf"), 1.0], False),
    ([float("-inf"), float("inf")], False),  # their sum is NaN: still caught
    ([3e38, 3e38, -1.0], True),  # finite values whose float32 sum overflows: the elementwise check settles it
    ([3e38, 3e38, float("nan")], False),
])
def test_all_finite_matches_the_elementwise_check(values, expected):
    from robustkit.verifiers.context import all_finite

    tensor = torch.tensor(values, dtype=torch.float32)
    assert all_finite(tensor) is expected is bool(torch.isfinite(tensor).all())


def test_an_eps_box_skips_no_check_of_the_inputs_it_is_built_from():
    model = build_model("mnist_fc_small", seed=0).eval()
    x = torch.rand(2, 1, 28, 28)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        margin_bounds(model, x, torch.tensor([0, 1]), 0.1, method="interval")
