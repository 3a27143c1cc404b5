"""The operator registry: which ``torch.nn`` layer (and which traced function or ONNX node) becomes which bound
operator.

Every supported layer type is registered here with :func:`register_operator`: the module type, a factory of
its bound operator, an optional check of the module's settings, and the spellings the importers meet it in
(``torch`` functions and tensor methods in traced ``forward`` code, ONNX node types). The graph builder
(:mod:`~robustkit.verifiers.graph`), the ``torch.fx`` reader and the ONNX importer all look layers up here,
so a new layer type is one operator class and one registration.

>>> import torch
>>> from torch import nn
>>> from robustkit.verifiers import ops
>>> class Doubling(nn.Module):
...     def forward(self, x):
...         return 2 * x
>>> _ = register_operator(Doubling, lambda module: ops.ScalarAffineOp(2.0, 0.0))
>>> from robustkit.verifiers import bounds
>>> box = bounds(nn.Sequential(nn.Flatten(), Doubling()), torch.full((1, 1, 1, 2), 0.5), eps=0.1, method="interval")
>>> [round(v, 4) for v in box.upper.flatten().tolist()]
[1.2, 1.2]
>>> unregister_operator(Doubling)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.nn import Normalize
from robustkit.verifiers.ops.affine import (
    BatchNorm2dOp,
    Conv2dOp,
    FlattenOp,
    LinearOp,
    NormalizeOp,
    PoolOp,
    _pair,
)
from robustkit.verifiers.ops.base import BoundOp
from robustkit.verifiers.ops.maxpool import MaxPool2dOp
from robustkit.verifiers.ops.relu import LeakyReLUOp, ReLUOp
from robustkit.verifiers.ops.sigmoid import SigmoidOp, TanhOp

# a traced call ``f(x, *args, **kwargs)`` -> its bound operator, or a str saying why it is not supported
FunctionRule = Callable[[tuple[Any, ...], Mapping[str, Any]], "BoundOp | str"]
# the attributes of an ONNX node -> the equivalent module, or a str saying why it is not supported
OnnxRule = Callable[[Mapping[str, Any]], "nn.Module | str"]


@dataclass(frozen=True)
class OperatorEntry:
    """How one module type becomes a bound operator; see :func:`register_operator`."""

    module: type[nn.Module]
    build: Callable[[nn.Module], BoundOp]
    check: Callable[[nn.Module], str | None] | None = None
    functions: Mapping[Callable[..., Any], FunctionRule] = field(default_factory=dict)
    methods: Mapping[str, FunctionRule] = field(default_factory=dict)
    onnx: Mapping[str, OnnxRule] = field(default_factory=dict)


_ENTRIES: dict[type[nn.Module], OperatorEntry] = {}
#: module type -> entry (read-only view; use :func:`register_operator` to add one)
OPERATORS: Mapping[type[nn.Module], OperatorEntry] = MappingProxyType(_ENTRIES)
#: module types that are the identity at evaluation time
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)


def register_operator(
    module: type[nn.Module],
    build: Callable[[nn.Module], BoundOp],
    *,
    check: Callable[[nn.Module], str | None] | None = None,
    functions: Mapping[Callable[..., Any], FunctionRule] | None = None,
    methods: Mapping[str, FunctionRule] | None = None,
    onnx: Mapping[str, OnnxRule] | None = None,
    replace: bool = False,
) -> OperatorEntry:
    """Register a layer type for every bound method.

    ``build(module)`` returns its bound operator (a subclass of :class:`~robustkit.verifiers.ops.AffineOp`
    or :class:`~robustkit.verifiers.ops.NonlinearOp`, see :mod:`robustkit.verifiers.ops.base`); ``check(module)``
    says why a module of this type still cannot be analysed (or None); ``functions`` and ``methods`` map the
    ``torch`` functions and tensor method names that mean this layer in traced ``forward`` code to rules
    ``(args, kwargs) -> operator``; ``onnx`` maps ONNX node types to rules ``attributes -> module``. Only
    modules whose ``forward`` is the registered type's own are read this way (a subclass with its own
    ``forward`` is traced instead). Registering a type twice needs ``replace=True``.
    """
    if not (isinstance(module, type) and issubclass(module, nn.Module)):
        raise TypeError(f"register_operator needs an nn.Module subclass, got {module!r}")
    if module in _ENTRIES and not replace:
        raise ValueError(f"{module.__name__} is registered already (pass replace=True to change it)")
    entry = OperatorEntry(module, build, check, dict(functions or {}), dict(methods or {}), dict(onnx or {}))
    _ENTRIES[module] = entry
    return entry


def unregister_operator(module: type[nn.Module]) -> None:
    """Remove a registration (for tests and user code that registered a type temporarily)."""
    _ENTRIES.pop(module, None)


def keeps_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``base`` that still runs ``base``'s own forward."""
    return isinstance(module, base) and type(module).forward is base.forward


