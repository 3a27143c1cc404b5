"""The one evaluation path (robustkit.evaluation): sample selection, the clean pass, attacks with their re-check
and worst case, verifiers and the consistency checks, checked against direct library calls."""

from __future__ import annotations

import pytest
import torch

from robustkit.attacks import PGD
from robustkit.data import load_dataset
from robustkit.errors import InputError, NonFiniteError
from robustkit.evaluation import (
    AttackRun,
    EvalData,
    MethodRun,
    batch_generator,
    check_finite_logits,
    find_conflicts,
    order_violation,
    predict,
    recheck,
    run_attack,
    run_verifiers,
    take_samples,
    verified_but_broken,
    worst_case,
)
from robustkit.verifiers import Status, get_verifier, verify
from tests.helpers import train_mnist_fc

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data() -> EvalData:
    dataset = load_dataset("mnist5k")
    return EvalData(dataset, dataset.test.subset(100, 30), 100, 12)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return train_mnist_fc(1, 2e-3)


def test_take_samples_refuses_ranges_outside_the_split(data: EvalData) -> None:
    split = data.dataset.test
    assert torch.equal(take_samples(split, 10, 5, what="the test split", count="--n").x, split.x[10:15])
    with pytest.raises(InputError, match="--n 1001 asks for 1001 samples, but the test split has 1000: use --n 1000"):
        take_samples(split, 0, 1001, what="the test split", count="--n")
    with pytest.raises(InputError, match="--s 995 --n 10 asks for samples up to index 1004.*use --n 5 or less"):
        take_samples(split, 995, 10, what="the test split", count="--n", first="--s")
    with pytest.raises(InputError, match="--s 1000 is out of range"):
        take_samples(split, 1000, 1, what="the test split", count="--n", first="--s")
    with pytest.raises(InputError, match="the empty split is empty"):
        take_samples(split.subset(0, 0), 0, 1, what="the empty split", count="--n")


def test_predict_matches_the_model_and_refuses_non_finite_logits(data: EvalData, model: torch.nn.Module) -> None:
    with torch.no_grad():
        expected = model(data.split.x).argmax(1)
    assert torch.equal(predict(model, data), expected)
    logits = torch.zeros(4, 3)
    logits[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"on 1 of 4 samples of the batch \(sample 12\)"):
        check_finite_logits(logits, 10, "the batch")


def test_attack_runs_match_the_attack_and_pass_the_recheck(data: EvalData, model: torch.nn.Module) -> None:
    attack = PGD(steps=3)
    runs = run_attack(model, data, "pgd", attack, [0.05, 0.2], seed=4)
    assert [r.eps for r in runs] == [0.05, 0.2] and all(r.config == repr(attack) for r in runs)
    first = [attack(model, x, y, eps=0.05, generator=batch_generator(4, offset)) for offset, x, y in data.batches()]
    assert torch.equal(runs[0].success, torch.cat([r.success for r in first]))
    assert torch.equal(runs[0].x_adv, torch.cat([r.x_adv for r in first]))
    assert recheck(model, data, runs) == []
    assert runs[1].n_broken >= runs[0].n_broken  # a larger ball breaks at least as many samples here
    assert torch.equal(worst_case(runs, 0.2), runs[1].success)


def test_batch_generators_depend_on_the_seed_and_the_offset_only() -> None:
    draws = {(seed, offset): torch.rand(4, generator=batch_generator(seed, offset))
             for seed in (0, 1, -1) for offset in (0, 12, 24)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)  # no two streams alike
    assert torch.equal(draws[1, 12], torch.rand(4, generator=batch_generator(1, 12)))


