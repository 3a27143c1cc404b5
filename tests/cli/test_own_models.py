"""Bring your own model: ``train``/``bench`` with factory specs, ``verify``/``attack`` on custom TorchScript,
torch.export programs, ONNX from torch's default exporter and safetensors weights, against the same network
built eagerly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.verifiers import verify
from tests.helpers import one_line_error, read_csv

pytestmark = pytest.mark.usefixtures("single_thread")

NETS = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 4, stride=2, padding=1)
        self.skip = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.pool(torch.relu(h + self.skip(h)))
        return self.fc2(torch.relu(self.fc1(h.view(h.size(0), -1))))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 24)
        self.fc2 = nn.Linear(24, 24)
        self.out = nn.Linear(24, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.out(torch.relu(h + self.fc2(h)))


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = nn.functional.gelu(self.fc1(x.flatten(1)))
        return torch.softmax(self.fc2(nn.functional.gelu(h)), dim=1)


def build():
    return Net()


def small():
    return Small()


def gelu():
    return Gelu()


def colour():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["--quiet", *args])


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``nets.py`` in the working directory (the test's folder), so that the spec ``nets.py:build`` is relative."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path / "nets.py"


def factory(name: str, seed: int = 0) -> nn.Module:
    spec = importlib.util.spec_from_file_location("own_nets", Path("nets.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    model: nn.Module = getattr(module, name)()
    return model.eval()


def first_test_samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    split = load_dataset("mnist5k").test
    return split.x[:n], split.y[:n]


def verified_acc(out: Path) -> dict[str, float]:
    _, rows = read_csv(out / "summary.csv")
    return {r["method"]: float(r["verified_acc"]) for r in rows}


def library_verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods: tuple[str, ...]) -> dict:
    """Verified accuracy of the eagerly built network by the library, as the command writes it (9 digits)."""
    return {m: pytest.approx(float(verify(model, x, y, eps, method=m).verified.float().mean()), abs=1e-7)
            for m in methods}


def test_train_a_factory_then_verify_its_checkpoint(nets: Path) -> None:
    result = run("train", "--trainer", "mixtrain", "--model", "nets.py:small", "--eps", "0.05", "--epochs", "1",
                 "--n-train", "100", "--val-size", "20", "--k", "2", "--out", "run")
    assert result.exit_code == 0, result.output
    assert "Training nets.py:small with mixtrain" in result.output
    config = json.loads(Path("run/config.json").read_text())
    assert config["model"] == "nets.py:small"
    assert config["model_source"] == {"file": str(nets.resolve()),
                                      "sha256": hashlib.sha256(nets.read_bytes()).hexdigest()}
    from safetensors import safe_open

    with safe_open("run/model.safetensors", framework="pt") as file:
        assert file.metadata() == {"model": "nets.py:small", "dataset": "mnist5k", "trainer": "mixtrain"}

    model = factory("small")
    model.load_state_dict(torch.load("run/model.pt", weights_only=True))
    x, y = first_test_samples(30)
    expected = library_verified(model, x, y, 0.005, ("interval", "symbolic"))
    assert float(verify(model, x, y, 0.005, method="symbolic").verified.float().mean()) > 0
    for weights in ("run/model.pt", "run/model.safetensors"):
        out = f"verify-{Path(weights).suffix[1:]}"
        verified = run("verify", "--model", "nets.py:small", "--checkpoint", weights, "--eps", "0.005", "--method",
                       "interval,symbolic", "--n-examples", "30", "--out", out)
        assert verified.exit_code == 0, verified.output
        assert verified_acc(Path(out)) == expected


@pytest.mark.parametrize(("trainer", "spec"), [("standard", "nets.py:build"), ("pgd", "nets.py:small"),
                                               ("verifiable", "nets:small")])
def test_every_trainer_trains_a_factory(nets: Path, trainer: str, spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(nets.parent))  # nets:small is the importable module's factory
    result = run("train", "--trainer", trainer, "--model", spec, "--eps", "0.05", "--epochs", "1",
                 "--n-train", "60", "--val-size", "10", "--out", "run")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(Path("run/history.csv"))
    assert rows[0]["model"] == spec and 0 <= float(rows[0]["verified_acc"]) <= 1


def test_factory_errors_are_one_line_and_write_nothing(nets: Path) -> None:
    common = ["train", "--eps", "0.1", "--epochs", "1", "--n-train", "40", "--out", "run"]
    one_line_error(run(*common, "--trainer", "standard", "--model", "nets.py:colour"),
                   "model nets.py:colour does not take mnist5k's 1x28x28 inputs: it takes 3x32x32 inputs (as "
                   "cifar10 has)")
    one_line_error(run(*common, "--trainer", "verifiable", "--model", "nets.py:gelu"),
                   "the verifiable trainer needs bounds of the model, but the model has 1 unsupported layer(s): "
                   "F.gelu in Gelu.forward at model")
    torch.jit.save(torch.jit.script(factory("build")), "net.pt")
    one_line_error(run(*common, "--trainer", "standard", "--model", "net.pt"),
                   "net.pt is a torchscript file: training builds a new network")
    assert not Path("run").exists()
    noted = run(*common, "--trainer", "standard", "--model", "nets.py:gelu", "--val-size", "10")
    assert noted.exit_code == 0, noted.output
    assert "Note: verified accuracy is not monitored, as the bound engine cannot read the model" in noted.stderr


@pytest.mark.parametrize("how", ["script", "trace"])
def test_verify_a_custom_torchscript_module(nets: Path, how: str) -> None:
    model = factory("build", seed=1)
    x, y = first_test_samples(12)
    saved = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x[:1])
    torch.jit.save(saved, "scripted_custom.pt")
    result = run("verify", "--model", "scripted_custom.pt", "--eps", "0.002", "--method", "interval,crown",
                 "--n-examples", "12", "--out", "out")
    assert result.exit_code == 0, result.output
    assert verified_acc(Path("out")) == library_verified(model, x, y, 0.002, ("interval", "crown"))


def test_interval_attack_on_an_exported_program_matches_the_eager_network(nets: Path) -> None:
    model = factory("build", seed=2)
    torch.save(model.state_dict(), "weights.pt")
    batch = {"x": {0: torch.export.Dim("batch")}}
    program = torch.export.export(model, (first_test_samples(2)[0],), dynamic_shapes=batch)
    torch.export.save(program, "exported.pt2")
    rows = {}
    for name, args in (("pt2", ["--model", "exported.pt2"]),
                       ("eager", ["--model", "nets.py:build", "--checkpoint", "weights.pt"])):
        result = run("attack", "--attack", "interval", *args, "--eps", "0.05", "--steps", "5", "--restarts", "1",
                     "--n-examples", "8", "--out", name)
        assert result.exit_code == 0, result.output
        _, rows[name] = read_csv(Path(name) / "attack.csv")
    skip = ("model", "checkpoint")
    assert [{k: v for k, v in r.items() if k not in skip} for r in rows["pt2"]] == \
        [{k: v for k, v in r.items() if k not in skip} for r in rows["eager"]]
    assert any(r["interval_success"] == "1" for r in rows["pt2"])


def test_unsupported_operators_of_torchscript_and_export_files_are_named_at_once(nets: Path) -> None:
    model = factory("gelu")
    torch.jit.save(torch.jit.trace(model, first_test_samples(1)[0]), "gelu.pt")
    torch.export.save(torch.export.export(model, (first_test_samples(1)[0],)), "gelu.pt2")
    for file in ("gelu.pt", "gelu.pt2"):
        one_line_error(run("verify", "--model", file, "--method", "interval", "--eps", "0.1", "--n-examples", "4",
                           "--out", "out"),
                       f"unsupported operators in {file}: aten::gelu (2x), aten::softmax. robustkit reads")
    attacked = run("attack", "--model", "gelu.pt", "--attack", "pgd", "--steps", "2", "--eps", "0.1", "--n-examples",
                   "4", "--out", "attacked")  # the TorchScript file still runs for gradient attacks
    assert attacked.exit_code == 0, attacked.output


def test_bench_with_a_factory_model_relative_to_its_toml(nets: Path, tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "nets.py").write_text(NETS)
    toml = """
