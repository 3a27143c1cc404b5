"""From a ``torch.nn`` model to the bound engine's graph of bound operators.

The graph is a list of nodes in topological order; each node applies one bound operator (see
:mod:`robustkit.verifiers.ops`) to the outputs of earlier nodes (index -1 is the network input) and the last
node is the output. ``nn.Sequential`` containers are flattened and :class:`~robustkit.nn.Residual` blocks become
their two branches joined by an addition node. Every layer that cannot be analysed is collected, and one
:class:`~robustkit.errors.UnsupportedLayerError` lists them all.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from robustkit.errors import UnsupportedLayerError
from robustkit.nn import Normalize, Residual
from robustkit.verifiers import ops

INPUT = -1

# module type -> factory of its bound operator; subclasses count only if they keep the parent's forward
OPERATORS: dict[type[nn.Module], Callable[[nn.Module], ops.BoundOp]] = {
    nn.Linear: ops.LinearOp,
    nn.Conv2d: ops.Conv2dOp,
    nn.ReLU: lambda m: ops.ReLUOp(),
    nn.Flatten: ops.FlattenOp,
    Normalize: ops.NormalizeOp,
    nn.BatchNorm2d: ops.BatchNorm2dOp,
    nn.AvgPool2d: ops.PoolOp,
    nn.AdaptiveAvgPool2d: ops.PoolOp,
}
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)
SUPPORTED_NAMES = sorted(
    [t.__name__ for t in OPERATORS] + [t.__name__ for t in PASS_THROUGH] + ["Sequential", "Residual"]
)


@dataclass(frozen=True)
class Node:
    """One bound operator applied to the outputs of ``inputs`` (node indices; -1 is the network input)."""

    op: ops.BoundOp
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class Graph:
    """The model as bound operators in topological order; the last node is the output."""

    nodes: tuple[Node, ...]

    def consumers(self) -> dict[int, list[int]]:
        """For every node (and -1, the input), the nodes that read its output."""
        users: dict[int, list[int]] = {INPUT: []}
        for index, node in enumerate(self.nodes):
            users.setdefault(index, [])
            for source in node.inputs:
                users[source].append(index)
        return users


def _keeps_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.unsupported: list[str] = []

    def add(self, op: ops.BoundOp, inputs: tuple[int, ...]) -> int:
        self.nodes.append(Node(op, inputs))
        return len(self.nodes) - 1

    def emit(self, module: nn.Module, source: int, path: str) -> int:
        kind = type(module).__name__
        if _keeps_forward(module, nn.Sequential):
            for name, child in module.named_children():
                source = self.emit(child, source, f"{path}.{name}" if path else name)
            return source
        if _keeps_forward(module, Residual):
            assert isinstance(module, Residual)
            main = self.emit(module.main, source, f"{path}.main")
            skip = source if module.skip is None else self.emit(module.skip, source, f"{path}.skip")
            return self.add(ops.AddOp(), (main, skip))
        for base in PASS_THROUGH:
            if _keeps_forward(module, base):
                if module.training and base is nn.Dropout:
                    self.unsupported.append(f"{path or 'model'} (Dropout in training mode: call model.eval())")
                return source
        for base, factory in OPERATORS.items():
            if _keeps_forward(module, base):
                if isinstance(module, nn.BatchNorm2d) and module.training:
                    self.unsupported.append(f"{path or 'model'} (BatchNorm2d in training mode: call model.eval())")
                    return source
                problem = ops.check_module(module)
                if problem:
                    self.unsupported.append(f"{path or 'model'} ({kind}: {problem})")
                    return source
                return self.add(factory(module), (source,))
        if isinstance(module, nn.Sequential | Residual | nn.Linear | nn.Conv2d | nn.ReLU):
            kind = f"{kind}, a subclass of {type(module).__mro__[1].__name__} with its own forward"
        self.unsupported.append(f"{path or 'model'} ({kind})")
        return source


_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, bool], ...], Graph]] = (
    weakref.WeakKeyDictionary()
)


def build_graph(model: nn.Module) -> Graph:
    """The bound-operator graph of ``model``; raises :class:`UnsupportedLayerError` listing every bad layer.

    Graphs are cached per model and rebuilt when its modules or their train/eval modes change.
    """
    fingerprint = tuple((id(m), m.training) for m in model.modules())
    cached = _cache.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    builder = _Builder()
    output = builder.emit(model, INPUT, "")
    if builder.unsupported:
        raise UnsupportedLayerError(builder.unsupported, SUPPORTED_NAMES)
    if output == INPUT:
        builder.add(ops.IdentityOp(), (INPUT,))
    graph = Graph(tuple(builder.nodes))
    _cache[model] = (fingerprint, graph)
    return graph
