"""VNN-COMP instances: an ONNX network and a VNN-LIB property decided ``sat``, ``unsat``, ``unknown`` or ``timeout``.

:func:`solve_instance` reads the network with robustkit's ONNX importer and the property with
:mod:`robustkit.vnnlib`, and decides each region of the property with a complete verifier's
:meth:`~robustkit.verifiers.Verifier.verify_spec` (``bab`` by default), all under one deadline:

* a region's output condition is a disjunction of conjunctions ``rows @ y + offsets <= 0``; the network is safe
  on the region when, for every conjunction, some row has ``row @ y + offset > 0``. The single-row conjunctions
  together are one specification (all their rows must be positive), proven at once; each multi-row conjunction
  is one more problem, a disjunction of its rows. A conjunction without rows ("true") makes any point of the
  box a counterexample: the box's centre is taken;
* the instance is ``sat`` when some region has a counterexample, ``unsat`` when every region is proven safe (a
  property without regions is unsat), ``timeout`` when the deadline passed first and ``unknown`` otherwise (the
  verifier gave up: numerical trouble, its memory budget, an incomplete method);
* proofs run on the float32 network over the input box rounded *outward* to float32 (a proof over a larger
  box holds on the smaller one), with the offsets rounded down (a proof with smaller offsets holds for the
  true ones); the specification coefficients are rounded to float32 like the network's weights;
* every counterexample is re-checked before ``sat`` is returned: moved into the property's float64 box as float32
  values, run through the network, and checked with :meth:`~robustkit.vnnlib.Property.is_counterexample`.
  A counterexample that fails the check is logged as a warning and the instance is ``unknown``, never ``sat``.

:func:`read_instances` reads a VNN-COMP ``instances.csv``; :func:`write_robustness_benchmark` writes one (an
ONNX export of a model, local-robustness properties around test points).

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "instances.csv").write_text("onnx/net.onnx,vnnlib/prop_0.vnnlib,60\\n\\n")
>>> [(i.onnx.name, i.vnnlib.name, i.timeout) for i in read_instances(folder / "instances.csv")]
[('net.onnx', 'prop_0.vnnlib', 60.0)]
"""

from __future__ import annotations

import contextlib
import copy
import csv
import inspect
import io
import logging
import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from robustkit.errors import InputError, ModelLoadError
from robustkit.vnnlib import Property, Region, read_property, robustness_property

__all__ = [
    "EXPORT_TOLERANCE", "RESULTS", "Instance", "InstanceResult", "load_network", "read_instances",
    "round_box_outward", "solve_instance", "write_robustness_benchmark",
]

RESULTS = ("sat", "unsat", "unknown", "timeout")
#: largest difference between the exported ONNX network's outputs and the model's, relative to the largest output
EXPORT_TOLERANCE = 1e-5
TIME_LIMIT_OPTION = "time_limit"
#: less time than this left before the deadline is a timeout (``exact`` refuses shorter time limits)
MIN_SLICE_S = 1e-3
_NAME = re.compile(r"^[\w.+-]+$")

logger = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Instance:
    """One row of a VNN-COMP ``instances.csv``: the network, the property and the time limit in seconds."""

    onnx: Path
    vnnlib: Path
    timeout: float


@dataclass(frozen=True, eq=False)
class InstanceResult:
    """The outcome of one instance: ``result`` is one of :data:`RESULTS` and ``seconds`` the time taken, loading
    included. For ``sat``, ``x`` (n_inputs,) is the re-checked counterexample flattened in C order (as the
    property's ``X_i`` number the network's input) and ``y`` (n_outputs,) the network's output there."""

    result: str
    seconds: float
    x: FloatArray | None = None
    y: FloatArray | None = None


# --------------------------------------------------------------------------------------------- the network


