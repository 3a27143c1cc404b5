"""Random networks for bound-engine tests: hypothesis strategies and a few fixed builders."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from robustkit.nn import Normalize, Residual


def _conv(draw, channels: int, size: int) -> tuple[nn.Conv2d, int, int]:
    kernel = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1]))
    out = draw(st.integers(2, 4))
    new_size = (size + 2 * padding - kernel) // stride + 1
    if new_size < 1:
        padding, stride, kernel = 1, 1, 1
        new_size = size + 2
    return nn.Conv2d(channels, out, kernel, stride=stride, padding=padding), out, new_size


ACTIVATIONS = ("ReLU", "LeakyReLU", "Sigmoid", "Tanh")
#: the activations with a mixed-integer encoding (what the ``exact`` method can take)
PIECEWISE_LINEAR = ("ReLU", "LeakyReLU")


def _activation(draw, names) -> nn.Module:
    name = draw(st.sampled_from(names))
    if name == "LeakyReLU":
        return nn.LeakyReLU(draw(st.sampled_from([0.01, 0.2, 0.5])))
    return getattr(nn, name)()


def _maxpool(draw, size: int) -> tuple[nn.MaxPool2d, int] | None:
    """A max pooling layer with random settings that fits a size x size grid, and its output size."""
    kernel, dilation = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    span = dilation * (kernel - 1) + 1
    padding = draw(st.integers(0, span // 2))
    if span > size + 2 * padding:
        return None
    pool = nn.MaxPool2d(kernel, stride=draw(st.sampled_from([1, 2])), padding=padding, dilation=dilation,
                        ceil_mode=draw(st.booleans()))
    probe = pool(torch.zeros(1, 1, size, size))
    if not bool(probe.isfinite().all()):  # a dilated window that only covers padding: torch gives -inf
        return None
    return pool, int(probe.shape[-1])


@st.composite
def networks(draw, kinds=("fc", "conv", "resnet"), activations=("ReLU",), maxpool=False):
    """(model in eval mode, input shape, number of classes) with random layers and random weights.

    Each activation is drawn from ``activations`` (names of ``torch.nn`` layers, see ``ACTIVATIONS``); with
    ``maxpool``, conv nets may get a max pooling layer with random kernel, stride, padding, dilation and
    ceil_mode after their first activation."""
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    channels = draw(st.sampled_from([1, 2]))
    size = draw(st.sampled_from([3, 4, 5]))
    classes = draw(st.integers(2, 4))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        means = [draw(st.floats(0.0, 1.0)) for _ in range(channels)]
        stds = [draw(st.floats(0.2, 2.0)) for _ in range(channels)]
        layers.append(Normalize(means, stds))
    shape_c, shape_s = channels, size
    if kind in ("conv", "resnet"):
        conv, shape_c, shape_s = _conv(draw, shape_c, shape_s)
        layers += [conv, _activation(draw, activations)]
        pooled = _maxpool(draw, shape_s) if maxpool and draw(st.booleans()) else None
        if pooled is not None:
            layers.append(pooled[0])
            shape_s = pooled[1]
        if draw(st.booleans()):
            batchnorm = nn.BatchNorm2d(shape_c)
            with torch.no_grad():
                batchnorm.running_mean.uniform_(-0.5, 0.5)
                batchnorm.running_var.uniform_(0.3, 2.0)
                batchnorm.weight.uniform_(-1.5, 1.5)
                batchnorm.bias.uniform_(-0.5, 0.5)
            layers.append(batchnorm)
        if shape_s >= 2 and draw(st.booleans()):
            layers.append(nn.AvgPool2d(2, stride=1))
            shape_s -= 1
        if kind == "resnet":
            main = nn.Sequential(nn.Conv2d(shape_c, shape_c, 3, padding=1), _activation(draw, activations),
                                 nn.Conv2d(shape_c, shape_c, 3, padding=1))
            skip = nn.Conv2d(shape_c, shape_c, 1) if draw(st.booleans()) else None
            layers += [Residual(main, skip), _activation(draw, activations)]
    layers.append(nn.Flatten())
    width = shape_c * shape_s * shape_s
    for _ in range(draw(st.integers(1, 2))):
        hidden = draw(st.integers(3, 8))
        layers += [nn.Linear(width, hidden), _activation(draw, activations)]
        width = hidden
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(draw(st.floats(0.5, 2.0)))
    return model, (channels, size, size), classes


def box_points(
    x: torch.Tensor, eps: float, n_uniform: int, n_vertices: int, generator: torch.Generator
) -> torch.Tensor:
    """Points of the clipped eps-box around each sample: uniform, vertices and the centre. (B, P, *shape)."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    shape = (x.shape[0], n_uniform, *x.shape[1:])
    uniform = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(shape, generator=generator)
    pick = torch.rand((x.shape[0], n_vertices, *x.shape[1:]), generator=generator) < 0.5
    vertices = torch.where(pick, upper.unsqueeze(1), lower.unsqueeze(1))
    return torch.cat([uniform, vertices, x.unsqueeze(1)], dim=1)


def pgd_points(model: nn.Module, x: torch.Tensor, eps: float, direction: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """Points of the box that push ``direction @ f`` down (a sign-gradient search), (B, *shape)."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    point = ((lower + upper) / 2).clone()
    step = max(eps, 1e-3) / 8
    for _ in range(steps):
        point.requires_grad_(True)
        value = (model(point) * direction).sum()
        (grad,) = torch.autograd.grad(value, point)
        point = torch.minimum(torch.maximum(point.detach() - step * grad.sign(), lower), upper)
    return point.detach()
