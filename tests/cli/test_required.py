"""Every required option of every command is enforced by robustkit itself: leaving one out is one line naming
it with exit code 2, also under a click that skips its own required check (as some releases do for options
declared with ``default=None``)."""

from __future__ import annotations

import importlib

import click
import pytest
from click.testing import CliRunner

from robustkit.cli import COMMANDS, main
from tests.helpers import one_line_error

# a valid value for every required parameter of every command, keyed by how --help names it
VALID = {
    "--model": "mnist_fc_small",
    "--eps": "0.1",
    "--method": "interval",
    "--attack": "pgd",
    "--trainer": "standard",
    "RUN_DIR": ".",
}


def _command(name: str) -> click.Command:
    module, attribute, _ = COMMANDS[name]
    command: click.Command = getattr(importlib.import_module(module), attribute)
    return command


def _label(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else param.human_readable_name


def _arguments(params: list[click.Parameter]) -> list[str]:
    arguments: list[str] = []
    for param in params:
        label = _label(param)
        arguments += [VALID[label]] if isinstance(param, click.Argument) else [label, VALID[label]]
    return arguments


CASES = [
    pytest.param(name, _label(missing), id=f"{name}-without-{_label(missing).lstrip('-')}")
    for name in sorted(COMMANDS)
    for missing in _command(name).params
    if missing.required
]


def test_the_table_covers_every_command_with_required_options():
    commands = {name for name, _ in (case.values for case in CASES)}
    assert commands == {"attack", "report", "train", "verify", "vnnlib-export"}
    for name in COMMANDS:
        for param in _command(name).params:
            if param.required:
                assert _label(param) in VALID, f"add a valid value for {name} {_label(param)} to VALID"


@pytest.mark.parametrize("click_checks_required", [True, False], ids=["click-checks", "click-skips"])
@pytest.mark.parametrize(("name", "missing"), CASES)
def test_missing_required_option_is_one_line(name, missing, click_checks_required, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if not click_checks_required:
        monkeypatch.setattr(click.core.Parameter, "value_is_missing", lambda self, value: False)
    given = [p for p in _command(name).params if p.required and _label(p) != missing]
    result = CliRunner().invoke(main, [name, *_arguments(given)])
    line = one_line_error(result, missing)
    assert line.startswith("Error: Missing") and isinstance(result.exception, SystemExit)