[grid]
datasets = ["mnist5k"]
models = ["nets.py:build"]
eps = [0.05]
trainers = ["standard"]

[data]
n_train = 100
n_test = 20
val_size = 0

[training]
epochs = 1

[evaluation]
pgd_steps = 2
pgd_restarts = 1
cw_steps = 2
interval_attack = { inner_steps = 2, iterations = 1, restarts = 1 }
verifiers = ["interval"]
exact = "false"
eps_sweep = []
"""
    (folder / "bench.toml").write_text(toml)
    (tmp_path / "nets.py").unlink()  # the bench must read the file beside its TOML, not the working directory's
    result = run("bench", "--config", str(folder / "bench.toml"), "--out", "bench")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(Path("bench/results.csv"))
    assert {r["model"] for r in rows} == {"nets.py:build"}
    assert [cell.name for cell in Path("bench/cells").iterdir()] == ["mnist5k__nets.py_build__standard__eps0.05__seed0"]
    (folder / "missing.toml").write_text(toml.replace("nets.py:build", "other.py:build"))
    one_line_error(run("bench", "--config", str(folder / "missing.toml"), "--out", "never"),
                   "grid.models: unknown model 'other.py:build'", f"relative files are read from {folder}")


def test_onnx_from_torchs_default_exporter_is_verified(nets: Path) -> None:
    pytest.importorskip("onnxscript")
    model = factory("build", seed=3)
    x, y = first_test_samples(12)
    torch.onnx.export(model, (x[:1],), "net.onnx")  # dynamo=True is the default exporter in torch 2.13
    result = run("verify", "--model", "net.onnx", "--eps", "0.002", "--method", "interval,crown", "--n-examples",
                 "12", "--out", "out")
    assert result.exit_code == 0, result.output
    assert verified_acc(Path("out")) == library_verified(model, x, y, 0.002, ("interval", "crown"))
