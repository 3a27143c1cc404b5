"""``robustkit verify``: result files, numbers checked against the library, and one-line user errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner

from robustkit import __version__
from robustkit.cli import main
from robustkit.cli.verify import SAMPLE_COLUMNS, SUMMARY_COLUMNS
from robustkit.data import load_dataset
from robustkit.verifiers import VERIFIERS, Status, VerificationResult, Verifier, verify
from tests.helpers import one_line_error, read_csv, train_mnist_fc

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLE_FIELDS = [
    "dataset", "model", "checkpoint", "trainer", "method", "eps", "seed", "n", "index", "label", "prediction",
    "status", "margin_lower", "time_s", "robustkit_version",
]
SUMMARY_FIELDS = [
    "dataset", "model", "checkpoint", "trainer", "method", "eps", "seed", "n", "clean_acc", "verified_acc",
    *(f"n_{s.value}" for s in Status), "time_s", "time_per_sample_s", "robustkit_version",
]




def run(*args: str):
    return CliRunner().invoke(main, list(args))






def test_acceptance_untrained_mnist_small(tmp_path):
    out = tmp_path / "run"
    result = run("verify", "--model", "mnist_small", "--dataset", "mnist5k", "--eps", "0.1",
                 "--method", "interval,symbolic,crown", "--n-examples", "100", "--out", str(out))
    assert result.exit_code == 0, result.output
    columns, rows = read_csv(out / "verify.csv")
    assert columns == SAMPLE_FIELDS == list(SAMPLE_COLUMNS)
    assert len(rows) == 300
    for method in ("interval", "symbolic", "crown"):
        mine = [r for r in rows if r["method"] == method]
        assert [int(r["index"]) for r in mine] == list(range(100))
        assert {r["eps"] for r in mine} == {"0.1"} and {r["n"] for r in mine} == {"100"}
    test = load_dataset("mnist5k").test
    assert [int(r["label"]) for r in rows[:100]] == test.y[:100].tolist()
    for r in rows:
        assert r["status"] in {s.value for s in Status}
        assert r["dataset"] == "mnist5k" and r["model"] == "mnist_small" and r["trainer"] == ""
        assert r["robustkit_version"] == __version__ and float(r["time_s"]) > 0
        # an untrained network is not robust: its margin bounds at eps 0.1 are negative, nothing is verified
        assert r["status"] != "verified" and float(r["margin_lower"]) <= 0
        assert (r["status"] == "falsified") == (r["prediction"] != r["label"])

    columns, summary = read_csv(out / "summary.csv")
    assert columns == SUMMARY_FIELDS == list(SUMMARY_COLUMNS)
    assert [r["method"] for r in summary] == ["interval", "symbolic", "crown"]
    for r in summary:
        mine = [s for s in rows if s["method"] == r["method"]]
        assert int(r["n"]) == 100 and r["seed"] == "0" and r["eps"] == "0.1"
        for status in Status:
            assert int(r[f"n_{status.value}"]) == sum(s["status"] == status.value for s in mine)
        correct = sum(s["prediction"] == s["label"] for s in mine)
        assert float(r["clean_acc"]) == pytest.approx(correct / 100)
        assert float(r["verified_acc"]) == 0.0
        assert float(r["time_s"]) == pytest.approx(sum(float(s["time_s"]) for s in mine), rel=1e-3)
    table = result.output.splitlines()
    assert table[0].split()[:4] == ["method", "eps", "clean", "acc"]
    assert [line.split()[0] for line in table[2:5]] == ["interval", "symbolic", "crown"]
    assert "misclassified samples are not verified" in result.output


@pytest.fixture(scope="module")
def trained_fc(tmp_path_factory):
    """mnist_fc_small after 320 seeded Adam steps on mnist5k, and its saved state_dict."""
    model = train_mnist_fc(4, 2e-3)
    path = tmp_path_factory.mktemp("weights") / "fc.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_trained_network_numbers_match_the_library(tmp_path, trained_fc):
    model, weights = trained_fc
    out = tmp_path / "run"
    methods = ["interval", "symbolic", "crown"]
    result = run("--seed", "3", "verify", "--model", "mnist_fc_small", "--checkpoint", str(weights),
                 "--eps", "0.02,0.1", "--method", ",".join(methods), "--n-examples", "100", "--start", "200",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out / "verify.csv")
    _, summary = read_csv(out / "summary.csv")
    assert len(rows) == 100 * 2 * 3 and len(summary) == 6
    assert {r["checkpoint"] for r in rows} == {str(weights)} and {r["seed"] for r in rows} == {"3"}

    test = load_dataset("mnist5k").test.subset(200, 100)
    with torch.no_grad():
        prediction = model(test.x).argmax(1)
    clean = float((prediction == test.y).float().mean())
    assert clean > 0.8  # the network really learned something, so the verified numbers below mean something

    verified_acc = {}
    for method in methods:
        for eps in (0.02, 0.1):
            expected = [verify(model, test.x[i:i + 50], test.y[i:i + 50], eps, method=method) for i in (0, 50)]
            statuses = [s.value for e in expected for s in e.status]
            margins = torch.cat([e.margin_lower for e in expected])
            mine = [r for r in rows if r["method"] == method and float(r["eps"]) == eps]
            assert [int(r["index"]) for r in mine] == list(range(200, 300))
            assert [r["status"] for r in mine] == statuses
            assert [int(r["prediction"]) for r in mine] == prediction.tolist()
            assert torch.allclose(torch.tensor([float(r["margin_lower"]) for r in mine]), margins, atol=1e-4)
            (row,) = [r for r in summary if r["method"] == method and float(r["eps"]) == eps]
            assert float(row["clean_acc"]) == pytest.approx(clean)
            verified_acc[method, eps] = float(row["verified_acc"])
            assert verified_acc[method, eps] == pytest.approx(statuses.count("verified") / 100)
    for method in methods:
        assert verified_acc[method, 0.1] <= verified_acc[method, 0.02]
    assert verified_acc["crown", 0.02] > 0.3  # a normally trained small net is verifiable at a small radius
    assert verified_acc["interval", 0.1] < verified_acc["crown", 0.02]


def test_every_registered_method_runs_and_agrees(tmp_path, trained_fc):
    """Table-driven over the registry: every verifier (the exact MILP one too, once registered) on a few
    samples, with the command's own cross-check that no method verifies what another falsifies."""
    _, weights = trained_fc
    out = tmp_path / "run"
    result = run("--quiet", "verify", "--model", "mnist_fc_small", "--checkpoint", str(weights), "--eps",
                 "0.02,0.04", "--method", ",".join(VERIFIERS), "--n-examples", "6", "--batch-size", "4",
                 "--timeout", "30", "--out", str(out))
    assert result.exit_code == 0, result.output
    _, summary = read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == [m for m in VERIFIERS for _ in range(2)]
    assert "soundness" not in result.output
    _, rows = read_csv(out / "verify.csv")
    assert len(rows) == 6 * 2 * len(VERIFIERS)


