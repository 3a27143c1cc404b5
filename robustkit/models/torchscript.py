"""Turn a TorchScript model (scripted or traced) back into ordinary ``torch.nn`` layers.

The bound engine walks ``torch.nn`` modules. A TorchScript file made of standard layers (Sequential, Linear,
Conv2d, ReLU, Flatten, pooling, batch norm, dropout, identity) and robustkit's ``Normalize``/``Residual`` is
rebuilt layer by layer with the same weights, so it can be verified. Modules are recognised by their fully
qualified TorchScript type name (``__torch__.torch.nn.modules.linear.Linear``), never by their short name, so a
user's own class called ``Linear`` with a different ``forward`` is not mistaken for a standard one. Anything
else makes :func:`to_eager` return None, and the caller lowers the module from its operator graph instead
(:mod:`robustkit.models.script_lowering`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustkit.nn import Normalize, Residual

__all__ = ["script_type_name", "to_eager"]

_MANGLE = re.compile(r"___torch_mangle_\d+\.")


def script_type_name(module: Any) -> str:
    """The qualified TorchScript type name of ``module`` without tracing's name mangling."""
    name: str = module._c._type().qualified_name()
    return _MANGLE.sub("", name)


class _NotConvertible(Exception):
    pass


def _graph_constants(module: Any, op_names: tuple[str, ...]) -> list[Any]:
    """Constant arguments of the first ``op_names`` call in a traced module's graph (lists expanded)."""
    for node in module.graph.nodes():
        if node.kind() in op_names:
            values: list[Any] = []
            for value in node.inputs():
                producer = value.node()
                if producer.kind() == "prim::ListConstruct":
                    values.append([v.toIValue() for v in producer.inputs()])
                else:
                    values.append(value.toIValue())
            return values
    raise _NotConvertible(f"no {op_names[0]} call found in the graph of {script_type_name(module)}")


def _attribute(module: Any, name: str, fallback: Callable[[], Any]) -> Any:
    """A scripted module keeps its constants as attributes; a traced one only in its graph."""
    try:
        return getattr(module, name)
    except AttributeError:
        return fallback()


def _copy_state(target: nn.Module, source: Any) -> nn.Module:
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    target.load_state_dict(state, strict=True)
    return target


def _linear(m: Any) -> nn.Module:
    weight = m.weight
    return _copy_state(nn.Linear(weight.shape[1], weight.shape[0], bias=m.bias is not None), m)


def _conv2d(m: Any) -> nn.Module:
    def from_graph(index: int) -> Callable[[], Any]:
        return lambda: _graph_constants(m, ("aten::_convolution", "aten::conv2d"))[index]

    stride = _attribute(m, "stride", from_graph(3))
    padding = _attribute(m, "padding", from_graph(4))
    dilation = _attribute(m, "dilation", from_graph(5))
    groups = _attribute(m, "groups", lambda: _graph_constants(m, ("aten::_convolution",))[8])
    padding_mode = _attribute(m, "padding_mode", lambda: "zeros")
    if isinstance(padding, str) or padding_mode != "zeros":
        raise _NotConvertible("Conv2d with string padding or non-zero padding mode")
    weight = m.weight
    conv = nn.Conv2d(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=tuple(stride),
        padding=tuple(padding), dilation=tuple(dilation), groups=groups, bias=m.bias is not None,
    )
    return _copy_state(conv, m)


def _flatten(m: Any) -> nn.Module:
    start = _attribute(m, "start_dim", lambda: _graph_constants(m, ("aten::flatten",))[1])
    end = _attribute(m, "end_dim", lambda: _graph_constants(m, ("aten::flatten",))[2])
    return nn.Flatten(start, end)


def _avgpool2d(m: Any) -> nn.Module:
    def from_graph(index: int) -> Callable[[], Any]:
        return lambda: _graph_constants(m, ("aten::avg_pool2d",))[index]

    kernel = _attribute(m, "kernel_size", from_graph(1))
    stride = _attribute(m, "stride", from_graph(2))
    padding = _attribute(m, "padding", from_graph(3))
    ceil_mode = _attribute(m, "ceil_mode", from_graph(4))
    include_pad = _attribute(m, "count_include_pad", from_graph(5))
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=include_pad)


def _batchnorm2d(m: Any) -> nn.Module:
    eps = _attribute(m, "eps", lambda: _graph_constants(m, ("aten::batch_norm",))[7])
    layer = nn.BatchNorm2d(m.running_mean.shape[0], eps=eps, affine=m.weight is not None)
    return _copy_state(layer, m)


def _normalize(m: Any) -> nn.Module:
    return Normalize(m.mean.flatten().tolist(), m.std.flatten().tolist())


def _sequential(m: Any) -> nn.Module:
    return nn.Sequential(*[_convert(child) for _, child in m.named_children()])


def _residual(m: Any) -> nn.Module:
    children = dict(m.named_children())
    skip = children.get("skip")
    return Residual(_convert(children["main"]), None if skip is None else _convert(skip))


_TORCH = "__torch__.torch.nn.modules."
_CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {
    _TORCH + "container.Sequential": _sequential,
    _TORCH + "linear.Linear": _linear,
    _TORCH + "linear.Identity": lambda m: nn.Identity(),
    _TORCH + "conv.Conv2d": _conv2d,
    _TORCH + "activation.ReLU": lambda m: nn.ReLU(),
    _TORCH + "flatten.Flatten": _flatten,
    _TORCH + "pooling.AvgPool2d": _avgpool2d,
    _TORCH + "batchnorm.BatchNorm2d": _batchnorm2d,
    _TORCH + "dropout.Dropout": lambda m: nn.Dropout(),
    "__torch__.robustkit.nn.Normalize": _normalize,
    "__torch__.robustkit.nn.Residual": _residual,
}


def _convert(module: Any) -> nn.Module:
    name = script_type_name(module)
    converter = _CONVERTERS.get(name)
    if converter is None:
        raise _NotConvertible(name)
    return converter(module)


def to_eager(module: torch.jit.ScriptModule) -> nn.Module | None:
    """An eager copy of ``module`` made of standard layers, or None when it holds anything else."""
    try:
        return _convert(module)
    except (_NotConvertible, RuntimeError, AttributeError, KeyError, TypeError, IndexError):
        return None
