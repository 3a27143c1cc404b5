"""Cross-checks against independent, deliberately plain implementations (dense matrices, Python loops).

The engine's ``symbolic`` and ``crown`` are batched and use several representations of generator rows; the
references below follow the textbook algorithms one sample and one neuron at a time on fully connected
networks, so any disagreement points at an engine bug.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from robustkit.verifiers import get_verifier, margin_bounds


def random_mlp(seed: int, widths: list[int]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).double().eval()


def linears(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def reference_boxes(model, x, eps):
    """Interval arithmetic, layer by layer: list of (lower, upper) of each pre-activation."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    pre = []
    for k, layer in enumerate(linears(model)):
        w, b = layer.weight, layer.bias
        center, radius = (lower + upper) / 2, (upper - lower) / 2
        low, high = w @ center + b - w.abs() @ radius, w @ center + b + w.abs() @ radius
        pre.append((low, high))
        if k < len(linears(model)) - 1:
            lower, upper = low.clamp(min=0), high.clamp(min=0)
    return pre


def reference_interval_margin(model, x, eps, y, pre):
    """IBP margin bound folded into the last layer, from the post-activation box of the last hidden layer."""
    last = linears(model)[-1]
    if len(pre) == 1:
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    else:
        lower, upper = pre[-2][0].clamp(min=0), pre[-2][1].clamp(min=0)
    center, radius = (lower + upper) / 2, (upper - lower) / 2
    out = torch.zeros(last.out_features, dtype=x.dtype)
    for j in range(last.out_features):
        row = last.weight[y] - last.weight[j]
        out[j] = row @ center + last.bias[y] - last.bias[j] - row.abs() @ radius
    return out


def reference_symbolic(model, x, eps, y):
    """Symbolic intervals with Neurify's relaxation, concrete bounds intersected with interval arithmetic."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    center = (lower + upper) / 2
    gens = torch.diag((upper - lower) / 2)  # rows: generators, columns: neurons
    box_lower, box_upper = lower.clone(), upper.clone()
    layers = linears(model)
    before_last = None
    for k, layer in enumerate(layers):
        w, b = layer.weight, layer.bias
        if k == len(layers) - 1:
            before_last = (box_lower.clone(), box_upper.clone())
        center = w @ center + b
        gens = gens @ w.T
        box_center, box_radius = (box_lower + box_upper) / 2, (box_upper - box_lower) / 2
        box_lower = w @ box_center + b - w.abs() @ box_radius
        box_upper = w @ box_center + b + w.abs() @ box_radius
        if k == len(layers) - 1:
            break
        radius = gens.abs().sum(0)
        low = torch.maximum(center - radius, box_lower)
        high = torch.maximum(torch.minimum(center + radius, box_upper), low)
        new_rows = []
        for j in range(center.shape[0]):
            if high[j] <= 0:
                center[j] = 0
                gens[:, j] = 0
            elif low[j] < 0:
                s = high[j] / (high[j] - low[j])
                center[j] = s * center[j] - s * low[j] / 2
                gens[:, j] = gens[:, j] * s
                row = torch.zeros(center.shape[0], dtype=x.dtype)
                row[j] = -s * low[j] / 2
                new_rows.append(row)
        if new_rows:
            gens = torch.cat([gens, torch.stack(new_rows)])
        box_lower, box_upper = low.clamp(min=0), high.clamp(min=0)
    out = torch.zeros(center.shape[0], dtype=x.dtype)
    for j in range(center.shape[0]):
        row = gens[:, y] - gens[:, j]
        out[j] = center[y] - center[j] - row.abs().sum()
    # interval's bound folded into the last layer, from the intersected boxes
    last = layers[-1]
    box_lower, box_upper = before_last
    box_center, box_radius = (box_lower + box_upper) / 2, (box_upper - box_lower) / 2
    for j in range(center.shape[0]):
        row = last.weight[y] - last.weight[j]
        folded = row @ box_center + last.bias[y] - last.bias[j] - row.abs() @ box_radius
        out[j] = torch.maximum(out[j], folded)
    return out


def reference_crown(model, x, eps, y, pre):
    """Backward linear relaxation from each margin, with the given pre-activation bounds."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    layers = linears(model)
    classes = layers[-1].out_features
    out = torch.zeros(classes, dtype=x.dtype)
    for j in range(classes):
        lam = torch.zeros(classes, dtype=x.dtype)
        lam[y] += 1
        lam[j] -= 1
        constant = torch.tensor(0.0, dtype=x.dtype)
        for k in range(len(layers) - 1, -1, -1):
            constant = constant + lam @ layers[k].bias
            lam = lam @ layers[k].weight
            if k == 0:
                break
            low, high = pre[k - 1]
            new = torch.zeros_like(lam)
            for i in range(lam.shape[0]):
                if high[i] <= 0:
                    continue
                if low[i] >= 0:
                    new[i] = lam[i]
                    continue
                s = high[i] / (high[i] - low[i])
                if lam[i] >= 0:
                    new[i] = lam[i] * (1.0 if high[i] >= -low[i] else 0.0)
                else:
                    new[i] = lam[i] * s
                    constant = constant - lam[i] * s * low[i]
            lam = new
        center, radius = (lower + upper) / 2, (upper - lower) / 2
        out[j] = constant + lam @ center - lam.abs() @ radius
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_symbolic_matches_reference(seed, eps):
    model = random_mlp(seed, [6, 8, 7, 4])
    x = torch.rand(5, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(5) % 4
    got = margin_bounds(model, x, y, eps, method="symbolic")
    for i in range(5):
        expected = reference_symbolic(model, x[i].flatten(), eps, int(y[i]))
        assert torch.allclose(got[i], expected, atol=1e-9), (got[i], expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_interval_and_crown_match_reference(seed, eps):
    model = random_mlp(seed, [6, 8, 7, 4])
    x = torch.rand(5, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    y = torch.arange(5) % 4
    interval = margin_bounds(model, x, y, eps, method="interval")
    crown = margin_bounds(model, x, y, eps, method=get_verifier("crown", intermediate="interval"))
    for i in range(5):
        pre = reference_boxes(model, x[i].flatten(), eps)
        expected_interval = reference_interval_margin(model, x[i].flatten(), eps, int(y[i]), pre)
        assert torch.allclose(interval[i], expected_interval, atol=1e-9)
        expected_crown = torch.maximum(reference_crown(model, x[i].flatten(), eps, int(y[i]), pre), expected_interval)
        assert torch.allclose(crown[i], expected_crown, atol=1e-9), (crown[i], expected_crown)
