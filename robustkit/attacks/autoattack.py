"""AutoAttack (Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks*, arXiv:2003.01690): the ensemble that robustness leaderboards (RobustBench) report, as
one attack.

Threat model: white box, L-inf ball of radius eps around x in [0, 1]; x is (B, *shape); the Square stage needs
images (B, C, H, W) and the targeted stages at least 4 classes. The stages run in order, each only on the
samples that every earlier stage left robust, and a sample is broken when any stage breaks it (the per-sample
worst case; clean-misclassified samples count as broken, as in AutoAttack):

* ``standard`` (the default, AutoAttack's standard version with its budgets): APGD-CE (100 iterations,
  1 restart), APGD-T (the targeted DLR loss, the 9 most likely other classes, 100 iterations each), FAB-T
  (9 target classes, 100 iterations each) and Square (5,000 queries), see :mod:`robustkit.attacks.apgd`,
  :mod:`robustkit.attacks.fab` and :mod:`robustkit.attacks.square`;
* ``fast`` (robustkit's, not AutoAttack's): APGD-CE and APGD-T (9 target classes) with 25 iterations each,
  a quarter of the standard ones, and neither FAB-T nor Square: at most 250 gradient steps per sample, for
  quick runs; expect it to break somewhat fewer samples than ``standard``.

All stages draw from the one generator in turn, so a seed fixes the whole run. The result is an
:class:`AutoAttackResult`: an :class:`AttackResult` (each stage re-checked by its own fresh forward pass, and
the final points once more) with ``stage_robust_accuracy``, the robust accuracy after the clean check and after
each stage, non-increasing by construction. A sample's point is the first stage's adversarial example that
broke it, or for a robust sample the lowest-margin point that any stage found.

>>> import torch
>>> from robustkit.models import build_model
>>> model = build_model("mnist_fc_small", seed=0).eval()
>>> x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
>>> y = model(x).argmax(1)  # all four correctly classified
>>> [label for label, _ in AutoAttack().stages]
['apgd-ce', 'apgd-t', 'fab-t', 'square']
>>> result = AutoAttack(version="fast")(model, x, y, eps=0.01)
>>> [label for label, _ in result.stage_robust_accuracy]
['clean', 'apgd-ce', 'apgd-t']
>>> bool(((result.x_adv - x).abs() <= 0.01 + 1e-6).all())
True
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import APGD
from robustkit.attacks.base import Attack, AttackResult, preserved_model
from robustkit.attacks.fab import FAB
from robustkit.attacks.square import Square
from robustkit.errors import InputError
from robustkit.gradients import margins

__all__ = ["VERSIONS", "AutoAttack", "AutoAttackResult"]

VERSIONS = ("standard", "fast")
CLEAN = "clean"


@dataclass(frozen=True, eq=False)
class AutoAttackResult(AttackResult):
    """An :class:`AttackResult` with the robust accuracy after each stage: ``(("clean", a0), ("apgd-ce", a1),
    ...)``, over all samples of the batch; the last value equals :attr:`robust_accuracy`.

    ``broken_at`` holds, per sample, the position in that tuple of the stage from which the sample counts as
    broken (0: misclassified clean; ``len(stage_robust_accuracy)`` for a sample no stage broke), so the stage
    accuracies of several batches combine exactly: after stage k, the share of samples with ``broken_at > k``.
    """

    stage_robust_accuracy: tuple[tuple[str, float], ...] = ()
    broken_at: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class AutoAttack(Attack):
    """AutoAttack's ``standard`` version (or robustkit's ``fast`` one); see the module docstring."""

    name: ClassVar[str] = "autoattack"
    version: str = "standard"

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise InputError(f"version must be one of {VERSIONS}, got {self.version!r}")

    @property
    def stages(self) -> tuple[tuple[str, Attack], ...]:
        """The stages of the version, in the order they run: (label, attack) pairs."""
        if self.version == "fast":
            return (("apgd-ce", APGD(steps=25)), ("apgd-t", APGD(loss="dlr", targeted=True, steps=25)))
        return (
            ("apgd-ce", APGD(loss="ce", steps=100, restarts=1)),
            ("apgd-t", APGD(loss="dlr", targeted=True, n_target_classes=9, steps=100, restarts=1)),
            ("fab-t", FAB(n_target_classes=9, steps=100, restarts=1)),
            ("square", Square(n_queries=5000, p_init=0.8, restarts=1)),
        )

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        return self.run_stages(model, x, y, eps, generator)[0]

    def run_stages(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The points and, per sample, the number of the stage that broke it (0: misclassified clean; one more
        than the number of stages: never broken)."""
        logits = model(x)
        best, best_margin = x.clone(), margins(logits, y)
        robust = logits.argmax(1) == y
        stage_of = torch.where(robust, len(self.stages) + 1, 0)
        for number, (_, member) in enumerate(self.stages, start=1):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            result = member(model, x[index], y[index], eps=eps, generator=generator)
            better = result.success | (result.margin < best_margin[index])
            best[index[better]] = result.x_adv[better]
            best_margin[index[better]] = result.margin[better]
            robust[index[result.success]] = False
            stage_of[index[result.success]] = number
        return best, stage_of

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, generator: torch.Generator | None = None
    ) -> AutoAttackResult:
        start = time.perf_counter()
        eps, x, y, generator = self.prepare(model, x, y, eps, generator)
        with preserved_model(model), torch.no_grad():
            n_classes = model(x[:1]).shape[1]
            if int(y.min()) < 0 or int(y.max()) >= n_classes:
                raise InputError(f"labels must be in [0, {n_classes - 1}]")
            with warnings.catch_warnings():  # the train-mode warning once, not once per stage
                warnings.filterwarnings("ignore", message="the model is in training mode")
                best, stage_of = self.run_stages(model, x, y, eps, generator)
            final_logits = model(best)
        prediction = final_logits.argmax(1)
        success = prediction != y
        labels = [CLEAN, *(label for label, _ in self.stages)]
        # a sample counts as broken from the stage that broke it on, if the final forward pass confirms it (one
        # that it misclassifies without a stage's report, which float rounding could cause, from the last stage)
        broken_at = torch.where(success, stage_of.clamp(max=len(self.stages)), len(labels))
        accuracies = tuple((label, int((broken_at > number).sum()) / len(y)) for number, label in enumerate(labels))
        return AutoAttackResult(
            attack=repr(self), eps=eps, norm=self.threat, x_adv=best, success=success,
            margin=margins(final_logits, y), prediction=prediction, time_s=time.perf_counter() - start,
            stage_robust_accuracy=accuracies, broken_at=broken_at,
        )
