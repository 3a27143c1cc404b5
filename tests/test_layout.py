"""Repository layout, packaging and the README/CI contract."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINKED = ["attacks", "verifiers", "trainers", "reports"]


@pytest.mark.parametrize("name", LINKED)
def test_top_level_links_point_into_the_package(name):
    link = ROOT / name
    assert link.is_symlink() and link.resolve() == (ROOT / "robustkit" / name).resolve()
    assert (link / "__init__.py").is_file()


def test_subpackages_exist():
    for name in ["attacks", "verifiers", "trainers", "reports", "models", "cli", "bench"]:
        assert (ROOT / "robustkit" / name / "__init__.py").is_file()


def test_dependencies_are_split_between_runtime_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]}
    assert runtime == {"torch", "numpy", "foolbox", "pandas", "matplotlib", "click", "mlxtend", "scipy", "tqdm",
                       "pillow", "safetensors"}
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=]", d)[0] for d in extras["test"]} == {"pytest", "hypothesis"}
    assert {re.split(r"[<>=]", d)[0] for d in extras["dev"]} == {"ruff", "mypy"}
    assert {"onnx", "onnxscript"} <= {re.split(r"[<>=]", d)[0] for d in extras["onnx"]}
    assert project["scripts"]["robustkit"] == "robustkit.cli:main"


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_readme_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("pip install -e . ") and "robustkit " in commands[0]
    assert '".[test,onnx,cluster]"' in commands[1] and commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in script and "<!-- test-command -->" in script
    text = (ROOT / "README.md").read_text()
    marked = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", text)
    assert marked is not None and marked.group(1) == quick_start_commands()[1]


def test_wheel_contains_the_package_once(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("robustkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    inits = [n for n in names if n.endswith("__init__.py")]
    assert "robustkit/__init__.py" in inits and "robustkit/attacks/__init__.py" in inits
    assert all(n.startswith(("robustkit/", "robustkit-")) for n in names), names
    assert len(names) == len(set(names))
    assert not any(n.startswith(("attacks/", "tests/", "verifiers/")) for n in names)
