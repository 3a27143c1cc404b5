"""95% intervals for accuracies: over test points for one seed (Wilson), over seeds for several (Student's t).

An accuracy measured once, on n test points, is a binomial proportion k / n: its interval is Wilson's score
interval (Wilson 1927), which stays inside [0, 1] and is sound at 0% and 100%, unlike the normal approximation.
An accuracy measured with several seeds (each a trained model and its evaluation) varies with the seed: its
interval is the t interval of the mean over the seeds, mean +- t(0.975, s - 1) * sd / sqrt(s), clipped to [0, 1].
It covers the variation between seeds, on the same test points; with two or three seeds it is wide, honestly.

>>> [round(v, 4) for v in wilson_interval(0.9, 100)]
[0.8256, 0.9448]
>>> [round(v, 4) for v in t_interval([0.90, 0.92, 0.94])]
[0.8703, 0.9697]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LEVEL", "interval", "t_interval", "wilson_interval"]

LEVEL = 0.95


def wilson_interval(fraction: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``fraction`` = k / n (k is rounded to a whole number of test
    points); ``(nan, nan)`` when the fraction is NaN or n is not positive."""
    from scipy.stats import norm

    if math.isnan(fraction) or math.isnan(n) or n <= 0:
        return math.nan, math.nan
    k = round(fraction * n)
    p = k / n
    z = float(norm.ppf(0.5 + level / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 and k = n one end is exactly 0 or 1 (centre - half cancels to rounding noise there)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def t_interval(values: Sequence[float], level: float = LEVEL,
               bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """The t interval of the mean of ``values`` (one per seed; NaNs left out), clipped to ``bounds`` (an accuracy's
    [0, 1] by default; ``(0, inf)`` for a time); ``(nan, nan)`` with fewer than two values."""
    from scipy.stats import t

    finite = [float(v) for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    half = float(t.ppf(0.5 + level / 2, len(finite) - 1)) * sd / math.sqrt(len(finite))
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


def interval(values: Sequence[float], n: float, level: float = LEVEL) -> tuple[float, float]:
    """The 95% interval of an accuracy measured once per seed (``values``) on ``n`` test points: Wilson's over the
    test points for one seed, the t interval over the seeds for several."""
    finite = [float(v) for v in values if not math.isnan(v)]
    if len(finite) == 1:
        return wilson_interval(finite[0], n, level)
    return t_interval(finite, level)
