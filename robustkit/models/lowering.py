"""Lower an operator graph to the layers the bound engine reads: the core that the TorchScript and
``torch.export`` importers share.

An importer walks a file's operator graph in order and calls :meth:`Lowering.call` once per ATen operator
(``aten::conv2d``, ``aten::relu``, ...) with its arguments by the names of the operator's schema: computed
tensors are :class:`Value` handles, weights and other constants plain tensors or numbers, and sizes equal to the
batch size :data:`BATCH`. The result (:meth:`Lowering.finish`) is a ``torch.fx.GraphModule`` made of standard
layers (Linear, Conv2d, BatchNorm2d in eval mode, ReLU, LeakyReLU, Sigmoid, Tanh, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d, Flatten), robustkit's :class:`~robustkit.nn.Normalize`, sums of two values (skip
connections) and arithmetic with numbers: what :func:`robustkit.verifiers.graph.build_graph` reads, so the
verifiers, the interval attack and the trainers run on it as on any other model.

Operators that cannot be lowered are collected with a count, and :meth:`Lowering.problems` names them all at
once. Every value is also computed on a probe batch while the graph is built (``Value.example``): that gives the
importers the shapes they need (``x.size(1)``, reshapes) without running any code of the file.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from robustkit.nn import Normalize

__all__ = ["BATCH", "UNREADABLE", "Lowering", "Refusal", "Value", "foldable", "lowered_operators"]


class _Batch:
    """The batch size, kept symbolic so that the lowered model takes batches of any size."""

    def __repr__(self) -> str:
        return "N"


#: a size equal to the batch size (``x.size(0)``)
BATCH = _Batch()


class _Unreadable:
    def __repr__(self) -> str:
        return "<unreadable>"


#: what an operator that could not be lowered produced; its users are not reported again
UNREADABLE = _Unreadable()


@dataclass(frozen=True, eq=False)
class Value:
    """A computed tensor of the lowered graph: its fx node and its value on the probe batch."""

    node: fx.Node
    example: Tensor

    @property
    def rank(self) -> int:
        """Number of dimensions, the batch dimension included."""
        return self.example.dim()


class Refusal(Exception):
    """Raised by an operator rule when this use of the operator cannot be lowered; the message says why."""


Rule = Callable[["Lowering", Mapping[str, Any]], Any]
_RULES: dict[str, Rule] = {}
# pure operators evaluated at load time when every input is a constant (weights transposed, scaled, ...)
_PURE = frozenset({
    "t", "permute", "transpose", "unsqueeze", "squeeze", "expand", "neg", "reciprocal", "sqrt", "rsqrt",
    "numpy_T", "select", "slice", "index_select", "cat", "stack", "to", "_to_copy", "type_as", "lift_fresh_copy",
    "lift_fresh", "zeros_like", "ones_like", "clone", "contiguous", "detach", "alias", "view", "reshape",
    "_unsafe_view", "flatten", "add", "sub", "rsub", "mul", "div", "pow", "exp", "log",
})


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for name in names:
            _RULES[name] = function
        return function

    return register


def lowered_operators() -> tuple[str, ...]:
    """Every ATen operator the importers lower on computed values (``aten::name``), for error messages."""
    return tuple(f"aten::{name}" for name in sorted(_RULES))


def foldable(name: str) -> bool:
    """Whether ``aten::name`` (or its in-place form) may be evaluated at load time on constant inputs."""
    base = _base(name)
    return base in _RULES or base in _PURE


def _base(name: str) -> str:
    """``relu_`` -> ``relu``: an in-place operator lowers like its functional form (importers rebind the alias)."""
    name = name.split("::")[-1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _contains(values: Iterable[Any], wanted: type) -> bool:
    for value in values:
        if isinstance(value, wanted) or (isinstance(value, list | tuple) and _contains(value, wanted)):
            return True
    return False


class Lowering:
    """Builds the lowered graph; see the module docstring.

    ``example`` is the probe batch the values are computed on; ``static_batch`` is the batch size a file was
    specialised to (a traced or exported program without a dynamic batch), which reshapes may name literally.
    """

    def __init__(self, source: str, example: Tensor, *, static_batch: int | None = None) -> None:
        self.source = source
        self.static_batch = static_batch
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.input = Value(self.graph.placeholder("x"), example)
        self._counts: dict[str, int] = {}
        self._reasons: dict[str, list[str]] = {}
        self._names: set[str] = set()
        self._hint = ""

    # -- what importers call

    def call(self, op: str, args: Mapping[str, Any], fold: Callable[[], Any] | None = None, hint: str = "") -> Any:
        """Lower one operator application; returns a :class:`Value`, a constant, a tuple of them, or
        :data:`UNREADABLE` (the operator is recorded as unsupported unless an input was unreadable already).

        ``fold`` evaluates the operator itself on constant inputs (only pure operators are folded); ``hint`` names
        the layer (the path of its weight in the file, such as ``conv1``).
        """
        base = _base(op)
        known = base in _RULES or base in _PURE
        if _contains(args.values(), _Unreadable):
            if not known:
                self.refuse(op)
            return UNREADABLE
        if fold is not None and known and not _contains(args.values(), Value):
            try:
                return fold()
            except Exception as exc:  # noqa: BLE001 - the file's constants do not fit the operator
                self.refuse(op, f"on its constants: {_first_line(exc)}")
                return UNREADABLE
        rule = _RULES.get(base)
        if rule is None:
            self.refuse(op)
            return UNREADABLE
        self._hint = hint or base.strip("_")
        try:
            return rule(self, args)
        except Refusal as exc:
            self.refuse(op, str(exc))
            return UNREADABLE

    def refuse(self, op: str, reason: str = "") -> None:
        """Record ``op`` as unsupported (counted; with ``reason`` when it is only this use that is)."""
        self._counts[op] = self._counts.get(op, 0) + 1
        if reason and reason not in self._reasons.setdefault(op, []):
            self._reasons[op].append(reason)

    def problems(self) -> list[str]:
        """Every operator recorded as unsupported, in order of first use: ``aten::gelu (2x)``, ``aten::batch_norm
        (in training mode)``."""
        described = []
        for op, count in self._counts.items():
            notes = ([f"{count}x"] if count > 1 else []) + self._reasons.get(op, [])
            described.append(f"{op} ({'; '.join(notes)})" if notes else op)
        return described

    def finish(self, output: Any, class_name: str) -> fx.GraphModule:
        """The lowered model (eval mode) returning ``output``."""
        if not isinstance(output, Value):
            raise Refusal("the model must return one computed tensor")
        self.graph.output(output.node)
        return fx.GraphModule(self.root, self.graph, class_name=class_name).eval()

    # -- what rules call

    def module(self, layer: nn.Module, value: Value) -> Value:
        """Apply ``layer`` (a standard layer) to ``value``."""
        name = re.sub(r"\W", "_", self._hint) or "layer"
        if not name[0].isalpha():
            name = f"m_{name}"
        unique, suffix = name, 1
        while unique in self._names:
            unique, suffix = f"{name}_{suffix}", suffix + 1
        self._names.add(unique)
        layer.eval()
        self.root.add_module(unique, layer)
        with torch.no_grad():
            example = layer(value.example)
        return Value(self.graph.call_module(unique, (value.node,)), example)

    def function(self, function: Callable[..., Any], *args: Any) -> Value:
        """``function`` (``operator.add``, ``mul``, ``sub``, ``truediv``) of values and numbers."""
        node = self.graph.call_function(function, tuple(a.node if isinstance(a, Value) else a for a in args))
        with torch.no_grad():
            example = function(*(a.example if isinstance(a, Value) else a for a in args))
        return Value(node, example)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


@_rule("linear")
def _linear(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _linear_layer(lw, _value(args, "input"), _required(args, "weight"), _weight(args, "bias", optional=True))


@_rule("addmm")
def _addmm(lw: Lowering, args: Mapping[str, Any]) -> Value:
    beta, alpha = _number(args, "beta", 1.0), _number(args, "alpha", 1.0)
    weight = _required(args, "mat2")
    bias = _weight(args, "self")
    assert bias is not None
    return _linear_layer(lw, _value(args, "mat1"), (alpha * weight).t().contiguous(), beta * bias)


@_rule("mm", "matmul")
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


@_rule("conv2d")
def _conv2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _conv_layer(lw, args)


@_rule("_convolution", "convolution")
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


@_rule("batch_norm")
def _batch_norm_rule(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _batch_norm(lw, args, _flag(args, "training"))


@_rule("native_batch_norm", "_native_batch_norm_legit")
def _native_batch_norm(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _batch_norm(lw, args, _flag(args, "training")), UNREADABLE, UNREADABLE


@_rule("_native_batch_norm_legit_no_training")
def _native_batch_norm_no_training(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _batch_norm(lw, args, False), UNREADABLE, UNREADABLE


@_rule("relu")
def _relu(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.ReLU(), _value(args, "self"))


@_rule("leaky_relu")
def _leaky_relu(lw: Lowering, args: Mapping[str, Any]) -> Value:
    slope = _number(args, "negative_slope", 0.01)
    if not 0 <= slope <= 1:
        raise Refusal(f"with negative_slope={slope:g} (the relaxations need 0 <= negative_slope <= 1)")
    return lw.module(nn.LeakyReLU(slope), _value(args, "self"))


@_rule("sigmoid")
def _sigmoid(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.Sigmoid(), _value(args, "self"))


@_rule("tanh")
def _tanh(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.module(nn.Tanh(), _value(args, "self"))


def _pool_sizes(args: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    kernel = _ints(args.get("kernel_size"), "kernel_size")
    stride_arg = args.get("stride")
    stride = kernel if stride_arg is None or stride_arg == [] or stride_arg == () else _ints(stride_arg, "stride")
    return kernel, stride, _ints(args.get("padding", 0), "padding")


@_rule("max_pool2d")
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


@_rule("max_pool2d_with_indices")
def _max_pool2d_with_indices(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    return _max_pool2d(lw, args), UNREADABLE


@_rule("avg_pool2d")
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


@_rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool2d(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    if x.rank != 4:
        raise Refusal(f"on a rank-{x.rank} value (only NCHW values)")
    return lw.module(nn.AdaptiveAvgPool2d(_ints(args.get("output_size"), "output_size")), x)


@_rule("mean")
def _mean(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    dims = args.get("dim")
    if args.get("dtype") is not None:
        raise Refusal("with a dtype")
    if x.rank != 4 or not isinstance(dims, list | tuple) or sorted(int(d) % 4 for d in dims) != [2, 3]:
        raise Refusal(f"over dims {dims!r} (only the spatial mean of NCHW values, global average pooling)")
    pooled = lw.module(nn.AdaptiveAvgPool2d(1), x)
    return pooled if _flag(args, "keepdim") else lw.module(nn.Flatten(), pooled)


@_rule("flatten")
def _flatten(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    start, end = int(_number(args, "start_dim", 0)) % x.rank, int(_number(args, "end_dim", -1)) % x.rank
    if start == end:
        return x
    if start == 1 and end == x.rank - 1:
        return lw.module(nn.Flatten(), x)
    raise Refusal(f"from dim {start} to {end} (only flattening each sample: start_dim=1 to the last dim)")


@_rule("view", "reshape", "_unsafe_view")
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


@_rule("contiguous", "clone", "detach", "alias")
def _identity(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _value(args, "self")


@_rule("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(lw: Lowering, args: Mapping[str, Any]) -> Value:
    if _flag(args, "train"):
        raise Refusal("in training mode: call model.eval() before saving it")
    return _value(args, "input")


@_rule("native_dropout")
def _native_dropout(lw: Lowering, args: Mapping[str, Any]) -> tuple[Any, ...]:
    if _flag(args, "train", True):
        raise Refusal("in training mode: call model.eval() before saving it")
    return _value(args, "input"), UNREADABLE


@_rule("to", "_to_copy", "type_as")
def _to(lw: Lowering, args: Mapping[str, Any]) -> Value:
    x = _value(args, "self")
    dtype = args.get("dtype")
    if isinstance(args.get("other"), Value | Tensor):
        dtype = args["other"].example.dtype if isinstance(args["other"], Value) else args["other"].dtype
    if dtype not in (None, torch.float32):
        raise Refusal(f"to {dtype} (robustkit computes in float32)")
    return x


# -- shape queries -----------------------------------------------------------------------------------------------


@_rule("size", "sym_size")
def _size(lw: Lowering, args: Mapping[str, Any]) -> Any:
    x = _value(args, "self")
    sizes: list[Any] = [BATCH, *(int(s) for s in x.example.shape[1:])]
    dim = args.get("dim")
    if dim is None:
        return sizes
    if not isinstance(dim, int) or not -x.rank <= dim < x.rank:
        raise Refusal(f"of dim {dim!r}")
    return sizes[dim]


@_rule("dim")
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


@_rule("add")
def _add(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "add", args.get("self"), args.get("other"), _number(args, "alpha", 1.0))


@_rule("sub")
def _sub(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "sub", args.get("self"), args.get("other"), _number(args, "alpha", 1.0))


@_rule("rsub")
def _rsub(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "sub", args.get("other"), args.get("self"), _number(args, "alpha", 1.0))


@_rule("mul")
def _mul(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return _arithmetic(lw, "mul", args.get("self"), args.get("other"), 1.0)


@_rule("div")
def _div(lw: Lowering, args: Mapping[str, Any]) -> Value:
    if args.get("rounding_mode") is not None:
        raise Refusal(f"with rounding_mode={args['rounding_mode']!r}")
    return _arithmetic(lw, "div", args.get("self"), args.get("other"), 1.0)


@_rule("neg")
def _neg(lw: Lowering, args: Mapping[str, Any]) -> Value:
    return lw.function(operator.mul, _value(args, "self"), -1.0)
