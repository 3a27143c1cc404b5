"""Check that a lowered model computes what the file it was read from computes, to float32 rounding.

The importers turn a file's operators into standard layers (:mod:`robustkit.models.lowering`); this module
runs the file's own computation and the lowered model on random inputs and compares them. The tolerance is not a
guess: :func:`error_bound` evaluates the lowered model in float64 and, alongside, a bound on how far any
float32 evaluation of the same function can be from it, by the standard rounding-error analysis (a dot
product of n terms is off by at most gamma(n) = n u / (1 - n u) times the sum of the terms' magnitudes, with
u = 2^-24; errors already in a layer's input pass through it scaled by the absolute weights, or by the
layer's Lipschitz constant for the activations and pooling). The file's float32 outputs must lie within that
bound of the float64 values, whatever the CPU, summation order or kernel library: a misread layer (a wrong
padding, a missed constant) is off by orders of magnitude more.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from robustkit.errors import ModelLoadError
from robustkit.nn import Normalize

__all__ = ["check_lowering", "error_bound"]

UNIT = 2.0**-24  # the unit roundoff of float32
TINY = float(torch.finfo(torch.float32).tiny)  # results below it may be flushed or subnormal


def gamma(n: int) -> float:
    """The bound on the relative error of a float32 sum or dot product of ``n`` terms."""
    return n * UNIT / (1 - n * UNIT)


Pair = tuple[Tensor, Tensor]  # (float64 value, bound on the error of a float32 evaluation)


def _affine(value: Pair, apply: Callable[[Tensor], Tensor], apply_abs: Callable[[Tensor], Tensor],
            bias: Tensor | None, terms: int) -> Pair:
    """y = A x + b computed by sums of ``terms`` products: the input's error through |A| and the sums' rounding."""
    v, e = value
    magnitude = apply_abs(v.abs() + e) + (0 if bias is None else bias.abs())
    return apply(v), apply_abs(e) + gamma(terms + 2) * magnitude


def _module_bound(layer: nn.Module, value: Pair) -> Pair:
    v, e = value
    bias = getattr(layer, "bias", None)
    b = bias.double() if isinstance(bias, Tensor) else None
    if isinstance(layer, nn.Linear):
        w = layer.weight.double()
        return _affine(value, lambda t: F.linear(t, w, b), lambda t: F.linear(t, w.abs()), b, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        w = layer.weight.double()
        stride, dilation, groups = layer.stride, layer.dilation, layer.groups
        padding = layer.padding if isinstance(layer.padding, tuple) else (0, 0)  # the importers give numbers

        def conv(t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return F.conv2d(t, weight, bias, stride, padding, dilation, groups)

        terms = (layer.in_channels // groups) * layer.kernel_size[0] * layer.kernel_size[1]
        bias_map = None if b is None else b.view(1, -1, 1, 1)
        return _affine(value, lambda t: conv(t, w, b), lambda t: conv(t, w.abs(), None), bias_map, terms)
    if isinstance(layer, nn.BatchNorm2d):
        assert layer.running_mean is not None and layer.running_var is not None
        variance = layer.running_var.double()
        weight = torch.ones_like(variance) if layer.weight is None else layer.weight.double()
        scale = weight / torch.sqrt(variance + layer.eps)
        shift = torch.zeros_like(scale) if layer.bias is None else layer.bias.double()
        mean = layer.running_mean.double()
        view = (1, -1, 1, 1)
        y = (v - mean.view(view)) * scale.view(view) + shift.view(view)
        magnitude = scale.abs().view(view) * (v.abs() + e + mean.abs().view(view)) + shift.abs().view(view)
        return y, scale.abs().view(view) * e + gamma(8) * magnitude
    if isinstance(layer, Normalize):
        mean, std = layer.mean.double(), layer.std.double()
        return (v - mean) / std, e / std + gamma(2) * (v.abs() + e + mean.abs()) / std
    if isinstance(layer, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        window = v.shape[-1] * v.shape[-2]  # no averaging window is larger than the whole map
        y, magnitude = layer(v), layer(v.abs() + e)
        return y, layer(e) + gamma(window + 1) * magnitude
    if isinstance(layer, nn.MaxPool2d):
        return layer(v), layer(e)  # a maximum moves by at most the largest error in its window
    if isinstance(layer, nn.ReLU):
        return torch.relu(v), e
    if isinstance(layer, nn.LeakyReLU):
        y = F.leaky_relu(v, layer.negative_slope)
        return y, max(1.0, abs(layer.negative_slope)) * e + UNIT * y.abs()
    if isinstance(layer, nn.Sigmoid):  # Lipschitz 1/4; library sigmoid and tanh are within a few ulps
        y = torch.sigmoid(v)
        return y, e / 4 + 8 * UNIT * y.abs() + TINY
    if isinstance(layer, nn.Tanh):
        y = torch.tanh(v)
        return y, e + 8 * UNIT * y.abs() + TINY
    if isinstance(layer, nn.Flatten):
        return layer(v), layer(e)
    if isinstance(layer, nn.Identity | nn.Dropout):
        return v, e
    raise TypeError(f"no rounding-error rule for {type(layer).__name__}")


def _function_bound(target: Callable[..., Tensor], args: Sequence[Pair | float]) -> Pair:
    pairs = [a for a in args if isinstance(a, tuple)]
    numbers = [float(a) for a in args if not isinstance(a, tuple)]
    if len(pairs) == 2 and target is operator.add:
        (a, ea), (b, eb) = pairs
        y = a + b
        return y, ea + eb + UNIT * y.abs()
    if len(pairs) == 1 and len(numbers) == 1:
        (v, e), c = pairs[0], numbers[0]
        values = [v if isinstance(a, tuple) else c for a in args]
        y = target(*values)
        factor = abs(1 / c) if target is operator.truediv else abs(c) if target is operator.mul else 1.0
        return y, factor * e + gamma(3) * (factor * v.abs() + abs(c) + y.abs())
    raise TypeError(f"no rounding-error rule for {target} of {len(pairs)} values")


def error_bound(model: fx.GraphModule, x: Tensor) -> Pair:
    """``model`` evaluated in float64 on ``x``, and a bound on how far a float32 evaluation can be from it."""
    modules = dict(model.named_modules())
    values: dict[str, Pair] = {}
    with torch.no_grad():
        for node in model.graph.nodes:
            if node.op == "placeholder":
                values[node.name] = (x.double(), torch.zeros_like(x, dtype=torch.float64))
            elif node.op == "call_module":
                values[node.name] = _module_bound(modules[str(node.target)], values[node.args[0].name])
            elif node.op == "call_function":
                args = [values[a.name] if isinstance(a, fx.Node) else float(a) for a in node.args]
                values[node.name] = _function_bound(node.target, args)
            elif node.op == "output":
                return values[node.args[0].name]
    raise ValueError("the graph has no output")


def _run(reference: Callable[[Tensor], Tensor], x: Tensor, step: int) -> Tensor:
    parts = [reference(x[i:i + step]) for i in range(0, len(x), step)]
    if not all(isinstance(p, Tensor) and p.dim() >= 1 for p in parts):
        raise TypeError("the file does not return a tensor")
    return torch.cat(parts)


def check_lowering(lowered: fx.GraphModule, reference: Callable[[Tensor], Tensor], input_shape: Sequence[int],
                   source: str, *, samples: int = 8, chunk: int | None = None, seed: int = 0) -> None:
    """Raise :class:`~robustkit.errors.ModelLoadError` unless ``reference`` (the file's own computation) and the
    lowered model agree on ``samples`` random inputs in [0, 1] within the float32 rounding bound.

    ``chunk`` feeds the reference that many samples at a time (a program specialised to one batch size); without
    it the whole batch goes in at once, or one sample at a time if that fails.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, *input_shape, generator=generator)
    with torch.no_grad():
        try:
            expected = _run(reference, x, chunk or samples)
        except Exception:  # a file specialised to one batch size fails on others: try one sample at a time
            if chunk == 1:
                raise
            try:
                expected = _run(reference, x, 1)
            except Exception as exc:  # noqa: BLE001 - the file's own code fails on inputs of its shape
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                shape = ", ".join(map(str, input_shape))
                raise ModelLoadError(f"{source} fails on inputs of shape (N, {shape}): {type(exc).__name__}: "
                                     f"{message}") from None
        value, bound = error_bound(lowered, x)
    if expected.shape != value.shape:
        raise ModelLoadError(f"robustkit's reading of {source} returns outputs of shape {list(value.shape[1:])}, "
                             f"the file {list(expected.shape[1:])}")
    if not bool(torch.isfinite(expected).all()):
        raise ModelLoadError(f"{source} returns NaN or infinite outputs on inputs in [0, 1]")
    difference = (expected.double() - value).abs()
    excess = difference - bound - TINY
    if bool((excess > 0).any()):
        worst = int(excess.flatten().argmax())
        raise ModelLoadError(
            f"robustkit's reading of {source} does not reproduce its outputs: they differ by up to "
            f"{float(difference.flatten()[worst]):.3g} where float32 rounding explains at most "
            f"{float(bound.flatten()[worst]):.3g}; please report this with the file"
        )
