"""The gradient kernel that attacks and complete verifiers share: margins, losses, the projection onto the
threat model's ball and the projected-gradient loop.

It lives outside :mod:`robustkit.attacks` so that the bound engine (the ``exact`` verifier's counterexample
searches) uses it without importing the attacks, which themselves build on the bound engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """f_y - max_{j != y} f_j per sample."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return true - others.max(1).values


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin loss to maximise: max_{j != y} f_j - f_y, the true logit masked out first."""
    return -margins(logits, y)


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, to maximise."""
    return F.cross_entropy(logits, y, reduction="none")


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": ce_loss, "cw": cw_loss}


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Closest point (in the norm's sense for L-inf; radial for L2) of the eps-ball around x, within [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        length = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
        delta = delta * _view(torch.clamp(eps / length, max=1.0), delta)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """A uniformly random point of the eps-ball around x (clipped to [0, 1])."""
    if norm == "linf":
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _view(direction.flatten(1).norm(dim=1).clamp(min=1e-12), x)
        dims = x[0].numel()
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / dims)
        noise = direction * _view(radius * eps, x)
    return (x + noise).clamp(0.0, 1.0)


def input_gradient(
    model: nn.Module, x: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Logits at x and the gradient of the per-sample loss with respect to x."""
    point = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(point)
        (grad,) = torch.autograd.grad(loss(logits, y).sum(), point)
    return logits.detach(), grad


def gradient_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    start: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    loss: Callable[[Tensor, Tensor], Tensor],
    norm: str = "linf",
    early_stop: bool = True,
    score: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The shared PGD loop: ``steps`` projected steps from ``start`` that ascend ``loss``; returns each sample's
    best point (lowest ``score``, by default the margin f_y - max_{j != y} f_j; negative means the property is
    broken) and that score. Used by PGD, cw-linf, the interval attack's inner search and the counterexample
    searches of the complete verifiers."""
    score = margins if score is None else score
    point = start.detach()
    best, best_margin = point.clone(), torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
    for step in range(steps + 1):
        if step < steps:
            logits, grad = input_gradient(model, point, y, loss)
        else:
            with torch.no_grad():
                logits = model(point)
        margin = score(logits, y)
        improved = margin < best_margin
        best[improved] = point[improved]
        best_margin = torch.minimum(best_margin, margin)
        broken = best_margin < 0
        if step == steps or (early_stop and bool(broken.all())):
            break
        if norm == "linf":
            direction = grad.sign()
        else:
            length = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            direction = grad / length.view(-1, *([1] * (grad.dim() - 1)))
        moved = project(point + step_size * direction, x, eps, norm)
        point = torch.where(broken.view(-1, *([1] * (x.dim() - 1))), point, moved) if early_stop else moved
    return best, best_margin
