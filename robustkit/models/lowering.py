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

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["BATCH", "UNREADABLE", "Lowering", "Refusal", "Value", "foldable", "lowered_operators", "register_rule"]


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


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: ``function(lowering, args)`` lowers the ATen operators ``names`` (without ``aten::``); it returns
    the result (a :class:`Value`, a constant, a tuple) or raises :class:`Refusal` saying why this use is not
    supported. The built-in rules are in :mod:`robustkit.models.aten_rules`."""

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


# the built-in rules register themselves on import (the module imports the names above, so it comes last)
from robustkit.models import aten_rules  # noqa: E402, F401
