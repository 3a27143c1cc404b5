"""The chunked row products of :mod:`robustkit.verifiers.rowops` against the plain expressions they replace."""

from __future__ import annotations

import pytest
import torch

from robustkit.models import build_model
from robustkit.verifiers import rowops


def _rows(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("m", [1, rowops.CHUNK, 2 * rowops.CHUNK + 3])
def test_values_and_gradients_equal_the_plain_expressions(m):
    """Float64, so the only difference allowed is summation order: within m * 2**-53 * sum |terms| (< 1e-12)."""
    rows, factor, magnitude = _rows((3, m, 2, 5), 0), _rows((3, 2, 5), 1), _rows((3, m), 2)
    cases = [
        (rowops.scale_columns, lambda r, f: r * f.unsqueeze(1), factor),
        (rowops.scale_rows, lambda r, f: r * f.view(*f.shape, 1, 1), magnitude),
    ]
    for function, plain, other in cases:
        ours = (rows.clone().requires_grad_(), other.clone().requires_grad_())
        theirs = (rows.clone().requires_grad_(), other.clone().requires_grad_())
        weight = _rows(rows.shape, 3)
        value = function(*ours)
        expected = plain(*theirs)
        assert torch.equal(value, expected)
        (value * weight).sum().backward()
        (expected * weight).sum().backward()
        for got, want in zip(ours, theirs, strict=True):
            assert torch.allclose(got.grad, want.grad, rtol=0, atol=1e-12 * (1 + float(want.grad.abs().max())))
    flat = rows.flatten(2)
    ours, theirs = flat.clone().requires_grad_(), flat.clone().requires_grad_()
    weight = _rows((3, 10), 4)
    value, expected = rowops.abs_sum(ours), theirs.abs().sum(1)
    assert torch.allclose(value, expected, rtol=0, atol=1e-12 * (1 + float(expected.detach().abs().max())))
    (value * weight).sum().backward()
    (expected * weight).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


def test_gradcheck():
    rows, factor, magnitude = _rows((2, 20, 3), 5), _rows((2, 3), 6), _rows((2, 20), 7)
    assert torch.autograd.gradcheck(rowops.scale_columns, (rows.requires_grad_(), factor.requires_grad_()))
    assert torch.autograd.gradcheck(rowops.scale_rows, (rows, magnitude.requires_grad_()))
    assert torch.autograd.gradcheck(rowops.abs_sum, (rows,))  # random normal entries: none at abs's kink


def test_only_the_needed_gradients_are_computed():
    rows, factor = _rows((2, 20, 3), 8).requires_grad_(), _rows((2, 3), 9)
    rowops.scale_columns(rows, factor).sum().backward()
    assert rows.grad is not None and factor.grad is None


@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_symbolic_bounds_and_gradients_unchanged(eps, monkeypatch):
    """The symbolic analysis of mnist_small (dense, one-hot and tiled blocks) with the chunked products and with
    the plain expressions: the same bounds and weight gradients, in float64, up to summation order."""
    from robustkit.verifiers.base import input_box, margin_spec
    from robustkit.verifiers.graph import build_graph
    from robustkit.verifiers.symbolic import symbolic_pass

    model = build_model("mnist_small", seed=3).double().eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lower, upper = input_box(x, eps)
    spec = margin_spec(torch.tensor([1, 4, 7]), 10).double()

    def run():
        model.zero_grad()
        found = symbolic_pass(build_graph(model), lower, upper, spec)
        found.spec_lower.sum().backward()
        return found.spec_lower.detach(), [p.grad.clone() for p in model.parameters()]

    chunked = run()
    monkeypatch.setattr(rowops, "scale_columns", lambda r, f: r * f.unsqueeze(1))
    monkeypatch.setattr(rowops, "scale_rows", lambda r, m: r * m.view(*m.shape, *([1] * (r.dim() - 2))))
    monkeypatch.setattr(rowops, "abs_sum", lambda r: r.abs().sum(1))
    plain = run()
    assert torch.allclose(chunked[0], plain[0], rtol=0, atol=1e-8 * (1 + float(plain[0].abs().max())))
    for got, want in zip(chunked[1], plain[1], strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-8 * (1 + float(want.abs().max())))
