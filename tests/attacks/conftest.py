"""A small MNIST network trained once per test session (a few seconds), shared by the attack tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustkit.data import load_dataset
from robustkit.models import build_model


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def trained_fc(mnist):
    """mnist_fc_small after two epochs of Adam: about 90% clean accuracy."""
    torch.manual_seed(0)
    model = build_model("mnist_fc_small", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(len(mnist.train), generator=generator)
        for start in range(0, len(order), 50):
            index = order[start : start + 50]
            loss = F.cross_entropy(model(mnist.train.x[index]), mnist.train.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model
