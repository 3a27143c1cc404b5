"""``worst-case``: the per-sample worst case over several attacks (the evaluation protocol of AutoAttack, Croce &
Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks*,
arXiv:2003.01690, with any of robustkit's attacks as members).

The attacks run in the order given; each later attack runs only on the samples that all earlier ones left
robust, so the ensemble costs little more than its strongest member. A sample is broken when any attack breaks
it; its point is the first successful adversarial example found (the earliest attack that broke it), and for a
sample that no attack breaks, the point of lowest margin f_y - max_{j != y} f_j over all attacks.

Threat model: that of the members, which must all share one norm (L-inf or L2); x is (B, *shape) in [0, 1].
Each member is a registered attack name (its defaults), a ``(name, options)`` pair, or an :class:`Attack`
instance; they are built when the ensemble is created (so a bad name fails at once) and stored as a tuple of
attack instances, which keeps the ensemble hashable and its ``repr`` complete. The same ``generator`` is handed
to every member in turn. There are no restarts of the ensemble itself; give the members restarts instead.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("toy2d", seed=0).eval()
>>> ensemble = WorstCase(attacks=["pgd", ("cw-linf", {"steps": 5})])
>>> [type(a).__name__ for a in ensemble.members]
['PGD', 'CWLinf']
>>> result = ensemble(model, torch.full((2, 1, 1, 2), 0.5), torch.tensor([0, 1]), eps=0.1)
>>> bool(((result.x_adv - 0.5).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import InputError

__all__ = ["AttackEntry", "WorstCase"]

AttackEntry = str | tuple[str, Mapping[str, Any]] | Attack


def _build(entry: AttackEntry) -> Attack:
    from robustkit.attacks import ATTACKS

    if isinstance(entry, Attack):
        return entry
    if isinstance(entry, str):
        return ATTACKS[entry]()
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Mapping):
        return ATTACKS[entry[0]](**entry[1])
    raise InputError(f"a worst-case member is an attack name, a (name, options) pair or an Attack, got {entry!r}")


@dataclass(frozen=True, kw_only=True)
class WorstCase(Attack):
    """Per-sample worst case over ``attacks``; see the module docstring."""

    name: ClassVar[str] = "worst-case"
    attacks: Sequence[AttackEntry] = ()

    def __post_init__(self) -> None:
        if isinstance(self.attacks, str | Attack) or not isinstance(self.attacks, Sequence):
            raise InputError(f"attacks must be a list of attacks, got {self.attacks!r}")
        members = tuple(_build(entry) for entry in self.attacks)
        if not members:
            raise InputError("worst-case needs at least one attack")
        threats = {member.threat for member in members}
        if len(threats) > 1:
            described = ", ".join(f"{type(m).__name__}: {m.threat}" for m in members)
            raise InputError(f"the attacks of a worst case must share one threat norm, got {described}")
        object.__setattr__(self, "attacks", members)

    @property
    def members(self) -> tuple[Attack, ...]:
        """The attack instances, in the order they run."""
        return tuple(member for member in self.attacks if isinstance(member, Attack))

    @property
    def threat(self) -> str:
        return self.members[0].threat

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        best = x.clone()
        best_margin = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for member in self.members:
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            result = member(model, x[index], y[index], eps=eps, generator=generator)
            better = result.margin < best_margin[index]
            best[index[better]] = result.x_adv[better]
            best_margin[index[better]] = result.margin[better]
            robust[index[result.success]] = False
        return best
