"""The model zoo: the MixTrain paper's six networks, small fully connected nets for tests and the VNN-COMP MNIST shape.

Every zoo network is an ``nn.Sequential`` built only from layers the bound engine supports (Linear, Conv2d,
ReLU, Flatten, :class:`~robustkit.nn.Normalize` and :class:`~robustkit.nn.Residual`), takes NCHW inputs in
[0, 1] and returns logits. The CIFAR and ImageNet-200 networks carry their input normalisation as a first
:class:`~robustkit.nn.Normalize` layer; the MNIST networks, as in the authors' code, use raw pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from robustkit.nn import Normalize, Residual
from robustkit.registry import Registry

__all__ = ["MODELS", "ModelSpec", "build_model", "count_parameters"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: how to build it and what it expects.

    ``paper`` marks the six networks of the MixTrain paper; ``dataset`` is the dataset it is meant for.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    description: str
    paper: bool = False


MODELS: Registry[ModelSpec] = Registry("model")


def _register(spec: ModelSpec) -> None:
    MODELS.add(spec.name, spec)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values (buffers such as normalisation constants excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(name: str, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised zoo network; with ``seed`` the initialisation is reproducible.

    Seeding uses a forked random state, so building a model never changes the caller's global RNG.

    >>> count_parameters(build_model("mnist_small"))
    166406
    """
    spec = MODELS[name]
    if seed is None:
        return spec.build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


def _small_conv(channels: int, spatial: int, num_classes: int, normalize: Normalize | None) -> nn.Sequential:
    """The authors' ``*_Small``: two stride-2 4x4 convolutions (16, 32 channels), FC 100, FC out."""
    flat = 32 * (spatial // 4) ** 2
    layers: list[nn.Module] = [] if normalize is None else [normalize]
    layers += [
        nn.Conv2d(channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    ]
    return nn.Sequential(*layers)


def _large_conv(channels: int, spatial: int, num_classes: int, normalize: Normalize | None) -> nn.Sequential:
    """The authors' ``*_Large``: four convolutions (32, 32, 64, 64 channels; two of stride 2), FC 512 x2."""
    flat = 64 * (spatial // 4) ** 2
    layers: list[nn.Module] = [] if normalize is None else [normalize]
    layers += [
        nn.Conv2d(channels, 32, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    ]
    return nn.Sequential(*layers)


def residual_block(in_channels: int, out_channels: int, downsample: bool) -> list[nn.Module]:
    """Two convolutions with a convolutional skip path, then ReLU.

    Without downsampling the main path is 3x3 -> ReLU -> 3x3 and the skip a 1x1 convolution; with
    downsampling the first convolution is 4x4 of stride 2 and the skip a 2x2 convolution of stride 2, so both
    paths halve the spatial size.
    """
    if downsample:
        first = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        skip = nn.Conv2d(in_channels, out_channels, 2, stride=2, padding=0)
    else:
        first = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        skip = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
    main = nn.Sequential(first, nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1))
    return [Residual(main, skip), nn.ReLU()]


def _resnet(stem: nn.Conv2d, num_classes: int, normalize: Normalize, width: int = 1) -> nn.Sequential:
    """Stem to 32x32 with 16w channels, blocks 16w -> 32w (/2) -> 64w (/2), FC 1000, FC out."""
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    layers: list[nn.Module] = [normalize, stem, nn.ReLU()]
    layers += residual_block(c1, c1, downsample=False)
    layers += residual_block(c1, c2, downsample=True)
    layers += residual_block(c2, c3, downsample=True)
    layers += [nn.Flatten(), nn.Linear(c3 * 8 * 8, 1000), nn.ReLU(), nn.Linear(1000, num_classes)]
    return nn.Sequential(*layers)


def _fully_connected(input_shape: tuple[int, int, int], widths: tuple[int, ...], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    previous = input_shape[0] * input_shape[1] * input_shape[2]
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)


def _mnist_fc256() -> nn.Sequential:
    """784-256-256-10 with ReLUs (Flatten, Linear 784->256, ReLU, Linear 256->256, ReLU, Linear 256->10): the
    shape of the VNN-COMP MNIST benchmarks' fully connected networks (``mnist-net_256x2.onnx`` of ``mnistfc``),
    for exporting and running such benchmarks with ``robustkit vnnlib-export`` and ``robustkit vnnlib``."""
    return _fully_connected((1, 28, 28), (256, 256), 10)


_register(ModelSpec(
    "mnist_small", lambda: _small_conv(1, 28, 10, None), (1, 28, 28), 10, "mnist5k",
    "MNIST_Small: conv16(4,s2)-conv32(4,s2)-fc100-fc10", paper=True,
))
_register(ModelSpec(
    "mnist_large", lambda: _large_conv(1, 28, 10, None), (1, 28, 28), 10, "mnist5k",
    "MNIST_Large: conv32-conv32(s2)-conv64-conv64(s2)-fc512-fc512-fc10", paper=True,
))
_register(ModelSpec(
    "cifar_small", lambda: _small_conv(3, 32, 10, Normalize(CIFAR10_MEAN, CIFAR10_STD)), (3, 32, 32), 10,
    "cifar10", "CIFAR_Small: normalize-conv16(4,s2)-conv32(4,s2)-fc100-fc10", paper=True,
))
_register(ModelSpec(
    "cifar_large", lambda: _large_conv(3, 32, 10, Normalize(CIFAR10_MEAN, CIFAR10_STD)), (3, 32, 32), 10,
    "cifar10", "CIFAR_Large: normalize-conv32-conv32(s2)-conv64-conv64(s2)-fc512-fc512-fc10", paper=True,
))
_register(ModelSpec(
    "cifar_resnet",
    lambda: _resnet(nn.Conv2d(3, 16, 3, stride=1, padding=1), 10, Normalize(CIFAR10_MEAN, CIFAR10_STD)),
    (3, 32, 32), 10, "cifar10",
    "CIFAR_Resnet: conv16, residual blocks 16-32(s2)-64(s2) with conv skips, fc1000-fc10", paper=True,
))
_register(ModelSpec(
    "imagenet200_resnet",
    lambda: _resnet(nn.Conv2d(3, 16, 4, stride=2, padding=1), 200, Normalize(IMAGENET_MEAN, IMAGENET_STD)),
    (3, 64, 64), 200, "tinyimagenet",
    "ImageNet-200 ResNet: conv16(4,s2), residual blocks 16-32(s2)-64(s2) with conv skips, fc1000-fc200",
    paper=True,
))
_register(ModelSpec(
    "mnist_fc", lambda: _fully_connected((1, 28, 28), (100, 100), 10), (1, 28, 28), 10, "mnist5k",
    "fully connected 784-100-100-10",
))
_register(ModelSpec(
    "mnist_fc_small", lambda: _fully_connected((1, 28, 28), (50, 50), 10), (1, 28, 28), 10, "mnist5k",
    "fully connected 784-50-50-10 (small enough for the exact verifier)",
))
_register(ModelSpec(
    "mnist_fc256", _mnist_fc256, (1, 28, 28), 10, "mnist5k",
    "fully connected 784-256-256-10, the shape of the VNN-COMP MNIST benchmarks (mnistfc 256x2)",
))
_register(ModelSpec(
    "toy2d", lambda: _fully_connected((1, 1, 2), (16, 16), 3), (1, 1, 2), 3, "none",
    "fully connected 2-16-16-3 on a (1, 1, 2) input, for tests that enumerate the input plane",
))
