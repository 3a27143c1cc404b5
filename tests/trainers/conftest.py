"""Shared fixtures for the trainer tests: the embedded data once, and one torch thread."""

from __future__ import annotations

import math

import pytest

from robustkit.data import Dataset, load_dataset


@pytest.fixture(autouse=True)
def _tiny_networks_one_thread(single_thread: None) -> None:
    """Every trainer test uses tiny networks: one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def same_number(a: float, b: float) -> bool:
    """Equality that treats NaN as equal to NaN (history fields that do not apply are NaN)."""
    return (math.isnan(a) and math.isnan(b)) or a == b
