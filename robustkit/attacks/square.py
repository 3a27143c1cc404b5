"""The Square attack (Andriushchenko, Croce, Flammarion, Hein, *Square Attack: a query-efficient black-box
adversarial attack via random search*, arXiv:1912.00049), L-inf, score-based.

Threat model: black box with access to the logits only: the attack runs forward passes under
``torch.no_grad()`` and never asks for a gradient, so it is the check that works when gradients are masked.
``x`` is (B, C, H, W) in [0, 1]; ``eps`` is the L-inf radius in input units.

Random search on the margin loss f_y - max_{j != y} f_j, per sample. The start is the vertical-stripes
initialisation: every column of every channel moves by +eps or -eps (uniformly at random). Each further query
proposes a change of one random square window of side s: in every channel the window is set to x + eps or
x - eps (a random sign per channel, redrawn if the proposal equals the current point), clipped to [0, 1].
The proposal is kept when it lowers the margin. s = round(sqrt(p * H * W)) (at least 1, at most
min(H, W) - 1 when the image is larger than one pixel), where the fraction p of pixels starts at ``p_init``
and is halved at the schedule points 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 queries,
rescaled to ``n_queries`` (as the reference code does, ``p_init / 512`` at the end). A sample stops at its
first misclassified query; a sample never broken returns its lowest-margin point. ``restarts`` repeats the
search from a fresh initialisation on the samples still robust. All randomness comes from the generator.

Defaults, from the paper and AutoAttack's standard version: ``n_queries`` = 5000 (per sample and restart,
the initial one included), ``p_init`` = 0.8, 1 restart, the margin loss.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> result = Square(n_queries=50)(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
>>> [square_fraction(query, 5000, 0.8) for query in (0, 5, 6, 25, 26, 4001)]
[0.8, 0.8, 0.4, 0.4, 0.2, 0.0015625]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import InputError
from robustkit.gradients import margins

__all__ = ["Square", "square_fraction"]

# the paper's schedule: p is halved after each of these queries out of 10,000
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(query: int, n_queries: int, p_init: float) -> float:
    """The fraction p of pixels in the square at search step ``query`` (0-based, after the initial query)."""
    rescaled = int(query / n_queries * 10000)
    halvings = sum(1 for point in SCHEDULE if rescaled > point)
    return p_init * 0.5**halvings


@dataclass(frozen=True, kw_only=True)
class Square(Attack):
    """The L-inf Square attack; see the module docstring for the algorithm and the defaults."""

    name: ClassVar[str] = "square"
    # forward passes only: the pre-flight checks flag points it breaks that no gradient attack breaks
    gradient_free: ClassVar[bool] = True
    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.n_queries < 1 or self.restarts < 1:
            raise InputError("n_queries and restarts must be >= 1")
        if not 0 < self.p_init <= 1:
            raise InputError(f"p_init must be in (0, 1], got {self.p_init}")

    @property
    def attempts(self) -> int:
        return self.restarts

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise InputError(f"square needs images of shape (batch, channels, height, width), got {tuple(x.shape)}")
        with torch.no_grad():
            return self.search(model, x, y, eps, generator)

    def search(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        batch, channels, height, width = x.shape
        device = x.device
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        stripes = torch.rand((batch, channels, 1, width), generator=generator, device=device) < 0.5
        out = torch.where(stripes, upper, lower)
        margin = margins(model(out), y)
        # the samples still searching, compacted whenever some break
        index = (margin >= 0).nonzero().squeeze(1)
        x_best, margin_best, y_run, lower, upper = out[index], margin[index], y[index], lower[index], upper[index]
        rows = torch.arange(height, device=device)
        columns = torch.arange(width, device=device)
        for query in range(self.n_queries - 1):
            if index.numel() == 0:
                break
            side = _side(square_fraction(query, self.n_queries, self.p_init), height, width)
            count = index.numel()
            top = torch.randint(0, height - side + 1, (count, 1), generator=generator, device=device)
            left = torch.randint(0, width - side + 1, (count, 1), generator=generator, device=device)
            in_rows = (rows >= top) & (rows < top + side)
            in_columns = (columns >= left) & (columns < left + side)
            window = (in_rows[:, :, None] & in_columns[:, None, :]).unsqueeze(1)
            signs = torch.rand((count, channels, 1, 1), generator=generator, device=device) < 0.5
            proposal = torch.where(window, torch.where(signs, upper, lower), x_best)
            unchanged = (proposal == x_best).flatten(1).all(1)
            if bool(unchanged.any()):  # redraw: another sign vector, uniformly (see _flips)
                flips = _flips(count, channels, generator, device) & unchanged.view(-1, 1, 1, 1)
                proposal = torch.where(window, torch.where(signs ^ flips, upper, lower), x_best)
            candidate = margins(model(proposal), y_run)
            improved = candidate < margin_best
            x_best = torch.where(improved.view(-1, 1, 1, 1), proposal, x_best)
            margin_best = torch.minimum(candidate, margin_best)
            broken = margin_best < 0
            if bool(broken.any()):
                out[index[broken]] = x_best[broken]
                keep = ~broken
                index, x_best, margin_best, y_run = index[keep], x_best[keep], margin_best[keep], y_run[keep]
                lower, upper = lower[keep], upper[keep]
        out[index] = x_best
        return out


def _flips(count: int, channels: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniformly random non-empty sets of channels, (count, channels, 1, 1).

    XOR-ing a sign vector with one gives a uniform draw among the other sign vectors. A proposal that changes
    nothing comes from the only such vector (for eps > 0, x + eps and x - eps differ in every pixel), so the
    redraw has the distribution of the authors' code, which redraws until the proposal changes.
    """
    if channels <= 30:
        code = torch.randint(1, 2**channels, (count, 1), generator=generator, device=device)
        bits = (code >> torch.arange(channels, device=device)) & 1 == 1
    else:  # an empty set has probability 2^-channels here; flipping channel 0 instead biases nothing measurable
        bits = torch.rand((count, channels), generator=generator, device=device) < 0.5
        bits[:, 0] |= ~bits.any(1)
    return bits.view(count, channels, 1, 1)


def _side(fraction: float, height: int, width: int) -> int:
    """Side of the square covering about ``fraction`` of the pixels: at least 1, below the image's size."""
    side = round(math.sqrt(fraction * height * width))
    return max(1, min(side, min(height, width) - 1)) if min(height, width) > 1 else 1
