"""Check that a lowered model computes what the file it was read from computes, to float32 rounding.

The importers turn a file's operators into standard layers (:mod:`robustkit.models.lowering`); this module runs
the file's own computation and the lowered model on random inputs and compares them. The tolerance is derived by
rounding-error analysis of the lowered graph (:func:`error_bound`), not tuned to a machine:

* every elementary float32 operation (a product, an addition, a division, a library sigmoid) rounds its result
  with an error of at most u = 2^-24 times its magnitude (a few ulps for library functions); the partial sums
  of a dot product of n terms stay below the sum of the terms' magnitudes, whatever the summation order,
  blocking or kernel library, so the n roundings of one output of a linear or convolutional layer are each at
  most u times that sum; exact operations (ReLU, max pooling, reshaping) round nothing;
* each rounding error reaches a network output through the derivative of that output with respect to the value
  it was made in (backpropagated exactly, in float64), to first order;
* rounding errors of different operations are independent and centred (the standard probabilistic model,
  Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019), so by Hoeffding's inequality their weighted sum exceeds
  LAMBDA = 10 times the root of the sum of the squared bounds with probability below 2 exp(-50), 4e-22.

The file's outputs must lie within twice that bound of the float64 values (the factor covers the second-order
terms and the file's own evaluation). Worst-case bounds (gamma(n) = n u / (1 - n u) per dot product, pushed
through the absolute weights of every layer) are rigorous but grow exponentially with depth: on the zoo's
ResNets they exceed the logits themselves. This bound stays below about 1e-3 of the logits' scale there, far
below what a misread layer (a wrong padding, a missed constant, a batch-norm epsilon) changes.
"""

from __future__ import annotations

import copy
import math
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
SAFETY = 2.0  # second-order terms and the evaluation order of the file itself
LAMBDA = 10.0  # Hoeffding: P(|sum of independent centred errors| > LAMBDA * root of sum of squares) < 2 exp(-50)
PAIRS = 80  # outputs compared (sample and class), each with its own backward pass
ELEMENTS_PER_PASS = 20_000_000  # float64 values held by one backward pass (about 0.5 GB with the gradients)


def spread(n: int) -> float:
    """The root of the sum of the squared bounds of ``n`` roundings of at most ``u`` each (relative to the
    magnitude they are made in): the rounding of a dot product of ``n`` terms in the probabilistic model."""
    return UNIT * math.sqrt(n)


