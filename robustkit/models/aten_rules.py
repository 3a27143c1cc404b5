"""The ATen operator rules of :mod:`robustkit.models.lowering`: one function per operator family, registered with
:func:`~robustkit.models.lowering.register_rule`, turning an operator application into standard layers."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.models.lowering import BATCH, UNREADABLE, Lowering, Refusal, Value, register_rule
from robustkit.nn import Normalize

__all__: list[str] = []


# -- argument checks ---------------------------------------------------------------------------------------------


def _value(args: Mapping[str, Any], key: str) -> Value:
    value = args.get(key)
    if isinstance(value, Value):
        return value
    raise Refusal(f"with a constant {key}" if isinstance(value, Tensor) else f"without a tensor {key}")


def _weight(args: Mapping[str, Any], key: str, *, optional: bool = False) -> Tensor | None:
    value = args.get(key)
    if value is None and optional:
        return None
    if isinstance(value, Value):
        raise Refusal(f"with a computed {key} (only weights stored in the file can be read)")
    if not isinstance(value, Tensor):
        raise Refusal(f"without a {key} tensor")
    if value.dtype != torch.float32:
        raise Refusal(f"with a {str(value.dtype).removeprefix('torch.')} {key} (robustkit computes in float32)")
    if not bool(torch.isfinite(value).all()):
        raise Refusal(f"with NaN or infinite values in its {key}")
    return value.detach().clone()


def _required(args: Mapping[str, Any], key: str) -> Tensor:
    weight = _weight(args, key)
    assert weight is not None
    return weight


def _ints(value: Any, what: str) -> tuple[int, int]:
    """A 2-d size: one integer for both axes, or two."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise Refusal(f"with {what}={value!r} (constant integers expected)")
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise Refusal(f"with {what}={value!r} (2 values expected)")
    return int(items[0]), int(items[1])


