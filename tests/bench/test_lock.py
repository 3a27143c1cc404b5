"""One writer per bench folder: while a bench runs, a second one on its folder (resumed or fresh) exits 2 with one
line naming the running process, and touches nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from robustkit.cli import main
from robustkit.runlock import LOCK_FILE
from tests.helpers import one_line_error

# long enough (many epochs of a small net) that it is still training when the second bench starts
LONG = """
[grid]
models = ["mnist_fc_small"]
trainers = ["standard"]

[data]
n_train = 4000
n_test = 20
val_size = 0

[training]
epochs = 500

[evaluation]
verifiers = ["interval"]
exact = "false"
eps_sweep = []
"""


def test_a_second_bench_on_a_running_folder_exits_2_naming_the_running_one(tmp_path: Path) -> None:
    config = tmp_path / "long.toml"
    config.write_text(LONG)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "robustkit", "--quiet", "bench", "--config", str(config),
                              "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "cells").is_dir() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        before = sorted(p.relative_to(out) for p in out.rglob("*") if p.name != LOCK_FILE)
        for extra in (["--resume"], []):
            result = CliRunner().invoke(main, ["bench", "--config", str(config), "--out", str(out), *extra])
            one_line_error(result, f"in use by another robustkit run: process {first.pid} (robustkit bench, started")
        assert first.poll() is None  # the running bench was not disturbed
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != LOCK_FILE) == before
    finally:
        first.kill()
        first.communicate(timeout=60)
