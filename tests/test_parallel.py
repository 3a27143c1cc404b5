"""Per-sample work in processes and on a Dask cluster: same results in index order, stored tasks skipped."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from robustkit.cli import main
from robustkit.errors import InputError
from robustkit.evaluation import EvalData, run_verifiers
from robustkit.parallel import TaskStore, WorkerPool, run_tasks
from robustkit.verifiers import Status, get_verifier
from tests.helpers import one_line_error


def square_plus(context: int, task: int) -> dict[str, int]:
    return {"value": task * task + context}


def test_processes_give_the_results_in_task_order():
    tasks = list(range(7))
    found = run_tasks(square_plus, 3, tasks, [f"t{t}" for t in tasks], workers=2)
    assert [r["value"] for r in found] == [t * t + 3 for t in tasks]


def slow_square(context: float, task: int) -> int:
    import time

    time.sleep(context)
    return task * task


def test_a_worker_pool_serves_many_calls_and_stops_starting_tasks_when_told():
    with WorkerPool(2) as pool:
        first = run_tasks(square_plus, 3, list(range(5)), [str(t) for t in range(5)], pool=pool)
        second = run_tasks(square_plus, -1, list(range(5)), [str(t) for t in range(5)], pool=pool)
        assert [r["value"] for r in first] == [t * t + 3 for t in range(5)]
        assert [r["value"] for r in second] == [t * t - 1 for t in range(5)]  # each call its own context
        asked = []

        def keep_going() -> bool:  # asked before each start: yes for the first three
            asked.append(True)
            return len(asked) <= 3

        found = dict(pool.run(slow_square, 0.05, list(range(10)), keep_going=keep_going))
        assert found == {0: 0, 1: 1, 2: 4}  # two started at once, one more after the first result, then none


def test_pooled_workers_import_the_factory_files_of_the_context(tmp_path):
    from robustkit.models.loading import load_model

    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n"
        "def build():\n"
        "    return Tiny()\n")
    model = load_model(f"{tmp_path / 'nets.py'}:build")
    x = torch.rand(6, 1, 28, 28)
    with WorkerPool(2) as pool:
        found = run_tasks(apply_model, (model, x), [0, 3], ["a", "b"], pool=pool)
    with torch.no_grad():
        assert torch.equal(found[0], model(x[0:3])) and torch.equal(found[1], model(x[3:6]))


def apply_model(context: tuple[torch.nn.Module, torch.Tensor], start: int) -> torch.Tensor:
    model, x = context
    with torch.no_grad():
        return model(x[start:start + 3])


def test_a_stored_task_is_not_run_again_and_settings_must_match(tmp_path):
    store = TaskStore(tmp_path / "parts", {"a": 1}, resume=False)
    store.save("t1", {"value": -100})  # as if a killed run had finished task 1 with this result
    with pytest.raises(InputError, match="--resume"):
        TaskStore(tmp_path / "parts", {"a": 1}, resume=False)
    with pytest.raises(InputError, match="a differ"):
        TaskStore(tmp_path / "parts", {"a": 2}, resume=True)
    again = TaskStore(tmp_path / "parts", {"a": 1}, resume=True)
    (tmp_path / "parts" / "t2.pt").write_bytes(b"cut short")  # a damaged file is run again
    found = run_tasks(square_plus, 0, [0, 1, 2], ["t0", "t1", "t2"], store=again)
    assert [r["value"] for r in found] == [0, -100, 4]
    assert torch.load(again.path("t2"), weights_only=True) == {"value": 4}


def small_data(n: int = 4) -> tuple[torch.nn.Module, EvalData]:
    from robustkit.data import load_dataset
    from robustkit.models import build_model

    model = build_model("mnist_fc_small", seed=0).eval()
    dataset = load_dataset("mnist5k")
    return model, EvalData(dataset, dataset.test.subset(0, n), 0, 2)


def test_dask_local_cluster_gives_the_sequential_results():
    distributed = pytest.importorskip("distributed")
    model, data = small_data()
    verifiers = {"bab": get_verifier("bab", time_limit=5.0), "crown": get_verifier("crown")}
    sequential = run_verifiers(model, data, verifiers, [0.02])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        clustered = run_verifiers(model, data, verifiers, [0.02], scheduler=cluster.scheduler_address)
    for one, other in zip(sequential, clustered, strict=True):
        assert (one.method, one.eps, one.status) == (other.method, other.eps, other.status)
        assert torch.equal(one.margin_lower, other.margin_lower)


def test_an_unreachable_scheduler_is_one_clear_error(monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr("robustkit.parallel.CONNECT_TIMEOUT_S", 1.0)
    model, data = small_data(1)
    with pytest.raises(InputError, match="cannot connect to the Dask scheduler"):
        run_verifiers(model, data, {"crown": get_verifier("crown")}, [0.01], scheduler="tcp://127.0.0.1:9")


def test_verify_cli_workers_and_resume(tmp_path):
    runner = CliRunner()
    args = ["-q", "verify", "--model", "mnist_fc_small", "--n-examples", "3", "--eps", "0.02",
            "--method", "bab", "--timeout", "5"]
    first = runner.invoke(main, [*args, "--workers", "2", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    single = runner.invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert single.exit_code == 0, single.output
    rows_a = (tmp_path / "a" / "verify.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "verify.csv").read_text().splitlines()
    status = [row.split(",")[rows_a[0].split(",").index("status")] for row in rows_a[1:]]
    assert status == [row.split(",")[rows_b[0].split(",").index("status")] for row in rows_b[1:]]
    assert set(status) <= {s.value for s in Status} and len(status) == 3
    assert not (tmp_path / "a" / "verify.parts").exists()  # removed once the results are written
    # a killed run: its parts folder is there; without --resume it is refused, with other settings too
    settings_probe = runner.invoke(main, [*args, "--out", str(tmp_path / "c")])
    assert settings_probe.exit_code == 0
    parts = tmp_path / "c" / "verify.parts"
    parts.mkdir()
    (parts / "config.json").write_text('{"n": 99}')
    refused = runner.invoke(main, [*args, "--out", str(tmp_path / "c")])
    assert refused.exit_code == 2
    one_line_error(refused, "--resume")
    mismatch = runner.invoke(main, [*args, "--out", str(tmp_path / "c"), "--resume"])
    assert mismatch.exit_code == 2
    one_line_error(mismatch, "other settings")
    usage = runner.invoke(main, [*args, "--resume"])
    assert usage.exit_code == 2
