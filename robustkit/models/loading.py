"""Model loading: how users hand robustkit a model (the ``--model`` / ``--checkpoint`` options).

A model specification is one of

* a zoo name (``mnist_small``), optionally with a checkpoint file of weights;
* a TorchScript file (``model.ts``, ``model.pt`` saved with ``torch.jit.save``), of ``nn.Sequential`` models
  (rebuilt layer by layer, :mod:`robustkit.models.torchscript`) or of any traced or scripted module (lowered
  from its operator graph, :mod:`robustkit.models.script_lowering`);
* a ``torch.export`` program (``model.pt2``, saved with ``torch.export.save``; :mod:`robustkit.models.pt2`);
* an ONNX file (``model.onnx``; needs the ``onnx`` extra);
* a Python factory ``package.module:function`` or ``path/to/file.py:function`` returning an ``nn.Module``,
  optionally with a checkpoint. A factory is the user's own code: naming it runs it (the module is imported and
  the function called), as with any Python code one chooses to run.

Model files and checkpoints are untrusted data, and nothing in them is unpickled: checkpoints are read with
``torch.load(weights_only=True)`` (a file that would run code when unpickled is refused,
:class:`~robustkit.errors.UnsafeCheckpointError`) or, for ``.safetensors`` files, with the ``safetensors``
package; ``torch.export`` archives are read as JSON and raw tensor bytes, never with ``torch.export.load``;
TorchScript files are opened with ``torch.jit.load``, which builds TorchScript objects and unpickles no Python
classes, and their code runs only once robustkit has read every operator on its path.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.errors import InputError, ModelLoadError, UnknownNameError, UnsafeCheckpointError
from robustkit.models.zoo import MODELS, build_model
from robustkit.nn import Normalize
from robustkit.runtime import resolve_device

__all__ = [
    "build_network", "extract_state_dict", "fit_problem", "is_safetensors", "load_checkpoint", "load_model",
    "load_safetensors", "load_state_dict_file", "resolve_spec", "spec_kind",
]

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "params", "module")
_FACTORY = re.compile(r"^(?P<target>[\w.]+|.+\.py):(?P<function>[A-Za-z_]\w*)$")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; weight checkpoints have none."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except Exception:  # noqa: BLE001 - a damaged archive (BadZipFile, NotImplementedError, ...) is not TorchScript
        return False


def spec_kind(spec: str | Path) -> str:
    """Classify a model specification as ``zoo``, ``torchscript``, ``export`` (a ``torch.export`` program),
    ``onnx``, ``factory`` or ``weights``.

    ``weights`` means a checkpoint file was given where a model was expected. An unknown spec raises
    :class:`~robustkit.errors.UnknownNameError` with the close zoo names.
    """
    text = str(spec)
    if text in MODELS:
        return "zoo"
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            return "onnx"
        from robustkit.models.pt2 import is_pt2

        if path.suffix.lower() == ".pt2" or is_pt2(path):
            return "export"
        return "torchscript" if _is_torchscript(path) else "weights"
    if _FACTORY.match(text):
        return "factory"
    if path.suffix.lower() in {".onnx", ".pt", ".pth", ".pt2", ".ts", ".jit", ".py", ".safetensors"} or "/" in text:
        raise ModelLoadError(f"model file {text!r} does not exist")
    raise UnknownNameError("model", text, MODELS)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state_dict inside a loaded checkpoint: the object itself, or a dict wrapping it under a key such as
    ``state_dict`` or ``model`` (also one level deeper, or as a one-element list); ``module.`` prefixes of
    DataParallel/DDP checkpoints are removed."""
    candidates: list[Any] = [obj]
    for _ in range(3):  # the object, a wrapper, and a wrapper inside a wrapper
        found = next((c for c in candidates if _is_state_dict(c)), None)
        if found is not None:
            state = {str(k): v for k, v in found.items()}
            if state and all(k.startswith("module.") for k in state):
                state = {k[len("module."):]: v for k, v in state.items()}
            return state
        nested: list[Any] = []
        for candidate in candidates:
            if isinstance(candidate, Mapping):
                for key in WRAPPER_KEYS:
                    value = candidate.get(key)
                    if isinstance(value, Sequence) and len(value) == 1:
                        value = value[0]
                    if value is not None:
                        nested.append(value)
        candidates = nested
    keys = list(obj)[:10] if isinstance(obj, Mapping) else []
    described = f"a dict with keys {keys}" if keys else f"a {type(obj).__name__}"
    raise ModelLoadError(
        f"{source} holds {described}, not a state_dict of tensors (also looked under {', '.join(WRAPPER_KEYS)})"
    )


