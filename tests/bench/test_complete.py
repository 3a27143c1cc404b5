"""The bench's complete stage: the band's arithmetic, the counterexample re-check, the chunked calls and the choice
of the complete verifier from the registry (fake verifiers monkeypatched into it, restored after each test)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from robustkit.bench.complete import (
    CHUNK,
    BandInvariantError,
    CompleteChoice,
    check_counterexamples,
    choose_complete,
    combine_band,
    complete_methods,
    complete_problem,
    run_complete,
)
from robustkit.data import Split, load_dataset
from robustkit.errors import InputError
from robustkit.evaluation import EvalData
from robustkit.verifiers import VERIFIERS, Status, VerificationResult, Verifier
from robustkit.verifiers.context import BoundContext, BoundResult
from robustkit.verifiers.graph import Graph

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = 0.05


def masks(*rows: str) -> list[Tensor]:
    """Boolean masks from strings of 0/1, one per sample: ``masks("10", "01")``."""
    return [torch.tensor([c == "1" for c in row]) for row in rows]


def test_band_arithmetic_on_a_hand_built_case() -> None:
    # samples: 0 verified by the best relaxation, 1 broken by an attack, 2 clean-misclassified (broken too),
    # 3 verified by the complete stage, 4 falsified by it, 5 left undecided (a timeout)
    relaxation, broken, complete_verified, complete_falsified = masks("100000", "011000", "000100", "000010")
    band = combine_band(relaxation, broken, complete_verified, complete_falsified)
    assert band.verified.tolist() == [True, False, False, True, False, False]
    assert band.falsified.tolist() == [False, True, True, False, True, False]
    assert band.undecided.tolist() == [False, False, False, False, False, True]
    assert band.fractions() == {"verified_complete": 2 / 6, "falsified": 3 / 6, "undecided": 1 / 6}


def test_verified_and_falsified_at_once_is_an_internal_error_naming_the_sample() -> None:
    relaxation, broken, complete_verified, complete_falsified = masks("110", "000", "000", "010")
    with pytest.raises(BandInvariantError, match=r"soundness bug.*test sample 41 verified by the best relaxation "
                                                 r"but falsified by the complete stage"):
        combine_band(relaxation, broken, complete_verified, complete_falsified, indices=[40, 41, 42])


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, Tensor, Tensor]:
    """A fixed linear classifier of 4 inputs (class 1 when x0 > x1) and four samples of class 0."""
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
        layer.bias.zero_()
    model = nn.Sequential(nn.Flatten(), layer)
    x = torch.tensor([[0.5, 0.52, 0.5, 0.5]]).repeat(4, 1).view(4, 1, 2, 2)
    return model.eval(), x, torch.zeros(4, dtype=torch.int64)


def test_the_counterexample_recheck_rejects_a_fake_outside_the_ball(linear: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = linear
    counterexample = x.clone()
    counterexample[:, 0, 0, 0] = 0.56  # misclassified (x0 > x1 = 0.52), but 0.06 from x: outside the ball
    counterexample[0, 0, 0, 0] = 0.5 + EPS + 1e-7  # misclassified and inside, with the 1e-6 slack ...
    counterexample[0, 0, 0, 1] = 0.5  # ... and x1 lowered by 0.02
    counterexample[2, 0, 0, 0] = 0.51  # inside the ball, but classified correctly
    counterexample[3, 0, 1, 1] = float("nan")
    accepted, problems = check_counterexamples(model, x, y, EPS, counterexample, torch.ones(4, dtype=torch.bool))
    assert accepted.tolist() == [True, False, False, False]
    why = dict(problems)
    assert set(why) == {1, 2, 3}
    assert "outside the eps-ball" in why[1] and "L-inf distance 0.06" in why[1]
    assert "classified correctly by a fresh forward pass" in why[2] and "not finite" in why[3]
    # nothing claimed, nothing checked; a claim without any counterexample is refused
    assert check_counterexamples(model, x, y, EPS, None, torch.zeros(4, dtype=torch.bool))[0].sum() == 0
    refused, problems = check_counterexamples(model, x, y, EPS, None, torch.tensor([False, True, False, False]))
    assert not refused.any() and problems == [(1, "reported falsified without a counterexample")]


@dataclass(frozen=True, kw_only=True)
class ScriptedComplete(Verifier):
    """A fake complete verifier: falsifies a misclassified sample at the clean point (a valid counterexample),
    verifies the correctly classified samples at even positions of its chunk and claims a counterexample 3 eps away
    for the others (a fake one, which the bench must refuse). Records the size of every call."""

    name: ClassVar[str] = "scripted"
    complete: ClassVar[bool] = True
    calls: ClassVar[list[int]] = []
    time_limit: float = 1.0

    def bound(self, ctx: BoundContext) -> BoundResult:  # pragma: no cover - the bench only calls verify
        raise NotImplementedError

    def verify(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> VerificationResult:
        ScriptedComplete.calls.append(len(y))
        with torch.no_grad():
            prediction = model(x).argmax(1)
        status, counterexample = [], torch.full_like(x, float("nan"))
        for i in range(len(y)):
            if prediction[i] != y[i]:
                status.append(Status.FALSIFIED)
                counterexample[i] = x[i]
            elif i % 2 == 0:
                status.append(Status.VERIFIED)
            else:
                status.append(Status.FALSIFIED)
                counterexample[i] = (x[i] + 3 * eps).clamp(0, 1)
        zeros = torch.zeros(len(y))
        return VerificationResult(self.name, eps, tuple(status), zeros, torch.zeros(len(y), 10), prediction, zeros,
                                  counterexample)


def test_the_band_goes_to_the_verifier_in_chunks_and_fake_counterexamples_stay_undecided(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(VERIFIERS._items, "scripted", ScriptedComplete)
    monkeypatch.setattr(ScriptedComplete, "calls", [])
    dataset = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    x = dataset.test.x[:40]
    with torch.no_grad():
        prediction = model(x).argmax(1)
    # labels that make every third sample misclassified
    y = torch.where(torch.arange(40) % 3 == 0, (prediction + 1) % 10, prediction)
    data = EvalData(dataset, Split(x, y), 100, 100)  # as if test samples 100 to 139
    band = torch.zeros(40, dtype=torch.bool)
    band[3:28] = True
    with caplog.at_level(logging.WARNING, logger="robustkit.bench.complete"):
        run = run_complete(model, data, EPS, CompleteChoice("scripted"), 0.25, band)
    assert ScriptedComplete.calls == [CHUNK, CHUNK, 5]  # 25 band samples, one call per chunk of 10
    with torch.no_grad():
        wrong = model(data.split.x).argmax(1) != data.split.y
    chunk_position = torch.zeros(40, dtype=torch.long)
    chunk_position[3:28] = torch.arange(25) % CHUNK
    even = chunk_position % 2 == 0
    assert run.falsified.tolist() == (band & wrong).tolist()
    assert run.verified.tolist() == (band & ~wrong & even).tolist()
    faked = band & ~wrong & ~even
    assert bool(faked.any()) and len(run.rejected) == int(faked.sum()) == len(caplog.records)
    first = int(faked.nonzero()[0])
    assert f"scripted at eps {EPS:g}, test sample {100 + first}: counterexample outside the eps-ball" in run.rejected[0]
    assert run.rejected[0].endswith("counted as undecided") and run.rejected[0] in caplog.records[0].getMessage()
    assert run.band.tolist() == list(range(3, 28)) and run.method == "scripted"
    assert '"method": "scripted", "time_limit": 0.25, "band": 25' in run.config()
    none = run_complete(model, data, EPS, CompleteChoice(None, "evaluation.complete is off"), 0.25, band)
    assert not none.verified.any() and not none.falsified.any() and "evaluation.complete is off" in none.config()
    # a cell budget: no chunk starts once it is spent (here: after the first), the rest stays undecided
    ScriptedComplete.calls.clear()
    clock = iter([0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    monkeypatch.setattr("robustkit.bench.complete.time.perf_counter", lambda: next(clock, 5.0))
    capped = run_complete(model, data, EPS, CompleteChoice("scripted"), 0.25, band, budget=1.0)
    assert ScriptedComplete.calls == [CHUNK] and capped.attempted == CHUNK
    assert not capped.verified[3 + CHUNK:].any() and not capped.falsified[3 + CHUNK:].any()
    assert '"budget": 1.0, "attempted": 10' in capped.config()


@dataclass(frozen=True, kw_only=True)
class FakeComplete(Verifier):
    """A complete verifier that applies to every graph (never run here)."""

    name: ClassVar[str] = "fake"
    complete: ClassVar[bool] = True
    time_limit: float = 1.0

    def bound(self, ctx: BoundContext) -> BoundResult:  # pragma: no cover - only the choice is tested
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class FakeInapplicable(FakeComplete):
    """A complete verifier that applies to no graph."""

    def applicable(self, graph: Graph) -> str | None:
        return "needs what this model lacks"


@dataclass(frozen=True, kw_only=True)
class FakeIncomplete(FakeComplete):
    """A relaxation: not complete, so never a choice of the complete stage."""

    complete: ClassVar[bool] = False


def test_auto_takes_the_strongest_applicable_complete_verifier_of_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    items = VERIFIERS._items
    exact = items["exact"]
    monkeypatch.setitem(items, "bab", FakeComplete)
    monkeypatch.setitem(items, "zeta", FakeComplete)  # another complete verifier, after the preference list
    monkeypatch.setitem(items, "relax", FakeIncomplete)
    assert complete_methods()[:2] == ("bab", "exact") and complete_methods()[-1] == "zeta"
    assert "relax" not in complete_methods()
    assert choose_complete("auto", model) == CompleteChoice("bab")
    assert choose_complete("exact", model) == CompleteChoice("exact")  # a named one, when it applies
    assert choose_complete("off", model).method is None
    monkeypatch.setitem(items, "bab", FakeInapplicable)  # bab cannot take the model: exact is next
    assert choose_complete("auto", model) == CompleteChoice("exact")
    assert complete_problem("bab", model) == "bab does not apply to the model: needs what this model lacks"
    with pytest.raises(InputError, match="evaluation.complete: bab does not apply to the model"):
        choose_complete("bab", model)
    monkeypatch.setitem(items, "exact", FakeInapplicable)
    assert choose_complete("auto", model) == CompleteChoice("zeta")
    monkeypatch.setitem(items, "zeta", FakeInapplicable)
    nothing = choose_complete("auto", model)
    assert nothing.method is None and nothing.reason.startswith("no complete verifier applies (bab: needs what")
    monkeypatch.setitem(items, "exact", exact)
    monkeypatch.delitem(items, "bab")  # a robustkit without bab (before it landed): auto takes exact
    assert choose_complete("auto", model) == CompleteChoice("exact")
    assert complete_problem("bab", model) == "'bab' is not a complete verifier of this robustkit"
    assert complete_problem("auto", model) is None and complete_problem("off", model) is None


def test_a_named_complete_verifier_that_cannot_take_a_model_fails_before_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from robustkit.bench import parse_config
    from robustkit.bench.runner import GridData, check_models

    monkeypatch.setitem(VERIFIERS._items, "exact", FakeInapplicable)
    config = parse_config({"grid": {"models": ["mnist_fc_small"], "trainers": ["standard"]},
                           "data": {"n_train": 100, "n_test": 10, "val_size": 0},
                           "evaluation": {"complete": "exact", "eps_sweep": []}}, "test")
    with pytest.raises(InputError, match=r"^bench config: evaluation.complete: model 'mnist_fc_small': exact does "
                                         r"not apply to the model: needs what this model lacks \(use auto"):
        check_models(config, {"mnist5k": GridData.load("mnist5k", config)})
