"""Read a module with its own ``forward`` (a user's network class) into bound operators with ``torch.fx``.

The module is traced symbolically; robustkit's own layers and every standard layer stay leaves, so each
``call_module`` goes through the same builder as ``nn.Sequential`` children. Functions understood: those the
operator registry lists for its layers (:mod:`robustkit.verifiers.ops.registry`: ``F.relu``, ``torch.relu``,
``x.relu()``, ``F.leaky_relu``, ...), flattening (``torch.flatten(x, 1)``, ``x.flatten(1)``,
``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``), the sum of two tensors (a skip connection) and
adding, subtracting, multiplying or dividing by a number. Anything else is reported as unsupported.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from robustkit.verifiers import ops
from robustkit.verifiers.graph import display_path
from robustkit.verifiers.ops.registry import OPERATORS, PASS_THROUGH, FunctionRule, function_rule, method_rule

if TYPE_CHECKING:
    from robustkit.verifiers.graph import _Builder

_ADD = (operator.add, torch.add, operator.iadd)
_BATCH = "batch"  # marker for values equal to the batch size (x.size(0), x.shape[0])
_SHAPE = "shape"  # marker for x.shape / x.size()


class _LeafTracer(fx.Tracer):
    """Keeps every module the builder knows (and robustkit's own layers) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(OPERATORS) + PASS_THROUGH) or type(m).__module__ == "robustkit.nn":
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten_target(args: tuple[Any, ...], values: dict[str, Any]) -> bool:
    """Whether view/reshape arguments (after the tensor) mean "keep the batch, flatten the rest"."""
    shape = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
    if len(shape) != 2:
        return False
    first = values.get(shape[0].name) if isinstance(shape[0], fx.Node) else shape[0]
    return first in (_BATCH, -1) and shape[1] == -1


def emit_traced(builder: _Builder, module: nn.Module, source: int, path: str) -> int:
    """Emit the nodes of ``module``'s traced forward; unsupported operations are recorded in the builder."""
    where = display_path(path)
    owner = f"{type(module).__name__}.forward"
    try:
        graph = _LeafTracer().trace(module)
    except Exception as exc:  # noqa: BLE001 - tracing runs user code; any failure means "cannot analyse"
        builder.unsupported.append(f"{owner} at {where} (its forward cannot be traced: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return source
    values: dict[str, Any] = {}  # fx node name -> graph node index, or a shape marker
    result = source
    for node in graph.nodes:
        args = node.args
        tensor_args = [a for a in args if isinstance(a, fx.Node) and isinstance(values.get(a.name), int)]
        first = values.get(args[0].name) if args and isinstance(args[0], fx.Node) else None
        name = f"{_called(node)} in {owner} at {where}"
        if any(isinstance(a, fx.Node) and a.name in values and values[a.name] is None for a in node.args):
            values[node.name] = None  # depends on an operation already reported as unsupported
            continue
        if node.op == "placeholder":
            if values:
                builder.unsupported.append(f"{owner} at {where} (it takes several inputs)")
            values[node.name] = source
        elif node.op == "output":
            output = args[0]
            if not isinstance(output, fx.Node) or not isinstance(values.get(output.name), int | None):
                builder.unsupported.append(f"{owner} at {where} (it must return one tensor)")
            elif values[output.name] is not None:
                result = values[output.name]
        elif node.op == "call_module" and isinstance(first, int):
            submodule = module.get_submodule(str(node.target))
            before = len(builder.unsupported)
            emitted = builder.emit(submodule, first, f"{path}.{node.target}" if path else str(node.target))
            # an unsupported layer is reported once; what only consumes its output is not reported again
            values[node.name] = emitted if len(builder.unsupported) == before else None
        elif node.op == "call_method" and node.target == "size" and len(args) == 2 and args[1] == 0:
            values[node.name] = _BATCH
        elif (node.op == "call_function" and node.target is getattr and args[1:] == ("shape",)) or (
            node.op == "call_method" and node.target == "size" and len(args) == 1
        ):
            values[node.name] = _SHAPE
        elif node.op == "call_function" and node.target is operator.getitem and first == _SHAPE and args[1] == 0:
            values[node.name] = _BATCH
        elif isinstance(first, int) and (rule := _rule(node)) is not None:
            made = rule(tuple(args[1:]), dict(node.kwargs))
            if isinstance(made, str):
                builder.unsupported.append(f"{name} ({made})")
                values[node.name] = None
            else:
                values[node.name] = builder.add(made, (first,))
        elif isinstance(first, int) and (
            (node.op == "call_function" and node.target is torch.flatten and args[1:] in ((1,), (1, -1)))
            or (node.op == "call_method" and node.target == "flatten" and args[1:] in ((1,), (1, -1)))
            or (node.op == "call_method" and node.target in ("view", "reshape") and _flatten_target(args[1:], values))
        ):  # before the scalar rule: torch.flatten(x, 1) is a call with a tensor and a number too
            values[node.name] = builder.add(ops.FlattenOp(), (first,))
        elif node.op == "call_function" and len(args) == 2 and not node.kwargs and len(tensor_args) == 1 and (
            _is_number(args[0]) or _is_number(args[1])
        ):
            values[node.name] = _scalar(builder, node, values, name)
        elif not isinstance(first, int):
            builder.unsupported.append(name)
            values[node.name] = None
        elif node.op == "call_function" and node.target in _ADD and len(tensor_args) == 2:
            values[node.name] = builder.add(ops.AddOp(), (values[tensor_args[0].name], values[tensor_args[1].name]))
        else:
            builder.unsupported.append(name)
            values[node.name] = None
    return result


def _rule(node: fx.Node) -> FunctionRule | None:
    """The registry's rule for a traced function or tensor method call, or None."""
    if node.op == "call_function" and callable(node.target):
        try:
            return function_rule(node.target)
        except TypeError:  # an unhashable target is not registered
            return None
    if node.op == "call_method" and isinstance(node.target, str):
        return method_rule(node.target)
    return None


def _called(node: fx.Node) -> str:
    """The operation as written in user code: ``torch.log``, ``F.gelu``, ``Tensor.exp``, ``operator.mul``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", None) or ""
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"F.{name}"
    if module.startswith("torch") or (module == "" and hasattr(torch, name)):
        return f"torch.{name}"
    return f"{module.replace('_operator', 'operator')}.{name}" if module else name


def _scalar(builder: _Builder, node: fx.Node, values: dict[str, Any], name: str) -> int | None:
    """x + c, c + x, x - c, c - x, x * c, c * x, x / c as a scalar affine operator."""
    left, right = node.args[0], node.args[1]
    tensor_first = isinstance(left, fx.Node)
    tensor = left if tensor_first else right
    constant = float(right if tensor_first else left)  # type: ignore[arg-type]
    assert isinstance(tensor, fx.Node)
    target = node.target
    affine: tuple[float, float] | None = None
    if target in (operator.add, torch.add):
        affine = (1.0, constant)
    elif target in (operator.sub, torch.sub):
        affine = (1.0, -constant) if tensor_first else (-1.0, constant)
    elif target in (operator.mul, torch.mul):
        affine = (constant, 0.0)
    elif target in (operator.truediv, torch.div) and tensor_first and constant != 0:
        affine = (1.0 / constant, 0.0)
    if affine is None:
        builder.unsupported.append(f"{name} (with the number {constant})")
        return None
    return builder.add(ops.ScalarAffineOp(*affine), (int(values[tensor.name]),))
