"""Helpers shared by several test modules."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import Attack, margins
from robustkit.data import load_dataset
from robustkit.models import build_model


def one_line_error(result: Any, *fragments: str) -> str:
    """Assert a CLI result is a usage error: exit code 2 and a single ``Error: ...`` line with ``fragments``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def error_after_output(result: Any, *fragments: str) -> str:
    """Assert a CLI result that printed progress (on stdout) ended as a user error: exit code 2 and a single
    ``Error: ...`` line on stderr with ``fragments``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV file."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def train_mnist_fc(epochs: int, lr: float) -> nn.Module:
    """``mnist_fc_small`` after ``epochs`` seeded epochs of Adam (batch 50) on mnist5k, in eval mode."""
    data = load_dataset("mnist5k")
    model = build_model("mnist_fc_small", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(data.train), generator=generator)
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            loss = F.cross_entropy(model(data.train.x[batch]), data.train.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


@dataclass(frozen=True, kw_only=True)
class RandomSearch(Attack):
    """A gradient-free L-inf attack for the gradient-masking tests: a random vertex of the eps-ball, then
    ``iterations`` proposals that redraw the signs of one random ``window`` x ``window`` square per channel,
    each kept for the samples whose margin it lowers. It only calls the model forward."""

    name: ClassVar[str] = "random-search"
    gradient_free: ClassVar[bool] = True
    iterations: int = 300
    window: int = 4

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        def signs(shape: tuple[int, ...]) -> Tensor:
            draw = torch.randint(0, 2, shape, generator=generator, device=generator.device).to(x.device, x.dtype)
            return draw * 2 - 1

        delta = signs(tuple(x.shape)) * eps
        best = margins(model((x + delta).clamp(0, 1)), y)
        height, width = x.shape[-2:]
        for _ in range(self.iterations):
            if bool((best < 0).all()):
                break
            row = int(torch.randint(0, height - self.window + 1, (1,), generator=generator))
            column = int(torch.randint(0, width - self.window + 1, (1,), generator=generator))
            candidate = delta.clone()
            candidate[..., row:row + self.window, column:column + self.window] = signs((*x.shape[:2], 1, 1)) * eps
            margin = margins(model((x + candidate).clamp(0, 1)), y)
            better = margin < best
            delta[better] = candidate[better]
            best = torch.minimum(best, margin)
        return x + delta