def _module(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``layer(x)`` in float64 and the bound on the rounding error that computing it in float32 adds."""
    bias = getattr(layer, "bias", None)
    b = bias.double() if isinstance(bias, Tensor) else None
    if isinstance(layer, nn.Linear):
        w = layer.weight.double()
        magnitude = F.linear(x.abs(), w.abs(), None if b is None else b.abs())
        return F.linear(x, w, b), spread(layer.in_features + 2) * magnitude
    if isinstance(layer, nn.Conv2d):
        padding = layer.padding if isinstance(layer.padding, tuple) else (0, 0)  # the importers give numbers

        def conv(t: Tensor, weight: Tensor, shift: Tensor | None) -> Tensor:
            return F.conv2d(t, weight, shift, layer.stride, padding, layer.dilation, layer.groups)

        w = layer.weight.double()
        terms = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        magnitude = conv(x.abs(), w.abs(), None if b is None else b.abs())
        return conv(x, w, b), spread(terms + 2) * magnitude
    if isinstance(layer, nn.BatchNorm2d):
        assert layer.running_mean is not None and layer.running_var is not None
        variance, mean = layer.running_var.double(), layer.running_mean.double()
        weight = torch.ones_like(variance) if layer.weight is None else layer.weight.double()
        scale = (weight / torch.sqrt(variance + layer.eps)).view(1, -1, 1, 1)
        shift = (torch.zeros_like(variance) if b is None else b).view(1, -1, 1, 1)
        mean = mean.view(1, -1, 1, 1)
        y = (x - mean) * scale + shift
        return y, spread(8) * (scale.abs() * (x.abs() + mean.abs()) + shift.abs())
    if isinstance(layer, Normalize):
        mean, std = layer.mean.double(), layer.std.double()
        return (x - mean) / std, spread(2) * (x.abs() + mean.abs()) / std
    if isinstance(layer, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        window = x.shape[-1] * x.shape[-2]  # no averaging window is larger than the whole map
        return layer(x), spread(window + 1) * layer(x.abs())
    if isinstance(layer, nn.LeakyReLU):
        y = F.leaky_relu(x, layer.negative_slope)
        return y, UNIT * y.abs()
    if isinstance(layer, nn.Sigmoid | nn.Tanh):  # library implementations are within a few ulps
        y = layer(x)
        return y, 8 * UNIT * y.abs() + TINY
    if isinstance(layer, nn.ReLU | nn.MaxPool2d | nn.Flatten | nn.Identity | nn.Dropout):
        y = layer(x)
        return y, torch.zeros_like(y)  # exact in floating point
    raise TypeError(f"no rounding-error rule for {type(layer).__name__}")


def _function(target: Callable[..., Tensor], args: Sequence[Tensor | float]) -> tuple[Tensor, Tensor]:
    y = target(*args)
    if target not in (operator.add, operator.sub, operator.mul, operator.truediv):
        raise TypeError(f"no rounding-error rule for {target}")
    numbers = sum(abs(float(a)) for a in args if not isinstance(a, Tensor))
    return y, spread(2) * (y.abs() + numbers)


def _bound_pass(model: fx.GraphModule, x: Tensor, rows: Tensor) -> tuple[Tensor, int]:
    """For output ``rows[i]`` of sample ``i`` of the float64 ``model``, the float32 error bound (see the module
    docstring); and the number of values per sample the pass held."""
    modules = dict(model.named_modules())
    values: dict[str, Tensor] = {}
    probes: list[tuple[Tensor, Tensor]] = []  # (zero perturbation added to a value, its local error bound)
    output: Tensor | None = None
    for node in model.graph.nodes:
        if node.op == "placeholder":
            values[node.name] = x
            continue
        if node.op == "output":
            output = values[node.args[0].name]
            break
        if node.op == "call_module":
            value, local = _module(modules[str(node.target)], values[node.args[0].name])
        elif node.op == "call_function":
            args = [values[a.name] if isinstance(a, fx.Node) else float(a) for a in node.args]
            value, local = _function(node.target, args)
        else:
            raise TypeError(f"no rounding-error rule for {node.op} nodes")
        perturbation = torch.zeros_like(value, requires_grad=True)
        probes.append((perturbation, local.detach()))
        values[node.name] = value + perturbation
    if output is None:
        raise TypeError("the graph has no output")
    squares = torch.zeros(len(x), dtype=torch.float64)
    if probes:
        chosen = output.gather(1, rows.view(-1, 1)).sum()
        gradients = torch.autograd.grad(chosen, [p for p, _ in probes], allow_unused=True)
        for gradient, (_, local) in zip(gradients, probes, strict=True):
            if gradient is not None:
                squares += (gradient * local).square().flatten(1).sum(1)
    return LAMBDA * squares.detach().sqrt(), sum(p[0].numel() for p in probes) // max(len(x), 1)


def error_bound(model: fx.GraphModule, x: Tensor, classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``model`` evaluated in float64 on ``x``, and for every output (or only those of ``classes``; the others get
    an infinite bound) the bound on how far a float32 evaluation of the same function can be from it (see the
    module docstring). One backward pass per output and sample, batched as memory allows."""
    double = copy.deepcopy(model).double()
    x = x.double()
    with torch.no_grad():
        value = double(x)
    chosen = range(value.shape[1]) if classes is None else classes
    bound = torch.full_like(value, math.inf)
    with torch.enable_grad():
        _, per_sample = _bound_pass(double, x[:1], torch.zeros(1, dtype=torch.long))
        pairs = [(sample, k) for k in chosen for sample in range(len(x))]
        step = max(1, ELEMENTS_PER_PASS // (3 * max(per_sample, 1)))  # values, perturbations and gradients
        for start in range(0, len(pairs), step):
            samples = torch.tensor([s for s, _ in pairs[start:start + step]])
            rows = torch.tensor([k for _, k in pairs[start:start + step]])
            bound[samples, rows] = _bound_pass(double, x[samples], rows)[0]
    return value, bound


def _run(reference: Callable[[Tensor], Tensor], x: Tensor, step: int) -> Tensor:
    parts = [reference(x[i:i + step]) for i in range(0, len(x), step)]
    if not all(isinstance(p, Tensor) and p.dim() >= 1 for p in parts):
        raise TypeError("the file does not return a tensor")
    return torch.cat(parts)


def check_lowering(lowered: fx.GraphModule, reference: Callable[[Tensor], Tensor], input_shape: Sequence[int],
                   source: str, *, samples: int = 8, chunk: int | None = None, seed: int = 0) -> None:
    """Raise :class:`~robustkit.errors.ModelLoadError` unless ``reference`` (the file's own computation) and the
    lowered model agree on random inputs in [0, 1] within twice the float32 rounding bound of
    :func:`error_bound`.

    ``samples`` inputs are compared, on at most :data:`PAIRS` outputs in all (fewer samples, and a random subset of
    the classes, for models with many classes: each bound takes a backward pass). ``chunk`` feeds the reference
    that many samples at a time (a program specialised to one batch size); without it the whole batch goes in at
    once, or one sample at a time if that fails.
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
    if expected.dim() != 2 or expected.shape[0] != samples:
        raise ModelLoadError(f"{source} must return logits of shape (N, classes), got {list(expected.shape)}")
    if not bool(torch.isfinite(expected).all()):
        raise ModelLoadError(f"{source} returns NaN or infinite outputs on inputs in [0, 1]")
    with torch.no_grad():
        got = lowered(x[:1])
    if got.shape[1:] != expected.shape[1:]:
        raise ModelLoadError(f"robustkit's reading of {source} returns outputs of shape {list(got.shape[1:])}, "
                             f"the file {list(expected.shape[1:])}")
    classes = list(range(expected.shape[1]))
    if len(classes) > PAIRS:  # many classes: a random subset of them, each a backward pass
        classes = sorted(torch.randperm(len(classes), generator=generator)[:PAIRS].tolist())
    compared = max(1, min(samples, PAIRS // len(classes)))
    value, bound = error_bound(lowered, x[:compared], classes)
    expected, value, bound = expected[:compared, classes], value[:, classes], bound[:, classes]
    difference = (expected.double() - value).abs()
    allowed = SAFETY * bound + TINY
    if bool((difference > allowed).any()):
        worst = int((difference - allowed).flatten().argmax())
        raise ModelLoadError(
            f"robustkit's reading of {source} does not reproduce its outputs: they differ by up to "
            f"{float(difference.flatten()[worst]):.3g} where float32 rounding explains at most "
            f"{float(allowed.flatten()[worst]):.3g}; please report this with the file"
        )
