"""Lower a TorchScript module of any structure (a traced or scripted custom ``nn.Module``) from its operator graph.

The module's inlined graph (``module.inlined_graph``: every submodule call inlined) is interpreted once for a
known input shape. Tensor operators go to :class:`~robustkit.models.lowering.Lowering`, which turns them into
standard layers; everything else is evaluated on the spot: constants, attributes (weights are the script's own
parameters and buffers, read with ``getattr``), lists and tuples, integer, boolean and string arithmetic,
``x.size(1)`` and ``x.dim()`` from the known shapes, and control flow (``prim::If``, ``prim::Loop``) whose
conditions those decide, as in the input checks of standard layers. Sizes equal to the batch size stay symbolic
(:data:`~robustkit.models.lowering.BATCH`), so ``x.view(x.size(0), -1)`` reads as flattening.

Nothing of the file runs while it is read: the script itself runs only afterwards, in
:func:`~robustkit.models.reproduce.check_lowering`, once every operator on its path was found to be one that
robustkit lowers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.models.lowering import BATCH, UNREADABLE, Lowering, Refusal, Value, foldable, lowered_operators
from robustkit.models.reproduce import check_lowering
from robustkit.nn import Opaque

__all__ = ["lower_script"]

MAX_LOOP = 10_000  # iterations of one prim::Loop; more is not a shape computation


def _format(template: str, *values: Any) -> str:
    return template.format(*values)


# operators on numbers, booleans, strings, lists and None, evaluated at load time
_SCALAR: dict[str, Callable[..., Any]] = {
    "aten::eq": operator.eq, "aten::ne": operator.ne, "aten::lt": operator.lt, "aten::le": operator.le,
    "aten::gt": operator.gt, "aten::ge": operator.ge, "aten::__not__": operator.not_,
    "aten::__and__": operator.and_, "aten::__or__": operator.or_, "aten::__xor__": operator.xor,
    "aten::add": operator.add, "aten::sub": operator.sub, "aten::mul": operator.mul,
    "aten::floordiv": operator.floordiv, "aten::div": operator.truediv, "aten::neg": operator.neg,
    "aten::remainder": operator.mod, "aten::len": len, "aten::__getitem__": operator.getitem,
    "aten::Int": int, "aten::Float": float, "aten::Bool": bool, "aten::str": str, "aten::format": _format,
    "aten::__contains__": lambda container, item: item in container, "aten::list": list,
    "prim::min": min, "prim::max": max, "aten::abs": abs,
}
# scalar operators that may see the batch size without computing with it
_BATCH_SAFE = frozenset({"aten::__getitem__", "aten::len", "aten::list", "aten::Int", "aten::str", "aten::format"})


class _Stop(Exception):
    """The interpretation cannot go on (the model raises, or returns something that is not one tensor)."""


def _contains_tensor(values: Sequence[Any]) -> bool:
    for value in values:
        if isinstance(value, Tensor | Value) or (isinstance(value, list | tuple) and _contains_tensor(value)):
            return True
    return False


def _contains_unreadable(values: Sequence[Any]) -> bool:
    return any(v is UNREADABLE or (isinstance(v, list | tuple) and _contains_unreadable(v)) for v in values)


def _contains_batch(values: Sequence[Any]) -> bool:
    return any(v is BATCH or (isinstance(v, list | tuple) and _contains_batch(v)) for v in values)


class _Interpreter:
    def __init__(self, module: torch.jit.ScriptModule, lowering: Lowering) -> None:
        self.module = module
        self.lw = lowering
        self.env: dict[int, Any] = {}
        self.paths: dict[int, str] = {}  # IR value -> the attribute path it was read from (conv1.weight)

    def get(self, value: Any) -> Any:
        return self.env[value.unique()]

    def set(self, value: Any, result: Any, path: str = "") -> None:
        self.env[value.unique()] = result
        if path:
            self.paths[value.unique()] = path

    def block(self, block: Any, inputs: Sequence[Any]) -> list[Any]:
        for param, value in zip(block.inputs(), inputs, strict=True):
            self.set(param, value)
        for node in block.nodes():
            self.node(node)
        return [self.get(v) for v in block.returnNode().inputs()]

    def node(self, node: Any) -> None:
        kind: str = node.kind()
        inputs = list(node.inputs())
        outputs = list(node.outputs())
        values = [self.get(v) for v in inputs]
        handler = getattr(self, "prim_" + kind.removeprefix("prim::"), None) if kind.startswith("prim::") else None
        results: list[Any]
        if (kind.startswith("prim::") or kind in _SCALAR) and _contains_unreadable(values) and kind != "prim::GetAttr":
            results = [UNREADABLE] * len(outputs)  # follows from an operator reported already
        elif handler is not None:
            results = handler(node, values)
        elif kind == "aten::tensor" and values and not _contains_tensor(values[:1]) and not _contains_batch(values):
            results = [torch.tensor(values[0], dtype=values[1] if isinstance(values[1], torch.dtype) else None)]
        elif kind in ("aten::__is__", "aten::__isnot__"):
            results = [(values[0] is values[1]) == (kind == "aten::__is__")]
        elif kind == "aten::warn":
            results = []
        elif kind in _SCALAR and not _contains_tensor(values):
            results = [self.scalar(kind, values)]
        elif kind.startswith("aten::"):
            results = [self.tensor_op(node, inputs, values)]
        else:
            self.lw.refuse(kind)
            results = [UNREADABLE] * len(outputs)
        for value, result in zip(outputs, results, strict=False):
            self.set(value, result)

    def scalar(self, kind: str, values: list[Any]) -> Any:
        if kind not in _BATCH_SAFE and _contains_batch(values):
            self.lw.refuse(kind, "computes with the batch size")
            return UNREADABLE
        if kind == "aten::Int" and values and values[0] is BATCH:
            return BATCH
        try:
            return _SCALAR[kind](*values)
        except Exception as exc:  # noqa: BLE001 - the script's own arithmetic fails (as it would when run)
            self.lw.refuse(kind, f"fails: {type(exc).__name__}")
            return UNREADABLE

    def tensor_op(self, node: Any, inputs: list[Any], values: list[Any]) -> Any:
        kind: str = node.kind()
        schema_text = node.schema()
        if schema_text == "(no schema)":
            self.lw.refuse(kind)
            return UNREADABLE
        schema = torch._C.parse_schema(schema_text)
        names = [a.name for a in schema.arguments]
        args = dict(zip(names, values, strict=False))
        hint = next((self.paths[v.unique()].rsplit(".", 1)[0] for v in inputs if v.unique() in self.paths
                     and "." in self.paths[v.unique()]), "")

        def fold() -> Any:
            name = schema.name.removeprefix("aten::")
            packet = getattr(torch.ops.aten, name)
            overload = getattr(packet, schema.overload_name or "default")
            positional = [args[a.name] for a in schema.arguments if not a.kwarg_only and a.name in args]
            keywords = {a.name: args[a.name] for a in schema.arguments if a.kwarg_only and a.name in args}
            return overload(*positional, **keywords)

        result = self.lw.call(kind, args, fold if foldable(kind) else None, hint=hint)
        base = kind.removeprefix("aten::")
        if base.endswith("_") and not base.endswith("__") and isinstance(result, Value) and inputs:
            self.set(inputs[0], result)  # an in-place operator: later reads of its input see the result
        return result

    # -- prim:: nodes

    def prim_Constant(self, node: Any, values: list[Any]) -> list[Any]:
        if not node.hasAttribute("value"):
            return [None]
        output = node.output()
        if output.type().kind() == "FunctionType":
            return [None]  # a function constant: its calls are inlined already
        return [output.toIValue()]

    def prim_GetAttr(self, node: Any, values: list[Any]) -> list[Any]:
        owner = values[0]
        name = node.s("name")
        if not isinstance(owner, torch.jit.ScriptModule):
            self.lw.refuse("prim::GetAttr", "of something that is not a module")
            return [UNREADABLE]
        attribute = getattr(owner, name)
        if isinstance(attribute, Tensor):
            attribute = attribute.detach()
        parent = self.paths.get(node.input().unique(), "")
        self.set(node.output(), attribute, f"{parent}.{name}" if parent else name)
        return [attribute]

    def prim_ListConstruct(self, node: Any, values: list[Any]) -> list[Any]:
        return [list(values)]

    def prim_TupleConstruct(self, node: Any, values: list[Any]) -> list[Any]:
        return [tuple(values)]

    def prim_ListUnpack(self, node: Any, values: list[Any]) -> list[Any]:
        if not isinstance(values[0], list | tuple):
            return [UNREADABLE] * len(list(node.outputs()))
        return list(values[0])

    prim_TupleUnpack = prim_ListUnpack

    def prim_TupleIndex(self, node: Any, values: list[Any]) -> list[Any]:
        return [values[0][values[1]]]

    def prim_NumToTensor(self, node: Any, values: list[Any]) -> list[Any]:
        return [values[0]]

    def prim_unchecked_cast(self, node: Any, values: list[Any]) -> list[Any]:
        return [values[0]]

    def prim_Uninitialized(self, node: Any, values: list[Any]) -> list[Any]:
        return [None]

    def prim_dtype(self, node: Any, values: list[Any]) -> list[Any]:
        value = values[0]
        return [value.example.dtype if isinstance(value, Value) else getattr(value, "dtype", UNREADABLE)]

    def prim_device(self, node: Any, values: list[Any]) -> list[Any]:
        return [torch.device("cpu")]

    def prim_is_cuda(self, node: Any, values: list[Any]) -> list[Any]:
        return [False]

    def prim_min(self, node: Any, values: list[Any]) -> list[Any]:
        return [self.scalar("prim::min", values)]

    def prim_max(self, node: Any, values: list[Any]) -> list[Any]:
        return [self.scalar("prim::max", values)]

    def prim_RaiseException(self, node: Any, values: list[Any]) -> list[Any]:
        message = values[0] if values and isinstance(values[0], str) else "an exception"
        raise _Stop(f"the model raises on these inputs: {message}")

    def prim_If(self, node: Any, values: list[Any]) -> list[Any]:
        condition = values[0]
        count = len(list(node.outputs()))
        if not isinstance(condition, bool):
            self.lw.refuse("prim::If", "on a condition that depends on tensor values or the batch size")
            return [UNREADABLE] * count
        blocks = list(node.blocks())
        return self.block(blocks[0] if condition else blocks[1], [])

    def prim_Loop(self, node: Any, values: list[Any]) -> list[Any]:
        trips, condition, carried = values[0], values[1], list(values[2:])
        if not isinstance(trips, int) or not isinstance(condition, bool) or trips > MAX_LOOP:
            self.lw.refuse("prim::Loop", "whose length depends on tensor values or the batch size")
            return [UNREADABLE] * len(carried)
        body = next(iter(node.blocks()))
        step = 0
        while condition and step < trips:
            results = self.block(body, [step, *carried])
            condition, carried = results[0], results[1:]
            if not isinstance(condition, bool):
                self.lw.refuse("prim::Loop", "whose length depends on tensor values or the batch size")
                return [UNREADABLE] * len(carried)
            step += 1
        return carried


def lower_script(module: torch.jit.ScriptModule, path: Path, input_shape: Sequence[int] | None) -> nn.Module:
    """The lowered model of the TorchScript ``module`` read from ``path``, or the module wrapped in
    :class:`~robustkit.nn.Opaque` with the reason when it cannot be lowered (it still runs, for the attacks).

    ``input_shape`` (C, H, W) is needed because TorchScript files do not record it; without it the module is
    returned opaque, saying so. A lowering that does not reproduce the script raises
    :class:`~robustkit.errors.ModelLoadError`.
    """
    module.eval()
    if input_shape is None:
        return Opaque(module, f"TorchScript file {path} does not record its input shape: give it (load_model's "
                              "input_shape; the commands pass the dataset's) so robustkit can read its operators")
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    lowering = Lowering(str(path), example)
    graph = module.inlined_graph
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return Opaque(module, f"TorchScript file {path}: the model takes {len(inputs) - 1} inputs (robustkit reads "
                              "models of one input tensor)")
    interpreter = _Interpreter(module, lowering)
    interpreter.set(inputs[0], module)
    interpreter.set(inputs[1], lowering.input)
    try:
        for node in graph.nodes():
            interpreter.node(node)
        outputs = [interpreter.get(v) for v in graph.outputs()]
    except _Stop as stop:
        return Opaque(module, f"TorchScript file {path}: {stop}")
    except Exception as exc:  # noqa: BLE001 - an IR construct the reader does not expect: keep the runnable script
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Opaque(module, f"TorchScript file {path}: robustkit cannot read its graph ({type(exc).__name__}: "
                              f"{detail})")
    problems = lowering.problems()
    if problems:
        return Opaque(module, f"unsupported operators in {path}: {', '.join(problems)}. robustkit reads "
                              f"{', '.join(lowered_operators())}")
    try:
        lowered = lowering.finish(outputs[0] if len(outputs) == 1 else None, "LoweredTorchScript")
    except Refusal as refusal:
        return Opaque(module, f"TorchScript file {path}: {refusal}")
    check_lowering(lowered, module, tuple(input_shape), f"TorchScript file {path}")
    return lowered
