"""The bench's evaluation of one model, per sample: AutoAttack is one of the attacks of the worst case, and a
verified sample is broken by none of them."""

from __future__ import annotations

import pytest
import torch

from robustkit.bench.config import EvaluationSettings
from robustkit.bench.evaluate import evaluate_model
from robustkit.data import load_dataset
from tests.helpers import train_mnist_fc

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = 0.015
ATTACK_METRICS = ("pgd_acc", "cw_acc", "interval_attack_acc")


def settings(autoattack: str, complete: str = "off") -> EvaluationSettings:
    """Few steps, two verifiers, no exact verifier, no sweep, the complete stage as asked (``complete``):
    a small model's evaluation in seconds."""
    return EvaluationSettings(pgd_steps=5, pgd_restarts=1, cw_steps=5,
                              interval_attack={"inner_steps": 3, "iterations": 1, "restarts": 1},
                              autoattack=autoattack, verifiers=("interval", "symbolic"), exact="false",
                              complete=complete, complete_time_limit=0.5, eps_sweep=(), sweep_n=0)


@pytest.fixture(scope="module")
def evaluations():
    dataset = load_dataset("mnist5k")
    test = dataset.test.subset(0, 60)
    model = train_mnist_fc(2, 2e-3)
    return test, {version: evaluate_model(model, dataset, test, EPS, settings(version), seed=0)
                  for version in ("fast", "off")}


def test_autoattack_is_taken_into_the_per_sample_worst_case(evaluations):
    test, runs = evaluations
    with_autoattack, without = runs["fast"], runs["off"]
    assert with_autoattack.violations == () and without.violations == ()
    autoattack = with_autoattack.broken["autoattack_acc"]
    worst = with_autoattack.broken["worst_attack_acc"]
    assert bool(autoattack.any()) and bool((~autoattack).any())
    assert not bool((autoattack & ~worst).any())  # broken by autoattack: broken in the worst case
    # the other attacks draw from their own generators, so they break the same samples with or without autoattack
    for metric in ATTACK_METRICS:
        assert torch.equal(with_autoattack.broken[metric], without.broken[metric])
    assert "autoattack_acc" not in without.broken
    assert torch.equal(worst, without.broken["worst_attack_acc"] | autoattack)
    measured = {m.metric: m.value for m in with_autoattack.measurements if m.eval_eps == EPS}
    assert measured["autoattack_acc"] == int((~autoattack).sum()) / len(test)
    assert measured["worst_attack_acc"] == int((~worst).sum()) / len(test)
    assert measured["worst_attack_acc"] <= measured["autoattack_acc"]
    config = next(m.config for m in with_autoattack.measurements if m.metric == "autoattack_acc")
    assert config == "AutoAttack(version='fast')"
    assert "autoattack_acc" not in {m.metric for m in without.measurements}


def test_verified_samples_are_not_broken_by_autoattack(evaluations):
    _, runs = evaluations
    evaluation = runs["fast"]
    verified = evaluation.verified
    assert verified is not None and bool(verified.any())  # the check has samples to look at
    assert not bool((verified & evaluation.broken["autoattack_acc"]).any())
    assert not bool((verified & evaluation.broken["worst_attack_acc"]).any())