def _flag(args: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Refusal(f"with {key}={value!r} (a constant flag expected)")
    return value


def _number(args: Mapping[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Refusal(f"with {key}={value!r} (a constant number expected)")
    return float(value)


# -- layers ------------------------------------------------------------------------------------------------------


def _linear_layer(lw: Lowering, x: Value, weight: Tensor, bias: Tensor | None) -> Value:
    if x.rank != 2:
        raise Refusal(f"on a rank-{x.rank} value (only (batch, features) inputs)")
    if weight.dim() != 2 or weight.shape[1] != x.example.shape[1]:
        raise Refusal(f"with a weight of shape {tuple(weight.shape)} on {x.example.shape[1]} features")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None and bias is not None:
            if bias.numel() not in (1, weight.shape[0]):
                raise Refusal(f"with a bias of shape {tuple(bias.shape)} for {weight.shape[0]} outputs")
            layer.bias.copy_(bias.reshape(-1).expand(weight.shape[0]))
    return lw.module(layer, x)


@register_rule("linear")
def _linear(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _linear_layer(lw, _value(args, "input"), _required(args, "weight"), _weight(args, "bias", optional=True))


@register_rule("addmm")
def _addmm(lw: Lowering, args: Mapping[str, Any]) -> Value:
    beta, alpha = _number(args, "beta", 1.0), _number(args, "alpha", 1.0)
    weight = _required(args, "mat2")
    bias = _weight(args, "self")
    assert bias is not None
    return _linear_layer(lw, _value(args, "mat1"), (alpha * weight).t().contiguous(), beta * bias)


@register_rule("mm", "matmul")
def _mm(lw: Lowering, args: Mapping[str, Any]) -> Value:
    key = "mat2" if "mat2" in args else "other"
    weight = _required(args, key)
    if weight.dim() != 2:
        raise Refusal(f"with a {weight.dim()}-d constant (only matrix products with a 2-d weight)")
    return _linear_layer(lw, _value(args, "self"), weight.t().contiguous(), None)


def _conv_layer(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x, weight, bias = _value(args, "input"), _required(args, "weight"), _weight(args, "bias", optional=True)
    if weight.dim() != 4 or x.rank != 4:
        raise Refusal("of a rank-3 or rank-5 value (only 2-d convolutions of NCHW values)")
    groups = int(_number(args, "groups", 1))
    stride, dilation = _ints(args.get("stride", 1), "stride"), _ints(args.get("dilation", 1), "dilation")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    padding_arg = args.get("padding", 0)
    if isinstance(padding_arg, str):
        if padding_arg == "valid":
            padding: tuple[int, int] = (0, 0)
        elif padding_arg == "same" and stride == (1, 1) and all((d * (k - 1)) % 2 == 0
                                                               for d, k in zip(dilation, kernel, strict=True)):
            padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
        else:
            raise Refusal(f"with padding={padding_arg!r} that pads the two sides of an axis differently")
    else:
        padding = _ints(padding_arg, "padding")
    if x.example.shape[1] != weight.shape[1] * groups:
        raise Refusal(f"with {weight.shape[1] * groups} input channels on a value with {x.example.shape[1]}")
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], kernel, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None and bias is not None:
            layer.bias.copy_(bias.reshape(-1))
    return lw.module(layer, x)


@register_rule("conv2d")
def _conv2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _conv_layer(lw, args)


@register_rule("_convolution", "convolution")
def _convolution(lw: Lowering, args: Mapping[str, Any]) -> Value:
    if _flag(args, "transposed"):
        raise Refusal("transposed")
    return _conv_layer(lw, args)


def _batch_norm(lw: Lowering, args: Mapping[str, Any], training: bool) -> Value:
    if training:
        raise Refusal("in training mode: call model.eval() before saving it")
    x = _value(args, "input")
    mean, var = _weight(args, "running_mean", optional=True), _weight(args, "running_var", optional=True)
    if mean is None or var is None:
        raise Refusal("without running statistics (it normalises with the statistics of each batch)")
    weight, bias = _weight(args, "weight", optional=True), _weight(args, "bias", optional=True)
    eps = _number(args, "eps", 1e-5)
    channels = mean.numel()
    if x.rank == 4 and x.example.shape[1] == channels:
        layer = nn.BatchNorm2d(channels, eps=eps, affine=weight is not None and bias is not None)
        state = {"running_mean": mean.reshape(-1), "running_var": var.reshape(-1),
                 "num_batches_tracked": torch.tensor(0)}
        if layer.affine and weight is not None and bias is not None:
            state |= {"weight": weight.reshape(-1), "bias": bias.reshape(-1)}
        layer.load_state_dict(state)
        return lw.module(layer, x)
    if x.rank == 2 and x.example.shape[1] == channels:
        scale = (torch.ones(channels) if weight is None else weight.double()) / torch.sqrt(var.double() + eps)
        shift = (torch.zeros(channels) if bias is None else bias.double()) - mean.double() * scale
        return _diagonal(lw, x, scale, shift)
    raise Refusal(f"on a rank-{x.rank} value with {x.example.shape[1]} channels ({channels} statistics)")


@register_rule("batch_norm")
def _batch_norm_rule(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _batch_norm(lw, args, _flag(args, "training"))


@register_rule("native_batch_norm", "_native_batch_norm_legit")
def _native_batch_norm(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _batch_norm(lw, args, _flag(args, "training")), UNREADABLE, UNREADABLE


@register_rule("_native_batch_norm_legit_no_training")
def _native_batch_norm_no_training(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _batch_norm(lw, args, False), UNREADABLE, UNREADABLE


@register_rule("relu")
def _relu(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.ReLU(), _value(args, "self"))


@register_rule("leaky_relu")
def _leaky_relu(lw: Lowering, args: Mapping[str, Any]) -> Value:
    slope = _number(args, "negative_slope", 0.01)
    if not 0 <= slope <= 1:
        raise Refusal(f"with negative_slope={slope:g} (the relaxations need 0 <= negative_slope <= 1)")
    return lw.module(nn.LeakyReLU(slope), _value(args, "self"))


@register_rule("sigmoid")
def _sigmoid(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.Sigmoid(), _value(args, "self"))


@register_rule("tanh")
def _tanh(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.Tanh(), _value(args, "self"))


def _pool_sizes(args: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = _ints(args.get("kernel_size"), "kernel_size")
    stride_arg = args.get("stride")
    stride = kernel if stride_arg is None or stride_arg == [] or stride_arg == () else _ints(stride_arg, "stride")
    return kernel, stride, _ints(args.get("padding", 0), "padding")


@register_rule("max_pool2d")
def _max_pool2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    if x.rank != 4:
        raise Refusal(f"on a rank-{x.rank} value (only NCHW values)")
    kernel, stride, padding = _pool_sizes(args)
    dilation = _ints(args.get("dilation", 1), "dilation")
    for k, p, d in zip(kernel, padding, dilation, strict=True):
        if p > ((k - 1) * d + 1) // 2:
            raise Refusal(f"with padding {list(padding)} of more than half the kernel {list(kernel)}")
    return lw.module(nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=_flag(args, "ceil_mode")), x)


@register_rule("max_pool2d_with_indices")
def _max_pool2d_with_indices(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _max_pool2d(lw, args), UNREADABLE


@register_rule("avg_pool2d")
def _avg_pool2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    if x.rank != 4:
        raise Refusal(f"on a rank-{x.rank} value (only NCHW values)")
    if args.get("divisor_override") is not None:
        raise Refusal("with divisor_override")
    kernel, stride, padding = _pool_sizes(args)
    layer = nn.AvgPool2d(kernel, stride, padding, ceil_mode=_flag(args, "ceil_mode"),
                         count_include_pad=_flag(args, "count_include_pad", True))
    return lw.module(layer, x)


@register_rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    if x.rank != 4:
        raise Refusal(f"on a rank-{x.rank} value (only NCHW values)")
    return lw.module(nn.AdaptiveAvgPool2d(_ints(args.get("output_size"), "output_size")), x)


@register_rule("mean")
def _mean(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    dims = args.get("dim")
    if args.get("dtype") is not None:
        raise Refusal("with a dtype")
    if x.rank != 4 or not isinstance(dims, list | tuple) or sorted(int(d) % 4 for d in dims) != [2, 3]:
        raise Refusal(f"over dims {dims!r} (only the spatial mean of NCHW values, global average pooling)")
    pooled = lw.module(nn.AdaptiveAvgPool2d(1), x)
    return pooled if _flag(args, "keepdim") else lw.module(nn.Flatten(), pooled)


@register_rule("flatten")
def _flatten(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    start, end = int(_number(args, "start_dim", 0)) % x.rank, int(_number(args, "end_dim", -1)) % x.rank
    if start == end:
        return x
    if start == 1 and end == x.rank - 1:
        return lw.module(nn.Flatten(), x)
    raise Refusal(f"from dim {start} to {end} (only flattening each sample: start_dim=1 to the last dim)")


@register_rule("view", "reshape", "_unsafe_view")
def _reshape(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    target = args.get("size", args.get("shape"))
    if not isinstance(target, list | tuple) or not target:
        raise Refusal(f"to {target!r}")
    shown = "[" + ", ".join(map(repr, target)) + "]"
    first, rest = target[0], list(target[1:])
    batch_like = first is BATCH or first == -1 or (lw.static_batch is not None and first == lw.static_batch)
    if not batch_like or not all(isinstance(r, int) for r in rest) or rest.count(-1) > (0 if first == -1 else 1):
        raise Refusal(f"to {shown} (only reshapes that keep the batch dimension)")
    per_sample = tuple(x.example.shape[1:])
    numel = math.prod(per_sample)
    known = math.prod(r for r in rest if r != -1)
    if -1 in rest:
        if known <= 0 or numel % known:
            raise Refusal(f"to {shown} on samples of shape {list(per_sample)}")
        rest = [numel // known if r == -1 else r for r in rest]
    elif known != numel:
        raise Refusal(f"to {shown} on samples of shape {list(per_sample)} (it would mix samples)")
    if tuple(rest) == per_sample:
        return x
    if len(rest) == 1:
        return lw.module(nn.Flatten(), x)
    raise Refusal(f"to {shown} (only flattening each sample or keeping its shape)")


@register_rule("contiguous", "clone", "detach", "alias")
def _identity(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _value(args, "self")


@register_rule("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(lw: Lowering, args: Mapping[str, Any]) -> Value:
    if _flag(args, "train"):
        raise Refusal("in training mode: call model.eval() before saving it")
    return _value(args, "input")


@register_rule("native_dropout")
def _native_dropout(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    if _flag(args, "train", True):
        raise Refusal("in training mode: call model.eval() before saving it")
    return _value(args, "input"), UNREADABLE


@register_rule("to", "_to_copy", "type_as")
def _to(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    dtype = args.get("dtype")
    if isinstance(args.get("other"), Value | Tensor):
        dtype = args["other"].example.dtype if isinstance(args["other"], Value) else args["other"].dtype
    if dtype not in (None, torch.float32):
        raise Refusal(f"to {dtype} (robustkit computes in float32)")
    return x


# -- shape queries -----------------------------------------------------------------------------------------------


@register_rule("size", "sym_size")
def _size(lw: Lowering, args: Mapping[str, Any]) -> Any:
    x = _value(args, "self")
    sizes: list[Any] = [BATCH, *(int(s) for s in x.example.shape[1:])]
    dim = args.get("dim")
    if dim is None:
        return sizes
    if not isinstance(dim, int) or not -x.rank <= dim < x.rank:
        raise Refusal(f"of dim {dim!r}")
    return sizes[dim]


@register_rule("dim")
def _dim(lw: Lowering, args: Mapping[str, Any]) -> int:
    return _value(args, "self").rank


# -- arithmetic --------------------------------------------------------------------------------------------------


def _diagonal(lw: Lowering, x: Value, scale: Tensor, shift: Tensor) -> Value:
    """x * scale + shift per feature of a (batch, features) value, as a diagonal Linear layer."""
    width = int(x.example.shape[1])
    layer = nn.Linear(width, width)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(scale.expand(width).float()))
        layer.bias.copy_(shift.expand(width).float())
    return lw.module(layer, x)


def _channel_affine(lw: Lowering, x: Value, scale: Tensor, shift: Tensor) -> Value:
    """x * scale[c] + shift[c] per channel, as a batch norm in eval mode with mean 0, variance 1 and eps 0, which
    computes exactly x * scale + shift."""
    channels = int(x.example.shape[1])
    layer = nn.BatchNorm2d(channels, eps=0.0)
    layer.load_state_dict({"weight": scale.expand(channels).float(), "bias": shift.expand(channels).float(),
                           "running_mean": torch.zeros(channels), "running_var": torch.ones(channels),
                           "num_batches_tracked": torch.tensor(0)})
    return lw.module(layer, x)


def _per_position(x: Value, constant: Tensor) -> Tensor:
    """The constant as one number per channel (NCHW values) or per feature ((batch, features) values)."""
    if constant.dtype == torch.bool or constant.is_complex():
        raise Refusal(f"by a {constant.dtype} constant")
    try:
        shape = torch.broadcast_shapes(constant.shape, x.example.shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        shape = None
    if shape != x.example.shape or (constant.dim() == x.rank and constant.shape[0] != 1):
        raise Refusal(f"by a constant of shape {list(constant.shape)} on values of shape "
                      f"{['N', *x.example.shape[1:]]}")
    spread = torch.broadcast_to(constant.double(), x.example.shape)[0]
    if x.rank == 2:
        return spread
    if x.rank == 4 and bool((spread == spread[:, :1, :1]).all()):
        return spread[:, 0, 0].contiguous()
    raise Refusal(f"by a constant of shape {list(constant.shape)} that is not one number per channel")


def _affine_const(lw: Lowering, x: Value, kind: str, constant: Any, alpha: float, x_first: bool) -> Value:
    """``kind`` (add, sub, mul, div) of a value and a constant: ``x + alpha c``, ``c - alpha x``, ``x / c`` ..."""
    if isinstance(constant, Tensor) and constant.numel() == 1 and constant.dim() <= x.rank:
        constant = constant.item()
    if isinstance(constant, bool) or not isinstance(constant, int | float | Tensor):
        raise Refusal(f"by {constant!r}")
    if kind == "div" and not x_first:
        raise Refusal("of a constant by a computed value (not an affine map)")
    if not isinstance(constant, Tensor):
        c = float(constant)
        if not math.isfinite(c) or (kind == "div" and c == 0):
            raise Refusal(f"by the number {c}")
        if kind == "mul":
            return lw.function(operator.mul, x, c)
        if kind == "div":
            return lw.function(operator.truediv, x, c)
        scaled = x if alpha == 1 else lw.function(operator.mul, x, alpha)
        if kind == "add":
            return lw.function(operator.add, x, alpha * c) if x_first else lw.function(operator.add, scaled, c)
        return lw.function(operator.sub, x, alpha * c) if x_first else lw.function(operator.sub, c, scaled)
    vector = _per_position(x, constant)
    if not bool(torch.isfinite(vector).all()) or (kind == "div" and bool((vector == 0).any())):
        raise Refusal("by a constant with zero, NaN or infinite values")
    ones, zeros = torch.ones_like(vector), torch.zeros_like(vector)
    exact: tuple[Tensor, Tensor] | None = None  # Normalize's (mean, std) when it computes the same float ops
    if kind == "add":
        scale, shift = (ones, alpha * vector) if x_first else (alpha * ones, vector)
        exact = (-vector, ones) if alpha == 1 else None
    elif kind == "sub":
        scale, shift = (ones, -alpha * vector) if x_first else (-alpha * ones, vector)
        exact = (vector, ones) if alpha == 1 and x_first else None
    elif kind == "mul":
        scale, shift = vector, zeros
    else:
        scale, shift = 1 / vector, zeros
        exact = (zeros, vector) if bool((vector > 0).all()) else None
    if x.rank == 2:
        return _diagonal(lw, x, scale, shift)
    if exact is not None:
        return lw.module(Normalize(exact[0].tolist(), exact[1].tolist()), x)
    return _channel_affine(lw, x, scale, shift)


def _arithmetic(lw: Lowering, kind: str, a: Any, b: Any, alpha: float) -> Value:
    if isinstance(a, Value) and isinstance(b, Value):
        if kind in ("mul", "div"):
            raise Refusal("of two computed values (not an affine map)")
        if a.example.shape != b.example.shape:
            raise Refusal(f"of values of shapes {list(a.example.shape[1:])} and {list(b.example.shape[1:])} "
                          "(broadcasting)")
        sign = alpha if kind == "add" else -alpha
        other = b if sign == 1 else lw.function(operator.mul, b, sign)
        return lw.function(operator.add, a, other)
    if isinstance(a, Value):
        return _affine_const(lw, a, kind, b, alpha, x_first=True)
    if isinstance(b, Value):
        if kind in ("add", "sub") and alpha != 1:  # a + alpha * x: fold alpha into the value first
            b = lw.function(operator.mul, b, alpha)
        return _affine_const(lw, b, kind, a, 1.0, x_first=False)
    raise Refusal("without a computed value")


@register_rule("add")
def _add(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "add", args.get("self"), args.get("other"), _number(args, "alpha", 1.0))


@register_rule("sub")
def _sub(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "sub", args.get("self"), args.get("other"), _number(args, "alpha", 1.0))


@register_rule("rsub")
def _rsub(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "sub", args.get("other"), args.get("self"), _number(args, "alpha", 1.0))


@register_rule("mul")
def _mul(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "mul", args.get("self"), args.get("other"), 1.0)


@register_rule("div")
def _div(lw: Lowering, args: Mapping[str, Any]) -> Value:
    if args.get("rounding_mode") is not None:
        raise Refusal(f"with rounding_mode={args['rounding_mode']!r}")
    return _arithmetic(lw, "div", args.get("self"), args.get("other"), 1.0)


@register_rule("neg")
def _neg(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.function(operator.mul, _value(args, "self"), -1.0)
