"""Benchmark configuration: a TOML file (or a built-in preset) describing the grid and how to run each cell.

Every key is validated before any training starts; an error names the key (``trainers.pgd.stepz``) and the
valid choices. See ``examples/bench.toml`` for a documented example and :data:`PRESETS` for the built-ins.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustkit.errors import InputError
from robustkit.trainers.base import TrainConfig

# TrainConfig fields a bench config may set (eps, seed, device and the monitoring size come from the grid)
TRAIN_KEYS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("eps", "seed", "device", "val_size")
)
EXACT_CHOICES = ("auto", "true", "false")


def _fail(key: str, message: str, choices: list[str] | tuple[str, ...] = ()) -> InputError:
    hint = ""
    if choices:
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(choices), n=2)
        hint = (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "") + \
            f" Valid: {', '.join(choices)}."
    return InputError(f"bench config: {key}: {message}.{hint}")


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer of the grid: its label, registry name, trainer options and training settings."""

    label: str
    name: str
    options: dict[str, Any]
    training: dict[str, Any]


@dataclass(frozen=True)
class EvaluationSettings:
    """How every trained model is evaluated on the first ``n_test`` test samples at its training eps."""

    pgd_steps: int = 40
    pgd_restarts: int = 5
    cw_steps: int = 40
    interval_attack: dict[str, Any] = field(default_factory=lambda: {"iterations": 2, "restarts": 1})
    verifiers: tuple[str, ...] = ("interval", "symbolic", "crown")
    exact: str = "auto"
    exact_max_relus: int = 200
    exact_time_limit: float = 10.0
    eps_sweep: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2)
    sweep_n: int = 200
    batch_size: int = 100


