"""The interval attack of the MixTrain paper (Wang, Chen, Abdou, Jana, *MixTrain: Scalable Training of Verifiably
Robust Neural Networks*, arXiv:1811.02625): gradient steps guided by symbolic interval bounds.

PGD follows the gradient at one point and stalls in local optima of the loss. The interval attack alternates
PGD with *interval steps*: around the current point it takes a small box (radius ``radius``), bounds the
margins f_y - f_j over it with robustkit's ``symbolic`` analysis (boxes interval arithmetic already verifies
skip that pass: ``symbolic`` keeps the better of its bound and interval's, so it verifies them too), and

* if the box is verified (no class can win inside it), grows the radius by ``growth`` (up to ``max_radius``
  times eps) and tries again: the neighbourhood holds no adversarial example, so look further;
* otherwise takes the class d whose margin bound is weakest and jumps to the corner of the box where the
  symbolic upper bound of f_d - f_y is largest: one step of the current radius along the sign of the symbolic
  input coefficients of f_d - f_y (the "interval gradient"), projected into the eps-ball and [0, 1].

Then PGD runs again from the new point. Each sample stops as soon as it is misclassified; ``restarts``
repeats the whole search from random starts on the samples still robust.

Threat model: white box, L-inf ball of radius eps around x in [0, 1]; x is (B, *shape). The model must be
analysable by the verifiers (see :mod:`robustkit.verifiers`).

Defaults, from the authors' code, in input units: ``inner_steps`` = 40 PGD steps of ``rel_step_size`` * eps
(0.01 at eps 0.3); ``radius`` = 0.01, ``growth`` = 3, up to ``max_radius`` = 0.5 (i.e. eps / 2);
``iterations`` = 4 interval steps per restart; ``restarts`` = 2. With these the attack takes at most
2 x 5 x 40 = 400 gradient steps per sample, as many as 40-step PGD with 10 restarts.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> attack = IntervalAttack(inner_steps=5, iterations=1)
>>> result = attack(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import InputError
from robustkit.gradients import ce_loss, gradient_steps, random_start


def _weakest(margin_lower: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The weakest lower bound of f_y - f_j over j != y per sample, and that j."""
    masked = margin_lower.clone()
    masked[torch.arange(y.numel()), y] = float("inf")
    found = masked.min(1)
    return found.values, found.indices


@dataclass(frozen=True, kw_only=True)
class IntervalAttack(Attack):
    """The interval attack; see the module docstring for the algorithm and the defaults."""

    name: ClassVar[str] = "interval"
    inner_steps: int = 40
    rel_step_size: float = 0.01 / 0.3
    radius: float = 0.01
    growth: float = 3.0
    max_radius: float = 0.5
    iterations: int = 4
    restarts: int = 2
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.inner_steps < 0 or self.iterations < 0 or self.restarts < 1:
            raise InputError("inner_steps and iterations must be >= 0 and restarts >= 1")
        if not (self.radius > 0 and self.growth > 1 and 0 < self.max_radius <= 1 and self.rel_step_size > 0):
            raise InputError("need radius > 0, growth > 1, 0 < max_radius <= 1 and rel_step_size > 0")

    @property
    def attempts(self) -> int:
        return self.restarts

    def interval_step(self, model: nn.Module, x: Tensor, y: Tensor, point: Tensor, eps: float) -> Tensor:
        """Move each sample to the box corner that maximises the symbolic bound of its weakest class."""
        from robustkit.verifiers import spec_bounds
        from robustkit.verifiers.base import margin_spec
        from robustkit.verifiers.symbolic import box_bounds

        moved = point.clone()
        pending = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        ball_lower, ball_upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        radius = min(self.radius, self.max_radius * eps)
        while bool(pending.any()) and radius <= self.max_radius * eps + 1e-12:
            index = pending.nonzero().squeeze(1)
            centre = point[index]
            lower = torch.maximum(centre - radius, ball_lower[index])
            upper = torch.minimum(centre + radius, ball_upper[index])
            with torch.no_grad():
                logits_count = model(centre[:1]).shape[1]
                spec = margin_spec(y[index], logits_count).to(x.dtype)
                # symbolic's bound is never below interval's (it keeps the better of both), so a box interval
                # arithmetic verifies is verified by symbolic too: only the others need the symbolic pass
                unsure = _weakest(spec_bounds(model, lower, upper, spec, method="interval"), y[index])[0] <= 0
                if bool(unsure.any()):
                    index, centre, lower, upper, spec = (t[unsure] for t in (index, centre, lower, upper, spec))
                    found = box_bounds(model, lower, upper, spec, coefficients=True)
                    assert found.input_coefficients is not None
                    bound, weakest = _weakest(found.spec_lower, y[index])
                    open_box = bound <= 0  # some class may win inside the box: step towards it
                    chosen = found.input_coefficients[torch.arange(index.numel()), weakest]
                    # the rows are margins f_y - f_d: f_d - f_y grows against their coefficients' sign
                    corner = centre - radius * chosen.sign()
                    corner = torch.minimum(torch.maximum(corner, ball_lower[index]), ball_upper[index])
                    moved[index[open_box]] = corner[open_box]
                    pending[index[open_box]] = False
            radius *= self.growth
        return moved

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        if eps == 0:
            return x
        step = self.rel_step_size * eps
        point = random_start(x, eps, "linf", generator) if self.random_start else x.clone()
        best = point.clone()
        best_margin = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for iteration in range(self.iterations + 1):
            index = active.nonzero().squeeze(1)
            found, margin = gradient_steps(
                model, x[index], y[index], point[index], eps=eps, steps=self.inner_steps, step_size=step,
                loss=ce_loss,
            )
            better = margin < best_margin[index]
            best[index[better]] = found[better]
            best_margin[index] = torch.minimum(best_margin[index], margin)
            point[index] = found
            active = best_margin >= 0
            if iteration == self.iterations or not bool(active.any()):
                break
            index = active.nonzero().squeeze(1)
            point[index] = self.interval_step(model, x[index], y[index], point[index], eps)
        return best
