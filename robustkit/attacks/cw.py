"""Carlini-Wagner L2 (Carlini & Wagner, *Towards Evaluating the Robustness of Neural Networks*,
arXiv:1608.04644): minimise ||x' - x||_2^2 + c * max(f_y - max_{j != y} f_j + confidence, 0) with Adam in
tanh space, with a per-sample binary search over the constant c.

Threat model: white box, x (B, *shape) in [0, 1]. With ``norm="linf"`` (the default, so that it can sit in
the same L-inf table as the other attacks) the tanh change of variables maps onto the eps-box
[max(x - eps, 0), min(x + eps, 1)], so every iterate lies inside the L-inf ball and the attack looks for the
smallest-L2 adversarial example within it. With ``norm="l2"`` the change of variables maps onto [0, 1] and
eps is an L2 radius; points beyond it are projected back (and then usually fail).

Defaults: 5 binary-search steps of 100 Adam steps each, learning rate 0.01, initial constant 0.01 (x10 while
no adversarial example is found, then bisection), confidence 0, early abort when the loss stalls.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> result = CWL2(steps=10, binary_search_steps=2)(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.base import NORMS, Attack
from robustkit.errors import InputError
from robustkit.gradients import margins


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True, kw_only=True)
class CWL2(Attack):
    """Carlini-Wagner L2 attack; see the module docstring for the threat models and defaults."""

    name: ClassVar[str] = "cw-l2"
    norm: str = "linf"
    steps: int = 100
    binary_search_steps: int = 5
    learning_rate: float = 0.01
    initial_const: float = 0.01
    confidence: float = 0.0
    abort_early: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.steps < 1 or self.binary_search_steps < 1 or not self.learning_rate > 0 or not self.initial_const > 0:
            raise InputError("cw-l2 needs steps >= 1, binary_search_steps >= 1 and positive learning rate and constant")

    @property
    def threat(self) -> str:
        return self.norm

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        if self.norm == "linf":
            lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        else:
            lower, upper = torch.zeros_like(x), torch.ones_like(x)
        width = (upper - lower).clamp(min=1e-12)
        unit = ((x - lower) / width * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)
        start = torch.atanh(unit)
        batch = x.shape[0]
        const = torch.full((batch,), self.initial_const, device=x.device, dtype=x.dtype)
        low = torch.zeros_like(const)
        high = torch.full_like(const, float("inf"))
        best = x.clone()
        best_distance = torch.full_like(const, float("inf"))
        best_margin = torch.full_like(const, float("inf"))

        def to_input(w: Tensor) -> Tensor:
            return lower + (upper - lower) * (torch.tanh(w) + 1) / 2

        for _ in range(self.binary_search_steps):
            w = start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.learning_rate)
            succeeded = torch.zeros(batch, dtype=torch.bool, device=x.device)
            previous = float("inf")
            for step in range(self.steps):
                with torch.enable_grad():
                    point = to_input(w)
                    logits = model(point)
                    margin = margins(logits, y)
                    distance = (point - x).flatten(1).pow(2).sum(1)
                    loss = distance + const * (margin + self.confidence).clamp(min=0)
                    (grad,) = torch.autograd.grad(loss.sum(), w)
                w.grad = grad
                optimizer.step()
                with torch.no_grad():
                    adversarial = margin < 0
                    succeeded |= adversarial
                    closer = adversarial & (distance < best_distance)
                    best[closer] = point.detach()[closer]
                    best_distance = torch.where(closer, distance.detach(), best_distance)
                    fallback = ~torch.isfinite(best_distance) & (margin.detach() < best_margin)
                    best[fallback] = point.detach()[fallback]
                    best_margin = torch.where(fallback, margin.detach(), best_margin)
                if self.abort_early and step % max(1, self.steps // 10) == 0:
                    total = float(loss.detach().sum())
                    if total > previous * 0.9999:
                        break
                    previous = total
            # per-sample bisection of the constant: smaller after a success, larger (x10 until bracketed) otherwise
            high = torch.where(succeeded, torch.minimum(high, const), high)
            low = torch.where(succeeded, low, torch.maximum(low, const))
            const = torch.where(torch.isfinite(high), (low + high) / 2, const * 10)
        return best
