"""Schedules against hand-worked values: training eps, learning rate, and MixTrain's weight a."""

from __future__ import annotations

import pytest

from robustkit.errors import InputError
from robustkit.trainers.schedules import AdaptiveWeight, EpsSchedule, GeometricWeight, LRSchedule

# (epoch, batch) -> fraction of the ramp for warm-up 1 epoch, ramp 2 epochs, 4 batches per epoch
RAMP_POINTS = [
    ((0, 0), 0.0), ((0, 3), 0.0),
    ((1, 0), 0.0), ((1, 1), 0.125), ((1, 2), 0.25), ((1, 3), 0.375),
    ((2, 0), 0.5), ((2, 2), 0.75), ((2, 3), 0.875),
    ((3, 0), 1.0), ((5, 2), 1.0),
]


@pytest.mark.parametrize(("position", "fraction"), RAMP_POINTS)
def test_linear_eps_ramp_after_warmup(position: tuple[int, int], fraction: float) -> None:
    schedule = EpsSchedule(0.3, warmup_epochs=1, ramp_epochs=2, shape="linear")
    epoch, batch = position
    assert schedule.progress(epoch, batch, 4) == pytest.approx(fraction)
    assert schedule(epoch, batch, 4) == pytest.approx(0.3 * fraction)


@pytest.mark.parametrize(("position", "fraction"), RAMP_POINTS)
def test_smooth_eps_ramp_is_smoothstep_of_the_linear_fraction(position: tuple[int, int], fraction: float) -> None:
    schedule = EpsSchedule(0.3, warmup_epochs=1, ramp_epochs=2, shape="smooth")
    epoch, batch = position
    assert schedule(epoch, batch, 4) == pytest.approx(0.3 * fraction * fraction * (3 - 2 * fraction))


def test_smooth_ramp_hand_values_start_slow_and_end_slow() -> None:
    schedule = EpsSchedule(0.3, warmup_epochs=1, ramp_epochs=2, shape="smooth")
    # t = 1/8 -> 0.04296875; t = 1/2 -> 1/2; t = 7/8 -> 0.95703125
    assert schedule(1, 1, 4) == pytest.approx(0.3 * 0.04296875)
    assert schedule(2, 0, 4) == pytest.approx(0.15)
    assert schedule(2, 3, 4) == pytest.approx(0.3 * 0.95703125)
    linear = EpsSchedule(0.3, warmup_epochs=1, ramp_epochs=2)
    assert schedule(1, 1, 4) < linear(1, 1, 4) and schedule(2, 3, 4) > linear(2, 3, 4)


def test_ramp_done_counts_whole_epochs() -> None:
    schedule = EpsSchedule(0.1, warmup_epochs=1, ramp_epochs=2)
    assert [schedule.ramp_done(e) for e in range(5)] == [False, False, False, True, True]


def test_no_ramp_jumps_to_target_after_warmup() -> None:
    schedule = EpsSchedule(0.2, warmup_epochs=2, ramp_epochs=0)
    assert [schedule(e, 0, 3) for e in range(4)] == [0.0, 0.0, 0.2, 0.2]
    assert EpsSchedule(0.2)(0, 0, 3) == 0.2 and EpsSchedule(0.2).ramp_done(0)


def test_bad_eps_schedules_are_refused() -> None:
    with pytest.raises(InputError, match="linear"):
        EpsSchedule(0.1, shape="cubic")
    with pytest.raises(InputError, match=">= 0"):
        EpsSchedule(0.1, warmup_epochs=-1)


def test_step_lr_drops_at_the_milestone_fractions() -> None:
    schedule = LRSchedule(0.1, "step", epochs=20)  # milestones 0.6, 0.85 -> epochs 12 and 17, gamma 0.2
    expected = {0: 0.1, 11: 0.1, 12: 0.02, 16: 0.02, 17: 0.004, 19: 0.004}
    for epoch, lr in expected.items():
        assert schedule(epoch) == pytest.approx(lr)


def test_cosine_lr_hand_values() -> None:
    schedule = LRSchedule(0.1, "cosine", epochs=5)  # to 0.1 * 0.01 at the last epoch
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(1) == pytest.approx(0.001 + 0.099 * (1 + 2**-0.5) / 2)
    assert schedule(2) == pytest.approx(0.0505)
    assert schedule(4) == pytest.approx(0.001)
    values = [schedule(e) for e in range(5)]
    assert values == sorted(values, reverse=True)


