"""The 95% intervals: Wilson's score interval and the t interval against hand computations."""

from __future__ import annotations

import math

import pytest

from robustkit.reports.stats import interval, t_interval, wilson_interval

Z = 1.959963984540054  # the 97.5% quantile of the standard normal distribution


def test_wilson_interval_matches_the_formula():
    for k, n in ((90, 100), (1, 30), (500, 1000), (999, 1000)):
        p = k / n
        centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
        half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
        assert wilson_interval(p, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0.9, 100) == pytest.approx((0.825634, 0.944771), abs=1e-6)


def test_wilson_interval_stays_inside_zero_and_one_and_rounds_to_whole_points():
    low, high = wilson_interval(0.0, 20)
    assert low == 0.0 and high == pytest.approx(Z * Z / 20 / (1 + Z * Z / 20))  # 0.1611, not 0 as Wald's
    low, high = wilson_interval(1.0, 20)
    assert high == 1.0 and low == pytest.approx(1 - Z * Z / 20 / (1 + Z * Z / 20))
    assert wilson_interval(0.3333333, 30) == wilson_interval(10 / 30, 30)  # a float32-ish fraction of 10 of 30
    assert all(math.isnan(v) for v in wilson_interval(math.nan, 100) + wilson_interval(0.5, 0))


def test_t_interval_for_known_values():
    # mean 0.92, sd 0.02, t(0.975, 2) = 4.302653
    assert t_interval([0.90, 0.92, 0.94]) == pytest.approx((0.92 - 4.302653 * 0.02 / math.sqrt(3),
                                                            0.92 + 4.302653 * 0.02 / math.sqrt(3)), abs=1e-7)
    # two seeds: t(0.975, 1) = 12.7062; mean 0.5, sd 0.1 / sqrt(2), so 0.5 +- 0.635: clipped to [0, 1]
    assert t_interval([0.45, 0.55]) == (0.0, 1.0)
    assert t_interval([0.80, 0.81]) == pytest.approx((0.805 - 12.7062 * 0.005, 0.805 + 12.7062 * 0.005), abs=1e-5)
    assert t_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in t_interval([0.5]))


def test_interval_picks_wilson_for_one_seed_and_t_for_several():
    assert interval([0.9], 100) == wilson_interval(0.9, 100)
    assert interval([0.9, math.nan], 100) == wilson_interval(0.9, 100)  # a seed that did not measure it
    assert interval([0.90, 0.92, 0.94], 100) == t_interval([0.90, 0.92, 0.94])