def test_a_staged_attack_keeps_its_stages_across_batches(data: EvalData, model: torch.nn.Module) -> None:
    """AutoAttack's per-sample broken_at joins over the batches (12, 12 and 6 samples), so the robust counts
    after each stage are those of the library's results added up."""
    from robustkit.attacks import AutoAttack

    attack = AutoAttack(version="fast")
    (run,) = run_attack(model, data, "autoattack", attack, [0.03], seed=2)
    expected = [0, 0, 0]
    for offset, x, y in data.batches():
        result = attack(model, x, y, eps=0.03, generator=batch_generator(2, offset))
        for position, (_, accuracy) in enumerate(result.stage_robust_accuracy):
            expected[position] += round(accuracy * len(y))
    assert run.stages == ("clean", "apgd-ce", "apgd-t")
    assert run.stage_robust_counts() == list(zip(run.stages, expected, strict=True))
    assert expected[0] > expected[-1] == data.n - run.n_broken
    (plain,) = run_attack(model, data, "pgd", PGD(steps=2), [0.03], seed=2)
    assert plain.stages == () and plain.broken_at is None and plain.stage_robust_counts() == []


def test_recheck_reports_examples_outside_the_ball_and_false_successes(data: EvalData, model: torch.nn.Module) -> None:
    clean = predict(model, data)
    x_adv = data.split.x.clone()
    x_adv[3] = (x_adv[3] + 0.5).clamp(0, 1)  # far outside an eps of 0.1
    success = clean != data.split.y
    correct = (~success).nonzero().flatten()[0]
    success[correct] = True  # claims a correctly classified clean point is adversarial
    run = AttackRun("fake", "Fake()", 0.1, x_adv, success, clean, 0.0)
    problems = recheck(model, data, [run])
    assert any(f"test sample {data.start + 3}: outside the eps-ball" in p for p in problems)
    assert any(f"test sample {data.start + int(correct)}: reported adversarial" in p for p in problems)


def test_worst_case_is_broken_by_any_attack() -> None:
    def run(success: list[bool], eps: float = 0.1) -> AttackRun:
        mask = torch.tensor(success)
        return AttackRun("a", "", eps, torch.zeros(3, 1), mask, mask.long(), 0.0)

    runs = [run([True, False, False]), run([False, False, True]), run([False, True, False], eps=0.3)]
    assert worst_case(runs, 0.1).tolist() == [True, False, True]


def test_run_verifiers_equals_verify_per_method(data: EvalData, model: torch.nn.Module) -> None:
    verifiers = {name: get_verifier(name) for name in ("interval", "symbolic", "crown")}
    runs = run_verifiers(model, data, verifiers, [0.01, 0.05])
    assert [(r.method, r.eps) for r in runs] == [(m, e) for m in verifiers for e in (0.01, 0.05)]
    for run in runs:
        expected = [verify(model, x, y, run.eps, method=run.method) for _, x, y in data.batches()]
        assert list(run.status) == [s for r in expected for s in r.status]
        assert torch.allclose(run.margin_lower, torch.cat([r.margin_lower for r in expected]), atol=1e-5)
        verified = torch.tensor([s is Status.VERIFIED for s in run.status]) & (run.prediction == data.split.y)
        assert torch.equal(run.verified(data.split.y), verified)
    assert find_conflicts(runs, data) == []


def test_consistency_checks_find_what_they_are_for(data: EvalData) -> None:
    n = data.n
    labels = data.split.y
    status = [Status.UNKNOWN] * n
    status[2] = Status.VERIFIED
    verified = MethodRun("a", 0.1, tuple(status), torch.zeros(n), labels.clone(), torch.zeros(n))
    status[2] = Status.FALSIFIED
    falsified = MethodRun("b", 0.1, tuple(status), torch.zeros(n), labels.clone(), torch.zeros(n))
    (conflict,) = find_conflicts([verified, falsified], data)
    assert (conflict.index, conflict.verified_by, conflict.falsified_by) == (data.start + 2, ("a",), ("b",))
    broken = torch.zeros(n, dtype=torch.bool)
    broken[2] = True
    assert verified_but_broken([verified, falsified], broken, data, 0.1) == [
        f"test sample {data.start + 2}: verified by a at eps 0.1 but broken by an attack"
    ]
    assert order_violation(0.5, 0.6, 0.9, 0.1) is None
    assert "verified 0.7000, worst-case attack 0.6000" in str(order_violation(0.7, 0.6, 0.9, 0.1))