def test_constant_lr_and_bad_lr_schedules() -> None:
    assert {LRSchedule(0.01, "constant", epochs=9)(e) for e in range(9)} == {0.01}
    with pytest.raises(InputError, match="constant, step or cosine"):
        LRSchedule(0.1, "linear")
    with pytest.raises(InputError, match="positive"):
        LRSchedule(0.0)


def test_adaptive_weight_follows_the_hand_worked_sequence() -> None:
    weight = AdaptiveWeight()  # initial 0.5, x1.25 up, x0.8 down, in [0.05, 0.95], tolerance 0.01
    steps = [
        # (ramp done, clean, verified) -> a for the next epoch
        ((False, 0.20, 0.00), 0.5),        # during the ramp a stays at its initial value
        ((True, 0.90, 0.50), 0.5),         # first measurement after the ramp: only the bests are recorded
        ((True, 0.895, 0.55), 0.625),      # clean within 0.01 of its best: more robustness
        ((True, 0.92, 0.52), 0.78125),     # a new best clean accuracy: more robustness
        ((True, 0.905, 0.56), 0.78125),    # clean dropped but verified improved: a stays
        ((True, 0.90, 0.50), 0.625),       # clean dropped and verified did not improve: less robustness
        ((True, 0.93, 0.50), 0.78125),
        ((True, 0.93, 0.50), 0.95),        # 0.9765625 capped at the maximum
    ]
    for (ramp_done, clean, verified), expected in steps:
        assert weight.update(ramp_done, clean, verified) == pytest.approx(expected)
        assert weight.value == pytest.approx(expected)
    assert weight.best_clean == pytest.approx(0.93) and weight.best_verified == pytest.approx(0.56)


def test_adaptive_weight_never_goes_below_its_minimum() -> None:
    weight = AdaptiveWeight(initial=0.1, minimum=0.05)
    weight.update(True, 0.9, 0.5)
    values = [weight.update(True, 0.5, 0.0) for _ in range(6)]
    assert values[0] == pytest.approx(0.08) and values[1] == pytest.approx(0.064)
    assert values[-1] == pytest.approx(0.05) and min(values) >= 0.05


def test_adaptive_weight_state_round_trip_continues_identically() -> None:
    first = AdaptiveWeight()
    for clean, verified in [(0.9, 0.5), (0.95, 0.6)]:
        first.update(True, clean, verified)
    second = AdaptiveWeight()
    second.load(first.state())
    for clean, verified in [(0.8, 0.4), (0.96, 0.7), (0.97, 0.7)]:
        assert first.update(True, clean, verified) == second.update(True, clean, verified)
    with pytest.raises(InputError):
        AdaptiveWeight(initial=0.01, minimum=0.05)


def test_geometric_weight_grows_every_five_epochs_after_the_ramp() -> None:
    weight = GeometricWeight()  # 0.1 during the ramp, x2.5 every 5 epochs after it, capped at 0.9
    during_ramp = [weight.update(False, 0.0, 0.0) for _ in range(3)]
    after_ramp = [weight.update(True, 0.0, 0.0) for _ in range(16)]
    assert during_ramp == [0.1, 0.1, 0.1]
    assert after_ramp[:4] == pytest.approx([0.1] * 4)
    assert after_ramp[4:9] == pytest.approx([0.25] * 5)
    assert after_ramp[9:14] == pytest.approx([0.625] * 5)
    assert after_ramp[14:] == pytest.approx([0.9, 0.9])


def test_geometric_weight_ignores_measurements_and_round_trips() -> None:
    a, b = GeometricWeight(), GeometricWeight()
    for _ in range(7):
        assert a.update(True, 0.1, 0.9) == b.update(True, 0.99, 0.0)
    restored = GeometricWeight()
    restored.load(a.state())
    assert [restored.update(True, 0, 0) for _ in range(4)] == [a.update(True, 0, 0) for _ in range(4)]
    with pytest.raises(InputError):
        GeometricWeight(factor=0.5)
