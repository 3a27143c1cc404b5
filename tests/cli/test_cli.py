"""The command-line skeleton: root options, listing commands and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from robustkit import __version__
from robustkit.cli import main
from tests.helpers import one_line_error


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_models_lists_paper_networks_with_parameter_counts():
    result = run("models")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()[2:]}
    expected = {
        "mnist_small": "166,406", "mnist_large": "1,974,762", "cifar_small": "214,918",
        "cifar_large": "2,466,858", "cifar_resnet": "4,209,938", "imagenet200_resnet": "4,400,464",
    }
    for name, count in expected.items():
        assert count in lines[name] and " yes " in lines[name]
    assert "1x28x28" in lines["mnist_small"] and "3x64x64" in lines["imagenet200_resnet"]


def test_datasets_lists_all_four_with_sizes():
    result = run("datasets")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:]}
    assert list(rows) == ["mnist5k", "mnist", "cifar10", "tinyimagenet"]
    assert rows["mnist5k"][1:6] == ["1x28x28", "10", "4,000", "1,000", "embedded"]
    assert rows["tinyimagenet"][1:3] == ["3x64x64", "200"]


def test_global_options_are_accepted():
    result = run("--seed", "3", "--device", "cpu", "--quiet", "models")
    assert result.exit_code == 0 and "mnist_small" in result.output




def test_unknown_command_is_one_line_with_suggestion():
    one_line_error(run("model"), "no such command 'model'", "Did you mean 'models'")


def test_bad_device_and_bad_option():
    one_line_error(run("--device", "gpu", "models"), "'gpu' is not a device")
    one_line_error(run("models", "--nope"), "--nope")
    one_line_error(run("--seed", "abc", "models"), "abc")


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "robustkit", "datasets", "--bogus"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--bogus" in result.stderr


def test_help_does_not_import_torch():
    code = "import sys; from robustkit.cli import main; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_threads_option_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        result = run("--threads", "1", "datasets")
        assert result.exit_code == 0 and torch.get_num_threads() == 1
        one_line_error(run("--threads", "0", "datasets"), "--threads")
    finally:
        torch.set_num_threads(before)
