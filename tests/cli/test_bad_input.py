"""Bad input, tried as a new user would, over every command: each invocation exits with code 2 and one line that
names the offending value, without a traceback, before anything long runs.

Arguments may name files of the ``world`` fixture as ``{name}`` (damaged checkpoints, model factories, bench
configurations, run folders with damaged CSV files, paths that cannot be created even by root).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from robustkit.cli import main
from robustkit.models import build_model
from tests.helpers import one_line_error
from tests.reports.runs import make_run

pytestmark = pytest.mark.usefixtures("single_thread", "mnist5k_read_once")


@pytest.fixture(scope="module")
def mnist5k_read_once() -> Iterator[None]:
    """Read the embedded mnist5k once for the module (each command would parse its CSV again: ~0.3 s a case)."""
    import robustkit.bench.runner
    import robustkit.data

    read = robustkit.data.load_dataset
    embedded = read("mnist5k")

    def load_dataset(name: str, data_dir: Any = None) -> Any:
        return embedded if name == "mnist5k" and data_dir is None else read(name, data_dir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(robustkit.data, "load_dataset", load_dataset)
        patch.setattr(robustkit.bench.runner, "load_dataset", load_dataset)
        yield

NETS = '''
import torch
from torch import nn


def sigmoid():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Sigmoid(), nn.Linear(32, 10))


def three_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))


def colour_input():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def not_a_module():
    return 42


def raises():
    raise ValueError("no weights here")


def always_nan():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        net[1].bias.fill_(float("nan"))
    return net


def overflow():
    hidden, out = nn.Linear(784, 2), nn.Linear(2, 10)
    with torch.no_grad():
        for layer in (hidden, out):
            layer.weight.zero_()
            layer.bias.zero_()
        hidden.weight[:, [14 * 28 + 14, 13 * 28 + 14]] = 3e38
        out.weight[:, 0], out.weight[:, 1] = 1.0, -1.0
    return nn.Sequential(nn.Flatten(), hidden, out)
'''

# a valid quick bench configuration; each bench case changes one thing in it
BASE: dict[str, Any] = {
    "seed": 0,
    "grid": {"models": ["mnist_fc_small"], "trainers": ["standard", "fast-pgd"], "eps": [0.1]},
    "data": {"n_train": 100, "n_test": 20, "val_size": 0},
    "training": {"epochs": 1, "batch_size": 50},
    "trainers": {"fast-pgd": {"trainer": "pgd", "steps": 2}},
    "evaluation": {"pgd_steps": 2, "pgd_restarts": 1, "cw_steps": 2, "verifiers": ["interval"], "exact": "false",
                   "eps_sweep": [], "interval_attack": {"iterations": 1}},
}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"


def to_toml(document: dict[str, Any]) -> str:
    """TOML text of a document whose tables are one or two levels deep (enough for bench configurations)."""
    lines = [f"{k} = {_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    for name, table in document.items():
        if not isinstance(table, dict):
            continue
        nested = {k: v for k, v in table.items() if isinstance(v, dict) and name == "trainers"}
        lines += [f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in table.items() if k not in nested]
        for label, options in nested.items():
            lines += [f"[{name}.{json.dumps(label)}]"] + [f"{k} = {_value(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def changed(section: str, key: str | None, value: Any) -> str:
    """The base configuration with ``section.key`` set to ``value`` (the whole section when key is None)."""
    document = json.loads(json.dumps(BASE))
    if key is None:
        document[section] = value
    else:
        document.setdefault(section, {})[key] = value
    return to_toml(document)


def without(section: str, key: str) -> dict[str, Any]:
    document = json.loads(json.dumps(BASE))
    del document[section][key]
    return document


BENCH_CONFIGS: dict[str, tuple[str, list[str]]] = {  # name -> (TOML text, fragments of the error line)
    "unknown_section": (to_toml({**BASE, "gird": {"models": ["mnist_fc"]}}), ["gird: unknown section", "'grid'"]),
    "unknown_grid_key": (changed("grid", "model", ["mnist_fc"]), ["grid.model: unknown key", "'models'"]),
    "grid_not_table": (changed("grid", None, 3), ["grid: must be a table"]),
    "seed_word": (changed("seed", None, "zero"), ["seed: must be an integer"]),
    "models_number": (changed("grid", "models", 3), ["grid.models", "model names"]),
    "models_unknown": (changed("grid", "models", ["mnist_smal"]), ["grid.models: unknown model 'mnist_smal'",
                                                                   "'mnist_small'"]),
    "datasets_unknown": (changed("grid", "datasets", ["mnist6k"]), ["grid.datasets: unknown dataset 'mnist6k'"]),
    "datasets_empty": (changed("grid", "datasets", []), ["grid.datasets", "non-empty list"]),
    "eps_word": (changed("grid", "eps", ["0.1"]), ["grid.eps", "'0.1' is not a number in [0, 1]"]),
    "eps_above_one": (changed("grid", "eps", [1.5]), ["grid.eps", "1.5 is not a number in [0, 1]"]),
    "eps_negative": (changed("grid", "eps", [-0.1]), ["grid.eps", "-0.1 is not"]),
    "eps_infinite": (changed("grid", "eps", [float("inf")]), ["grid.eps", "inf is not"]),
    "eps_empty": (changed("grid", "eps", []), ["grid.eps", "non-empty list"]),
    "trainers_unknown": (changed("grid", "trainers", ["stadard"]), ["grid.trainers: 'stadard' is neither",
                                                                    "'standard'"]),
    "trainers_empty": (changed("grid", "trainers", []), ["grid.trainers", "non-empty list", "[]"]),
    "trainers_number": (changed("grid", "trainers", 5), ["grid.trainers", "got 5"]),
    "trainers_nested_list": (changed("grid", "trainers", [["standard"]]), ["grid.trainers", "[['standard']]"]),
    "trainer_name_unknown": (changed("trainers", "fast-pgd", {"trainer": "pgdd"}),
                             ["trainers.fast-pgd.trainer: unknown trainer 'pgdd'", "'pgd'"]),
    "trainer_name_list": (changed("trainers", "fast-pgd", {"trainer": ["pgd"]}),
                          ["trainers.fast-pgd.trainer: unknown trainer ['pgd']"]),
    "trainer_option_unknown": (changed("trainers", "fast-pgd", {"trainer": "pgd", "stepz": 2}),
                               ["trainers.fast-pgd.stepz: unknown option of trainer 'pgd'", "'steps'"]),
    "trainer_option_word": (changed("trainers", "fast-pgd", {"trainer": "pgd", "steps": "many"}),
                            ["trainers.fast-pgd.steps: must be an integer, got 'many'"]),
    "trainer_option_fraction": (changed("trainers", "fast-pgd", {"trainer": "pgd", "steps": 2.5}),
                                ["trainers.fast-pgd.steps: must be an integer, got 2.5"]),
    "trainer_option_bool": (changed("trainers", "fast-pgd", {"trainer": "pgd", "random_start": "yes"}),
                            ["trainers.fast-pgd.random_start: must be true or false, got 'yes'"]),
    "trainer_option_zero": (changed("trainers", "fast-pgd", {"trainer": "pgd", "steps": 0}),
                            ["trainers.fast-pgd", "steps >= 1"]),
    "mixtrain_k_zero": (changed("trainers", "fast-pgd", {"trainer": "mixtrain", "k": 0}),
                        ["trainers.fast-pgd", "k must be >= 1, got 0"]),
    "verifiable_method": (changed("trainers", "fast-pgd", {"trainer": "verifiable", "method": "exact"}),
                          ["trainers.fast-pgd", "'exact'"]),
    "kappa_range": (changed("trainers", "fast-pgd", {"trainer": "verifiable", "kappa_start": 2.0}),
                    ["trainers.fast-pgd", "kappa must be in [0, 1]"]),
    "trainers_not_table": (to_toml({**without("trainers", "fast-pgd"), "trainers": 3}), ["trainers: must be a table"]),
    "training_unknown": (changed("training", "learning_rate", 0.1), ["training.learning_rate: unknown key",
                                                                     "Valid: epochs, batch_size, lr,"]),
    "training_lr_word": (changed("training", "lr", "fast"), ["training.lr: must be a finite number, got 'fast'"]),
    "training_lr_negative": (changed("training", "lr", -1.0), ["learning rate must be a finite positive number",
                                                               "got -1.0"]),
    "training_lr_infinite": (changed("training", "lr", float("inf")), ["training.lr: must be a finite number",
                                                                       "got inf"]),
    "training_epochs_zero": (changed("training", "epochs", 0), ["epochs and batch size must be >= 1"]),
    "training_epochs_fraction": (changed("training", "epochs", 1.5), ["training.epochs: must be an integer",
                                                                      "1.5"]),
    "training_epochs_bool": (changed("training", "epochs", True), ["training.epochs: must be an integer",
                                                                   "True"]),
    "training_batch_word": (changed("training", "batch_size", "50"), ["training.batch_size", "'50'"]),
    "training_optimizer": (changed("training", "optimizer", "adamw"), ["optimizer must be adam or sgd",
                                                                       "'adamw'"]),
    "training_schedule": (changed("training", "lr_schedule", "linear"), ["lr schedule", "'linear'"]),
    "training_ramp": (changed("training", "ramp", "cubic"), ["eps ramp", "'cubic'"]),
    "training_momentum": (changed("training", "momentum", -0.5), ["momentum and weight_decay must be >= 0",
                                                                  "-0.5"]),
    "training_grad_clip": (changed("training", "grad_clip", 0), ["grad_clip must be > 0", "got 0"]),
    "training_eps_factor": (changed("training", "eps_factor", 20.0), ["eps must be in [0, 1]", "factor=20.0"]),
    "data_unknown": (changed("data", "ntrain", 5), ["data.ntrain: unknown key", "'n_train'"]),
    "data_negative": (changed("data", "n_train", -5), ["data.n_train: must be >= 0, got -5"]),
    "data_word": (changed("data", "n_test", "all"), ["data.n_test: must be an integer, got 'all'"]),
    "data_dir_number": (changed("data", "data_dir", 5), ["data.data_dir: must be a string, got 5"]),
    "data_dir_needed": (changed("grid", "datasets", ["mnist"]), ["data.data_dir", "'mnist'"]),
    "data_n_train_too_many": (changed("data", "n_train", 100000), ["data.n_train 100000",
                                                                   "mnist5k training split has 4000"]),
    "data_n_test_too_many": (changed("data", "n_test", 5000), ["data.n_test 5000", "mnist5k test split has 1000"]),
    "data_val_size_too_many": (changed("data", "val_size", 1001), ["data.val_size 1001", "has 1000"]),
    "eval_unknown": (changed("evaluation", "pgd_step", 3), ["evaluation.pgd_step: unknown key", "'pgd_steps'"]),
    "eval_steps_word": (changed("evaluation", "pgd_steps", "ten"), ["evaluation.pgd_steps: must be an integer",
                                                                    "'ten'"]),
    "eval_steps_zero": (changed("evaluation", "pgd_steps", 0), ["evaluation.pgd_steps: must be >= 1, got 0"]),
    "eval_restarts_negative": (changed("evaluation", "pgd_restarts", -1), ["evaluation.pgd_restarts", "-1"]),
    "eval_cw_fraction": (changed("evaluation", "cw_steps", 1.5), ["evaluation.cw_steps: must be an integer",
                                                                  "1.5"]),
    "eval_verifiers_unknown": (changed("evaluation", "verifiers", ["crwn"]), ["evaluation.verifiers",
                                                                             "unknown verifier 'crwn'", "'crown'"]),
    "eval_verifiers_empty": (changed("evaluation", "verifiers", []), ["evaluation.verifiers", "non-empty"]),
    "eval_exact_choice": (changed("evaluation", "exact", "maybe"), ["evaluation.exact: 'maybe' is not a choice"]),
    "eval_exact_relus": (changed("evaluation", "exact_max_relus", -3), ["evaluation.exact_max_relus", "-3"]),
    "eval_exact_time_zero": (changed("evaluation", "exact_time_limit", 0), ["evaluation.exact_time_limit",
                                                                            "must be > 0, got 0"]),
    "eval_exact_time_word": (changed("evaluation", "exact_time_limit", "10s"), ["evaluation.exact_time_limit",
                                                                                "'10s'"]),
    "eval_sweep_range": (changed("evaluation", "eps_sweep", [2.0]), ["evaluation.eps_sweep", "2.0 is not"]),
    "eval_sweep_word": (changed("evaluation", "eps_sweep", "0.1"), ["evaluation.eps_sweep", "numbers"]),
    "eval_sweep_n_negative": (changed("evaluation", "sweep_n", -1), ["evaluation.sweep_n: must be >= 0, got -1"]),
    "eval_sweep_n_too_many": (to_toml({**BASE, "evaluation": {**BASE["evaluation"], "eps_sweep": [0.05],
                                                               "sweep_n": 50}}),
                              ["evaluation.sweep_n 50", "the mnist5k evaluated test samples has 20"]),
    "eval_batch_zero": (changed("evaluation", "batch_size", 0), ["evaluation.batch_size: must be >= 1, got 0"]),
    "eval_interval_unknown": (changed("evaluation", "interval_attack", {"foo": 1}),
                              ["evaluation.interval_attack.foo: unknown option"]),
    "eval_interval_number": (changed("evaluation", "interval_attack", 3), ["evaluation.interval_attack",
                                                                           "got 3"]),
    "eval_interval_word": (changed("evaluation", "interval_attack", {"restarts": "two"}),
                           ["evaluation.interval_attack.restarts: must be an integer, got 'two'"]),
    "eval_interval_range": (changed("evaluation", "interval_attack", {"restarts": 0}),
                            ["evaluation.interval_attack", "restarts >= 1"]),
    "not_toml": ("this is = = not toml\n", ["is not valid TOML"]),
    "duplicate_key": ("seed = 1\nseed = 2\n", ["is not valid TOML"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every file and folder the cases name."""
    root = tmp_path_factory.mktemp("world")
    paths: dict[str, Path] = {}

    def path(name: str) -> Path:
        paths[name] = root / name
        return paths[name]

    path("a_file").write_text("not a folder\n")
    paths["under_a_file"] = root / "a_file" / "sub"  # cannot be created, not even by root
    path("empty_dir").mkdir()
    path("nets.py").write_text(NETS)
    fc_small = build_model("mnist_fc_small").state_dict()
    path("garbage.pt").write_bytes(os.urandom(400))
    torch.save(fc_small, path("truncated.pt"))
    paths["truncated.pt"].write_bytes(paths["truncated.pt"].read_bytes()[:500])
    torch.save({k: v.round().long() for k, v in fc_small.items()}, path("ints.pt"))
    torch.save({k: v.clone().fill_(float("nan")) for k, v in fc_small.items()}, path("nan.pt"))
    torch.save(build_model("mnist_small").state_dict(), path("other_net.pt"))
    torch.save({"epoch": 3, "lr": 0.1}, path("notes.pt"))
    path("unsafe.pt").write_bytes(pickle.dumps(os.system))  # refers to os.system; writing it runs nothing
    torch.jit.save(torch.jit.script(build_model("mnist_fc_small")), path("net.ts"))
    for name, (text, _) in BENCH_CONFIGS.items():
        path(f"{name}.toml").write_text(text)
    path("valid.toml").write_text(to_toml(BASE))
    path("toml_dir.toml").mkdir()
    (path("nonempty") / "notes.txt").parent.mkdir()
    (paths["nonempty"] / "notes.txt").write_text("mine\n")
    path("damaged_bench").mkdir()
    (paths["damaged_bench"] / "config.json").write_text("{not json")
    path("other_bench").mkdir()
    (paths["other_bench"] / "config.json").write_text(json.dumps({"config": {"seed": 99}}))
    path("damaged_train").mkdir()
    (paths["damaged_train"] / "checkpoint.pt").write_bytes(os.urandom(300))
    path("unreadable_config_train").mkdir()
    torch.save({"format": "robustkit-train-checkpoint/1"}, paths["unreadable_config_train"] / "checkpoint.pt")
    (paths["unreadable_config_train"] / "config.json").write_text("{{{")
    path("finished_train").mkdir()
    torch.save({}, paths["finished_train"] / "checkpoint.pt")
    path("not_a_run").mkdir()
    (paths["not_a_run"] / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    make_run(path("run"))
    for name, edit in {
        "binary_results": lambda run: (run / "results.csv").write_bytes(b"\x00\xff\xfe garbage"),
        "empty_results": lambda run: (run / "results.csv").write_text(""),
        "no_metric_column": lambda run: (run / "results.csv").write_text(
            (run / "results.csv").read_text().replace(",metric,", ",measure,", 1)),
        "word_in_value": lambda run: (run / "results.csv").write_text(
            (run / "results.csv").read_text().replace(",0.989,", ",lots,", 1)),
        "accuracy_above_one": lambda run: (run / "results.csv").write_text(
            (run / "results.csv").read_text().replace(",0.989,", ",1.989,", 1)),
        "no_epochs": lambda run: (run / "epochs.csv").unlink(),
        "epochs_without_loss": lambda run: (run / "epochs.csv").write_text(
            (run / "epochs.csv").read_text().replace(",loss,", ",lost,", 1)),
    }.items():
        edit(make_run(path(name)))
    return {name: str(p) for name, p in paths.items()}


VERIFY = ["verify", "--model", "mnist_fc_small", "--eps", "0.1", "--method", "interval", "--n-examples", "4"]
ATTACK = ["attack", "--model", "mnist_fc_small", "--eps", "0.1", "--attack", "pgd", "--n-examples", "4"]
TRAIN = ["train", "--trainer", "standard", "--model", "mnist_fc_small", "--eps", "0.1", "--n-train", "80",
         "--val-size", "10", "--epochs", "1"]


def _with(base: list[str], *changes: str) -> list[str]:
    """``base`` with each ``--option value`` of ``changes`` replacing the base's value (or added)."""
    args = list(base)
    pairs = list(changes)
    while pairs:
        option = pairs.pop(0)
        value = pairs.pop(0) if pairs and not pairs[0].startswith("--") else None
        if option in args:
            position = args.index(option)
            if value is None:
                del args[position : position + 2]
            else:
                args[position + 1] = value
        else:
            args += [option] if value is None else [option, value]
    return args


def case(case_id: str, args: list[str], *fragments: str) -> Any:
    return pytest.param(args, fragments, id=case_id)


COMMON_MODEL_CASES = [  # (id, changes, fragments): every command that takes --model
    ("unknown-zoo-name", ["--model", "mnist_smal"], ["unknown model 'mnist_smal'", "'mnist_small'"]),
    ("missing-onnx-file", ["--model", "nope.onnx"], ["'nope.onnx' does not exist"]),
    ("missing-file-in-folder", ["--model", "dir/missing.pt"], ["'dir/missing.pt' does not exist"]),
    ("weights-as-model", ["--model", "{truncated.pt}"], ["is a weights checkpoint, not a model"]),
    ("factory-module-missing", ["--model", "nosuchpkg.mod:build"], ["cannot import 'nosuchpkg.mod'"]),
    ("factory-function-missing", ["--model", "{nets.py}:missing"], ["has no callable 'missing'"]),
    ("factory-raises", ["--model", "{nets.py}:raises"], ["raises' raised ValueError: no weights here"]),
    ("factory-not-module", ["--model", "{nets.py}:not_a_module"], ["returned a int, not a torch.nn.Module"]),
    ("factory-three-classes", ["--model", "{nets.py}:three_classes"], ["returns 3 logits", "10 classes"]),
    ("factory-colour-input", ["--model", "{nets.py}:colour_input"], ["does not take mnist5k's 1x28x28 inputs"]),
    ("factory-nan-everywhere", ["--model", "{nets.py}:always_nan"], ["NaN or infinite logits"]),
    ("factory-nan-on-data", ["--model", "{nets.py}:overflow"], ["NaN or infinite logits on",
                                                               "of the mnist5k test split"]),
    ("zoo-net-of-other-shape", ["--model", "toy2d"], ["does not take mnist5k's 1x28x28 inputs"]),
    ("checkpoint-missing", ["--checkpoint", "missing.pt"], ["'missing.pt' does not exist"]),
    ("checkpoint-garbage", ["--checkpoint", "{garbage.pt}"], ["garbage.pt: the file is damaged"]),
    ("checkpoint-truncated", ["--checkpoint", "{truncated.pt}"], ["truncated.pt: the file is damaged"]),
    ("checkpoint-integers", ["--checkpoint", "{ints.pt}"], ["ints.pt holds non-floating-point tensors",
                                                           "1.weight (int64)"]),
    ("checkpoint-nan", ["--checkpoint", "{nan.pt}"], ["nan.pt holds NaN or infinite values", "1.weight"]),
    ("checkpoint-other-net", ["--checkpoint", "{other_net.pt}"], ["other_net.pt does not fit the model"]),
    ("checkpoint-not-weights", ["--checkpoint", "{notes.pt}"], ["notes.pt holds a dict with keys ['epoch', 'lr']"]),
    ("checkpoint-unsafe", ["--checkpoint", "{unsafe.pt}"], ["refused to load", "unsafe.pt", "system"]),
    ("checkpoint-for-torchscript", ["--model", "{net.ts}", "--checkpoint", "{ints.pt}"],
     ["--checkpoint applies to zoo names and factories"]),
    ("mean-word", ["--mean", "0.5,x", "--std", "0.2"], ["--mean", "'x' is not a number"]),
    ("mean-without-std", ["--mean", "0.5"], ["--mean and --std must be given together"]),
    ("std-zero", ["--mean", "0.5", "--std", "0"], ["std must be positive, got [0.0]"]),
    ("std-infinite", ["--mean", "0.5", "--std", "inf"], ["--std", "'inf' is not a finite number"]),
    ("unknown-dataset", ["--dataset", "mnist6k"], ["'mnist6k' is not one of"]),
    ("dataset-needs-folder", ["--dataset", "cifar10"], ["--data-dir"]),
    ("data-dir-missing", ["--dataset", "mnist", "--data-dir", "nowhere"], ["'nowhere' does not exist"]),
    ("data-dir-is-file", ["--dataset", "mnist", "--data-dir", "{a_file}"], ["a_file' is a file"]),
    ("data-dir-without-files", ["--dataset", "mnist", "--data-dir", "{empty_dir}"], ["empty_dir"]),
    ("too-many-samples", ["--n-examples", "2000"], ["--n-examples 2000", "test split has 1000"]),
    ("zero-samples", ["--n-examples", "0"], ["--n-examples", "0 is not in the range"]),
    ("samples-word", ["--n-examples", "all"], ["--n-examples", "'all'"]),
    ("start-negative", ["--start", "-1"], ["--start", "-1"]),
    ("start-past-the-end", ["--start", "1000"], ["--start 1000 is out of range"]),
    ("range-past-the-end", ["--start", "998"], ["--start 998 --n-examples 4", "up to index 1001"]),
    ("batch-zero", ["--batch-size", "0"], ["--batch-size", "0 is not in the range"]),
    ("eps-word", ["--eps", "abc"], ["--eps", "'abc' is not a number"]),
    ("eps-above-one", ["--eps", "1.5"], ["--eps", "got 1.5"]),
    ("eps-negative", ["--eps", "-0.1"], ["--eps", "got -0.1"]),
    ("eps-infinite", ["--eps", "inf"], ["--eps", "'inf' is not a finite number"]),
    ("eps-nan", ["--eps", "nan"], ["--eps", "'nan' is not a finite number"]),
    ("eps-division-by-zero", ["--eps", "1/0"], ["--eps", "'1/0' is not a number"]),
    ("eps-empty-item", ["--eps", "0.1,,0.2"], ["--eps", "empty value in '0.1,,0.2'"]),
    ("out-is-file", ["--out", "{a_file}"], ["--out", "a_file' is a file"]),
    ("out-under-file", ["--out", "{under_a_file}"], ["cannot create the output folder", "a_file/sub"]),
]

VERIFY_CASES = [
    case(f"verify-{case_id}", _with(VERIFY, *changes), *fragments) for case_id, changes, fragments in COMMON_MODEL_CASES
] + [
    case("verify-unknown-method", _with(VERIFY, "--method", "interval,crwn"), "unknown verifier 'crwn'", "'crown'"),
    case("verify-empty-method", _with(VERIFY, "--method", ""), "--method", "got ''"),
    case("verify-empty-method-item", _with(VERIFY, "--method", "interval,,crown"), "'interval,,crown'"),
    case("verify-timeout-zero", _with(VERIFY, "--timeout", "0"), "--timeout", "0"),
    case("verify-timeout-infinite", _with(VERIFY, "--timeout", "inf"), "--timeout", "'inf' is not a finite"),
    case("verify-timeout-word", _with(VERIFY, "--timeout", "long"), "--timeout", "'long'"),
    case("verify-extra-argument", [*VERIFY, "extra"], "unexpected extra argument (extra)"),
    case("verify-unknown-option", [*VERIFY, "--attack", "pgd"], "No such option '--attack'"),
]

ATTACK_CASES = [
    case(f"attack-{case_id}", _with(ATTACK, *changes), *fragments)
    for case_id, changes, fragments in COMMON_MODEL_CASES
    if case_id not in {"checkpoint-unsafe", "mean-without-std", "start-negative", "eps-nan", "batch-zero",
                       "dataset-needs-folder", "data-dir-without-files", "factory-module-missing"}
] + [
    case("attack-unknown", _with(ATTACK, "--attack", "pgd,cw-lnf"), "unknown attack 'cw-lnf'", "'cw-linf'"),
    case("attack-worst-case", _with(ATTACK, "--attack", "worst-case"), "the per-sample worst case"),
    case("attack-foolbox-unknown", _with(ATTACK, "--attack", "foolbox:LinfDeepFool"), "LinfDeepFool"),
    case("attack-foolbox-l2", _with(ATTACK, "--attack", "foolbox:L2PGD"), "foolbox:L2PGD attacks in the l2 norm"),
    case("attack-empty", _with(ATTACK, "--attack", ""), "--attack", "got ''"),
    case("attack-empty-item", _with(ATTACK, "--attack", "pgd,,cw-linf"), "'pgd,,cw-linf'"),
    case("attack-steps-zero", _with(ATTACK, "--steps", "0"), "--steps", "0 is not in the range"),
    case("attack-steps-word", _with(ATTACK, "--steps", "ten"), "--steps", "'ten'"),
    case("attack-restarts-negative", _with(ATTACK, "--restarts", "-2"), "--restarts", "-2"),
    case("attack-save-adv-value", _with(ATTACK, "--save-adv=yes"), "--save-adv", "does not take a value"),
    case("attack-restarts-word", _with(ATTACK, "--restarts", "few"), "--restarts", "'few'"),
]

TRAIN_CASES = [
    case("train-unknown-trainer", _with(TRAIN, "--trainer", "sgd"), "'sgd' is not one of"),
    case("train-unknown-model", _with(TRAIN, "--model", "mnist_smal"), "unknown model 'mnist_smal'",
         "Did you mean 'mnist_small'"),
    case("train-model-of-other-shape", _with(TRAIN, "--model", "toy2d"), "toy2d does not take mnist5k's 1x28x28 "
         "inputs: it takes 1x1x2 inputs"),
    case("train-unknown-dataset", _with(TRAIN, "--dataset", "mnist6k"), "'mnist6k' is not one of"),
    case("train-dataset-needs-folder", _with(TRAIN, "--dataset", "mnist"), "--data-dir"),
    case("train-data-dir-is-file", _with(TRAIN, "--dataset", "mnist", "--data-dir", "{a_file}"), "is a file"),
    case("train-eps-above-one", _with(TRAIN, "--eps", "1.5"), "--eps", "got 1.5"),
    case("train-two-eps", _with(TRAIN, "--eps", "0.1,0.2"), "give one training radius, got '0.1,0.2'"),
    case("train-eps-word", _with(TRAIN, "--eps", "tiny"), "'tiny' is not a number"),
    case("train-epochs-zero", _with(TRAIN, "--epochs", "0"), "--epochs", "0 is not in the range"),
    case("train-epochs-word", _with(TRAIN, "--epochs", "some"), "--epochs", "'some'"),
    case("train-batch-zero", _with(TRAIN, "--batch-size", "0"), "--batch-size", "0 is not in the range"),
    case("train-lr-zero", _with(TRAIN, "--lr", "0"), "--lr", "0"),
    case("train-lr-negative", _with(TRAIN, "--lr", "-1"), "--lr", "-1"),
    case("train-lr-infinite", _with(TRAIN, "--lr", "inf"), "--lr", "'inf' is not a finite number"),
    case("train-lr-nan", _with(TRAIN, "--lr", "nan"), "--lr", "'nan' is not a finite number"),
    case("train-lr-word", _with(TRAIN, "--lr", "fast"), "--lr", "'fast'"),
    case("train-k-for-standard", _with(TRAIN, "--k", "3"), "--k is not an option of the standard trainer"),
    case("train-k-zero", _with(TRAIN, "--trainer", "mixtrain", "--k", "0"), "--k", "0 is not in the range"),
    case("train-unknown-schedule", _with(TRAIN, "--trainer", "mixtrain", "--schedule", "linear"), "'linear'"),
    case("train-schedule-for-verifiable", _with(TRAIN, "--trainer", "verifiable", "--schedule", "geometric"),
         "--schedule is not an option of the verifiable trainer"),
    case("train-unknown-method", _with(TRAIN, "--trainer", "verifiable", "--method", "exact"), "'exact'"),
    case("train-method-for-pgd", _with(TRAIN, "--trainer", "pgd", "--method", "interval"),
         "--method is not an option of the pgd trainer"),
    case("train-steps-for-mixtrain", _with(TRAIN, "--trainer", "mixtrain", "--steps", "5"),
         "--steps is not an option of the mixtrain trainer"),
    case("train-steps-zero", _with(TRAIN, "--trainer", "pgd", "--steps", "0"), "--steps", "0 is not in the range"),
    case("train-warmup-negative", _with(TRAIN, "--warmup-epochs", "-1"), "--warmup-epochs", "-1"),
    case("train-ramp-word", _with(TRAIN, "--ramp-epochs", "few"), "--ramp-epochs", "'few'"),
    case("train-eps-factor-zero", _with(TRAIN, "--eps-factor", "0"), "--eps-factor", "0"),
    case("train-eps-factor-infinite", _with(TRAIN, "--eps-factor", "inf"), "--eps-factor", "'inf' is not a finite"),
    case("train-eps-beyond-one-after-factor", _with(TRAIN, "--eps", "0.9", "--eps-factor", "2"),
         "eps must be in [0, 1] (also after eps_factor)", "factor=2.0"),
    case("train-val-size-negative", _with(TRAIN, "--val-size", "-1"), "--val-size", "-1"),
    case("train-val-size-too-many", _with(TRAIN, "--val-size", "1001"), "--val-size 1001", "test split has 1000"),
    case("train-n-train-zero", _with(TRAIN, "--n-train", "0"), "--n-train", "0 is not in the range"),
    case("train-n-train-too-many", _with(TRAIN, "--n-train", "100000"), "--n-train 100000",
         "training split has 4000", "use --n-train 4000 or less"),
    case("train-resume-without-out", _with(TRAIN, "--resume"), "--resume needs --out DIR"),
    case("train-resume-empty-folder", _with(TRAIN, "--resume", "--out", "{empty_dir}"),
         "there is no checkpoint.pt in", "empty_dir"),
    case("train-resume-damaged-checkpoint", _with(TRAIN, "--resume", "--out", "{damaged_train}"),
         "damaged_train/checkpoint.pt: the file is damaged"),
    case("train-resume-damaged-config", _with(TRAIN, "--resume", "--out", "{unreadable_config_train}"),
         "unreadable_config_train/config.json is unreadable"),
    case("train-existing-run", _with(TRAIN, "--out", "{finished_train}"), "finished_train",
         "already holds a training run", "--resume"),
    case("train-out-is-file", _with(TRAIN, "--out", "{a_file}"), "--out", "a_file' is a file"),
    case("train-out-under-file", _with(TRAIN, "--out", "{under_a_file}"), "cannot create the output folder",
         "a_file/sub"),
]

BENCH = ["bench", "--config", "{valid.toml}", "--out", "{empty_dir}/fresh"]
BENCH_CASES = [
    case(f"bench-config-{name}", _with(BENCH, "--config", f"{{{name}.toml}}"), *fragments)
    for name, (_, fragments) in BENCH_CONFIGS.items()
] + [
    case("bench-config-missing", _with(BENCH, "--config", "nowhere.toml"), "'nowhere.toml' does not exist"),
    case("bench-config-is-folder", _with(BENCH, "--config", "{toml_dir.toml}"), "--config", "is a directory"),
    case("bench-unknown-preset", ["bench", "--preset", "fast"], "unknown bench preset 'fast'", "paper, quick"),
    case("bench-config-and-preset", _with(BENCH, "--preset", "quick"), "either --config or --preset"),
    case("bench-resume-without-out", ["bench", "--config", "{valid.toml}", "--resume"], "--resume needs"),
    case("bench-resume-not-a-run", _with(BENCH, "--out", "{empty_dir}", "--resume"), "empty_dir holds no bench run"),
    case("bench-resume-damaged-run", _with(BENCH, "--out", "{damaged_bench}", "--resume"),
         "damaged_bench/config.json is damaged"),
    case("bench-resume-other-settings", _with(BENCH, "--out", "{other_bench}", "--resume"),
         "cannot resume", "other_bench", "different settings"),
    case("bench-fresh-into-used-folder", _with(BENCH, "--out", "{nonempty}"), "nonempty is not empty", "--resume"),
    case("bench-out-is-file", _with(BENCH, "--out", "{a_file}"), "--out", "a_file' is a file"),
    case("bench-out-under-file", _with(BENCH, "--out", "{under_a_file}"), "cannot create the output folder",
         "a_file/sub"),
    case("bench-bad-device", _with(BENCH, "--device", "gpu"), "invalid device 'gpu'"),
    case("bench-seed-word", _with(BENCH, "--seed", "seven"), "--seed", "'seven'"),
    case("bench-data-dir-is-file", _with(BENCH, "--data-dir", "{a_file}"), "--data-dir", "a_file' is a file"),
]

REPORT_CASES = [
    case("report-missing-folder", ["report", "nowhere"], "RUN_DIR", "'nowhere' does not exist"),
    case("report-file", ["report", "{a_file}"], "RUN_DIR", "a_file' is a file"),
    case("report-empty-folder", ["report", "{empty_dir}"], "empty_dir", "results.csv does not exist"),
    case("report-not-a-run", ["report", "{not_a_run}"], "not_a_run", "results.csv does not exist"),
    case("report-binary-results", ["report", "{binary_results}"], "binary_results/results.csv is not a UTF-8"),
    case("report-empty-results", ["report", "{empty_results}"], "empty_results/results.csv"),
    case("report-results-without-metric", ["report", "{no_metric_column}"], "no_metric_column/results.csv",
         "metric"),
    case("report-word-in-value", ["report", "{word_in_value}"], "word_in_value/results.csv", "'lots'"),
    case("report-accuracy-above-one", ["report", "{accuracy_above_one}"], "accuracy_above_one/results.csv",
         "1.989"),
    case("report-no-epochs", ["report", "{no_epochs}"], "no_epochs/epochs.csv does not exist"),
    case("report-epochs-without-loss", ["report", "{epochs_without_loss}"], "epochs_without_loss/epochs.csv",
         "loss"),
    case("report-unknown-format", ["report", "{run}", "--format", "md,svg"], "unknown report format 'svg'"),
    case("report-format-when-comparing", ["report", "{run}", "{run}", "--format", "md"],
         "--format applies to rebuilding one run"),
    case("report-compare-with-missing", ["report", "{run}", "nowhere"], "'nowhere' does not exist"),
    case("report-compare-with-damaged", ["report", "{run}", "{binary_results}"], "binary_results/results.csv"),
    case("report-three-folders", ["report", "{run}", "{run}", "{run}"], "unexpected extra argument"),
]

OTHER_CASES = [
    case("root-bad-device", ["--device", "gpu", "models"], "'gpu' is not a device"),
    case("root-bad-cuda-index", ["--device", "cuda:x", "datasets"], "'cuda:x' is not a device"),
    case("root-seed-word", ["--seed", "abc", "models"], "--seed", "'abc'"),
    case("root-seed-fraction", ["--seed", "1.5", "models"], "--seed", "'1.5'"),
    case("root-threads-zero", ["--threads", "0", "datasets"], "--threads", "0 is not in the range"),
    case("root-threads-word", ["--threads", "many", "datasets"], "--threads", "'many'"),
    case("root-unknown-command", ["modles"], "no such command 'modles'", "'models'"),
    case("root-unknown-option", ["--bogus", "models"], "No such option '--bogus'"),
    case("models-unknown-option", ["models", "--nope"], "No such option '--nope'"),
    case("models-extra-argument", ["models", "mnist_small"], "unexpected extra argument (mnist_small)"),
    case("datasets-unknown-option", ["datasets", "--verbose"], "No such option '--verbose'"),
    case("datasets-extra-argument", ["datasets", "mnist"], "unexpected extra argument (mnist)"),
]

CASES = VERIFY_CASES + ATTACK_CASES + TRAIN_CASES + BENCH_CASES + REPORT_CASES + OTHER_CASES


def fill(text: str, world: dict[str, str]) -> str:
    """``text`` with every ``{name}`` replaced by the path of that name in ``world``."""
    return re.sub(r"\{([\w.]+)\}", lambda match: world[match.group(1)], text)


def test_the_suite_holds_at_least_150_distinct_invocations() -> None:
    invocations = {tuple(c.values[0]) for c in CASES}
    assert len(invocations) == len(CASES) >= 150
    commands = {next(a for a in c.values[0] if not a.startswith("-") and a not in {"gpu", "cuda:x", "abc", "1.5",
                                                                                    "0", "many"})
                for c in CASES}
    assert commands >= {"verify", "attack", "train", "bench", "report", "models", "datasets", "modles"}


@pytest.mark.parametrize(("args", "fragments"), CASES)
def test_bad_input_is_one_line_naming_the_value(args: list[str], fragments: tuple[str, ...],
                                                world: dict[str, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["--quiet", *(fill(arg, world) for arg in args)])
    line = one_line_error(result, *(fill(fragment, world) for fragment in fragments))
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written where it ran
