"""Unsupported-layer errors name the module type and its path in the model, for traced factories as for
``nn.Sequential`` models (issue 13, item 4).

The messages come from the bound engine (robustkit/verifiers/graph.py and fx_import.py) in the format
``<type> at <path>``: the type as written in user code (``nn.LSTM``, ``torch.log``), the path rooted at
``model`` as in ``model.get_submodule`` (``model.lstm``, ``model.2``), and nothing reported for operations that
only consume an unsupported layer's output.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from robustkit.cli import main
from tests.helpers import one_line_error

NETS = """
import torch
from torch import nn


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(784, 16)  # a 2-D input is one unbatched sequence: the forward runs
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        out, _ = self.lstm(x.flatten(1))
        return self.head(out)


class WithLog(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(torch.log(x.flatten(1) + 1))


def lstm():
    return WithLSTM()


def log():
    return WithLog()


def sequential():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.GELU(), nn.Linear(32, 10))
"""

def error_for(factory: str, tmp_path: Path) -> str:
    nets = tmp_path / "nets.py"
    nets.write_text(NETS)
    result = CliRunner().invoke(main, ["verify", "--model", f"{nets}:{factory}", "--eps", "0.1", "--method",
                                       "interval", "--n-examples", "2", "--out", str(tmp_path / "run")])
    return one_line_error(result, "unsupported layer")


def test_traced_lstm_is_named_by_type_and_path(tmp_path: Path) -> None:
    line = error_for("lstm", tmp_path)
    assert "the model has 1 unsupported layer(s): nn.LSTM at model.lstm" in line
    assert "getitem" not in line  # unpacking the LSTM's output is not a layer of its own


def test_traced_function_is_named_with_the_forward_that_calls_it(tmp_path: Path) -> None:
    line = error_for("log", tmp_path)
    assert "the model has 1 unsupported layer(s): torch.log in WithLog.forward at model" in line


def test_sequential_child_is_named_like_a_traced_one(tmp_path: Path) -> None:
    line = error_for("sequential", tmp_path)
    assert "the model has 1 unsupported layer(s): nn.GELU at model.2" in line
