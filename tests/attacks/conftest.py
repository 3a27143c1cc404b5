"""A small MNIST network trained once per test session (a few seconds), shared by the attack tests."""

from __future__ import annotations

import pytest

from robustkit.data import load_dataset
from tests.helpers import train_mnist_fc


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def trained_fc(mnist):
    """mnist_fc_small after two epochs of Adam: about 90% clean accuracy."""
    return train_mnist_fc(2, 1e-3)