@dataclass(frozen=True)
class BenchConfig:
    """The whole benchmark: grid (datasets x models x trainers x eps), data sizes, training and evaluation."""

    datasets: tuple[str, ...]
    models: tuple[str, ...]
    eps: tuple[float, ...]
    trainers: tuple[TrainerSpec, ...]
    data_dir: str | None = None
    n_train: int = 0
    n_test: int = 1000
    val_size: int = 200
    seed: int = 0
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    source: str = "preset paper"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(raw: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise _fail(key, "must be a table")
    for name in value:
        if name not in allowed:
            raise _fail(f"{key}.{name}", "unknown key", allowed)
    return dict(value)


def _names(value: Any, key: str, registry: Mapping[str, Any], kind: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(key, f"must be a non-empty list of {kind} names")
    for name in value:
        if name not in registry:
            raise _fail(key, f"unknown {kind} {name!r}", tuple(registry))
    return tuple(value)


def _eps_list(value: Any, key: str) -> tuple[float, ...]:
    if isinstance(value, int | float):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(key, "must be a non-empty list of numbers in [0, 1]")
    for eps in value:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or not 0 <= eps <= 1:
            raise _fail(key, f"{eps!r} is not a number in [0, 1] (eps is in input units)")
    return tuple(float(e) for e in value)


def _trainer(label: str, raw: Any, defaults: dict[str, Any]) -> TrainerSpec:
    from robustkit.trainers import TRAINERS

    if not isinstance(raw, Mapping):
        raise _fail(f"trainers.{label}", "must be a table")
    name = raw.get("trainer", label)
    if name not in TRAINERS:
        raise _fail(f"trainers.{label}.trainer", f"unknown trainer {name!r}", tuple(TRAINERS))
    option_names = tuple(f.name for f in dataclasses.fields(TRAINERS[name]) if f.init)
    options, training = {}, dict(defaults)
    for key, value in raw.items():
        if key == "trainer":
            continue
        if key in TRAIN_KEYS:
            training[key] = value
        elif key in option_names:
            options[key] = value
        else:
            raise _fail(f"trainers.{label}.{key}", f"unknown option of trainer {name!r}", option_names + TRAIN_KEYS)
    try:
        TRAINERS[name](**options)
    except (InputError, TypeError) as exc:
        raise _fail(f"trainers.{label}", str(exc)) from None
    return TrainerSpec(label=label, name=name, options=options, training=training)


def parse_config(raw: Mapping[str, Any], source: str) -> BenchConfig:
    """Validate a parsed TOML document into a :class:`BenchConfig` (all errors name their key)."""
    from robustkit.data import DATASETS
    from robustkit.models import MODELS
    from robustkit.verifiers import VERIFIERS

    top = ("seed", "grid", "data", "training", "trainers", "evaluation")
    for key in raw:
        if key not in top:
            raise _fail(key, "unknown section", top)
    grid = _section(raw, "grid", ("datasets", "models", "eps", "trainers"))
    data = _section(raw, "data", ("data_dir", "n_train", "n_test", "val_size"))
    training = _section(raw, "training", TRAIN_KEYS)
    evaluation = _section(raw, "evaluation", tuple(f.name for f in dataclasses.fields(EvaluationSettings)))
    trainer_tables = raw.get("trainers", {})
    if not isinstance(trainer_tables, Mapping):
        raise _fail("trainers", "must be a table of trainer tables")
    labels = grid.get("trainers", list(trainer_tables))
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels:
        raise _fail("grid.trainers", "must be a non-empty list of trainer labels")
    from robustkit.trainers import TRAINERS

    specs = []
    for label in labels:
        if label not in trainer_tables and label not in TRAINERS:
            raise _fail("grid.trainers", f"{label!r} is neither a [trainers.{label}] table nor a trainer name",
                        tuple(trainer_tables) + tuple(TRAINERS))
        specs.append(_trainer(label, trainer_tables.get(label, {"trainer": label}), training))
    for spec in specs:
        try:
            TrainConfig(**spec.training)
        except (InputError, TypeError) as exc:
            raise _fail(f"trainers.{spec.label}", str(exc)) from None
    datasets = _names(grid.get("datasets", ["mnist5k"]), "grid.datasets", DATASETS, "dataset")
    models = _names(grid.get("models", ["mnist_small"]), "grid.models", MODELS, "model")
    eps = _eps_list(grid.get("eps", [0.1]), "grid.eps")
    data_dir = data.get("data_dir") or None
    for dataset in datasets:
        if DATASETS[dataset].info.needs_data_dir and data_dir is None:
            raise _fail("data.data_dir", f"dataset {dataset!r} is read from files: set data.data_dir (or --data-dir)")
    for key in ("n_train", "n_test", "val_size"):
        if key in data and (not isinstance(data[key], int) or data[key] < 0):
            raise _fail(f"data.{key}", "must be an integer >= 0")
    settings = dict(evaluation)
    for key in ("verifiers",):
        if key in settings:
            settings[key] = _names(settings[key], f"evaluation.{key}", VERIFIERS, "verifier")
    if settings.get("eps_sweep"):
        settings["eps_sweep"] = _eps_list(settings["eps_sweep"], "evaluation.eps_sweep")
    elif "eps_sweep" in settings:
        settings["eps_sweep"] = ()
    if "exact" in settings:
        settings["exact"] = str(settings["exact"]).lower()
        if settings["exact"] not in EXACT_CHOICES:
            raise _fail("evaluation.exact", f"{settings['exact']!r} is not a choice", EXACT_CHOICES)
    if "interval_attack" in settings:
        from robustkit.attacks import IntervalAttack

        try:
            IntervalAttack(**settings["interval_attack"])
        except (InputError, TypeError) as exc:
            raise _fail("evaluation.interval_attack", str(exc)) from None
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise _fail("seed", "must be an integer")
    return BenchConfig(
        datasets=datasets, models=models, eps=eps, trainers=tuple(specs), data_dir=data_dir,
        n_train=data.get("n_train", 0), n_test=data.get("n_test", 1000), val_size=data.get("val_size", 200),
        seed=seed, evaluation=EvaluationSettings(**settings), source=source,
    )


def load_config(path: str) -> BenchConfig:
    """Read and validate a TOML configuration file."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"bench config file {str(file)!r} does not exist")
    try:
        raw = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"bench config {file} is not valid TOML: {exc}") from None
    return parse_config(raw, source=str(file))


def preset(name: str) -> BenchConfig:
    """A built-in configuration (see :data:`PRESETS`)."""
    from robustkit.bench.presets import PRESETS

    if name not in PRESETS:
        from robustkit.errors import UnknownNameError

        raise UnknownNameError("bench preset", name, PRESETS)
    return parse_config(tomllib.loads(PRESETS[name]), source=f"preset {name}")
