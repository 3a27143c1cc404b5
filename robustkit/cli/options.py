"""Click options shared by the commands that evaluate a model on data (verify, attack, train, bench).

Each decorator adds a group of options and, where several options describe one thing, hands the command a
single frozen dataclass instead of loose keyword arguments:

* :func:`model_options` -> ``model_args: ModelArgs`` (``--model``, ``--checkpoint``, ``--mean``, ``--std``)
* :func:`data_options` -> ``data_args: DataArgs`` (``--dataset``, ``--data-dir``, ``--n-examples``, ``--start``,
  ``--batch-size``)
* :func:`eps_option` -> ``eps: list[float]``; :func:`method_option` -> ``methods: list[str]``;
  :func:`out_option` -> ``out: Path | None`` (see :func:`output_dir`)

:func:`load_eval_data` and :func:`load_cli_model` turn them into the evaluation samples and a ready model.
Registries are read when a decorator is applied (at the import of the command's module), never when
:mod:`robustkit.cli` itself is imported, so ``robustkit --help`` stays free of torch.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from robustkit.cli import GlobalOptions, UserError
from robustkit.errors import UnknownNameError

if TYPE_CHECKING:
    from torch import nn

    from robustkit.data import Dataset
    from robustkit.evaluation import EvalData

__all__ = [
    "DataArgs", "ModelArgs", "PositiveFloat", "accepts_option", "data_options", "eps_option", "global_options",
    "load_cli_model", "load_eval_data", "method_option", "model_options", "out_option", "output_dir",
    "output_folder", "parse_eps", "parse_floats", "parse_names",
]

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

_FRACTION = re.compile(r"^(?P<num>[^/]+)/(?P<den>[^/]+)$")


def _apply(function: Callable[..., Any], decorators: Sequence[Decorator]) -> Callable[..., Any]:
    """Apply ``decorators`` as if stacked above ``function`` in this order (so ``--help`` lists them so)."""
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _bad(message: str) -> click.BadParameter:
    return click.BadParameter(" ".join(message.split()))


# ---------------------------------------------------------------------------------------------- parsing


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.25"`` -> ``(0.5, 0.25)``; a fraction such as ``2/255`` is allowed; every value is finite."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty value in {text!r}: give comma-separated numbers such as 0.1,0.3")
        fraction = _FRACTION.match(item)
        try:
            value = (
                float(fraction.group("num")) / float(fraction.group("den")) if fraction else float(item)
            )
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{item!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{item!r} is not a finite number")
        values.append(value)
    return tuple(values)


def parse_eps(text: str) -> list[float]:
    """Comma-separated radii in input space, each in [0, 1]: ``"0.1,0.3"`` or ``"2/255,8/255"``.

    Repeated values are kept once, in the order given.

    >>> parse_eps("0.1, 0.3,0.1")
    [0.1, 0.3]
    """
    values = parse_floats(text)
    outside = [v for v in values if not 0.0 <= v <= 1.0]
    if outside:
        raise ValueError(
            f"eps must be in [0, 1] because inputs live in [0, 1] (e.g. 0.1 or 8/255), got {outside[0]:g}"
        )
    return list(dict.fromkeys(values))


def parse_names(text: str, registry: Mapping[str, Any], kind: str) -> list[str]:
    """Comma-separated names, each registered in ``registry``; repeated names are kept once, in order.

    An unknown name raises :class:`ValueError` with the close matches and every valid choice.

    >>> parse_names("b, a", {"a": 1, "b": 2}, "thing")
    ['b', 'a']
    """
    names = [name.strip() for name in text.split(",")]
    if not any(names) or not all(names):
        raise ValueError(f"give one or more comma-separated {kind} names, got {text!r}")
    for name in names:
        if name not in registry:
            raise ValueError(str(UnknownNameError(kind, name, registry)))
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------- global options


def global_options(ctx: click.Context) -> GlobalOptions:
    """The root group's ``--seed``/``--device``/``--quiet`` (defaults when a command runs without the group)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions(seed=0, device="auto", quiet=False)


