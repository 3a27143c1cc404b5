"""Read a ``torch.export`` program (``.pt2``, written by ``torch.export.save``) into verifiable layers, without
``torch.export.load``.

``torch.export.load`` is not safe for files from others in torch 2.13: it unpickles the saved example inputs
(falling back to ``weights_only=False`` when the safe unpickler refuses them), tensor payloads marked as
pickled (``weights_only=False``), opaque and custom-class constants, loads AOTInductor shared libraries found in
the archive, parses shape expressions with ``sympy.sympify`` (which evaluates Python code) and turns guard
strings into code. So robustkit reads the archive itself, and only its plain parts:

* ``models/<name>.json``, the program's ATen graph in the documented JSON schema (major version 8), as data;
  shape expressions are kept as text and only the batch dimension may be symbolic;
* the weights and constants as raw little-endian tensor bytes described by their JSON configs, their sizes and
  strides checked against the bytes there are.

An archive that needs anything else (pickled tensors, custom objects, AOTInductor code, the pre-2.7 format
with pickled weights) is refused with what it holds; the example inputs are never read. The graph's operators
are lowered by :class:`~robustkit.models.lowering.Lowering`; the reproduction check runs the same graph with
torch's own ATen kernels (``torch.ops.aten.<name>.<overload>``, only for operators robustkit lowers).
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.errors import ModelLoadError, RobustkitError
from robustkit.models.lowering import UNREADABLE, Lowering, Refusal, foldable, lowered_operators
from robustkit.models.reproduce import check_lowering

__all__ = ["is_pt2", "load_pt2"]

SCHEMA_MAJOR = 8
# torch._export.serde.schema.ScalarType, as stored in the JSON
DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
          7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}


def is_pt2(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export`` archive (a zip file with an ``archive_format`` of ``pt2``)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "archive_format" for name in archive.namelist())
    except Exception:  # noqa: BLE001 - a damaged archive (BadZipFile, NotImplementedError, ...) is not a program
        return False


@dataclass(frozen=True)
class _Archive:
    path: Path
    archive: zipfile.ZipFile
    prefix: str

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"torch.export file {self.path}: {message}")

    def read(self, name: str) -> bytes:
        try:
            return self.archive.read(self.prefix + name)
        except KeyError:
            raise self.fail(f"it has no {name}") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.fail(f"{name} is not valid JSON ({exc})") from None


def _int(value: Any, what: str) -> int:
    if isinstance(value, dict) and isinstance(value.get("as_int"), int):
        return int(value["as_int"])
    raise Refusal(f"{what} {value!r} is not a constant integer")


def _tensor(archive: _Archive, folder: str, fqn: str, payload: Mapping[str, Any]) -> Tensor:
    """One weight or constant from its raw bytes; anything pickled is refused."""
    name = payload.get("path_name", "")
    if payload.get("use_pickle"):
        raise archive.fail(f"{fqn} is stored as a pickle (a tensor subclass), which robustkit does not unpickle")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(("custom_obj", "opaque_obj")):
        raise archive.fail(f"{fqn} is a custom object ({name!r}), which robustkit does not unpickle")
    meta = payload.get("tensor_meta") or {}
    dtype = DTYPES.get(int(meta.get("dtype", 0)))
    if dtype is None:
        raise archive.fail(f"{fqn} has an unsupported dtype (code {meta.get('dtype')!r})")
    try:
        sizes = [_int(s, "size") for s in meta.get("sizes", [])]
        strides = [_int(s, "stride") for s in meta.get("strides", [])]
        offset = _int(meta.get("storage_offset", {"as_int": 0}), "storage offset")
    except Refusal as exc:
        raise archive.fail(f"{fqn}: {exc}") from None
    data = archive.read(f"data/{folder}/{name}")
    element = torch.empty((), dtype=dtype).element_size()
    count = len(data) // element
    if len(data) % element or len(sizes) != len(strides) or min([*sizes, *strides, offset], default=0) < 0:
        raise archive.fail(f"{fqn}: its sizes, strides and {len(data)} bytes do not fit together")
    needed = 0 if math.prod(sizes) == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    if needed > count:
        raise archive.fail(f"{fqn} needs {needed} values but its file holds {count}")
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if count else torch.empty(0, dtype=dtype)
    return torch.as_strided(flat, sizes, strides, offset).clone()


def _open(path: Path) -> tuple[_Archive, dict[str, Any], dict[str, Tensor]]:
    """The archive, its program JSON and every weight and constant by name; refuses the unsafe parts."""
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except Exception as exc:  # noqa: BLE001 - damaged zip files fail with many error types
        raise ModelLoadError(f"cannot read torch.export file {path}: corrupt ({type(exc).__name__})") from None
    marker = next((n for n in names if n.rsplit("/", 1)[-1] == "archive_format"), None)
    if marker is None:
        raise ModelLoadError(f"{path} is not a torch.export archive (no archive_format)")
    reader = _Archive(path, archive, marker[: -len("archive_format")])
    if reader.read("archive_format").strip() != b"pt2":
        raise reader.fail("its archive_format is not pt2")
    if reader.read("byteorder").strip().decode(errors="replace") != sys.byteorder:
        raise reader.fail(f"its tensors are not in this machine's byte order ({sys.byteorder})")
    inside = [n[len(reader.prefix):] for n in names if n.startswith(reader.prefix)]
    if any(n.startswith("data/aotinductor/") for n in inside):
        raise reader.fail("it holds AOTInductor-compiled code, which robustkit does not load")
    models = sorted(n[len("models/"):-len(".json")] for n in inside if n.startswith("models/") and n.endswith(".json"))
    if not models:
        raise reader.fail("it holds no program (models/*.json); it may be in the pre-2.7 format, which stores "
                          "pickles: save it again with torch.export.save")
    model = "model" if "model" in models else models[0]
    if len(models) > 1 and "model" not in models:
        raise reader.fail(f"it holds several programs ({', '.join(models)}) and none is called model")
    if f"data/weights/{model}.pt" in inside or f"data/constants/{model}.pt" in inside:
        raise reader.fail("its weights are pickled (an old format): save it again with torch.export.save")
    program = reader.json(f"models/{model}.json")
    version = program.get("schema_version", {}) if isinstance(program, dict) else {}
    if not isinstance(version, dict) or version.get("major") != SCHEMA_MAJOR:
        raise reader.fail(f"it has schema version {version.get('major') if isinstance(version, dict) else '?'}; "
                          f"robustkit reads version {SCHEMA_MAJOR} (torch 2.7 to 2.13)")
    tensors: dict[str, Tensor] = {}
    for folder, config in (("weights", f"data/weights/{model}_weights_config.json"),
                           ("constants", f"data/constants/{model}_constants_config.json")):
        payloads = reader.json(config).get("config", {}) if config in inside else {}
        for fqn, payload in payloads.items():
            tensors[fqn] = _tensor(reader, folder, fqn, payload)
    return reader, program, tensors


def _target(target: Any) -> tuple[str, str]:
    """``torch.ops.aten.conv2d.default`` -> (``aten::conv2d``, ``default``); other targets keep their text."""
    parts = str(target).split(".")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"]:
        return f"aten::{parts[3]}", parts[4]
    return str(target), ""


def _overload(op: str, overload: str) -> Any:
    """The ATen operator overload (only ever looked up for operators robustkit lowers)."""
    packet = getattr(torch.ops.aten, op.removeprefix("aten::"))
    return getattr(packet, overload)


class _Graph:
    """The program's graph as data, evaluated either by lowering or by torch's ATen kernels."""

    def __init__(self, reader: _Archive, program: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        self.reader = reader
        module = program.get("graph_module", {})
        self.graph = module.get("graph", {})
        signature = module.get("signature", {})
        self.constants: dict[str, Tensor] = {}
        users: list[str] = []
        for spec in signature.get("input_specs", []):
            kind, body = next(iter(spec.items()))
            if kind == "user_input":
                argument = body.get("arg", {})
                if "as_tensor" not in argument:
                    raise reader.fail(f"it takes a non-tensor input ({next(iter(argument), '?')})")
                users.append(argument["as_tensor"]["name"])
            elif kind in ("parameter", "buffer", "tensor_constant"):
                target = body.get(f"{kind}_name")
                if target not in tensors:
                    raise reader.fail(f"its {kind} {target!r} is missing from the archive")
                self.constants[body["arg"]["name"]] = tensors[target]
            else:
                raise reader.fail(f"it takes a {kind.replace('_', ' ')} input, which robustkit does not read")
        outputs = signature.get("output_specs", [])
        kinds = [next(iter(spec)) for spec in outputs]
        if len(users) != 1 or kinds != ["user_output"]:
            raise reader.fail(f"the program must take one tensor and return one, with no buffer mutations (it "
                              f"takes {len(users)} inputs and its outputs are {', '.join(kinds) or 'none'}: "
                              "export the model in eval mode)")
        self.input = users[0]
        self.output = outputs[0]["user_output"]["arg"]
        meta = self.graph.get("tensor_values", {}).get(self.input, {})
        if meta.get("dtype") != 7:  # ScalarType.FLOAT
            raise reader.fail("its input is not a float32 tensor")
        sizes = meta.get("sizes", [])
        try:
            self.input_shape = tuple(_int(s, "input size") for s in sizes[1:])
        except Refusal:
            raise reader.fail("only its batch dimension may be dynamic") from None
        first = sizes[0] if sizes else {}
        self.static_batch = int(first["as_int"]) if isinstance(first, dict) and "as_int" in first else None

    def decode(self, argument: Mapping[str, Any], env: Mapping[str, Any]) -> Any:
        kind, body = next(iter(argument.items()))
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return env[body["name"]]
        if kind in ("as_tensors", "as_optional_tensors"):
            return [self.decode(item, env) if "as_none" not in item else None for item in body]
        if kind == "as_optional_tensor":
            return None if "as_none" in body else self.decode(body, env)
        if kind in ("as_int", "as_bool", "as_string", "as_ints", "as_bools", "as_strings"):
            return list(body) if isinstance(body, list) else body
        if kind in ("as_float", "as_floats"):
            return [float(v) for v in body] if isinstance(body, list) else float(body)
        if kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            return env[body["as_name"]] if "as_name" in body else next(iter(body.values()))
        if kind in ("as_sym_ints", "as_sym_bools", "as_sym_floats"):
            return [env[item["as_name"]] if "as_name" in item else next(iter(item.values())) for item in body]
        if kind == "as_scalar_type":
            return DTYPES.get(body, UNREADABLE)
        if kind in ("as_memory_format", "as_layout"):
            return None
        if kind == "as_device":
            return torch.device("cpu")
        raise Refusal(f"with an argument of kind {kind}")

    def arguments(self, node: Mapping[str, Any], env: Mapping[str, Any], op: str, overload: str) -> dict[str, Any]:
        args = {item["name"]: self.decode(item["arg"], env) for item in node.get("inputs", [])}
        for argument in _overload(op, overload)._schema.arguments:
            if argument.name not in args and argument.has_default_value():
                args[argument.name] = argument.default_value
        return args

    def bind(self, node: Mapping[str, Any], result: Any, env: dict[str, Any]) -> None:
        outputs = node.get("outputs", [])
        if len(outputs) == 1 and "as_tensors" in outputs[0]:
            outputs = outputs[0]["as_tensors"]
            outputs = [{"as_tensor": item} if "name" in item else item for item in outputs]
        results = list(result) if isinstance(result, tuple | list) and len(outputs) != 1 else [result]
        for output, value in zip(outputs, results + [UNREADABLE] * (len(outputs) - len(results)), strict=True):
            kind, body = next(iter(output.items()))
            if kind == "as_tensor":
                env[body["name"]] = value
            elif kind in ("as_sym_int", "as_sym_bool", "as_sym_float") and "as_name" in body:
                env[body["as_name"]] = value

    def lower(self, lowering: Lowering) -> Any:
        env: dict[str, Any] = {**self.constants, self.input: lowering.input}
        for node in self.graph.get("nodes", []):
            op, overload = _target(node.get("target"))
            if not op.startswith("aten::") or not foldable(op):
                lowering.refuse(op)
                self.bind(node, UNREADABLE, env)
                continue
            try:
                args = self.arguments(node, env, op, overload)
            except Refusal as exc:
                lowering.refuse(op, str(exc))
                self.bind(node, UNREADABLE, env)
                continue

            def fold(op: str = op, overload: str = overload, args: dict[str, Any] = args) -> Any:
                return _call(_overload(op, overload), args)

            name = node.get("name", "")
            hint = next((item["arg"]["as_tensor"]["name"] for item in node.get("inputs", [])
                         if "as_tensor" in item["arg"] and item["arg"]["as_tensor"]["name"] in self.constants), name)
            self.bind(node, lowering.call(op, args, fold, hint=_layer_name(hint)), env)
        return self.decode(self.output, env)

    def run(self, x: Tensor) -> Tensor:
        """The program on ``x`` with torch's own kernels (every operator one robustkit lowers, checked before)."""
        env: dict[str, Any] = {**self.constants, self.input: x}
        for node in self.graph.get("nodes", []):
            op, overload = _target(node.get("target"))
            self.bind(node, _call(_overload(op, overload), self.arguments(node, env, op, overload)), env)
        out: Tensor = self.decode(self.output, env)
        return out


