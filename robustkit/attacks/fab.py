"""Targeted FAB, L-inf (Croce & Hein, *Minimally distorted adversarial examples with a fast adaptive boundary
attack*, arXiv:1907.02044), as AutoAttack's FAB-T runs it.

Threat model: white box; ``x`` (B, *shape) in [0, 1]; ``eps`` the L-inf radius. FAB looks for the adversarial
example of smallest L-inf distance and counts it only within ``eps`` (farther ones are projected into the ball
by the base class and then usually fail). For each target class t, the ``n_target_classes`` classes with the
highest clean logits other than y, on the samples still without an adversarial example within eps, starting
from x (later restarts: from a uniform random point at L-inf distance eps / 2), each of ``steps`` iterations

1. linearises g = f_t - f_y at the current point x_k: the hyperplane g(x_k) + grad g(x_k) . (z - x_k) = 0;
2. projects both x_k and the original point x onto it inside the box [0, 1] (:func:`linf_projection`, the
   minimal L-inf move onto a hyperplane within the box), giving the moves d_k and d_0;
3. steps to x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0)), a = min(|d_k| / (|d_k| + |d_0|),
   ``alpha_max``) with L-inf norms, the bias towards x that keeps the result close to it, and ``eta`` > 1
   an overshoot past the linearised boundary;
4. if x_{k+1} is misclassified, keeps it when it is the closest adversarial point so far and takes the
   backward step x_{k+1} = x + ``beta`` (x_{k+1} - x).

Each call returns, per sample, the closest adversarial point found over all targets and restarts (x where none
was found). Needs at least 2 classes.

Defaults, AutoAttack's standard FAB-T (the paper's values): 9 target classes, 100 iterations, 1 restart,
``alpha_max`` = 0.1, ``eta`` = 1.05, ``beta`` = 0.9.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> result = FAB(steps=10)(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
>>> linf_projection(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1.0]]), torch.tensor([1.2]))
tensor([[0.1000, 0.1000]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import InputError
from robustkit.gradients import input_gradient

__all__ = ["FAB", "linf_projection"]


def linf_projection(points: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row of ``points`` (N, D) in [0, 1]: the move d of smallest L-inf norm with w . (p + d) = b and
    p + d in [0, 1]; where the hyperplane cannot be reached inside the box, the move to the corner of the box
    that comes closest to it.

    With c = b - w . p, coordinate i moves by r sign(c) sign(w_i), at most by its room to the box face
    (``room``); the reached change sum_i |w_i| min(r, room_i) grows piecewise linearly in r, so sorting the
    rooms gives the segment where it equals |c| and r on it in closed form.
    """
    residual = b - (w * points).sum(1)
    direction = residual.sign().unsqueeze(1) * w.sign()
    room = torch.where(direction > 0, 1 - points, points) * direction.abs()
    weight = w.abs() * direction.abs()
    room_sorted, order = room.sort(1)
    weight_sorted = weight.gather(1, order)
    full = (weight_sorted * room_sorted).cumsum(1)  # change from the coordinates with room <= room_k, all moved
    weight_from = weight_sorted.flip(1).cumsum(1).flip(1)  # sum of |w_j| over j >= k
    reached = full + room_sorted * (weight_from - weight_sorted)  # the change at r = room_k
    need = residual.abs()
    segment = (reached < need.unsqueeze(1)).sum(1, keepdim=True)  # first k with reached_k >= need
    reachable = segment.squeeze(1) < points.shape[1]
    segment = segment.clamp(max=points.shape[1] - 1)
    full_before = torch.where(segment > 0, full.gather(1, (segment - 1).clamp(min=0)), torch.zeros_like(need)[:, None])
    radius = (need.unsqueeze(1) - full_before) / weight_from.gather(1, segment).clamp(min=1e-30)
    radius = torch.where(reachable.unsqueeze(1), radius, torch.full_like(radius, float("inf")))
    return direction * torch.minimum(radius, room)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True, kw_only=True)
class FAB(Attack):
    """Targeted FAB in the L-inf norm; see the module docstring for the algorithm and the defaults."""

    name: ClassVar[str] = "fab"
    n_target_classes: int = 9
    steps: int = 100
    restarts: int = 1
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.n_target_classes < 1:
            raise InputError("steps, restarts and n_target_classes must be >= 1")
        if not (0 <= self.alpha_max <= 1 and self.eta >= 1 and 0 < self.beta < 1):
            raise InputError("need 0 <= alpha_max <= 1, eta >= 1 and 0 < beta < 1")

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        logits = model(x)
        if logits.shape[1] < 2:
            raise InputError("FAB needs at least 2 classes")
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        targets = others.argsort(1, descending=True)[:, : min(self.n_target_classes, logits.shape[1] - 1)]
        best = x.clone()
        best_distance = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        for column in range(targets.shape[1]):
            for restart in range(self.restarts):
                index = (best_distance > eps).nonzero().squeeze(1)
                if index.numel() == 0:
                    return best
                start = x[index] if restart == 0 else _random_start(x[index], eps / 2, generator)
                points, distance = self.search(model, x[index], y[index], targets[index, column], start)
                closer = distance < best_distance[index]
                best[index[closer]] = points[closer]
                best_distance[index[closer]] = distance[closer]
        return best

    def search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        """One FAB run towards ``target``: the closest adversarial point found and its L-inf distance from x
        (x and inf where none was found)."""
        batch = x.shape[0]
        origin = x.flatten(1)
        point = start.clone()
        best = x.clone()
        best_distance = torch.full((batch,), float("inf"), device=x.device, dtype=x.dtype)

        def target_minus_true(logits: Tensor, labels: Tensor) -> Tensor:
            return (logits.gather(1, target.unsqueeze(1)) - logits.gather(1, labels.unsqueeze(1))).squeeze(1)

        for _ in range(self.steps):
            logits, grad = input_gradient(model, point, y, target_minus_true)
            w = grad.flatten(1)
            flat = point.flatten(1)
            b = (w * flat).sum(1) - target_minus_true(logits, y)  # the linearised boundary: w . z = b
            moves = linf_projection(torch.cat((flat, origin)), torch.cat((w, w)), torch.cat((b, b)))
            lengths = moves.abs().amax(1).clamp(min=1e-8)
            from_point, from_origin = moves[:batch].view_as(x), moves[batch:].view_as(x)
            alpha = (lengths[:batch] / (lengths[:batch] + lengths[batch:])).clamp(0, self.alpha_max)
            alpha = _view(alpha, x)
            point = ((1 - alpha) * (point + self.eta * from_point) + alpha * (x + self.eta * from_origin)).clamp(0, 1)
            adversarial = model(point).argmax(1) != y
            distance = (point - x).flatten(1).abs().amax(1)
            closer = adversarial & (distance < best_distance)
            best = torch.where(_view(closer, x), point, best)
            best_distance = torch.where(closer, distance, best_distance)
            point = torch.where(_view(adversarial, x), x + self.beta * (point - x), point)
        return best, best_distance


def _random_start(x: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """A random point at L-inf distance ``radius`` from x (uniform noise scaled to that norm), clipped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    noise = noise / _view(noise.flatten(1).abs().amax(1).clamp(min=1e-12), x)
    return (x + radius * noise).clamp(0, 1)
