"""The model zoo: parameter counts, output shapes, supported layers only, reproducible initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.errors import UnknownNameError
from robustkit.models import MODELS, build_model, count_parameters
from robustkit.nn import Normalize, Residual

PAPER_NETWORKS = ["mnist_small", "mnist_large", "cifar_small", "cifar_large", "cifar_resnet", "imagenet200_resnet"]

# Worked out by hand from DESIGN.md section 7, e.g. mnist_small: conv 16*1*4*4+16 = 272,
# conv 32*16*4*4+32 = 8,224, fc 1568*100+100 = 156,900, fc 100*10+10 = 1,010.
PARAMETERS = {
    "mnist_small": 166_406,
    "mnist_large": 1_974_762,
    "cifar_small": 214_918,
    "cifar_large": 2_466_858,
    "cifar_resnet": 4_209_938,
    "imagenet200_resnet": 4_400_464,
    "mnist_fc": 89_610,
    "mnist_fc_small": 42_310,
    "mnist_fc256": 269_322,
    "toy2d": 371,
}
SUPPORTED = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize, Residual)


def test_registry_holds_the_paper_networks_first():
    assert [name for name, spec in MODELS.items() if spec.paper] == PAPER_NETWORKS
    assert set(PARAMETERS) == set(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_and_output_shape(name):
    spec = MODELS[name]
    model = build_model(name)
    assert count_parameters(model) == PARAMETERS[name]
    out = model(torch.rand(3, *spec.input_shape))
    assert tuple(out.shape) == (3, spec.num_classes)
    assert all(isinstance(m, SUPPORTED) for m in model.modules())


def test_mnist_small_matches_the_paper_layout():
    layers = list(build_model("mnist_small"))
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 16, (4, 4), (2, 2), (1, 1)), (16, 32, (4, 4), (2, 2), (1, 1))]
    assert [(m.in_features, m.out_features) for m in linears] == [(1568, 100), (100, 10)]


def test_resnets_have_conv_skip_connections():
    for name in ("cifar_resnet", "imagenet200_resnet"):
        blocks = [m for m in build_model(name).modules() if isinstance(m, Residual)]
        assert len(blocks) == 3 and all(isinstance(b.skip, nn.Conv2d) for b in blocks)


def test_cifar_networks_normalise_inside():
    first = next(iter(build_model("cifar_small")))
    assert isinstance(first, Normalize) and first.channels == 3


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mnist_fc_small", seed=5)
    after = torch.rand(1)
    b = build_model("mnist_fc_small", seed=5)
    c = build_model("mnist_fc_small", seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_unknown_model_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'mnist_small'"):
        build_model("mnist_smal")