def _onnx_input_shape(path: Path) -> tuple[int, ...]:
    """The shape of the ONNX graph's data input without its first (batch) dimension."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    data = next(value for value in graph.input if value.name not in constants)  # load_onnx checked there is one
    dims = data.type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ModelLoadError(f"ONNX file {path}: input {data.name!r} has {len(dims)} dimension(s); expected a batch "
                             "dimension followed by the input's shape")
    shape = []
    for position, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise ModelLoadError(f"ONNX file {path}: dimension {position} of input {data.name!r} has no fixed size")
        shape.append(int(dim.dim_value))
    return tuple(shape)


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, ...], int]:
    """The ONNX network at ``path`` as verifiable layers on ``device`` (eval mode), its input shape (batch
    dimension excluded, from the graph's input) and its number of outputs."""
    from robustkit.models.onnx_import import load_onnx
    from robustkit.runtime import resolve_device

    path = Path(path)
    if not path.is_file():
        raise InputError(f"network file {path} {'is not a file' if path.exists() else 'does not exist'}")
    target = resolve_device(device)
    model = load_onnx(path).to(target).eval()
    shape = _onnx_input_shape(path)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape, device=target))
    except Exception as exc:  # noqa: BLE001 - any failure of the imported graph on its own declared input
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"ONNX file {path}: the network fails on its declared input shape "
                             f"{'x'.join(map(str, shape))} ({type(exc).__name__}: {detail})") from None
    if out.dim() != 2 or out.shape[0] != 1:
        raise ModelLoadError(f"ONNX file {path}: the network must return outputs of shape (1, n), got "
                             f"{tuple(out.shape)}")
    return model, shape, int(out.shape[1])


# ------------------------------------------------------------------------------------------ float32 boxes


