"""The Square attack: no gradients at all, the paper's schedule of square sizes, the exact query budget, and real
strength on the fixture network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks import APGD, PGD, Square
from robustkit.attacks.square import square_fraction
from robustkit.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this model has no gradients")


class Guarded(nn.Module):
    """The wrapped network's logits, whose backward raises; records whether autograd was on at every call and
    how many rows it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.grad_enabled: list[bool] = []
        self.rows = 0

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.rows += x.shape[0]
        return _NoBackward.apply(self.inner(x))


def test_square_uses_no_gradients_and_still_breaks_points(trained_fc, mnist):
    x, y = mnist.test.x[:64], mnist.test.y[:64]
    model = Guarded(trained_fc).eval()
    with pytest.raises(RuntimeError, match="no gradients"):
        PGD(steps=2)(model, x, y, eps=0.1)
    model.grad_enabled.clear()
    result = Square(n_queries=300)(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert not any(model.grad_enabled)
    with torch.no_grad():
        clean_wrong = int((trained_fc(x).argmax(1) != y).sum())
    assert int(result.success.sum()) >= clean_wrong + 15


def test_square_breaks_most_of_what_apgd_breaks(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    apgd = APGD(steps=50)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    square = Square(n_queries=1000)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    both = int((apgd.success & square.success).sum())
    assert both >= 0.8 * int(apgd.success.sum())


def test_schedule_of_square_sizes_is_the_papers():
    # halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000
    halvings = [(0, 0), (10, 0), (11, 1), (50, 1), (51, 2), (200, 2), (201, 3), (1001, 5), (8000, 8), (8001, 9)]
    for query, count in halvings:
        assert square_fraction(query, 10000, 0.8) == pytest.approx(0.8 / 2**count)
    # rescaled to the budget: 5,000 queries halve after 5, 25, 100, ...
    assert [square_fraction(q, 5000, 0.8) for q in (5, 6, 25, 26)] == pytest.approx([0.8, 0.4, 0.4, 0.2])


def test_each_sample_gets_exactly_the_query_budget():
    # logits that ignore the input: nothing can be broken, so every sample spends all its queries
    constant = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    model = Guarded(constant).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long)
    result = Square(n_queries=40)(model, x, y, eps=0.1)
    assert not bool(result.success.any())
    # the search: 40 queries per sample; the base class: one clean pass, one re-check, one final pass
    assert model.rows == 40 * 5 + 3 * 5


def test_a_broken_sample_stops_querying():
    # class 0 scores 0.5, class 1 the mean pixel: the sample at 0.45 can be pushed over (all pixels + 0.1), the one
    # at 0.1 never; the broken one must stop querying as soon as it breaks
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        linear[1].weight.copy_(torch.stack([torch.zeros(16), torch.full((16,), 1 / 16)]))
        linear[1].bias.copy_(torch.tensor([0.5, 0.0]))
    model = Guarded(linear).eval()
    x = torch.stack([torch.full((1, 4, 4), 0.45), torch.full((1, 4, 4), 0.1)])
    result = Square(n_queries=400)(model, x, torch.zeros(2, dtype=torch.long), eps=0.1)
    assert result.success.tolist() == [True, False]
    search_rows = model.rows - 2 - 2 - 2  # clean pass, re-check and final pass of the base class
    assert 400 < search_rows < 2 * 400  # the robust sample spent all its queries, the broken one far fewer


def test_same_seed_same_result_and_bad_inputs(trained_fc, mnist):
    x, y = mnist.test.x[:16], mnist.test.y[:16]
    first = Square(n_queries=50)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(2))
    second = Square(n_queries=50)(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first.x_adv, second.x_adv)
    flat = nn.Sequential(nn.Linear(2, 2)).eval()
    points = torch.rand(3, 2)
    with pytest.raises(InputError, match="images"):
        Square()(flat, points, flat(points).argmax(1), eps=0.1)
    for options in ({"n_queries": 0}, {"p_init": 0.0}, {"restarts": 0}):
        with pytest.raises(InputError):
            Square(**options)
