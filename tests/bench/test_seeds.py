"""``bench --seeds``: one cell per seed (its own folder, rows and resume), and a summary over the seeds."""

from __future__ import annotations

import csv
from pathlib import Path

from click.testing import CliRunner

from robustkit.cli import main

TINY = """
[grid]
models = ["mnist_fc_small"]
trainers = ["standard"]
eps = [0.1]
[data]
n_train = 100
n_test = 40
val_size = 0
[training]
epochs = 1
[evaluation]
pgd_steps = 3
pgd_restarts = 1
cw_steps = 3
interval_attack = { inner_steps = 2, iterations = 1, restarts = 1 }
eps_sweep = []
verifiers = ["interval"]
exact = false
complete = "off"             # a time budget is not deterministic: the resume below compares numbers
"""


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_seeds_give_distinct_cells_a_summary_over_them_and_resume_per_seed(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    command = ["--quiet", "bench", "--config", str(config), "--seeds", "3,5", "--out", str(out), "--jobs", "1"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "x 2 seed(s) (3, 5)" in result.stdout
    key = "mnist5k__mnist_fc_small__standard__eps0.1"
    assert sorted(p.name for p in (out / "cells").iterdir()) == [f"{key}__seed3", f"{key}__seed5"]
    results = rows(out / "results.csv")
    clean = {r["seed"]: r for r in results if r["metric"] == "clean_acc" and r["n"] == "40"}
    assert set(clean) == {"3", "5"}
    # two seeds train two different networks: their weights (and almost surely some number) differ
    import torch

    weights = [torch.load(out / "cells" / f"{key}__seed{s}" / "model.pt", weights_only=True) for s in (3, 5)]
    assert any(not torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert {r["seed"] for r in rows(out / "epochs.csv")} == {"3", "5"}
    (summary,) = rows(out / "summary.csv")
    values = [float(clean[s]["value"]) for s in ("3", "5")]
    assert (summary["seed"], summary["n_seeds"], summary["interval"]) == ("3;5", "2", "t")
    assert float(summary["clean_acc"]) == sum(values) / 2
    assert float(summary["clean_acc_std"]) == abs(values[0] - values[1]) / 2 ** 0.5
    markdown = (out / "summary.md").read_text()
    assert "n = 40 test samples, 2 seeds per cell (3, 5)." in markdown
    assert f"| standard | {100 * sum(values) / 2:.1f}% ± {100 * float(summary['clean_acc_std']):.1f} (" in markdown
    # resume: the seed-3 cell is kept, the seed-5 cell (its result lost) is evaluated again, to the same numbers
    (out / "cells" / f"{key}__seed5" / "result.json").unlink()
    again = CliRunner().invoke(main, [*command, "--resume"])
    assert again.exit_code == 0, again.output
    lines = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert "seed 3" in lines[0] and "(finished earlier, reused)" in lines[0]
    assert "seed 5" in lines[1] and "reused" not in lines[1]
    (resumed,) = rows(out / "summary.csv")
    timing = ("eval_time_s", "peak_memory_mb")  # measured again for the seed-5 cell
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in summary.items() if k not in timing}
    other = CliRunner().invoke(main, ["bench", "--config", str(config), "--seeds", "3", "--out", str(out), "--resume",
                                      "--jobs", "1"])
    assert other.exit_code == 2 and "different settings (seeds)" in other.output


def test_a_folder_written_before_seeds_resumes_in_place(tmp_path):
    import json
    import tomllib

    from robustkit.bench import parse_config, plan, run_bench

    config = parse_config(tomllib.loads(TINY), source="tiny")
    out = tmp_path / "old"
    (cell,) = plan(config)
    legacy = out / "cells" / cell.legacy_key
    legacy.mkdir(parents=True)
    saved = config.to_dict()
    saved["seed"] = saved.pop("seeds")[0]  # config.json as written before seeds: "seed": 0
    (out / "config.json").write_text(json.dumps({"config": saved}))
    (legacy / "result.json").write_text(json.dumps({"results": [], "epochs": [], "violations": []}))
    run = run_bench(config, out, resume=True)
    assert [o.reused for o in run.outcomes] == [True]  # found in its old folder: nothing trained again
    assert sorted(p.name for p in (out / "cells").iterdir()) == [cell.legacy_key]
