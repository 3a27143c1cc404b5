"""Attacks: PGD, Carlini-Wagner (L2 and L-inf), the interval attack, a foolbox adapter and the worst case.

Every attack is configuration (keyword-only options with documented defaults) and is called with the model:
``ATTACKS["pgd"](steps=40)(model, x, y, eps=0.1, generator=g) -> AttackResult``. See DESIGN.md section 4.
"""

from __future__ import annotations

from typing import Any

from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.cw import CWL2
from robustkit.attacks.foolbox_adapter import FoolboxAttack
from robustkit.attacks.interval import IntervalAttack
from robustkit.attacks.pgd import PGD, CWLinf
from robustkit.attacks.worst_case import WorstCase
from robustkit.gradients import margins
from robustkit.registry import Registry

__all__ = [
    "ATTACKS", "CWL2", "PGD", "Attack", "AttackResult", "CWLinf", "FoolboxAttack", "IntervalAttack", "WorstCase",
    "get_attack", "margins",
]

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.add("pgd", PGD)
ATTACKS.add("cw-linf", CWLinf)
ATTACKS.add("cw-l2", CWL2)
ATTACKS.add("interval", IntervalAttack)
ATTACKS.add("foolbox", FoolboxAttack)
ATTACKS.add("worst-case", WorstCase)


def get_attack(name: str, **options: Any) -> Attack:
    """An attack from its registered name and options."""
    return ATTACKS[name](**options)
