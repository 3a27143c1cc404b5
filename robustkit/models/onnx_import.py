"""Read an ONNX file into verifiable ``torch.nn`` layers (needs the ``onnx`` extra).

robustkit converts ONNX graphs itself rather than through a general converter, because the result must be
made of layers the bound engine understands: a chain of Gemm/MatMul(+Add), Conv, Flatten, Reshape to 2-D,
BatchNormalization, AveragePool, per-channel Sub/Div/Mul/Add by constants, Identity and Dropout, with skip
connections (a value used by two branches that an Add joins again) turned into :class:`~robustkit.nn.Residual`,
plus every node type the operator registry reads (:func:`robustkit.verifiers.ops.registry.onnx_rule`: Relu,
LeakyRelu, Sigmoid, Tanh, MaxPool, and whatever :func:`~robustkit.verifiers.ops.register_operator` adds), so
a new layer type needs no change here. A graph with any other operator is refused with the full list of them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustkit.errors import ModelLoadError, RobustkitError
from robustkit.nn import Normalize, Residual
from robustkit.verifiers.ops.registry import onnx_rule, onnx_types

__all__ = ["SUPPORTED_OPS", "load_onnx", "supported_ops"]

# the node types the converter handles itself (the registry's come on top, see ``supported_ops``)
_OWN_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Constant", "Conv", "Div", "Dropout", "Flatten", "Gemm",
    "Identity", "MatMul", "Mul", "Reshape", "Sub",
    # shape arithmetic, as exported for x.view(x.size(0), -1); evaluated symbolically at load time
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast",
)


def supported_ops() -> tuple[str, ...]:
    """Every ONNX node type the importer reads: its own and those of the operator registry (as registered now)."""
    return tuple(sorted(set(_OWN_OPS) | set(onnx_types())))


#: the node types read with the built-in layers registered (``supported_ops()`` also sees later registrations)
SUPPORTED_OPS = supported_ops()
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast")
BATCH = "N"  # the symbolic batch dimension in evaluated shapes


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


@dataclass
class _Graph:
    nodes: list[Any]
    constants: dict[str, np.ndarray]
    ranks: dict[str, int]
    consumers: dict[str, list[Any]]
    output: str
    path: Path
    shapes: dict[str, list[Any]]

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"ONNX file {self.path}: {message}")

    def is_join(self, node: Any) -> bool:
        """An Add of two computed values (not of a value and a constant): the end of a skip connection."""
        return bool(node.op_type == "Add" and not any(i in self.constants for i in node.input))


def _attributes(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Converter:
    """Walks the graph from its input and emits a module per node, nesting skip connections."""

    def __init__(self, graph: _Graph) -> None:
        self.g = graph

    def walk(self, value: str) -> tuple[list[nn.Module], str, Any]:
        """Modules from ``value`` on, up to the graph output or to a join Add (returned, not consumed)."""
        modules: list[nn.Module] = []
        while value != self.g.output:
            users = self.g.consumers.get(value, [])
            if len(users) == 1 and self.g.is_join(users[0]):
                return modules, value, users[0]
            if len(users) == 1:
                module, value = self.node(users[0], value)
                modules.append(module)
            elif len(users) == 2:
                residual, value = self.fork(value, users)
                modules.append(residual)
            else:
                raise self.g.fail(f"value {value!r} is used by {len(users)} nodes; only chains and skip "
                                  "connections (two branches joined by Add) are supported")
        return modules, value, None

    def branch(self, start: str, first: Any) -> tuple[list[nn.Module], Any]:
        if self.g.is_join(first):
            return [], first
        module, value = self.node(first, start)
        rest, _, join = self.walk(value)
        if join is None:
            raise self.g.fail(f"a branch starting at {first.name or first.op_type!r} never joins again")
        return [module, *rest], join

    def fork(self, value: str, users: list[Any]) -> tuple[nn.Module, str]:
        (main, join_a), (skip, join_b) = (self.branch(value, u) for u in users)
        if join_a is not join_b:
            raise self.g.fail(f"the two branches from {value!r} end in different Add nodes")
        if not main:
            main, skip = skip, main
        skip_module = nn.Sequential(*skip) if skip else None
        return Residual(nn.Sequential(*main), skip_module), join_a.output[0]

    def const(self, name: str, what: str) -> np.ndarray:
        if name not in self.g.constants:
            raise self.g.fail(f"{what} must be a constant (initializer), got the computed value {name!r}")
        return self.g.constants[name]

    def node(self, node: Any, value: str) -> tuple[nn.Module, str]:
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None:
            return self.registered(node), node.output[0]
        module: nn.Module = handler(node, value, _attributes(node))
        return module, node.output[0]

    def registered(self, node: Any) -> nn.Module:
        """A node read by the operator registry's rule: one data input, and only its first output used."""
        rule = onnx_rule(node.op_type)
        if rule is None:
            raise self.g.fail(f"unsupported operator {node.op_type}")
        inputs = [name for name in node.input if name]
        if len(inputs) != 1:
            raise self.g.fail(f"{node.op_type} with {len(inputs)} inputs (only one data input is supported)")
        used = [name for name in node.output[1:] if name and (name in self.g.consumers or name == self.g.output)]
        if used:
            raise self.g.fail(f"{node.op_type}'s extra output {used[0]!r} is used by the graph (only its first "
                              "output is supported)")
        made = rule(_attributes(node))
        if isinstance(made, str):
            raise self.g.fail(f"{node.op_type} is not supported with {made}")
        return made

    def op_Identity(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        return nn.Identity()

    def op_Dropout(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if len(node.output) > 1 and node.output[1] in self.g.consumers:
            raise self.g.fail("a Dropout mask output is used by the graph")
        return nn.Identity()

    def op_Flatten(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if attrs.get("axis", 1) != 1:
            raise self.g.fail(f"Flatten with axis={attrs['axis']} (only axis=1 keeps the batch dimension)")
        return nn.Flatten()

    def op_Reshape(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if node.input[1] in self.g.shapes:
            shape: list[Any] = list(self.g.shapes[node.input[1]])
        else:
            shape = [int(v) for v in np.atleast_1d(self.const(node.input[1], "Reshape's shape"))]
        # (batch | -1 | 0 | 1, -1 | k) flattens each sample; a wrong k then fails in the next layer, never silently
        if len(shape) != 2 or shape[0] not in (BATCH, -1, 0, 1) or not isinstance(shape[1], int) or shape[1] < -1 \
                or shape[1] == 0:
            raise self.g.fail(f"Reshape to {shape}: only flattening to (batch, -1) is supported")
        return nn.Flatten()

    def op_Gemm(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if attrs.get("transA", 0):
            raise self.g.fail("Gemm with transA=1 is not supported")
        weight = self.const(node.input[1], "Gemm's B")
        weight = weight if attrs.get("transB", 0) else weight.T
        weight = weight * attrs.get("alpha", 1.0)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=len(node.input) > 2 and node.input[2] != "")
        with torch.no_grad():
            linear.weight.copy_(_tensor(weight))
            if linear.bias is not None:
                bias = self.const(node.input[2], "Gemm's C") * attrs.get("beta", 1.0)
                linear.bias.copy_(_tensor(np.broadcast_to(bias, (weight.shape[0],))))
        return linear

    def op_MatMul(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        weight = self.const(node.input[1], "MatMul's second input")
        if weight.ndim != 2:
            raise self.g.fail(f"MatMul with a {weight.ndim}-d weight")
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        with torch.no_grad():
            linear.weight.copy_(_tensor(weight.T))
        return linear

    def _affine(self, node: Any, value: str, scale: np.ndarray, shift: np.ndarray) -> nn.Module:
        """x * scale + shift with per-channel (4-D) or per-feature (2-D) constants."""
        rank = self.g.ranks.get(value)
        size = max(scale.size, shift.size)
        if rank == 4 and scale.squeeze().ndim <= 1 and shift.squeeze().ndim <= 1:
            channels = size
            scale_c = np.broadcast_to(scale.reshape(-1), (channels,))
            shift_c = np.broadcast_to(shift.reshape(-1), (channels,))
            if np.any(scale_c <= 0):
                raise self.g.fail(f"{node.op_type} by a non-positive constant is not supported")
            return Normalize((-shift_c / scale_c).tolist(), (1.0 / scale_c).tolist())
        if rank == 2 and scale.squeeze().ndim <= 1 and shift.squeeze().ndim <= 1:
            width = self.g.ranks.get(value + "#width")
            if width is None:
                raise self.g.fail(f"cannot infer the width of the input of {node.op_type}")
            linear = nn.Linear(width, width)
            with torch.no_grad():
                linear.weight.copy_(torch.diag(_tensor(np.broadcast_to(scale.reshape(-1), (width,)))))
                linear.bias.copy_(_tensor(np.broadcast_to(shift.reshape(-1), (width,))))
            return linear
        raise self.g.fail(f"{node.op_type} by a constant of shape {scale.shape if scale.size > 1 else shift.shape} "
                          f"on a rank-{rank} value is not a per-channel or per-feature affine map")

    def _binary_const(self, node: Any, value: str) -> np.ndarray:
        other = node.input[1] if node.input[0] == value else node.input[0]
        return self.const(other, f"the other input of {node.op_type}").astype(np.float64)

    def op_Add(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        c = self._binary_const(node, value)
        return self._affine(node, value, np.ones(1), c)

    def op_Sub(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        c = self._binary_const(node, value)
        if node.input[0] != value:
            return self._affine(node, value, -np.ones(1), c)
        return self._affine(node, value, np.ones(1), -c)

    def op_Mul(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        return self._affine(node, value, self._binary_const(node, value), np.zeros(1))

    def op_Div(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if node.input[0] != value:
            raise self.g.fail("Div of a constant by a computed value is not affine")
        return self._affine(node, value, 1.0 / self._binary_const(node, value), np.zeros(1))

    def _pads(self, attrs: dict[str, Any], what: str) -> tuple[int, int]:
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            raise self.g.fail(f"{what} with auto_pad={attrs['auto_pad']!r} is not supported")
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
            raise self.g.fail(f"{what} with asymmetric padding {pads} is not supported")
        return int(pads[0]), int(pads[1])

    def op_Conv(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        weight = self.const(node.input[1], "Conv's weight")
        if weight.ndim != 4:
            raise self.g.fail(f"Conv with a {weight.ndim}-d weight (only 2-D convolutions are supported)")
        groups = int(attrs.get("group", 1))
        conv = nn.Conv2d(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=tuple(attrs.get("strides", [1, 1])), padding=self._pads(attrs, "Conv"),
            dilation=tuple(attrs.get("dilations", [1, 1])), groups=groups,
            bias=len(node.input) > 2 and node.input[2] != "",
        )
        with torch.no_grad():
            conv.weight.copy_(_tensor(weight))
            if conv.bias is not None:
                conv.bias.copy_(_tensor(self.const(node.input[2], "Conv's bias")))
        return conv

    def op_BatchNormalization(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        if attrs.get("training_mode", 0):
            raise self.g.fail("BatchNormalization in training mode")
        scale, bias, mean, var = (self.const(n, "BatchNormalization's parameters") for n in node.input[1:5])
        layer = nn.BatchNorm2d(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)))
        layer.load_state_dict(
            {"weight": _tensor(scale), "bias": _tensor(bias), "running_mean": _tensor(mean),
             "running_var": _tensor(var), "num_batches_tracked": torch.tensor(0)}
        )
        return layer

    def op_AveragePool(self, node: Any, value: str, attrs: dict[str, Any]) -> nn.Module:
        kernel = tuple(attrs["kernel_shape"])
        return nn.AvgPool2d(
            kernel, stride=tuple(attrs.get("strides", kernel)), padding=self._pads(attrs, "AveragePool"),
            ceil_mode=bool(attrs.get("ceil_mode", 0)), count_include_pad=bool(attrs.get("count_include_pad", 0)),
        )


def _shape_info(model: Any) -> tuple[dict[str, int], dict[str, list[Any]]]:
    """Rank of every value whose shape ONNX can infer (plus ``name#width`` for the width of rank-2 values),
    and its dimensions, with the first (batch) dimension symbolic when it is not a fixed number."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is only a hint; conversion errors name the real problem
        inferred = model
    ranks: dict[str, int] = {}
    dims: dict[str, list[Any]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if not info.type.tensor_type.HasField("shape"):
            continue
        shape = info.type.tensor_type.shape.dim
        ranks[info.name] = len(shape)
        dims[info.name] = [
            int(d.dim_value) if d.HasField("dim_value") else (BATCH if i == 0 else None) for i, d in enumerate(shape)
        ]
        if len(shape) == 2 and shape[1].HasField("dim_value"):
            ranks[info.name + "#width"] = int(shape[1].dim_value)
    return ranks, dims


def _evaluate_shapes(
    nodes: list[Any], constants: dict[str, np.ndarray], dims: dict[str, list[Any]]
) -> tuple[dict[str, list[Any]], set[int]]:
    """Evaluate shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat ...) with a symbolic batch size.

    Returns the evaluated values (as lists; scalars as one-element lists) and the ids of the nodes consumed.
    """
    shapes: dict[str, list[Any]] = {}
    done: set[int] = set()

    def known(name: str) -> list[Any] | None:
        if name in shapes:
            return shapes[name]
        if name in constants:
            return [int(v) for v in np.atleast_1d(constants[name]).reshape(-1)]
        return None

    for node in nodes:
        if node.op_type not in SHAPE_OPS:
            continue
        attrs = _attributes(node)
        out = node.output[0]
        if node.op_type == "Shape":
            if node.input[0] not in dims:
                continue
            shapes[out] = list(dims[node.input[0]])
        else:
            inputs = [known(n) for n in node.input if n]
            if inputs[0] is None or (node.op_type == "Concat" and any(i is None for i in inputs)):
                continue
            data = inputs[0]
            if node.op_type == "Gather":
                indices = constants.get(node.input[1])
                if indices is None or attrs.get("axis", 0) != 0:
                    continue
                shapes[out] = [data[int(i)] for i in np.atleast_1d(indices).reshape(-1)]
            elif node.op_type in ("Unsqueeze", "Squeeze", "Cast"):
                shapes[out] = list(data)
            else:
                shapes[out] = [v for i in inputs if i is not None for v in i]
        done.add(id(node))
    return shapes, done


def load_onnx(path: str | Path) -> nn.Module:
    """Read the ONNX file at ``path`` into an ``nn.Sequential`` of verifiable layers (eval mode)."""
    path = Path(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ModelLoadError(
            f"reading the ONNX file {path} needs the onnx package: pip install 'robustkit[onnx]'"
        ) from exc
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many types for damaged files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot read ONNX file {path}: corrupt or not a valid ONNX model ({first_line})"
        ) from None
    try:
        return _convert(model, path, numpy_helper)
    except RobustkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed graph the checker let through must not crash the caller
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot convert ONNX file {path}: malformed graph ({type(exc).__name__}: "
                             f"{first_line})") from None


def _convert(model: Any, path: Path, numpy_helper: Any) -> nn.Module:
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    supported = supported_ops()
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in supported})
    if unsupported:
        raise ModelLoadError(
            f"ONNX file {path} uses unsupported operator(s): {', '.join(unsupported)}. "
            f"Supported: {', '.join(supported)}"
        )
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(_attributes(node)["value"])
        else:
            nodes.append(node)
    ranks, dims = _shape_info(model)
    shapes, shape_nodes = _evaluate_shapes(nodes, constants, dims)
    left = sorted({n.op_type for n in nodes if n.op_type in SHAPE_OPS and id(n) not in shape_nodes})
    if left:
        raise ModelLoadError(f"ONNX file {path}: {', '.join(left)} only supported as shape arithmetic on "
                             "the batch size (as in x.view(x.size(0), -1))")
    nodes = [n for n in nodes if id(n) not in shape_nodes]
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in nodes:
        for name in dict.fromkeys(node.input):
            if name and name not in constants:
                consumers[name].append(node)
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelLoadError(f"ONNX file {path} must have one data input and one output, "
                             f"found {len(inputs)} and {len(graph.output)}")
    g = _Graph(nodes, constants, ranks, consumers, graph.output[0].name, path, shapes)
    modules, _, join = _Converter(g).walk(inputs[0])
    if join is not None:
        raise g.fail("the graph joins a branch that never forked")
    if ranks.get(inputs[0]) == 2:
        modules.insert(0, nn.Flatten())
    return nn.Sequential(*modules).eval()