class PositiveFloat(click.FloatRange):
    """A finite number > 0 (``click.FloatRange`` alone lets ``inf`` through, which makes no learning rate,
    factor or time limit)."""

    name = "positive number"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelArgs:
    """What ``--model``, ``--checkpoint``, ``--mean`` and ``--std`` asked for."""

    spec: str
    checkpoint: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return parse_floats(value)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def model_options(function: F) -> F:
    """Add ``--model`` (required), ``--checkpoint``, ``--mean`` and ``--std``; the command gets ``model_args``."""

    @functools.wraps(function)
    def command(
        *args: Any,
        model: str,
        checkpoint: Path | None,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        **kwargs: Any,
    ) -> Any:
        return function(*args, model_args=ModelArgs(model, checkpoint, mean, std), **kwargs)

    return cast(F, _apply(command, [
        click.option("--model", "model", required=True, metavar="SPEC",
                     help="A zoo name (see 'robustkit models'), a TorchScript (.pt, .ts), torch.export (.pt2) or "
                          "ONNX file, or a factory package.module:function or file.py:function."),
        click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     metavar="FILE", help="Weights for a zoo model or factory: a state_dict (.pt) or .safetensors."),
        click.option("--mean", callback=_float_list, metavar="a,b,c",
                     help="Per-channel mean of a model trained on normalised inputs (with --std)."),
        click.option("--std", callback=_float_list, metavar="a,b,c",
                     help="Per-channel standard deviation (with --mean)."),
    ]))


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataArgs:
    """What the data options asked for: ``n_examples`` test samples from index ``start``, in batches."""

    dataset: str = "mnist5k"
    data_dir: Path | None = None
    n_examples: int = 100
    start: int = 0
    batch_size: int = 50


def data_options(function: F) -> F:
    """Add ``--dataset``, ``--data-dir``, ``--n-examples``, ``--start`` and ``--batch-size``; the command gets
    ``data_args``."""
    from robustkit.data import DATASETS

    @functools.wraps(function)
    def command(
        *args: Any, dataset: str, data_dir: Path | None, n_examples: int, start: int, batch_size: int, **kwargs: Any
    ) -> Any:
        return function(*args, data_args=DataArgs(dataset, data_dir, n_examples, start, batch_size), **kwargs)

    return cast(F, _apply(command, [
        click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist5k", show_default=True,
                     help="Registered dataset (see 'robustkit datasets'); its test split is evaluated."),
        click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
                     help="Folder with the dataset's files (every dataset except the embedded mnist5k)."),
        click.option("--n-examples", type=click.IntRange(min=1), default=100, show_default=True, metavar="N",
                     help="Number of test samples."),
        click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, metavar="I",
                     help="Index of the first test sample."),
        click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True, metavar="B",
                     help="Samples processed at once."),
    ]))


def load_eval_data(args: DataArgs) -> EvalData:
    """Load ``args.dataset`` and take test samples ``start`` to ``start + n_examples - 1``, which must all exist
    (see :func:`robustkit.evaluation.take_samples`)."""
    from robustkit.data import load_dataset
    from robustkit.evaluation import EvalData, take_samples

    dataset = load_dataset(args.dataset, args.data_dir)
    split = take_samples(dataset.test, args.start, args.n_examples, what=f"the {args.dataset} test split",
                         count="--n-examples", first="--start")
    return EvalData(dataset, split, args.start, args.batch_size)


