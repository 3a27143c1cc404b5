"""Shared fixtures for the trainer tests: the embedded data once, and one torch thread."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from robustkit.data import Dataset, load_dataset


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """The networks here are tiny; one torch thread keeps the tests fast and steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def same_number(a: float, b: float) -> bool:
    """Equality that treats NaN as equal to NaN (history fields that do not apply are NaN)."""
    return (math.isnan(a) and math.isnan(b)) or a == b
