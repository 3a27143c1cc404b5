"""AutoAttack: robust accuracy after each stage, never above APGD-CE alone, seeded, and Square as the stage that
still works behind a masked gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks import APGD, AutoAttack, AutoAttackResult, get_attack
from robustkit.errors import InputError
from robustkit.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

STAGES = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]


class Rounded(nn.Module):
    """The wrapped network behind 8-bit rounding of its input: the same predictions, but a zero input gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def standard(trained_fc, mnist):
    x, y = mnist.test.x[:24], mnist.test.y[:24]
    return x, y, AutoAttack()(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))


def accuracies(result: AutoAttackResult) -> list[float]:
    return [accuracy for _, accuracy in result.stage_robust_accuracy]


def test_stage_accuracies_are_reported_and_non_increasing(standard, trained_fc):
    x, y, result = standard
    assert isinstance(result, AutoAttackResult)
    assert [label for label, _ in result.stage_robust_accuracy] == STAGES
    values = accuracies(result)
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(result.robust_accuracy)
    with torch.no_grad():
        assert values[0] == pytest.approx(float((trained_fc(x).argmax(1) == y).float().mean()))
        prediction = trained_fc(result.x_adv).argmax(1)
    assert torch.equal(result.success, prediction != y)  # re-checked by a fresh forward pass
    assert float((result.x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert 0 < result.robust_accuracy < values[0]


def test_broken_at_gives_the_stage_accuracies_per_sample(standard):
    _, _, result = standard
    assert result.broken_at is not None and result.broken_at.shape == result.success.shape
    assert torch.equal(result.broken_at < len(STAGES), result.success)  # robust samples: past the last stage
    for position, (_, accuracy) in enumerate(result.stage_robust_accuracy):
        assert accuracy == int((result.broken_at > position).sum()) / len(result.success)


def test_never_above_apgd_ce_alone_whose_run_is_the_first_stage(standard, trained_fc):
    x, y, result = standard
    alone = APGD()(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert result.robust_accuracy <= alone.robust_accuracy
    assert dict(result.stage_robust_accuracy)["apgd-ce"] == pytest.approx(alone.robust_accuracy)


def test_square_breaks_what_the_gradient_stages_cannot_behind_a_masked_gradient(trained_fc, mnist):
    x, y = mnist.test.x[24:36], mnist.test.y[24:36]
    masked = Rounded(trained_fc).eval()
    result = AutoAttack()(masked, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    stages = dict(result.stage_robust_accuracy)
    assert stages["square"] < stages["fab-t"] - 0.2  # the gradient-free stage breaks many more points
    assert stages["square"] == pytest.approx(result.robust_accuracy)


def test_same_seed_same_result_and_the_fast_version(trained_fc, mnist):
    x, y = mnist.test.x[:32], mnist.test.y[:32]
    fast = get_attack("autoattack", version="fast")
    first = fast(trained_fc, x, y, eps=0.05, generator=torch.Generator().manual_seed(4))
    second = fast(trained_fc, x, y, eps=0.05, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.x_adv, second.x_adv)
    assert first.stage_robust_accuracy == second.stage_robust_accuracy
    assert [label for label, _ in first.stage_robust_accuracy] == ["clean", "apgd-ce", "apgd-t"]
    assert [type(member).__name__ for _, member in AutoAttack().stages] == ["APGD", "APGD", "FAB", "Square"]


def test_model_state_and_mode_warning(trained_fc, mnist):
    x, y = mnist.test.x[:8], mnist.test.y[:8]
    trained_fc.train()
    try:
        with pytest.warns(UserWarning, match="training mode") as caught:
            AutoAttack(version="fast")(trained_fc, x, y, eps=0.05)
        assert len([w for w in caught if "training mode" in str(w.message)]) == 1  # once, not once per stage
        assert trained_fc.training
    finally:
        trained_fc.eval()


def test_bad_version_and_too_few_classes():
    with pytest.raises(InputError, match="version"):
        AutoAttack(version="plus")
    model = build_model("toy2d", seed=0).eval()  # 3 classes: no targeted DLR loss
    x = torch.full((2, 1, 1, 2), 0.5)
    with pytest.raises(InputError, match="4 classes"):
        AutoAttack(version="fast")(model, x, model(x).argmax(1), eps=0.001)