def round_box_outward(lower: npt.ArrayLike, upper: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The smallest float32 box that contains the float64 box ``[lower, upper]``: a bound that the cast to
    float32 moved inward is moved one float32 step outward.

    >>> low, high = round_box_outward([0.1], [0.1])
    >>> bool(low[0] <= 0.1 <= high[0]), low.dtype.name
    (True, 'float32')
    """
    low64, high64 = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    low, high = low64.astype(np.float32), high64.astype(np.float32)
    low = np.where(low > low64, np.nextafter(low, np.float32(-np.inf)), low)
    high = np.where(high < high64, np.nextafter(high, np.float32(np.inf)), high)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise InputError("the property's input box exceeds the float32 range of the network")
    return low, high


def _inside_float32(point: FloatArray, lower: FloatArray, upper: FloatArray) -> np.ndarray | None:
    """``point`` clipped into the box as float32 values that lie inside it (a cast that left the box moved one
    step back), or None when some coordinate's interval holds no float32 value."""
    near = np.clip(point, lower, upper).astype(np.float32)
    near = np.where(near < lower, np.nextafter(near, np.float32(np.inf)), near)
    near = np.where(near > upper, np.nextafter(near, np.float32(-np.inf)), near)
    return near if bool(np.all((lower <= near) & (near <= upper))) else None


# ------------------------------------------------------------------------------------------------ solving


@dataclass(frozen=True, eq=False)
class _Verdict:
    result: str
    x: FloatArray | None = None
    y: FloatArray | None = None


def _problems(region: Region) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """The region's safety condition as verify_spec problems (specifications of a disjunction, their offsets),
    all of which must be verified: the single-row conjunctions as one specification, then each multi-row
    conjunction as a disjunction of its rows."""
    single = [c for c in region.conjunctions if c.rows.shape[0] == 1]
    problems: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    if single:
        problems.append(([np.concatenate([c.rows for c in single])], [np.concatenate([c.offsets for c in single])]))
    for conjunction in region.conjunctions:
        rows, offsets = conjunction.rows, conjunction.offsets
        if rows.shape[0] > 1:
            problems.append(([rows[i:i + 1] for i in range(rows.shape[0])],
                             [offsets[i:i + 1] for i in range(rows.shape[0])]))
    return problems


@dataclass(frozen=True, eq=False)
class _Solver:
    model: nn.Module
    shape: tuple[int, ...]
    prop: Property
    method: str
    options: dict[str, Any]
    timed: bool  # whether the method takes a time_limit
    deadline: float

    def run(self) -> _Verdict:
        undecided = False
        for region in self.prop.regions:
            verdict = self.region(region)
            if verdict.result in ("sat", "timeout"):
                return verdict
            undecided |= verdict.result == "unknown"  # a later region may still give a counterexample
        return _Verdict("unknown" if undecided else "unsat")

    def region(self, region: Region) -> _Verdict:
        if any(c.rows.shape[0] == 0 for c in region.conjunctions):
            return self.recheck(region, (region.lower + region.upper) / 2)
        from robustkit.verifiers import Status, get_verifier
        from robustkit.verifiers.context import model_device_dtype

        device, dtype = model_device_dtype(self.model)
        low, high = round_box_outward(region.lower, region.upper)
        lower = torch.from_numpy(low).reshape(1, *self.shape).to(device=device, dtype=dtype)
        upper = torch.from_numpy(high).reshape(1, *self.shape).to(device=device, dtype=dtype)
        undecided = False
        for rows, offsets in _problems(region):
            remaining = self.deadline - time.perf_counter()
            if remaining < MIN_SLICE_S:
                return _Verdict("timeout")
            limit = {TIME_LIMIT_OPTION: remaining} if self.timed else {}
            verifier = get_verifier(self.method, **self.options, **limit)
            specs = [torch.tensor(r, device=device, dtype=dtype) for r in rows]
            shifts = [_round_down(o, dtype).to(device) for o in offsets]
            found = verifier.verify_spec(self.model, lower, upper, specs, shifts)
            status = found.status[0]
            if status == Status.VERIFIED:
                continue
            if status == Status.TIMEOUT:
                return _Verdict("timeout")
            if status == Status.FALSIFIED:
                verdict = self.recheck(region, found.counterexample[0].double().reshape(-1).numpy())
                if verdict.result == "sat":
                    return verdict
            undecided = True
        return _Verdict("unknown" if undecided else "unsat")

    def recheck(self, region: Region, point: FloatArray) -> _Verdict:
        """``sat`` with the point moved into the region's box and the network's output there, when that is a
        counterexample of the property; ``unknown`` (and a warning) otherwise."""
        from robustkit.verifiers.context import model_device_dtype

        device, dtype = model_device_dtype(self.model)
        if np.all(np.isfinite(point)):
            inside = _inside_float32(point, region.lower, region.upper)
            if inside is not None:
                x = inside.astype(np.float64)
                network, inputs = self.model, torch.from_numpy(inside).to(device=device, dtype=dtype)
            else:
                # the box is narrower than a float32 step at some coordinate, so no float32 input lies in it:
                # the point itself is checked, on a float64 copy of the network
                x = np.clip(point, region.lower, region.upper)
                network, inputs = copy.deepcopy(self.model).double(), torch.from_numpy(x).to(device)
            with torch.no_grad():
                y = network(inputs.reshape(1, *self.shape)).reshape(-1).double().cpu().numpy()
            if self.prop.is_counterexample(x, y):
                return _Verdict("sat", x, y)
        logger.warning("%s reported a counterexample that the re-check rejects (not in the box, or the network's "
                       "output there does not satisfy the property): the result is unknown", self.method)
        return _Verdict("unknown")


def _round_down(offsets: np.ndarray, dtype: torch.dtype) -> Tensor:
    """Offsets in float32, each rounded toward -inf (or in float64 as they are)."""
    if dtype == torch.float64:
        return torch.from_numpy(np.array(offsets, dtype=np.float64))
    low = offsets.astype(np.float32)
    low = np.where(low > offsets, np.nextafter(low, np.float32(-np.inf)), low)
    return torch.from_numpy(low).to(dtype)


def _positive_seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def solve_instance(network: str | Path, prop: str | Path, timeout: float, method: str = "bab",
                   device: str | torch.device = "cpu", **options: Any) -> InstanceResult:
    """Decide the VNN-LIB property ``prop`` on the ONNX ``network`` within ``timeout`` seconds (module docstring).

    ``method`` is a registered verifier (a complete one decides; an incomplete one can only prove or find the
    box's centre to be a counterexample); ``options`` go to it, and its ``time_limit`` is the time left before
    the deadline at each call. Unreadable files, a property whose numbers of inputs or outputs differ from the
    network's, and unsupported ONNX operators raise a :class:`~robustkit.errors.RobustkitError` with a one-line
    message.
    """
    from robustkit.verifiers import VERIFIERS

    start = time.perf_counter()
    deadline = start + _positive_seconds(timeout, "timeout")
    timed = TIME_LIMIT_OPTION in inspect.signature(VERIFIERS[method]).parameters  # an unknown name fails here
    if TIME_LIMIT_OPTION in options:
        raise TypeError("time_limit is not an option of solve_instance: it comes from timeout")
    model, shape, n_outputs = load_network(network, device)
    spec = read_property(prop)
    n_inputs = math.prod(shape)
    if spec.n_inputs != n_inputs:
        raise InputError(f"property declares {spec.n_inputs} inputs, the network takes {n_inputs} "
                         f"({prop} on {network})")
    if spec.n_outputs != n_outputs:
        raise InputError(f"property declares {spec.n_outputs} outputs, the network has {n_outputs} "
                         f"({prop} on {network})")
    verdict = _Solver(model, shape, spec, method, dict(options), timed, deadline).run()
    return InstanceResult(verdict.result, time.perf_counter() - start, verdict.x, verdict.y)


# ------------------------------------------------------------------------------------------ instances.csv


def read_instances(csv_path: str | Path, root: str | Path | None = None) -> list[Instance]:
    """The rows ``onnx,vnnlib,timeout`` of a VNN-COMP ``instances.csv`` (no header; blank lines are ignored),
    with the paths relative to ``root`` (default: the CSV's folder). A malformed row raises an
    :class:`~robustkit.errors.InputError` naming its line."""
    path = Path(csv_path)
    base = path.parent if root is None else Path(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"cannot read the instances file {path}: {' '.join(reason.split())}") from None
    if not base.is_dir():
        raise InputError(f"the instances' root folder {base} does not exist")
    instances = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in next(csv.reader([line]))]
        if len(cells) != 3 or not cells[0] or not cells[1]:
            raise InputError(f"{path} line {number}: expected onnx,vnnlib,timeout, got {line.strip()!r}")
        try:
            seconds = float(cells[2])
        except ValueError:
            raise InputError(f"{path} line {number}: the timeout {cells[2]!r} is not a number") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"{path} line {number}: the timeout must be a finite number of seconds > 0, "
                             f"got {cells[2]!r}")
        instances.append(Instance(base / cells[0], base / cells[1], seconds))
    if not instances:
        raise InputError(f"{path} holds no instances (expected lines onnx,vnnlib,timeout)")
    return instances


