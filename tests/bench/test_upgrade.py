"""A run folder written before the bench had its complete stage resumes: the cells it evaluated are evaluated again
(their training kept), so every cell gets the band's metrics, and nothing crashes on the older records."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest

from robustkit.bench import CellOutcome, parse_config, plan, run_bench
from robustkit.bench.runner import _load_outcome, evaluated_before_complete_stage

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = """
[grid]
models = ["mnist_fc_small"]
trainers = ["standard"]
eps = [0.1]
[data]
n_train = 100
n_test = 30
val_size = 0
[training]
epochs = 1
[evaluation]
pgd_steps = 3
pgd_restarts = 1
cw_steps = 3
interval_attack = { inner_steps = 2, iterations = 1, restarts = 1 }
autoattack = "off"
eps_sweep = []
verifiers = ["interval", "crown"]
complete = "off"
"""
BAND = ("verified_complete", "falsified", "undecided")


def test_a_run_from_before_the_complete_stage_is_evaluated_again_on_resume(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(TINY), source="tiny")
    out = tmp_path / "run"
    first = run_bench(config, out)
    (cell,) = plan(config)
    result_file = out / "cells" / cell.key / "result.json"
    # the files as the bench wrote them before the complete stage: no band rows, no complete keys, exact on
    saved = json.loads(result_file.read_text())
    saved["results"] = [row for row in saved["results"] if row["metric"] not in BAND]
    result_file.write_text(json.dumps(saved))
    document = json.loads((out / "config.json").read_text())
    evaluation = document["config"]["evaluation"]
    del evaluation["complete"], evaluation["complete_time_limit"]
    evaluation["exact"] = "auto"  # the default then
    (out / "config.json").write_text(json.dumps(document))
    notes: list[str] = []
    resumed = run_bench(config, out, resume=True, on_note=notes.append)
    (outcome,) = resumed.outcomes
    assert not outcome.reused  # evaluated again ...
    # ... on the model trained before, not trained again (the epoch rows, NaN included, as they were)
    assert json.dumps(outcome.epochs) == json.dumps(first.outcomes[0].epochs)
    assert outcome.metric("train_time_s") == first.outcomes[0].metric("train_time_s")
    for metric in ("clean_acc", "worst_attack_acc", "verified_best", *BAND):
        assert outcome.metric(metric) == first.outcomes[0].metric(metric), metric
    assert any("predates the complete stage" in note for note in notes)
    assert json.loads((out / "config.json").read_text())["config"] == json.loads(json.dumps(config.to_dict()))
    with (out / "summary.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["complete_method"] == "none" and float(row["verified_complete"]) == outcome.metric("verified_best")
    # the records written now are current: the next resume reuses them; a record without any rows is no evaluation
    assert not evaluated_before_complete_stage(_load_outcome(cell, result_file))
    assert not evaluated_before_complete_stage(CellOutcome(cell, [], [], [], reused=True))
