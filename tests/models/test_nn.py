"""robustkit.nn layers: Normalize and Residual."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.errors import InputError
from robustkit.nn import Normalize, Residual


def test_normalize_per_channel():
    layer = Normalize([0.5, 0.0, 1.0], [0.5, 2.0, 0.25])
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, x[:, 1] / 2.0, (x[:, 2] - 1.0) / 0.25], dim=1)
    assert torch.allclose(layer(x), expected)
    assert set(dict(layer.named_buffers())) == {"mean", "std"} and not list(layer.parameters())


@pytest.mark.parametrize(("mean", "std", "match"), [
    ([0.5], [0.0], "positive"), ([0.5, 0.5], [1.0], "one mean and one std"), ([float("nan")], [1.0], "finite"),
])
def test_normalize_rejects_bad_statistics(mean, std, match):
    with pytest.raises(InputError, match=match):
        Normalize(mean, std)


def test_normalize_rejects_wrong_channels():
    with pytest.raises(InputError, match="3 channel"):
        Normalize([0.1, 0.2, 0.3], [1, 1, 1])(torch.rand(1, 1, 2, 2))


def test_residual_sums_branches():
    main, skip = nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.rand(4, 3)
    assert torch.allclose(Residual(main, skip)(x), main(x) + skip(x))
    assert torch.allclose(Residual(main)(x), main(x) + x)
