"""From a ``torch.nn`` model to the bound engine's graph of bound operators.

The graph is a list of nodes in topological order; each node applies one bound operator (see
:mod:`robustkit.verifiers.ops`) to the outputs of earlier nodes (index -1 is the network input) and the last
node is the output. ``nn.Sequential`` containers are flattened and :class:`~robustkit.nn.Residual` blocks become
their two branches joined by an addition node. Every layer that cannot be analysed is collected, and one
:class:`~robustkit.errors.UnsupportedLayerError` lists them all; an imported model the importers could not
lower (:class:`~robustkit.nn.Opaque`) is refused with the importer's own message.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from robustkit.errors import UnreadableModelError, UnsupportedLayerError
from robustkit.nn import Opaque, Residual
from robustkit.verifiers import ops
from robustkit.verifiers.ops.registry import PASS_THROUGH, keeps_forward, lookup, supported_names

INPUT = -1


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


def node_shapes(graph: Graph, input_shape: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Output shape (without batch) of every node, and of the input (-1), for inputs of ``input_shape``."""
    known = _shapes.setdefault(graph, {})
    if input_shape not in known:
        shapes: dict[int, tuple[int, ...]] = {INPUT: input_shape}
        for index, node in enumerate(graph.nodes):
            shapes[index] = node.op.out_shape(*(shapes[source] for source in node.inputs))
        known[input_shape] = shapes
    return known[input_shape]


_shapes: weakref.WeakKeyDictionary[Graph, dict[tuple[int, ...], dict[int, tuple[int, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def graph_forward(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """Evaluate the graph on concrete inputs (used to check that it reproduces the model)."""
    values: dict[int, torch.Tensor] = {INPUT: x}
    for index, node in enumerate(graph.nodes):
        values[index] = node.op.forward(*(values[source] for source in node.inputs))
    return values[len(graph.nodes) - 1]


def check_reproduces(graph: Graph, model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`UnsupportedLayerError` when the graph's outputs differ from the model's on ``x``.

    This catches models whose ``forward`` does something the module structure does not show.
    """
    key = tuple(x.shape[1:])
    if key in _checked.setdefault(graph, set()):
        return
    with torch.no_grad():
        expected = model(x)
        got = graph_forward(graph, x)
    scale = 1 + float(expected.abs().max())
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale):
        difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
        raise UnsupportedLayerError(
            [f"model (robustkit's reading of its layers does not reproduce its outputs: largest difference "
             f"{difference:.3g}; its forward may use operations that are not visible as layers)"],
            supported_names(),
        )
    _checked[graph].add(key)


_checked: weakref.WeakKeyDictionary[Graph, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()


def display_path(path: str) -> str:
    """A module's path as ``model.get_submodule`` takes it, rooted at ``model``: ``model.lstm``, ``model.2``."""
    return f"model.{path}" if path else "model"


def layer_name(module: nn.Module) -> str:
    """A module's type as written in user code: ``nn.LSTM`` for torch's layers, the class name otherwise."""
    kind = type(module).__name__
    return f"nn.{kind}" if type(module).__module__.startswith("torch.nn.") else kind


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.unsupported: list[str] = []
        self.opaque: list[str] = []  # the reasons of imported models the engine cannot read (see Opaque)

    def add(self, op: ops.BoundOp, inputs: tuple[int, ...]) -> int:
        self.nodes.append(Node(op, inputs))
        return len(self.nodes) - 1

    def emit(self, module: nn.Module, source: int, path: str) -> int:
        kind = layer_name(module)
        where = display_path(path)
        if isinstance(module, Opaque):
            self.opaque.append(module.reason)
            return source
        if keeps_forward(module, nn.Sequential):
            for name, child in module.named_children():
                source = self.emit(child, source, f"{path}.{name}" if path else name)
            return source
        if keeps_forward(module, Residual):
            assert isinstance(module, Residual)
            main = self.emit(module.main, source, f"{path}.main")
            skip = source if module.skip is None else self.emit(module.skip, source, f"{path}.skip")
            return self.add(ops.AddOp(), (main, skip))
        for base in PASS_THROUGH:
            if keeps_forward(module, base):
                if module.training and base is nn.Dropout:
                    self.unsupported.append(f"{kind} at {where} (in training mode: call model.eval())")
                return source
        entry = lookup(module)
        if entry is not None:
            problem = entry.check(module) if entry.check is not None else None
            if problem:
                self.unsupported.append(f"{kind} at {where} ({problem})")
                return source
            return self.add(entry.build(module), (source,))
        if type(module).__module__.startswith("torch.nn."):
            self.unsupported.append(f"{kind} at {where}")
            return source
        if isinstance(module, torch.jit.ScriptModule):
            self.unsupported.append(f"TorchScript module {module.original_name} at {where} (with its own code: save it "
                                    "with torch.jit.save and read it with robustkit.models.load_model, which "
                                    "lowers its operators)")
            return source
        from robustkit.verifiers.fx_import import emit_traced

        return emit_traced(self, module, source, path)


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
        raise UnsupportedLayerError(builder.opaque + builder.unsupported, supported_names())
    if builder.opaque:
        raise UnreadableModelError(builder.opaque)
    if output == INPUT:
        builder.add(ops.IdentityOp(), (INPUT,))
    graph = Graph(tuple(builder.nodes))
    _cache[model] = (fingerprint, graph)
    return graph
