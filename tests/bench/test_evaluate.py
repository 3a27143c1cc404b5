"""The bench's evaluation of one model, per sample: AutoAttack is one of the attacks of the worst case, and a
verified sample is broken by none of them."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.bench.complete import choose_complete
from robustkit.bench.config import EvaluationSettings
from robustkit.bench.evaluate import Evaluation, evaluate_model
from robustkit.data import load_dataset
from robustkit.parallel import WorkerPool
from tests.helpers import train_mnist_fc

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = 0.015
ATTACK_METRICS = ("pgd_acc", "cw_acc", "interval_attack_acc")
BAND = ("verified_complete", "falsified", "undecided")


def settings(autoattack: str, complete: str = "off") -> EvaluationSettings:
    """Few steps, two verifiers, no exact verifier, no sweep, the complete stage as asked (``complete``):
    a small model's evaluation in seconds."""
    return EvaluationSettings(pgd_steps=5, pgd_restarts=1, cw_steps=5,
                              interval_attack={"inner_steps": 3, "iterations": 1, "restarts": 1},
                              autoattack=autoattack, verifiers=("interval", "symbolic"), exact="false",
                              complete=complete, complete_time_limit=0.5, eps_sweep=(), sweep_n=0)


@pytest.fixture(scope="module")
def model():
    return train_mnist_fc(2, 2e-3)


@pytest.fixture(scope="module")
def evaluations(model):
    dataset = load_dataset("mnist5k")
    test = dataset.test.subset(0, 60)
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


def band_of(evaluation: Evaluation) -> dict[str, float]:
    return {m.metric: m.value for m in evaluation.measurements if m.metric in BAND and m.eval_eps == EPS}


def test_without_the_complete_stage_the_band_is_what_relaxations_and_attacks_leave(evaluations):
    _, runs = evaluations
    evaluation = runs["off"]
    measured = {m.metric: m for m in evaluation.measurements if m.eval_eps == EPS}
    best, worst = measured["verified_best"].value, measured["worst_attack_acc"].value
    robust, proven = round(60 * worst), round(60 * best)
    assert band_of(evaluation) == {"verified_complete": best, "falsified": (60 - robust) / 60,
                                   "undecided": (robust - proven) / 60}
    assert robust > proven  # a band to decide: the other test's complete verifier has work
    assert json.loads(measured["verified_complete"].config) == {"method": None, "reason": "evaluation.complete is off"}


def test_the_complete_stage_decides_within_the_band(model):
    """The strongest complete verifier of the registry (bab where robustkit has it) on the band of a trained net."""
    dataset = load_dataset("mnist5k")
    test = dataset.test.subset(0, 60)
    evaluation = evaluate_model(model, dataset, test, EPS, settings("off", complete="auto"), seed=0)
    assert evaluation.violations == ()
    band, verified, broken = evaluation.band, evaluation.verified, evaluation.broken["worst_attack_acc"]
    assert band is not None and verified is not None and evaluation.complete is not None
    assert int(band.verified.sum() + band.falsified.sum() + band.undecided.sum()) == 60
    assert not bool((band.verified & band.falsified).any())
    assert bool((band.verified >= verified).all()) and bool((band.falsified >= broken).all())
    # the complete verifier saw the band only, and decided only inside it
    assert evaluation.complete.band.tolist() == (~verified & ~broken).nonzero().flatten().tolist()
    assert not bool(((band.verified & ~verified) | (band.falsified & ~broken))[verified | broken].any())
    measured = band_of(evaluation)
    assert measured == {"verified_complete": int(band.verified.sum()) / 60,
                        "falsified": int(band.falsified.sum()) / 60, "undecided": int(band.undecided.sum()) / 60}
    stage = json.loads(next(m.config for m in evaluation.measurements if m.metric == "verified_complete"))
    assert stage == {"method": choose_complete("auto", model).method, "time_limit": 0.5,
                     "band": len(evaluation.complete.band)}


def test_evaluation_workers_give_the_numbers_of_one_process(model, monkeypatch):
    """Batches of every stage (attacks, relaxations, sweep, the complete stage's chunks) in two worker
    processes: each batch has its own generator and every process one thread here, so every measurement and
    every per-sample mask is that of the evaluation in this process."""
    import dataclasses

    dataset = load_dataset("mnist5k")
    test = dataset.test.subset(0, 60)
    chosen = dataclasses.replace(settings("fast", complete="exact"), complete_time_limit=30.0, batch_size=20,
                                 eps_sweep=(0.01, 0.03), sweep_n=40)
    eps = 0.04
    monkeypatch.setattr("robustkit.bench.complete.CHUNK", 3)  # the band (8 samples here) in several chunks
    alone = evaluate_model(model, dataset, test, eps, chosen, seed=3)
    pooled_work = []
    run = WorkerPool.run

    def recorded(pool, work, *args, **options):
        pooled_work.append(work.__name__)
        return run(pool, work, *args, **options)

    monkeypatch.setattr(WorkerPool, "run", recorded)
    pooled = evaluate_model(model, dataset, test, eps, chosen, seed=3, workers=2)
    assert set(pooled_work) == {"_attack_task", "_verify_task", "_sweep_task", "_complete_task"}
    assert alone.violations == () == pooled.violations
    values = [(m.metric, m.eval_eps, m.value, m.n, m.config) for m in alone.measurements]
    assert values == [(m.metric, m.eval_eps, m.value, m.n, m.config) for m in pooled.measurements]
    assert alone.broken.keys() == pooled.broken.keys()
    assert all(torch.equal(alone.broken[key], pooled.broken[key]) for key in alone.broken)
    assert alone.complete is not None and pooled.complete is not None and len(alone.complete.band) > 3
    assert torch.equal(alone.complete.verified, pooled.complete.verified)
    assert torch.equal(alone.complete.falsified, pooled.complete.falsified)
    assert {m.eval_eps for m in pooled.measurements} == {0.01, 0.03, eps}
    assert pooled.peak_memory_mb > 0