@dataclass(frozen=True)
class AlwaysVerified(Verifier):
    """An unsound verifier that claims every sample, for the cross-check test."""

    name: ClassVar[str] = "always-verified"

    def bound(self, ctx):
        raise NotImplementedError("verify() is overridden")

    def verify(self, model, x, y, eps):
        with torch.no_grad():
            prediction = model(x).argmax(1)
        count = x.shape[0]
        return VerificationResult(
            method=self.name, eps=eps, status=(Status.VERIFIED,) * count, margin_lower=torch.ones(count),
            margins_lower=torch.ones(count, 10), prediction=prediction, time_s=torch.full((count,), 1e-3),
        )


@dataclass(frozen=True)
class TimeLimited(Verifier):
    """Reports a timeout for every sample when its time limit is below one second, unknown otherwise."""

    name: ClassVar[str] = "time-limited"
    time_limit: float = 10.0

    def bound(self, ctx):
        raise NotImplementedError("verify() is overridden")

    def verify(self, model, x, y, eps):
        count = x.shape[0]
        status = Status.TIMEOUT if self.time_limit < 1 else Status.UNKNOWN
        return VerificationResult(
            method=self.name, eps=eps, status=(status,) * count, margin_lower=torch.zeros(count),
            margins_lower=torch.zeros(count, 10), prediction=y.clone(), time_s=torch.full((count,), self.time_limit),
        )


def test_soundness_conflict_is_an_error_after_writing_files(tmp_path, monkeypatch):
    # the registry has no removal on purpose; the test adds its fake verifier for its own duration only
    monkeypatch.setitem(VERIFIERS._items, AlwaysVerified.name, AlwaysVerified)
    out = tmp_path / "run"
    result = run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval,always-verified",
                 "--n-examples", "5", "--out", str(out))
    assert result.exit_code == 1, result.output
    _, rows = read_csv(out / "verify.csv")
    falsified = [r["index"] for r in rows if r["method"] == "interval" and r["status"] == "falsified"]
    assert falsified  # an untrained network misclassifies some of the first five digits
    for index in falsified:
        assert (f"soundness bug: test sample {index} " in result.stderr
                and "verified by always-verified but falsified by interval" in result.stderr)
    assert result.stderr.splitlines()[-1].startswith(f"Error: {len(falsified)} soundness conflict(s)")


def test_timeout_reaches_methods_that_take_a_time_limit(tmp_path, monkeypatch):
    monkeypatch.setitem(VERIFIERS._items, TimeLimited.name, TimeLimited)
    for timeout, column in (("0.5", "n_timeout"), (None, "n_unknown")):
        out = tmp_path / f"run-{timeout}"
        extra = ["--timeout", timeout] if timeout else []
        result = run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "time-limited",
                     "--n-examples", "3", "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
        (row,) = read_csv(out / "summary.csv")[1]
        assert row[column] == "3"
    assert "0/3" in result.output.replace(" ", "") or "3/0" in result.output.replace(" ", "")
    ignored = run("verify", "--model", "mnist_small", "--eps", "0", "--method", "interval", "--n-examples", "2",
                  "--timeout", "5", "--out", str(tmp_path / "ignored"))
    assert ignored.exit_code == 0 and "--timeout is ignored" in ignored.stderr