def lookup(module: nn.Module) -> OperatorEntry | None:
    """The entry of ``module``'s type (or of a base type whose forward it keeps), or None."""
    entry = _ENTRIES.get(type(module))
    if entry is not None:
        return entry
    return next((e for base, e in _ENTRIES.items() if keeps_forward(module, base)), None)


def function_rule(target: Callable[..., Any]) -> FunctionRule | None:
    """The rule of a traced ``torch`` function, or None."""
    return next((e.functions[target] for e in _ENTRIES.values() if target in e.functions), None)


def method_rule(name: str) -> FunctionRule | None:
    """The rule of a traced tensor method, or None."""
    return next((e.methods[name] for e in _ENTRIES.values() if name in e.methods), None)


def onnx_rule(op_type: str) -> OnnxRule | None:
    """The rule of an ONNX node type, or None."""
    return next((e.onnx[op_type] for e in _ENTRIES.values() if op_type in e.onnx), None)


def onnx_types() -> tuple[str, ...]:
    """Every ONNX node type that some registered operator reads."""
    return tuple(sorted({name for e in _ENTRIES.values() for name in e.onnx}))


def supported_names() -> list[str]:
    """The layer names the graph builder reads, for error messages."""
    return sorted([t.__name__ for t in _ENTRIES] + [t.__name__ for t in PASS_THROUGH] + ["Sequential", "Residual"])


# -- the built-in layers -------------------------------------------------------------------------------------


def _check_conv(module: nn.Module) -> str | None:
    assert isinstance(module, nn.Conv2d)
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}; use explicit numbers"
    return None


def _check_flatten(module: nn.Module) -> str | None:
    assert isinstance(module, nn.Flatten)
    if module.start_dim != 1 or module.end_dim != -1:
        return f"Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}); only start_dim=1 is supported"
    return None


def _check_batchnorm(module: nn.Module) -> str | None:
    return "in training mode: call model.eval()" if module.training else None


