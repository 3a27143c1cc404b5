"""Attacks: PGD, Carlini-Wagner (L2 and L-inf), the interval attack, Auto-PGD, Square, targeted FAB,
AutoAttack, a foolbox adapter and the worst case.

Every attack is configuration (keyword-only options with documented defaults) and is called with the model:
``ATTACKS["pgd"](steps=40)(model, x, y, eps=0.1, generator=g) -> AttackResult``. See DESIGN.md section 4.
"""

from __future__ import annotations

from typing import Any

from robustkit.attacks.apgd import APGD
from robustkit.attacks.autoattack import AutoAttack, AutoAttackResult
from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.cw import CWL2
from robustkit.attacks.fab import FAB
from robustkit.attacks.foolbox_adapter import FoolboxAttack
from robustkit.attacks.interval import IntervalAttack
from robustkit.attacks.pgd import PGD, CWLinf
from robustkit.attacks.square import Square
from robustkit.attacks.worst_case import WorstCase
from robustkit.gradients import margins
from robustkit.registry import Registry

__all__ = [
    "APGD", "ATTACKS", "CWL2", "FAB", "PGD", "Attack", "AttackResult", "AutoAttack", "AutoAttackResult", "CWLinf",
    "FoolboxAttack", "IntervalAttack", "Square", "WorstCase", "get_attack", "margins",
]

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.add("pgd", PGD)
ATTACKS.add("cw-linf", CWLinf)
ATTACKS.add("cw-l2", CWL2)
ATTACKS.add("interval", IntervalAttack)
ATTACKS.add("apgd", APGD)
ATTACKS.add("square", Square)
ATTACKS.add("fab", FAB)
ATTACKS.add("autoattack", AutoAttack)
ATTACKS.add("foolbox", FoolboxAttack)
ATTACKS.add("worst-case", WorstCase)


def get_attack(name: str, **options: Any) -> Attack:
    """An attack from its registered name and options."""
    return ATTACKS[name](**options)