def load_cli_model(args: ModelArgs, dataset: Dataset, options: GlobalOptions) -> nn.Module:
    """The model of ``args`` on the root ``--device``, in eval mode, checked against the dataset's input shape
    and number of classes.

    Randomly initialised parameters (a zoo model or factory without a checkpoint) are drawn from a generator
    seeded with the root ``--seed``, so the same seed gives the same untrained network; the global random
    state is left as it was.
    """
    import torch

    from robustkit.models import load_model
    from robustkit.runtime import resolve_device

    device = resolve_device(options.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return load_model(
            args.spec, args.checkpoint, args.mean, args.std, device=device,
            input_shape=dataset.input_shape, num_classes=dataset.num_classes, dataset=dataset.name,
        )


# ------------------------------------------------------------------------------------ eps, method, out


def eps_option(required: bool = True, default: str | None = None) -> Decorator:
    """``--eps 0.1[,0.3...]`` -> ``eps: list[float]``, each in [0, 1] (fractions such as ``2/255`` allowed)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
        if value is None:
            return None
        try:
            return parse_eps(value)
        except ValueError as exc:
            raise _bad(str(exc)) from None

    # no explicit default=None next to required=True: some click releases then skip the required check
    defaults: dict[str, Any] = {} if default is None else {"default": default, "show_default": True}
    return click.option(
        "--eps", required=required, callback=convert, metavar="EPS[,EPS...]", **defaults,
        help="L-inf radii in input space [0, 1], comma-separated; fractions such as 2/255 are allowed.",
    )


def method_option(
    registry: Mapping[str, Any], kind: str, *, required: bool = True, default: str | None = None
) -> Decorator:
    """``--method a,b`` -> ``methods: list[str]``, each checked against ``registry`` when the command runs
    (so names registered after the decorator was applied are accepted too)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
        if value is None:
            return None
        try:
            return parse_names(value, registry, kind)
        except ValueError as exc:
            raise _bad(str(exc)) from None

    defaults: dict[str, Any] = {} if default is None else {"default": default, "show_default": True}
    return click.option(
        "--method", "methods", required=required, callback=convert, metavar="NAME[,NAME...]", **defaults,
        help=f"Comma-separated {kind}s: {', '.join(registry)}.",
    )


def accepts_option(factory: Callable[..., Any], option: str) -> bool:
    """Whether ``factory`` (e.g. a registered verifier class) takes the keyword argument ``option``."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def out_option(command: str) -> Decorator:
    """``--out DIR`` -> ``out: Path | None``; :func:`output_dir` creates it (default ``runs/<command>-<time>``)."""
    return click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
        help=f"Folder for the result files (created; default runs/{command}-<date>-<time>).",
    )


@contextmanager
def output_folder(out: Path | None, command: str) -> Iterator[Path]:
    """:func:`output_dir` around a command's work: when the block fails, the folders this call created (the
    output folder and its missing parents) are removed again if still empty, so a user error found late, such
    as an unsupported layer, leaves nothing behind."""
    chain = [Path("runs")] if out is None else [out, *out.parents]
    created = [folder for folder in chain if not folder.exists()]
    folder = output_dir(out, command)
    try:
        yield folder
    except BaseException:
        for made in sorted({folder, *created} if out is None else created, key=lambda p: len(p.parts),
                           reverse=True):
            with suppress(OSError):  # not empty (something was written after all): keep it
                made.rmdir()
        raise


def output_dir(out: Path | None, command: str) -> Path:
    """Create and return ``out``, or a new ``runs/<command>-YYYYmmdd-HHMMSS`` folder when it is None.

    A default folder is created atomically (``mkdir`` without ``exist_ok``), so two commands started in the
    same second get folders of their own (the second with a ``-2`` suffix).
    """
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            return out
        base = Path("runs") / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for suffix in range(1, 1000):
            candidate = base if suffix == 1 else base.with_name(f"{base.name}-{suffix}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
        raise UserError(f"cannot create a new output folder next to {str(base)!r}: 999 of that name exist")
    except OSError as exc:
        folder = out if out is not None else Path("runs")
        raise UserError(f"cannot create the output folder {str(folder)!r}: {exc.strerror or exc}") from None
