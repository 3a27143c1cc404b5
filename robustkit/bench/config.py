"""Benchmark configuration: a TOML file (or a built-in preset) describing the grid and how to run each cell.

Every key is validated before any training starts; an error names the key (``trainers.pgd.stepz``) and the
valid choices. See ``examples/bench.toml`` for a documented example and :data:`PRESETS` for the built-ins.
``grid.models`` takes zoo names and factories (``"nets.py:build"``, ``"mypkg.nets:build"``); a relative factory
file is read from the TOML file's folder, and the factory's code runs when the bench builds the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustkit.errors import InputError
from robustkit.trainers.base import TrainConfig

# TrainConfig fields a bench config may set (eps, seed, device and the monitoring size come from the grid)
TRAIN_KEYS = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("eps", "seed", "device", "val_size")
)
EXACT_CHOICES = ("auto", "true", "false")
# the complete verifiers evaluation.complete = "auto" considers, strongest first (then any other complete one)
COMPLETE_PREFERENCE = ("bab", "exact")
# evaluation.complete: the strongest applicable complete verifier, a named one, or no complete stage
COMPLETE_CHOICES = ("auto", *COMPLETE_PREFERENCE, "off")
# evaluation.autoattack: AutoAttack's standard version, robustkit's fast one, or no AutoAttack
AUTOATTACK_CHOICES = ("standard", "fast", "off")
# evaluation keys with a lower bound: (key, bound, whether the bound itself is excluded)
EVALUATION_RANGES = (("pgd_steps", 1, False), ("pgd_restarts", 1, False), ("cw_steps", 1, False),
                     ("exact_max_relus", 0, False), ("exact_time_limit", 0, True), ("complete_time_limit", 0, True),
                     ("complete_cell_budget", 0, False), ("sweep_n", 0, False), ("batch_size", 1, False))


def _fail(key: str, message: str, choices: list[str] | tuple[str, ...] = (), near: str | None = None) -> InputError:
    """The error for ``key``; with ``choices``, the valid ones and those close to ``near`` (default: the key's
    last part, for an unknown key; pass the offending value for an unknown name)."""
    hint = ""
    choices = tuple(dict.fromkeys(choices))  # a table named after a trainer is one choice, not two
    if choices:
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1] if near is None else near, list(choices), n=2)
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
    """How every trained model is evaluated on the first ``n_test`` test samples at its training eps.

    ``complete`` names the complete stage's verifier (:data:`COMPLETE_CHOICES`; ``auto``: the strongest one the
    registry has that applies to the model, see :func:`robustkit.bench.complete.choose_complete`), run on the
    samples that no relaxation verified and no attack broke, with at most ``complete_time_limit`` seconds per
    sample and, with ``complete_cell_budget`` > 0, at most that many seconds per cell and eps (the samples not
    reached stay undecided; 0: no cap). ``exact`` is the older MILP stage (``verified_exact``, off by default;
    ``complete = "exact"`` does its work inside the complete stage), kept so that existing configuration files
    keep their meaning.
    """

    pgd_steps: int = 40
    pgd_restarts: int = 5
    cw_steps: int = 40
    interval_attack: dict[str, Any] = field(default_factory=lambda: {"iterations": 2, "restarts": 1})
    autoattack: str = "off"
    verifiers: tuple[str, ...] = ("interval", "symbolic", "crown")
    exact: str = "false"
    exact_max_relus: int = 200
    exact_time_limit: float = 10.0
    complete: str = "auto"
    complete_time_limit: float = 10.0
    complete_cell_budget: float = 0.0
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
    seeds: tuple[int, ...] = (0,)  # every cell is trained and evaluated once per seed
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    source: str = "preset paper"
    model_dir: str | None = None  # the folder relative factory files of ``models`` are read from
    #: cells trained and evaluated at once when ``robustkit bench`` gets no ``--jobs`` (``run.jobs``; None:
    #: auto, see :func:`robustkit.bench.run_bench`); the results do not depend on it
    jobs: int | None = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_KINDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _typed(key: str, value: Any, cls: type) -> None:
    """Check a TOML value against the type that ``cls`` (a dataclass) declares for the field ``key`` names.

    An integer is a number too, ``true``/``false`` are no numbers, numbers are finite; ``X | None`` fields take
    an X (TOML has no null); list and table fields are checked by their own code.
    """
    declared = typing.get_type_hints(cls)[key.rsplit(".", 1)[-1]]
    options = typing.get_args(declared) if isinstance(declared, types.UnionType) else (declared,)
    wanted = next((t for t in options if t in _KINDS), None)
    if wanted is None:
        return
    if wanted is bool:
        fits = isinstance(value, bool)
    elif wanted is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif wanted is float:
        fits = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        fits = isinstance(value, str)
    if not fits:
        raise _fail(key, f"must be {_KINDS[wanted]}, got {value!r}")


def _at_least(key: str, value: Any, low: float, *, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise _fail(key, f"must be {'>' if strict else '>='} {low:g}, got {value!r}")


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
            raise _fail(key, f"unknown {kind} {name!r}", tuple(registry), near=name)
    return tuple(value)


def _models(value: Any, key: str, base: Path | None) -> tuple[str, ...]:
    """Zoo names and factory specs; a factory file is looked up relative to ``base`` (the TOML file's folder)."""
    from robustkit.errors import RobustkitError
    from robustkit.models import MODELS, spec_kind
    from robustkit.models.loading import resolve_spec

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(key, "must be a non-empty list of zoo model names or factories (package.module:function, "
                         "file.py:function)")
    for spec in value:
        if spec in MODELS:
            continue
        resolved = resolve_spec(spec, base)
        try:
            kind = spec_kind(resolved)
        except RobustkitError:
            kind = "unknown"
        target = resolved.rsplit(":", 1)[0]
        if kind != "factory" or (target.endswith(".py") and not Path(target).expanduser().is_file()):
            where = f" (relative files are read from {base})" if base is not None and ".py:" in spec else ""
            raise _fail(key, f"unknown model {spec!r} (neither a zoo name nor a factory package.module:function "
                             f"or file.py:function whose file exists{where})", tuple(MODELS), near=spec)
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
    if not isinstance(name, str) or name not in TRAINERS:
        raise _fail(f"trainers.{label}.trainer", f"unknown trainer {name!r}", tuple(TRAINERS), near=str(name))
    option_names = tuple(f.name for f in dataclasses.fields(TRAINERS[name]) if f.init)
    options, training = {}, dict(defaults)
    for key, value in raw.items():
        if key == "trainer":
            continue
        if key in TRAIN_KEYS:
            _typed(f"trainers.{label}.{key}", value, TrainConfig)
            training[key] = value
        elif key in option_names:
            _typed(f"trainers.{label}.{key}", value, TRAINERS[name])
            options[key] = value
        else:
            raise _fail(f"trainers.{label}.{key}", f"unknown option of trainer {name!r}", option_names + TRAIN_KEYS)
    try:
        TRAINERS[name](**options)
    except (InputError, TypeError) as exc:
        raise _fail(f"trainers.{label}", str(exc)) from None
    return TrainerSpec(label=label, name=name, options=options, training=training)


def _seeds(raw: Mapping[str, Any]) -> tuple[int, ...]:
    """``seed = S`` (one seed, the default 0) or ``seeds = [S, ...]`` (every cell once per seed), not both."""
    if "seed" in raw and "seeds" in raw:
        raise _fail("seeds", "give either seed (one) or seeds (a list), not both")
    if "seeds" not in raw:
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _fail("seed", "must be an integer")
        return (seed,)
    return check_seeds(raw["seeds"], "seeds")


def _complete(name: str) -> None:
    """``evaluation.complete``: one of :data:`COMPLETE_CHOICES`, and a named verifier must be registered as complete
    (``bab`` is only there once robustkit has it)."""
    from robustkit.verifiers import VERIFIERS

    key = "evaluation.complete"
    if name not in COMPLETE_CHOICES:
        raise _fail(key, f"{name!r} is not a choice (a complete verifier, auto for the strongest that applies, or "
                    "off)", COMPLETE_CHOICES, near=name)
    if name in ("auto", "off"):
        return
    if name not in VERIFIERS or not VERIFIERS[name].complete:
        registered = [n for n in VERIFIERS if VERIFIERS[n].complete]
        raise _fail(key, f"{name!r} is not a complete verifier of this robustkit (complete verifiers: "
                    f"{', '.join(registered) or 'none'}); use auto or one of them")


def check_seeds(value: Any, key: str) -> tuple[int, ...]:
    """A non-empty list of distinct integers, as a tuple; an error naming ``key`` otherwise."""
    if (not isinstance(value, list | tuple) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _fail(key, f"must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(key, f"lists a seed twice: {value!r}")
    return tuple(value)


def parse_config(raw: Mapping[str, Any], source: str, base: Path | None = None) -> BenchConfig:
    """Validate a parsed TOML document into a :class:`BenchConfig` (all errors name their key); factory files in
    ``grid.models`` are read relative to ``base`` (the TOML file's folder; the working directory without it)."""
    from robustkit.data import DATASETS
    from robustkit.verifiers import VERIFIERS

    top = ("seed", "seeds", "grid", "data", "training", "trainers", "evaluation", "run")
    for key in raw:
        if key not in top:
            raise _fail(key, "unknown section", top)
    grid = _section(raw, "grid", ("datasets", "models", "eps", "trainers"))
    data = _section(raw, "data", ("data_dir", "n_train", "n_test", "val_size"))
    training = _section(raw, "training", TRAIN_KEYS)
    for key, value in training.items():
        _typed(f"training.{key}", value, TrainConfig)
    evaluation = _section(raw, "evaluation", tuple(f.name for f in dataclasses.fields(EvaluationSettings)))
    for key, value in evaluation.items():
        if key != "exact":  # exact takes true and false as well as "auto", "true" and "false"
            _typed(f"evaluation.{key}", value, EvaluationSettings)
    for key, low, strict in EVALUATION_RANGES:
        if key in evaluation:
            _at_least(f"evaluation.{key}", evaluation[key], low, strict=strict)
    trainer_tables = raw.get("trainers", {})
    if not isinstance(trainer_tables, Mapping):
        raise _fail("trainers", "must be a table of trainer tables")
    labels = grid.get("trainers", list(trainer_tables))
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise _fail("grid.trainers", f"must be a non-empty list of trainer labels, got {labels!r}")
    from robustkit.trainers import TRAINERS

    specs = []
    for label in labels:
        if label not in trainer_tables and label not in TRAINERS:
            raise _fail("grid.trainers", f"{label!r} is neither a [trainers.{label}] table nor a trainer name",
                        tuple(trainer_tables) + tuple(TRAINERS), near=label)
        specs.append(_trainer(label, trainer_tables.get(label, {"trainer": label}), training))
    for spec in specs:
        try:
            TrainConfig(**spec.training)
        except (InputError, TypeError) as exc:
            raise _fail(f"trainers.{spec.label}", str(exc)) from None
    datasets = _names(grid.get("datasets", ["mnist5k"]), "grid.datasets", DATASETS, "dataset")
    models = _models(grid.get("models", ["mnist_small"]), "grid.models", base)
    eps = _eps_list(grid.get("eps", [0.1]), "grid.eps")
    if "data_dir" in data:
        _typed("data.data_dir", data["data_dir"], BenchConfig)
    data_dir = data.get("data_dir") or None
    for dataset in datasets:
        if DATASETS[dataset].info.needs_data_dir and data_dir is None:
            raise _fail("data.data_dir", f"dataset {dataset!r} is read from files: set data.data_dir (or --data-dir)")
    for key in ("n_train", "n_test", "val_size"):
        if key in data:
            _typed(f"data.{key}", data[key], BenchConfig)
            _at_least(f"data.{key}", data[key], 0)
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
            raise _fail("evaluation.exact", f"{settings['exact']!r} is not a choice", EXACT_CHOICES,
                        near=settings["exact"])
    if "complete" in settings:
        _complete(settings["complete"])
    if "autoattack" in settings and settings["autoattack"] not in AUTOATTACK_CHOICES:
        raise _fail("evaluation.autoattack", f"{settings['autoattack']!r} is not a choice (the AutoAttack version, or "
                    "off)", AUTOATTACK_CHOICES, near=settings["autoattack"])
    if "interval_attack" in settings:
        from robustkit.attacks import IntervalAttack

        attack_options = settings["interval_attack"]
        if not isinstance(attack_options, Mapping):
            raise _fail("evaluation.interval_attack", f"must be a table of IntervalAttack options, got "
                        f"{attack_options!r}")
        allowed = tuple(f.name for f in dataclasses.fields(IntervalAttack) if f.init)
        for key, value in attack_options.items():
            if key not in allowed:
                raise _fail(f"evaluation.interval_attack.{key}", "unknown option", allowed)
            _typed(f"evaluation.interval_attack.{key}", value, IntervalAttack)
        try:
            IntervalAttack(**settings["interval_attack"])
        except (InputError, TypeError) as exc:
            raise _fail("evaluation.interval_attack", str(exc)) from None
    seeds = _seeds(raw)
    jobs = _section(raw, "run", ("jobs",)).get("jobs", 1)
    if jobs == "auto":
        jobs = None
    elif isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise _fail("run.jobs", f"must be a whole number >= 1 or \"auto\", got {jobs!r}")
    return BenchConfig(
        datasets=datasets, models=models, eps=eps, trainers=tuple(specs), data_dir=data_dir,
        n_train=data.get("n_train", 0), n_test=data.get("n_test", 1000), val_size=data.get("val_size", 200),
        seeds=seeds, evaluation=EvaluationSettings(**settings), source=source,
        model_dir=None if base is None else str(base), jobs=jobs,
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
    return parse_config(raw, source=str(file), base=file.resolve().parent)


def preset(name: str) -> BenchConfig:
    """A built-in configuration (see :data:`PRESETS`)."""
    from robustkit.bench.presets import PRESETS

    if name not in PRESETS:
        from robustkit.errors import UnknownNameError

        raise UnknownNameError("bench preset", name, PRESETS)
    return parse_config(tomllib.loads(PRESETS[name]), source=f"preset {name}")
