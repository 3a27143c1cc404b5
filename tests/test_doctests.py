"""The examples in docstrings run and print what they say (STYLE.md: runnable examples, doctested)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import robustkit

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(robustkit.__path__, prefix="robustkit.")
    if not name.startswith("robustkit.cli") and name != "robustkit.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
