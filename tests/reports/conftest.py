"""Shared run folders: building the plots takes a few seconds, so one full build serves every read-only test."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustkit.reports.build import build_report
from tests.reports.runs import make_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh synthetic run folder with results.csv and epochs.csv only."""
    return make_run(tmp_path / "run")


@pytest.fixture(scope="session")
def built_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A synthetic run folder with every report built once; tests must not change it."""
    folder = make_run(tmp_path_factory.mktemp("built") / "run")
    return folder, build_report(folder)