def _layer_name(placeholder: str) -> str:
    """``p_conv1_weight`` -> ``conv1``: the layer a weight placeholder belongs to."""
    for prefix in ("p_", "b_", "c_"):
        if placeholder.startswith(prefix):
            placeholder = placeholder[len(prefix):]
            break
    for suffix in ("_weight", "_bias", "_running_mean", "_running_var"):
        if placeholder.endswith(suffix):
            return placeholder[: -len(suffix)]
    return placeholder


def _call(overload: Any, args: Mapping[str, Any]) -> Any:
    schema = overload._schema.arguments
    positional = [args[a.name] for a in schema if not a.kwarg_only and a.name in args]
    keywords = {a.name: args[a.name] for a in schema if a.kwarg_only and a.name in args}
    return overload(*positional, **keywords)


def load_pt2(path: str | Path, input_shape: Sequence[int] | None = None) -> nn.Module:
    """Read the ``torch.export`` archive at ``path`` into a lowered model (eval mode); see the module docstring.

    ``input_shape`` (C, H, W), when given, must be the one the program was exported for.
    """
    path = Path(path)
    try:
        return _load(path, input_shape)
    except RobustkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed archive must not crash the caller with a KeyError
        raise ModelLoadError(f"cannot read torch.export file {path}: malformed ({type(exc).__name__}: {exc})") from None


def _load(path: Path, input_shape: Sequence[int] | None) -> nn.Module:
    reader, program, tensors = _open(path)
    graph = _Graph(reader, program, tensors)
    if input_shape is not None and tuple(input_shape) != graph.input_shape:
        shown = ", ".join(map(str, graph.input_shape))
        raise ModelLoadError(f"torch.export file {path} was exported for inputs of shape (N, {shown}), not "
                             f"(N, {', '.join(map(str, input_shape))})")
    example = torch.rand(2, *graph.input_shape, generator=torch.Generator().manual_seed(0))
    lowering = Lowering(str(path), example, static_batch=graph.static_batch)
    output = graph.lower(lowering)
    problems = lowering.problems()
    if problems:
        raise ModelLoadError(f"unsupported operators in {path}: {', '.join(problems)}. robustkit reads "
                             f"{', '.join(lowered_operators())}")
    try:
        lowered = lowering.finish(output, "LoweredExport")
    except Refusal as exc:
        raise reader.fail(str(exc)) from None
    reference: Callable[[Tensor], Tensor] = graph.run
    check_lowering(lowered, reference, graph.input_shape, f"torch.export file {path}", chunk=graph.static_batch)
    return lowered