def _no_arguments(op: Callable[[], BoundOp]) -> FunctionRule:
    def rule(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BoundOp | str:
        if args or set(kwargs) - {"inplace"}:
            return "unexpected arguments"
        return op()

    return rule


def _leaky_rule(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BoundOp | str:
    values = dict(zip(("negative_slope", "inplace"), args, strict=False)) | dict(kwargs)
    slope = values.get("negative_slope", 0.01)
    if set(values) - {"negative_slope", "inplace"} or not isinstance(slope, int | float):
        return "unexpected arguments"
    return _leaky(nn.LeakyReLU(float(slope)))


def _leaky(module: nn.Module) -> BoundOp:
    return LeakyReLUOp.from_module(module)


def _check_leaky(module: nn.Module) -> str | None:
    assert isinstance(module, nn.LeakyReLU)
    if not 0 <= module.negative_slope <= 1:
        return f"negative_slope={module.negative_slope} (the relaxations need 0 <= negative_slope <= 1)"
    return None


def _check_maxpool(module: nn.Module) -> str | None:
    assert isinstance(module, nn.MaxPool2d)
    if module.return_indices:
        return "return_indices=True (the indices are not a value the bound methods can bound)"
    for k, p, d in zip(_pair(module.kernel_size), _pair(module.padding), _pair(module.dilation), strict=True):
        if p > ((k - 1) * d + 1) // 2:  # torch refuses these too, when the layer runs
            return f"padding={module.padding} is more than half the (dilated) kernel {module.kernel_size}"
    return None


def _maxpool(module: nn.Module) -> BoundOp:
    return MaxPool2dOp(module)


_MAX_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _is_size(value: Any) -> bool:
    """An int or a pair of ints (bools are not sizes)."""
    if isinstance(value, tuple | list):
        return len(value) == 2 and all(_is_size(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _maxpool_rule(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BoundOp | str:
    values = dict(zip(_MAX_POOL_ARGUMENTS, args, strict=False)) | dict(kwargs)
    if set(values) - set(_MAX_POOL_ARGUMENTS) or "kernel_size" not in values:
        return "unexpected arguments"
    sizes_ok = all(_is_size(values[k]) for k in ("kernel_size", "padding", "dilation") if k in values)
    if not sizes_ok or not (values.get("stride") is None or _is_size(values["stride"])) or not all(
        isinstance(values.get(k, False), bool) for k in ("ceil_mode", "return_indices")
    ):
        return "arguments that are not constant sizes and flags"
    module = nn.MaxPool2d(**values)
    problem = _check_maxpool(module)
    return problem if problem else MaxPool2dOp(module)


def _onnx_maxpool(attrs: Mapping[str, Any]) -> nn.Module | str:
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", ()))
    if len(kernel) != 2:
        return f"kernel_shape={list(kernel)} (only 2-D max pooling is supported)"
    if int(attrs.get("storage_order", 0)) != 0:
        return f"storage_order={attrs['storage_order']} (only the default row-major order 0 is supported)"
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return f"auto_pad={auto_pad!r} (give explicit pads)"
    pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        return f"asymmetric pads {pads} (torch pads both sides of each axis equally)"
    module = nn.MaxPool2d(kernel, stride=tuple(int(s) for s in attrs.get("strides", (1, 1))),
                          padding=(pads[0], pads[1]), dilation=tuple(int(d) for d in attrs.get("dilations", (1, 1))),
                          ceil_mode=bool(attrs.get("ceil_mode", 0)))
    problem = _check_maxpool(module)
    return problem if problem else module


register_operator(nn.Linear, LinearOp)
register_operator(nn.Conv2d, Conv2dOp, check=_check_conv)
register_operator(nn.ReLU, ReLUOp, functions={F.relu: _no_arguments(ReLUOp), torch.relu: _no_arguments(ReLUOp)},
                  methods={"relu": _no_arguments(ReLUOp), "relu_": _no_arguments(ReLUOp)},
                  onnx={"Relu": lambda attrs: nn.ReLU()})
register_operator(nn.LeakyReLU, _leaky, check=_check_leaky, functions={F.leaky_relu: _leaky_rule},
                  onnx={"LeakyRelu": lambda attrs: nn.LeakyReLU(float(attrs.get("alpha", 0.01)))})
register_operator(nn.Sigmoid, SigmoidOp,
                  functions={torch.sigmoid: _no_arguments(SigmoidOp), F.sigmoid: _no_arguments(SigmoidOp)},
                  methods={"sigmoid": _no_arguments(SigmoidOp)}, onnx={"Sigmoid": lambda attrs: nn.Sigmoid()})
register_operator(nn.Tanh, TanhOp, functions={torch.tanh: _no_arguments(TanhOp), F.tanh: _no_arguments(TanhOp)},
                  methods={"tanh": _no_arguments(TanhOp)}, onnx={"Tanh": lambda attrs: nn.Tanh()})
register_operator(nn.MaxPool2d, _maxpool, check=_check_maxpool, functions={F.max_pool2d: _maxpool_rule},
                  onnx={"MaxPool": _onnx_maxpool})
register_operator(nn.Flatten, FlattenOp, check=_check_flatten)
register_operator(Normalize, NormalizeOp)
register_operator(nn.BatchNorm2d, BatchNorm2dOp, check=_check_batchnorm)
register_operator(nn.AvgPool2d, PoolOp)
register_operator(nn.AdaptiveAvgPool2d, PoolOp)
