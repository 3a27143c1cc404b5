"""The ``bab`` verifier: answers known by enumeration, agreement with ``exact``, sound sub-problem bounds,
valid counterexamples, limits and determinism.

The oracle enumerates every activation pattern of a tiny ReLU network: on each pattern the network is affine
and the pattern is a polytope of the box, so the minimum of every specification row over the box is the
smallest of one linear program per pattern (float64, HiGHS).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from robustkit.errors import InputError
from robustkit.verifiers import Status, get_verifier, spec_bounds, verify, verify_spec
from robustkit.verifiers.bab import BabVerifier, Problem
from robustkit.verifiers.graph import build_graph

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"time_limit": 20.0, "attack_steps": 10, "attack_restarts": 2}


def tiny_net(seed: int, sizes: tuple[int, ...] = (4, 4, 4, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def enumerated_minima(model: nn.Sequential, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """min over the box of rows @ f(x), per row, by one LP per activation pattern of the hidden neurons."""
    linear = [m for m in model if isinstance(m, nn.Linear)]
    weights = [m.weight.detach().double().numpy() for m in linear]
    biases = [m.bias.detach().double().numpy() for m in linear]
    hidden = [w.shape[0] for w in weights[:-1]]
    best = np.full(rows.shape[0], np.inf)
    box = np.stack([lower, upper], 1)
    for pattern in itertools.product((0.0, 1.0), repeat=sum(hidden)):
        matrix, const = np.eye(lower.size), np.zeros(lower.size)
        a_ub, b_ub, start = [], [], 0
        for w, b, n in zip(weights[:-1], biases[:-1], hidden, strict=True):
            pre_m, pre_c = w @ matrix, w @ const + b
            mask = np.array(pattern[start:start + n])
            start += n
            sign = 2 * mask - 1  # active: z >= 0, inactive: z <= 0
            a_ub.append(-sign[:, None] * pre_m)
            b_ub.append(sign * pre_c)
            matrix, const = mask[:, None] * pre_m, mask * pre_c
        out_m, out_c = weights[-1] @ matrix, weights[-1] @ const + biases[-1]
        for r, row in enumerate(rows):
            found = linprog(row @ out_m, A_ub=np.concatenate(a_ub), b_ub=np.concatenate(b_ub), bounds=box,
                            method="highs")
            if found.status == 0:
                best[r] = min(best[r], found.fun + row @ out_c)
    return best


CASES = [(seed, eps) for seed in (0, 1, 2, 3) for eps in (0.05, 0.15, 0.3)]


@functools.cache
def enumerated_case(seed: int, eps: float) -> tuple[nn.Sequential, torch.Tensor, int, np.ndarray]:
    """A tiny net, a point, its label and the true minima of its margins over the eps-box (enumeration)."""
    model = tiny_net(seed)
    x = torch.rand(1, 1, 4, generator=torch.Generator().manual_seed(seed))
    label = int(model(x).argmax(1))
    rows = np.delete(np.eye(3)[label] - np.eye(3), label, 0)
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    truth = enumerated_minima(model, lower.flatten().double().numpy(), upper.flatten().double().numpy(), rows)
    return model, x, label, truth


@pytest.mark.parametrize("options", [{"branching": "babsr"}, {"branching": "fsb"},
                                     {"per_row": False, "refine_intermediate": True}], ids=["babsr", "fsb", "joint"])
def test_relu_splitting_matches_enumeration(options):
    decided = {"verified": 0, "falsified": 0}
    for seed, eps in CASES:
        model, x, label, truth = enumerated_case(seed, eps)
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        result = verify(model, x, torch.tensor([label]), eps, method="bab", split="relu", **options, **FAST)
        status = result.status[0]
        if truth.min() > 1e-4:
            assert status is Status.VERIFIED, (seed, eps, truth)
            # the reported margin bounds are sound: below the true minima
            margins = np.delete(result.margins_lower[0].double().numpy(), label)
            assert np.all(margins <= truth + 1e-4)
        elif truth.min() < -1e-4:
            assert status is Status.FALSIFIED, (seed, eps, truth)
            point = result.counterexample[0]
            assert torch.all(point >= lower[0] - 1e-7) and torch.all(point <= upper[0] + 1e-7)
            assert int(model(point.unsqueeze(0)).argmax(1)) != label
        decided[status.value] = decided.get(status.value, 0) + 1
    assert decided["verified"] >= 2 and decided["falsified"] >= 2  # the table exercises both answers


def tight_problem(seed: int, slack: float) -> tuple[nn.Module, Problem]:
    """One random row over a wide box of a 6-16-16-4 net, offset so that its true minimum (``exact``'s MILP)
    is ``slack``: proving (slack > 0) or refuting (slack < 0) it needs branching."""
    model = tiny_net(seed, (6, 16, 16, 4))
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 6, generator=generator)
    row = torch.randn(1, 4, generator=generator)
    lower, upper = (x - 0.5).clamp(min=0), (x + 0.5).clamp(max=1)
    minimum = float(spec_bounds(model, lower, upper, row, method="exact", time_limit=20.0))
    return model, Problem(lower, upper, row, torch.tensor([slack - minimum]), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("branching", ["babsr", "fsb"])
def test_tight_properties_agree_with_exact(branching):
    for seed in (0, 2):
        for slack in (2e-3, -2e-3):
            model, problem = tight_problem(seed, slack)
            found = verify_spec(model, problem.lower, problem.upper, problem.rows, problem.offsets, method="bab",
                                split="relu", branching=branching, **FAST)
            assert found.status == ((Status.VERIFIED,) if slack > 0 else (Status.FALSIFIED,)), (seed, slack)
            if slack < 0:
                point = found.counterexample
                assert torch.all(point >= problem.lower) and torch.all(point <= problem.upper)
                with torch.no_grad():
                    assert float(model(point) @ problem.rows[0] + problem.offsets[0]) <= 0
            else:
                assert float(found.lower[0, 0]) <= slack + 1e-4  # a sound bound: not above the true minimum


@pytest.mark.parametrize("per_row", [True, False])
def test_rows_proven_at_the_root_leave_the_sub_problems(per_row):
    """A conjunction whose root proves all rows but one: with ``per_row`` the branch and bound passes only the
    open row (every batch's bounds have one column), without it all of them; both prove it, and the proven
    row keeps its root bound."""
    model, hard = tight_problem(0, 2e-3)
    rows = torch.cat([hard.rows, torch.zeros_like(hard.rows)])  # the second row is 0 @ f + 1 > 0: proven anywhere
    problem = Problem(hard.lower, hard.upper, rows, torch.cat([hard.offsets, torch.ones(1)]),
                      torch.zeros(2, dtype=torch.long))
    columns = []
    verifier = BabVerifier(split="relu", per_row=per_row, attack_steps=0, attack_restarts=0, time_limit=20.0,
                           batch_size=8, monitor=lambda event, data: columns.append(data["lower"].shape[1]))
    outcome = verifier.decide(model, build_graph(model), problem)
    assert outcome.status is Status.VERIFIED
    assert columns and set(columns) == ({1} if per_row else {2})
    assert float(outcome.lower[1]) == pytest.approx(1.0)
    assert float(outcome.lower[0]) <= 2e-3 + 1e-4


def sub_problem_points(model: nn.Sequential, lower: torch.Tensor, upper: torch.Tensor, n: int):
    generator = torch.Generator().manual_seed(0)
    points = lower + torch.rand((n, *lower.shape[1:]), generator=generator) * (upper - lower)
    pre, value = {}, points
    graph = build_graph(model)
    for index, node in enumerate(graph.nodes):
        if node.op.needs_bounds:
            pre[index] = value
        value = node.op.forward(value)
    return points, pre, value


@pytest.mark.parametrize("refine", [False, True])
def test_every_sub_problem_bound_holds_on_its_sub_problem(refine):
    """At every batch, sampled points of the box that satisfy a sub-problem's splits have every row above the
    sub-problem's bound: the beta-CROWN bounds are sound on the open domains, not only at the root."""
    model, problem = tight_problem(0, 2e-3)
    points, pre, out = sub_problem_points(model, problem.lower, problem.upper, 20000)
    values = out.detach() @ problem.rows.T + problem.offsets
    checked = []

    def monitor(event, data):
        bounds = data["lower"]
        for d in range(bounds.shape[0]):
            inside = torch.ones(points.shape[0], dtype=torch.bool)
            for key, splits in data.items():
                if key.startswith("splits"):
                    sign = splits[d].flatten().float()
                    z = pre[int(key[6:])].detach().flatten(1)
                    inside &= ((sign * z) >= 0).all(1)
            if bool(inside.any()):
                assert torch.all(values[inside] >= bounds[d] - 1e-4), "a sub-problem bound above a point's value"
                checked.append(int(inside.sum()))

    verifier = BabVerifier(split="relu", monitor=monitor, attack_steps=0, attack_restarts=0, time_limit=20.0,
                           batch_size=8, refine_intermediate=refine)
    outcome = verifier.decide(model, build_graph(model), problem)
    assert outcome.status is Status.VERIFIED
    assert len(checked) >= 50  # sub-problems with sampled points in them were checked


def test_input_splitting_on_a_two_input_net_matches_a_dense_grid():
    """Input splitting (chosen automatically: two inputs) against a 301 x 301 grid of the box: the grid's
    minimum m of a row is within L * h of the true minimum (L an infinity-norm Lipschitz constant of the row,
    h half the grid spacing), so offsets -m - 0.01 (a grid point violates) and -m + 2 L h + 0.01 (every
    point satisfies) have known answers."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    low, high, steps = 0.2, 0.8, 301
    axis = torch.linspace(low, high, steps)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 2)
    lower, upper = torch.full((1, 1, 2), low), torch.full((1, 1, 2), high)
    linear = [m for m in model if isinstance(m, nn.Linear)]
    split_boxes = 0
    for seed in range(3):
        row = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            values = (model(grid) @ row.T).flatten()
        minimum = float(values.min())
        lipschitz = float(row.abs().sum())  # |row| times the infinity-norm operator norms of the layers
        for layer in linear:
            lipschitz *= float(layer.weight.detach().abs().sum(1).max())
        h = (high - low) / (steps - 1) / 2
        refuted = verify_spec(model, lower, upper, row, torch.tensor([-minimum - 0.01]), method="bab", **FAST)
        assert refuted.status == (Status.FALSIFIED,)
        point = refuted.counterexample
        assert torch.all(point >= lower) and torch.all(point <= upper)
        with torch.no_grad():
            assert float(model(point) @ row[0]) - minimum - 0.01 <= 0
        proven = verify_spec(model, lower, upper, row, torch.tensor([-minimum + 2 * lipschitz * h + 0.01]),
                             method="bab", **FAST)
        assert proven.status == (Status.VERIFIED,)
        # and a tighter offset that the root bound cannot prove: splitting boxes must decide it
        boxes: list[int] = []

        def monitor(event: str, data: dict, boxes: list[int] = boxes) -> None:
            boxes.append(data["lower"].shape[0])

        tight = BabVerifier(monitor=monitor, **FAST)
        problem = Problem(lower, upper, row, torch.tensor([-minimum + 0.005]),
                          torch.zeros(1, dtype=torch.long))
        outcome = tight.decide(model, build_graph(model), problem)
        assert outcome.status in (Status.VERIFIED, Status.FALSIFIED)
        if outcome.status is Status.FALSIFIED:
            assert problem.violation(model(outcome.counterexample.unsqueeze(0)))[0] <= 0
        split_boxes += sum(boxes)
    assert split_boxes > 0


def test_disjunction_is_verified_when_one_alternative_holds():
    model = tiny_net(1)
    x = torch.rand(1, 1, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)[0]
    eps = 0.02
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    # f_0 > far above its value (false everywhere) OR f_0 > far below its value (true everywhere)
    impossible = (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([-(float(logits[0]) + 100.0)]))
    certain = (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([-(float(logits[0]) - 100.0)]))
    found = verify_spec(model, lower, upper, [impossible[0], certain[0]], [impossible[1], certain[1]],
                        method="bab", **FAST)
    assert found.status == (Status.VERIFIED,)
    alone = verify_spec(model, lower, upper, [impossible[0]], [impossible[1]], method="bab", **FAST)
    assert alone.status == (Status.FALSIFIED,)
    point = alone.counterexample
    assert torch.all(point >= lower) and torch.all(point <= upper)
    assert float(model(point)[0, 0]) - float(logits[0]) - 100.0 <= 0


def hard_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from robustkit.models import build_model

    model = build_model("mnist_fc_small", seed=0).eval()
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, x, model(x).argmax(1)


def test_time_limit_gives_timeout_and_memory_budget_gives_memory():
    model, x, y = hard_case()
    slow = verify(model, x, y, 0.03, method="bab", time_limit=0.5, attack_restarts=0, attack_steps=0)
    assert slow.status == (Status.TIMEOUT,)
    assert float(slow.time_s[0]) < 5.0
    tiny = verify(model, x, y, 0.03, method="bab", time_limit=30, memory_limit_gb=1e-6, batch_size=2,
                  attack_restarts=0, attack_steps=0)
    assert tiny.status == (Status.MEMORY,)


def test_deterministic_given_the_seed():
    model, x, y = hard_case()
    verifier = get_verifier("bab", time_limit=60, attack_steps=0, attack_restarts=0)
    graph = build_graph(model)
    label = int(y[0])
    rows = (torch.eye(10)[label] - torch.eye(10))[[j for j in range(10) if j != label]]
    problem = Problem((x - 0.018).clamp(min=0), (x + 0.018).clamp(max=1), rows, torch.zeros(9),
                      torch.zeros(9, dtype=torch.long))
    first = verifier.decide(model, graph, problem)
    second = verifier.decide(model, graph, problem)
    assert first.status is second.status
    assert first.domains == second.domains > 1
    assert torch.equal(first.lower, second.lower)


def test_options_are_validated():
    for bad in ({"branching": "random"}, {"split": "both"}, {"time_limit": 0}, {"batch_size": 0},
                {"iterations": -1}, {"memory_limit_gb": float("nan")}, {"intermediate": "magic"}):
        with pytest.raises(InputError):
            BabVerifier(**bad)
    assert BabVerifier.complete and not BabVerifier.differentiable
