"""The interval attack's cheap pre-check: boxes interval arithmetic verifies skip the symbolic pass, and the
attack's points are the same as with the symbolic pass on every box."""

from __future__ import annotations

import torch

import robustkit.verifiers.interval as interval_module
import robustkit.verifiers.symbolic as symbolic_module
from robustkit.attacks import IntervalAttack
from robustkit.verifiers.base import margin_spec
from robustkit.verifiers.graph import build_graph

SETTINGS = {"inner_steps": 5, "iterations": 3, "restarts": 1}


def _counting(monkeypatch) -> dict[str, int]:
    """Count the boxes that reach the symbolic pass."""
    counts = {"boxes": 0}
    original = symbolic_module.box_bounds

    def counted(model, lower, upper, spec, **options):
        counts["boxes"] += lower.shape[0]
        return original(model, lower, upper, spec, **options)

    monkeypatch.setattr(symbolic_module, "box_bounds", counted)
    return counts


def test_precheck_keeps_the_attack_points_and_skips_symbolic_boxes(trained_fc, mnist, monkeypatch):
    model = trained_fc.eval()
    x, y = mnist.test.x[:40], mnist.test.y[:40]
    attack = IntervalAttack(**SETTINGS)
    counts = _counting(monkeypatch)
    with_check = attack(model, x, y, eps=0.1)
    checked_boxes = counts["boxes"]

    original = interval_module.interval_pass

    def never_verifies(graph, lower, upper, spec):
        found = original(graph, lower, upper, spec)
        found.spec_lower = torch.full_like(found.spec_lower, -float("inf"))
        return found

    monkeypatch.setattr(interval_module, "interval_pass", never_verifies)
    counts["boxes"] = 0
    symbolic_everywhere = attack(model, x, y, eps=0.1)
    assert torch.equal(with_check.x_adv, symbolic_everywhere.x_adv)
    assert torch.equal(with_check.success, symbolic_everywhere.success)
    assert checked_boxes < counts["boxes"], "the pre-check verified no box: the test shows nothing"


def test_boxes_interval_verifies_are_verified_by_symbolic(trained_fc, mnist):
    """The pre-check's premise, on random boxes of random widths around test points: symbolic's margin bounds
    are never below interval arithmetic's (symbolic keeps the better of both)."""
    model = trained_fc.eval()
    graph = build_graph(model)
    generator = torch.Generator().manual_seed(0)
    x, y = mnist.test.x[:60], mnist.test.y[:60]
    radius = torch.rand(60, 1, 1, 1, generator=generator) * 0.05
    centre = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * 0.05).clamp(0, 1)
    lower, upper = (centre - radius).clamp(min=0), (centre + radius).clamp(max=1)
    spec = margin_spec(y, 10)
    with torch.no_grad():
        interval = interval_module.interval_pass(graph, lower, upper, spec).spec_lower
        symbolic = symbolic_module.box_bounds(model, lower, upper, spec).spec_lower
    assert bool((symbolic >= interval).all())
    others = torch.ones_like(interval, dtype=torch.bool)
    others[torch.arange(60), y] = False
    verified = (interval.masked_fill(~others, float("inf")) > 0).all(1)
    assert 0 < int(verified.sum()) < 60, "pick widths where interval arithmetic verifies some boxes, not all"