# -------------------------------------------------------------------------------------- writing benchmarks


def _export_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    """``model`` as an ONNX file by torch's default (dynamo) exporter, written atomically; its log lines,
    warnings and prints are silenced."""
    from robustkit.io import atomic_write_bytes

    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
            if program is None:
                raise RuntimeError("the exporter returned no program")
            data = program.model_proto.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types for models it cannot trace
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"cannot export the model to ONNX ({type(exc).__name__}: {detail})") from None
    finally:
        exporter_log.setLevel(level)
    atomic_write_bytes(path, data)


def _check_export(path: Path, x: Tensor, expected: Tensor) -> None:
    """Read the exported file back with robustkit's importer; its outputs on ``x`` must match ``expected``."""
    from robustkit.models.onnx_import import load_onnx

    network = load_onnx(path)
    try:
        with torch.no_grad():
            again = network(x.detach().cpu().float())
    except Exception as exc:  # noqa: BLE001 - any failure of the read-back graph on the model's own inputs
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        path.unlink(missing_ok=True)
        raise ModelLoadError(f"the exported ONNX network fails on the model's inputs when read back "
                             f"({type(exc).__name__}: {detail})") from None
    expected = expected.detach().cpu().float()
    if again.shape != expected.shape:
        raise ModelLoadError(f"the exported ONNX file {path} returns outputs of shape {tuple(again.shape)}, the "
                             f"model {tuple(expected.shape)}")
    error = float((again - expected).abs().max())
    scale = float(expected.abs().max())
    if not error <= EXPORT_TOLERANCE * max(scale, 1e-6):
        path.unlink(missing_ok=True)
        raise ModelLoadError(f"the exported ONNX network does not reproduce the model: outputs differ by {error:.3g} "
                             f"(largest output {scale:.3g}, tolerance {EXPORT_TOLERANCE:g} relative)")