def _pickle_globals(path: Path) -> list[str]:
    """The globals a pickle file (or the pickles inside a torch zip file) refers to, found by reading its
    opcodes with :mod:`pickletools` (which never executes anything)."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]
    except Exception:  # noqa: BLE001 - a damaged archive has no globals to report; the caller says it is corrupt
        return []
    found: list[str] = []
    for blob in blobs:
        stream = io.BytesIO(blob)
        while stream.tell() < len(blob):
            strings: list[str] = []
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - garbage opcodes end the scan, whatever they raise
                break
    return found


def _unsafe(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to load {path}: it holds {what}, which could run code when unpickled. robustkit only reads "
        "tensors; save weights with torch.save(model.state_dict(), FILE) or export TorchScript/ONNX"
    )


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file: a little-endian 8-byte header length, then a JSON header."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with path.open("rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def load_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file (read by the ``safetensors`` package: no pickle)."""
    path = Path(path).expanduser()
    try:
        from safetensors import safe_open
    except ImportError as exc:  # a dependency of robustkit; only a broken install lacks it
        raise ModelLoadError(f"reading {path} needs the safetensors package: pip install safetensors") from exc
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            tensors = {str(key): file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - the Rust reader raises its own error type for damaged files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read safetensors file {path}: damaged ({first_line})") from None
    return tensors, metadata


def load_checkpoint(path: str | Path) -> Any:
    """The contents of an untrusted checkpoint, on CPU: a safetensors file's tensors, or ``torch.load`` with
    ``weights_only=True`` (new zip and legacy formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {str(path)!r} does not exist")
    if is_safetensors(path):
        return load_safetensors(path)[0]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        offending = re.search(r"GLOBAL ([\w.]+)", message)
        if "Weights only load failed" in message and offending:
            raise _unsafe(path, offending.group(1)) from None
        foreign = [g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict"))]
        if foreign:
            raise _unsafe(path, ", ".join(dict.fromkeys(foreign))) from None
        # torch's own first line here is about its weights_only default, which misleads: the file is broken
        raise _damaged(path) from None
    except Exception:  # noqa: BLE001 - garbage bytes reach the unpickler as any error at all
        # (KeyError for a memo reference it never stored, IndexError, TypeError, struct.error, ...)
        raise _damaged(path) from None


def _damaged(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read checkpoint {path}: the file is damaged (truncated or corrupt) or was not written by "
        "torch.save"
    )


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The state_dict stored in the checkpoint at ``path`` (see :func:`extract_state_dict`)."""
    return extract_state_dict(load_checkpoint(path), source=f"checkpoint {path}")


def _apply_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s) {unexpected[:5]}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:3]}")
    if problems:
        raise ModelLoadError(f"{source} does not fit the model: {'; '.join(problems)}")
    # load_state_dict would silently cast integer tensors into the float weights; a weights file has floats
    not_float = [f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k, v in expected.items()
                 if v.is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        raise ModelLoadError(
            f"{source} holds non-floating-point tensors where the model has floating-point weights: "
            f"{', '.join(not_float[:5])}; save the trained weights with torch.save(model.state_dict(), FILE)"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(f"{source} holds NaN or infinite values in {bad[:5]}")
    model.load_state_dict(state, strict=True)


#: the prefix of the module names under which factory files (``file.py:build``) are imported
USER_MODULE_PREFIX = "robustkit_user_"


def import_file_module(name: str, file: Path) -> ModuleType:
    """Import the Python file ``file`` as the module ``name`` (kept in ``sys.modules``, so its classes pickle by
    reference; worker processes import it under the same name: :func:`user_modules`)."""
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"cannot import {str(file)!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def user_modules() -> dict[str, str]:
    """The factory files imported so far: module name -> file."""
    return {name: str(module.__file__) for name, module in list(sys.modules.items())
            if name.startswith(USER_MODULE_PREFIX) and getattr(module, "__file__", None)}


def _load_factory(spec: str) -> nn.Module:
    match = _FACTORY.match(spec)
    if match is None:
        raise ModelLoadError(f"invalid factory {spec!r}: use package.module:function or file.py:function")
    target, function = match.group("target"), match.group("function")
    try:
        if target.endswith(".py"):
            file = Path(target).expanduser()
            if not file.is_file():
                raise ModelLoadError(f"factory file {target!r} does not exist")
            module = import_file_module(f"{USER_MODULE_PREFIX}{file.stem}", file)
        else:
            module = importlib.import_module(target)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot import {target!r} for model factory {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ModelLoadError(f"{target!r} has no callable {function!r}")
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_torchscript(path: Path, input_shape: Sequence[int] | None) -> nn.Module:
    from robustkit.models.script_lowering import lower_script
    from robustkit.models.torchscript import to_eager

    try:
        with warnings.catch_warnings():
            # reading TorchScript is what the user asked for; torch's deprecation notice is not for them
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated")
            scripted = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails inside torch with any error type
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot read TorchScript file {path}: corrupt ({first_line})") from None
    eager = to_eager(scripted)
    return lower_script(scripted, path, input_shape) if eager is None else eager


def _parse_stats(values: Sequence[float] | None, name: str) -> list[float] | None:
    if values is None:
        return None
    parsed = [float(v) for v in values]
    if not parsed:
        raise InputError(f"--{name} needs at least one value")
    return parsed


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _takes(model: nn.Module, device: torch.device, known: Sequence[int] | None) -> str:
    """What the model takes instead, for the error when it fails on the dataset's inputs: its known shape (a zoo
    network's), the shape of a registered dataset it runs on, or what its first layer takes."""
    from robustkit.data import DATASETS

    if known is not None:
        return f"it takes {_shape_text(known)} inputs"
    for name in DATASETS:
        shape = DATASETS[name].info.input_shape
        try:
            with torch.no_grad():
                model(torch.full((2, *shape), 0.5, device=device))
        except Exception:  # noqa: BLE001 - trying the shapes robustkit knows; a failure only rules one out
            continue
        return f"it takes {_shape_text(shape)} inputs (as {name} has)"
    for path, layer in model.named_modules():
        if isinstance(layer, nn.Conv2d):
            return f"its first layer (model.{path}, Conv2d) takes {layer.in_channels} input channels"
        if isinstance(layer, nn.Linear):
            return f"its first layer (model.{path}, Linear) takes {layer.in_features} input features"
    return "it fails on them"


def fit_problem(model: nn.Module, input_shape: Sequence[int], num_classes: int | None, *, spec: str | None = None,
                data: str = "the dataset", device: str | torch.device = "cpu") -> str | None:
    """Why ``model`` (built from ``spec``) does not fit the data, in one line naming both shapes, or None: one
    forward pass on a dummy batch of ``input_shape`` (C, H, W), checking its logits against ``num_classes``."""
    name = "the model" if spec is None else f"model {spec}"
    known = MODELS[spec].input_shape if spec is not None and spec in MODELS else None
    target = resolve_device(device)
    probe = torch.full((2, *input_shape), 0.5, device=target)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on the expected input
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return (f"{name} does not take {data}'s {_shape_text(input_shape)} inputs: {_takes(model, target, known)} "
                f"({detail})")
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return f"{name} must return logits of shape (N, classes), got {shape}"
    if num_classes is not None and out.shape[1] != num_classes:
        return f"{name} returns {out.shape[1]} logits but {data} has {num_classes} classes"
    if not bool(torch.isfinite(out).all()):
        return f"{name} returns NaN or infinite logits"
    return None


def resolve_spec(spec: str, base: str | Path | None) -> str:
    """``spec`` with the file of a ``file.py:function`` factory made absolute against ``base`` when relative (a
    bench configuration's folder); every other spec is returned unchanged."""
    match = _FACTORY.match(spec)
    if base is None or spec in MODELS or match is None or not match.group("target").endswith(".py"):
        return spec
    file = Path(match.group("target")).expanduser()
    if file.is_absolute():
        return spec
    return f"{Path(base) / file}:{match.group('function')}"


def build_network(spec: str, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised network to train: a zoo name or a factory (``package.module:function``,
    ``file.py:function``, whose code runs). With ``seed`` the initialisation is reproducible and the caller's
    random state is left as it was."""
    kind = spec_kind(spec)
    if kind not in ("zoo", "factory"):
        raise ModelLoadError(
            f"{spec} is a {'weights checkpoint' if kind == 'weights' else kind + ' file'}: training builds a new "
            "network, so give a zoo name or a factory (package.module:function or file.py:function)"
        )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(spec) if kind == "zoo" else _load_factory(spec)


def load_model(
    spec: str | Path,
    checkpoint: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
) -> nn.Module:
    """Build or read the model ``spec`` and return it ready to use: weights loaded, eval mode, on ``device``.

    ``mean``/``std`` wrap the model in :class:`~robustkit.nn.Normalize` (for models trained on normalised
    inputs). With ``input_shape`` (C, H, W) the model is probed with one forward pass, and with
    ``num_classes`` its number of logits is checked, so a mismatch fails here with a clear message (naming
    ``dataset``). TorchScript files of custom modules need ``input_shape`` to be lowered (they do not record it).
    """
    kind = spec_kind(spec)
    if checkpoint is not None and kind in {"torchscript", "export", "onnx"}:
        raise InputError(f"--checkpoint applies to zoo names and factories; the {kind} file holds its own weights")
    if kind == "weights":
        raise ModelLoadError(
            f"{spec} is a weights checkpoint, not a model: pass the architecture as --model "
            "(a zoo name or module:function) and this file as --checkpoint"
        )
    mean_list, std_list = _parse_stats(mean, "mean"), _parse_stats(std, "std")
    if (mean_list is None) != (std_list is None):
        raise InputError("--mean and --std must be given together")
    target = resolve_device(device)
    model: nn.Module
    if kind == "zoo":
        model = build_model(str(spec))
    elif kind == "factory":
        model = _load_factory(str(spec))
    elif kind == "torchscript":
        model = _load_torchscript(Path(spec).expanduser(), input_shape)
    elif kind == "export":
        from robustkit.models.pt2 import load_pt2

        model = load_pt2(Path(spec).expanduser(), input_shape)
    else:
        from robustkit.models.onnx_import import load_onnx

        model = load_onnx(Path(spec).expanduser())
    if checkpoint is not None:
        _apply_state_dict(model, load_state_dict_file(checkpoint), f"checkpoint {checkpoint}")
    if mean_list is not None and std_list is not None:
        model = nn.Sequential(Normalize(mean_list, std_list), model)
    model = model.to(target).eval()
    if input_shape is not None:
        problem = fit_problem(model, input_shape, num_classes, spec=str(spec), data=dataset or "the dataset",
                              device=target)
        if problem is not None:
            raise ModelLoadError(problem)
    return model