def test_default_out_folder_is_timestamped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run("verify", "--model", "mnist_fc_small", "--eps", "0", "--method", "interval",
                   "--n-examples", "2").exit_code == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("verify-") for f in folders)
    assert all((tmp_path / "runs" / f / "summary.csv").is_file() for f in folders)


def test_unknown_method_suggests_close_match(tmp_path):
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval,crwn"),
                   "--method", "unknown verifier 'crwn'", "Did you mean 'crown'")


@pytest.mark.parametrize(("eps", "message"), [
    ("1.5", "eps must be in [0, 1]"), ("-0.1", "eps must be in [0, 1]"), ("0.1,,0.3", "empty value"),
    ("nan", "not a finite number"), ("abc", "'abc' is not a number"),
])
def test_bad_eps(eps, message):
    one_line_error(run("verify", "--model", "mnist_small", "--eps", eps, "--method", "interval"), "--eps", message)


def test_fraction_eps_is_accepted(tmp_path):
    out = tmp_path / "run"
    result = run("verify", "--model", "mnist_fc_small", "--eps", "8/255,0.1,8/255", "--method", "interval",
                 "--n-examples", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [float(r["eps"]) for r in read_csv(out / "summary.csv")[1]] == [pytest.approx(8 / 255), 0.1]


def test_dataset_from_files_needs_data_dir():
    one_line_error(run("verify", "--model", "mnist_small", "--dataset", "mnist", "--eps", "0.1", "--method",
                       "interval"), "--data-dir")


def test_out_of_range_samples():
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval", "--start", "990",
                       "--n-examples", "20"), "up to index 1009", "has 1000 samples")
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval", "--start", "1000"),
                   "--start 1000 is out of range")


def test_unsupported_layers_are_listed(tmp_path):
    factory = tmp_path / "sigmoid_net.py"
    factory.write_text(
        "from torch import nn\n\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.GELU(), nn.Linear(32, 10), nn.Softplus())\n"
    )
    line = one_line_error(run("verify", "--model", f"{factory}:build", "--eps", "0.1", "--method", "interval",
                              "--n-examples", "2", "--out", str(tmp_path / "run")), "unsupported layer")
    assert "nn.GELU at model.2" in line and "nn.Softplus at model.4" in line
    assert not (tmp_path / "run" / "verify.csv").exists()


def test_bad_out_and_normalisation_options(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval", "--out", str(taken)),
                   "--out", "is a file")
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval", "--mean", "0.5,x",
                       "--std", "0.2"), "--mean", "'x' is not a number")
    one_line_error(run("verify", "--model", "mnist_small", "--eps", "0.1", "--method", "interval", "--mean", "0.5"),
                   "--mean and --std must be given together")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_alpha_crown_on_imported_models_matches_the_zoo_model(tmp_path, trained_fc, fmt):
    """The same trained network as a zoo model with a checkpoint, a TorchScript file and an ONNX file:
    alpha-crown verifies the same samples with the same margin bounds (the imports rebuild the same layers;
    a float32 reordering of the sums moves a bound by far less than 1e-4 * (1 + |bound|))."""
    model, weights = trained_fc
    path = tmp_path / ("net.pt" if fmt == "torchscript" else "net.onnx")
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        pytest.importorskip("onnx")
        torch.onnx.export(model, (torch.rand(1, 1, 28, 28),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    common = ["--eps", "0.03", "--method", "crown,alpha-crown", "--n-examples", "12", "--batch-size", "6"]
    zoo = run("--quiet", "verify", "--model", "mnist_fc_small", "--checkpoint", str(weights), *common,
              "--out", str(tmp_path / "zoo"))
    imported = run("--quiet", "verify", "--model", str(path), *common, "--out", str(tmp_path / "imported"))
    assert zoo.exit_code == 0, zoo.output
    assert imported.exit_code == 0, imported.output
    _, expected = read_csv(tmp_path / "zoo" / "verify.csv")
    _, found = read_csv(tmp_path / "imported" / "verify.csv")
    assert [(r["method"], r["index"], r["status"]) for r in found] == [
        (r["method"], r["index"], r["status"]) for r in expected]
    for mine, theirs in zip(found, expected, strict=True):
        bound = float(theirs["margin_lower"])
        assert float(mine["margin_lower"]) == pytest.approx(bound, abs=1e-4 * (1 + abs(bound)))
    alpha = [float(r["margin_lower"]) for r in found if r["method"] == "alpha-crown"]
    crown = [float(r["margin_lower"]) for r in found if r["method"] == "crown"]
    assert all(a >= c - 1e-4 * (1 + abs(c)) for a, c in zip(alpha, crown, strict=True))
    assert sum(r["status"] == "verified" for r in found if r["method"] == "alpha-crown") > 0