def _number(value: float) -> str:
    """The shortest text of ``value`` that reads back exactly (``60`` rather than ``60.0``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def write_robustness_benchmark(model: nn.Module, x: Tensor, y: Tensor, eps_list: Sequence[float],
                               out_dir: str | Path, timeout: float, *, all_points: bool = False,
                               name: str = "network") -> int:
    """Write a VNN-COMP benchmark of local robustness around the points ``x`` (N, *shape) in [0, 1] with labels
    ``y`` (N,); returns the number of instances.

    ``out_dir/onnx/<name>.onnx`` is ``model`` exported by ``torch.onnx.export(..., dynamo=True)`` with batch size
    1, read back by robustkit's importer and checked to reproduce the model's outputs on ``x`` (within
    :data:`EXPORT_TOLERANCE` relative). ``out_dir/vnnlib/prop_<i>_eps_<eps>.vnnlib`` states, for point i and each
    eps, that some class other than ``y[i]`` scores at least as high somewhere in ``[x - eps, x + eps]`` clipped to
    [0, 1] (unsat: robust). Points the model misclassifies are skipped unless ``all_points``.
    ``out_dir/instances.csv`` lists the instances with ``timeout`` seconds each. Every file is written atomically.
    """
    from robustkit import __version__
    from robustkit.io import atomic_write_text
    from robustkit.verifiers.base import validate_eps, validate_inputs

    if not _NAME.match(name):
        raise InputError(f"the network name {name!r} must be letters, digits, '.', '_', '+' or '-'")
    eps_values = [validate_eps(eps) for eps in eps_list]
    if not eps_values:
        raise InputError("give at least one eps")
    seconds = _positive_seconds(timeout, "timeout")
    model = model.eval()
    points, labels = validate_inputs(model, x, y)
    assert labels is not None  # validate_inputs returns labels when given some
    with torch.no_grad():
        logits = model(points)
    if logits.dim() != 2:
        raise InputError(f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}")
    n_outputs = int(logits.shape[1])
    if int(labels.min()) < 0 or int(labels.max()) >= n_outputs:
        raise InputError(f"labels must be classes in 0..{n_outputs - 1}")
    out = Path(out_dir)
    network = Path("onnx") / f"{name}.onnx"
    _export_onnx(model, points[:1], out / network)
    _check_export(out / network, points, logits)

    correct = (logits.argmax(1) == labels).tolist()
    rows = []
    for index in range(points.shape[0]):
        if not (all_points or correct[index]):
            continue
        centre = points[index].detach().cpu().double().numpy().reshape(-1)
        label = int(labels[index])
        for eps in eps_values:
            lower, upper = np.clip(centre - eps, 0.0, 1.0), np.clip(centre + eps, 0.0, 1.0)
            comment = (f"local robustness of point {index} (label {label}) at L-inf eps {eps!r}, box clipped to "
                       f"[0, 1]; sat: some other class scores at least as high\nwritten by robustkit {__version__}")
            prop = Path("vnnlib") / f"prop_{index}_eps_{eps!r}.vnnlib"
            atomic_write_text(out / prop, robustness_property(lower, upper, label, n_outputs, comment=comment))
            rows.append([network.as_posix(), prop.as_posix(), _number(seconds)])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    atomic_write_text(out / "instances.csv", buffer.getvalue())
    return len(rows)
