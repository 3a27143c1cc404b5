"""The README's Python API example runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    marked = re.search(r"<!-- python-api -->\s*```python\n(.+?)\n```", text, re.DOTALL)
    assert marked is not None, "README.md lost its marked Python API example"
    code = marked.group(1)
    for call in ("verify(", "attack(", ".fit(", "run_bench("):
        assert call in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the example's run folder goes under tmp_path too
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert re.fullmatch(r"epoch 2: clean \d+% on 50 samples", lines[0])
    assert re.fullmatch(r"PGD robust accuracy \d+%", lines[1])
    assert re.fullmatch(r"verified \(crown\) \d+%", lines[2])
    assert re.fullmatch(r"mnist5k__mnist_fc_small__standard__eps0\.1\S*: clean \d+%, verified \d+%", lines[3])
    assert lines[4] == "['index.html', 'summary.csv', 'summary.md']"
