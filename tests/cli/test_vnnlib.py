"""``robustkit vnnlib`` and ``vnnlib-export``, and :mod:`robustkit.vnncomp` under them: results against a network
whose answers are known by construction, re-checked counterexamples, resumable instance runs, one-line errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from robustkit.cli import main
from robustkit.cli.vnnlib import part_path
from robustkit.models.onnx_import import load_onnx
from robustkit.verifiers import VERIFIERS, SpecResult, Status
from robustkit.vnncomp import read_instances, round_box_outward, solve_instance, write_robustness_benchmark
from robustkit.vnnlib import read_property, robustness_property
from tests.helpers import one_line_error, read_csv

pytestmark = pytest.mark.usefixtures("single_thread")

METHOD = "bab"  # the commands' default

# point 0 is robust at eps 0.05, point 1 is not (class 2 catches up through the ReLU on x_3), point 2's label is
# not the network's prediction (skipped by the export)
POINTS = torch.tensor([[0.8, 0.3, 0.2, 0.1], [0.5, 0.2, 0.3, 0.55], [0.8, 0.3, 0.2, 0.1]]).reshape(3, 1, 1, 4)
LABELS = torch.tensor([0, 0, 1])
EPS = 0.05
RESULT_LINE = re.compile(r"\(([XY])_(\d+) (\S+?)\)")


def known_network() -> nn.Sequential:
    """4-8-8-3 ReLU network computing y = (x_0, x_1, x_2 + 2 relu(x_3 - 0.5)) on [0, 1]^4."""
    first, second, last = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        for i in range(4):
            first.weight[i, i] = 1.0
        first.weight[4, 3], first.bias[4] = 1.0, -0.5
        for i in range(3):
            first.weight[5 + i, i] = -1.0  # never active on [0, 1]: stays in the graph, as trained networks have
        second.weight.copy_(torch.eye(8))
        second.bias.zero_()
        last.weight.zero_()
        last.bias.zero_()
        for i in range(3):
            last.weight[i, i] = 1.0
        last.weight[2, 4] = 2.0
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), second, nn.ReLU(), last).eval()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    count = write_robustness_benchmark(known_network(), POINTS, LABELS, [EPS], folder, 20, name="known")
    assert count == 2
    return folder


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_export_writes_the_onnx_network_properties_and_instances(bench):
    instances = read_instances(bench / "instances.csv")
    assert [(i.onnx.relative_to(bench).as_posix(), i.vnnlib.relative_to(bench).as_posix(), i.timeout)
            for i in instances] == [("onnx/known.onnx", "vnnlib/prop_0_eps_0.05.vnnlib", 20.0),
                                    ("onnx/known.onnx", "vnnlib/prop_1_eps_0.05.vnnlib", 20.0)]
    network = load_onnx(bench / "onnx" / "known.onnx")
    with torch.no_grad():
        assert torch.allclose(network(POINTS), known_network()(POINTS), rtol=0, atol=1e-6)
    prop = read_property(bench / "vnnlib" / "prop_1_eps_0.05.vnnlib")
    assert (prop.n_inputs, prop.n_outputs, len(prop.regions)) == (4, 3, 1)
    assert np.allclose(prop.regions[0].lower, [0.45, 0.15, 0.25, 0.5]) and np.allclose(prop.regions[0].upper,
                                                                                        [0.55, 0.25, 0.35, 0.6])


def test_robust_property_is_unsat(bench, tmp_path):
    out = tmp_path / "result.txt"
    result = run("vnnlib", bench / "onnx/known.onnx", bench / "vnnlib/prop_0_eps_0.05.vnnlib", "--method", METHOD,
                 "--timeout", "20", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == "unsat\n"  # the result is the last (and only) line of stdout
    assert "unsat in" in result.stderr and len(result.stderr.splitlines()) == 1
    assert out.read_text() == "unsat\n"


def check_counterexample(result_file: Path, prop_file: Path, network: Path, label: int) -> None:
    """The result file's counterexample lies in the property's box, the network does not score ``label`` above
    every other class there, and the file's outputs are the network's."""
    text = result_file.read_text()
    assert text.splitlines()[0] == "sat"
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for name, index, value in RESULT_LINE.findall(text):
        values[name][int(index)] = float(value)
    prop = read_property(prop_file)
    x = np.array([values["X"][i] for i in range(prop.n_inputs)])
    y = np.array([values["Y"][j] for j in range(prop.n_outputs)])
    region = prop.regions[0]
    assert np.all(region.lower <= x) and np.all(x <= region.upper)
    with torch.no_grad():
        out = load_onnx(network)(torch.tensor(x, dtype=torch.float32).reshape(1, 1, 1, 4))[0].double().numpy()
    assert np.allclose(out, y, rtol=0, atol=1e-6)
    assert np.delete(out, label).max() >= out[label] and prop.is_counterexample(x, out)


def test_non_robust_property_is_sat_with_a_checked_counterexample(bench, tmp_path):
    out = tmp_path / "result.txt"
    prop = bench / "vnnlib/prop_1_eps_0.05.vnnlib"
    result = run("vnnlib", bench / "onnx/known.onnx", prop, "--method", METHOD, "--timeout", "20", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "sat"
    check_counterexample(out, prop, bench / "onnx/known.onnx", label=0)


def test_a_label_the_network_does_not_predict_is_sat(bench, tmp_path):
    centre = POINTS[0].reshape(-1).double().numpy()
    prop = write_text(tmp_path / "wrong.vnnlib", robustness_property(centre - 0.01, centre + 0.01, 1, 3))
    out = tmp_path / "result.txt"
    result = run("--quiet", "vnnlib", bench / "onnx/known.onnx", prop, "--method", METHOD, "--out", out)
    assert result.exit_code == 0 and result.output == "sat\n"
    check_counterexample(out, prop, bench / "onnx/known.onnx", label=1)


def test_no_time_left_is_a_timeout(bench, tmp_path):
    out = tmp_path / "result.txt"
    result = run("vnnlib", bench / "onnx/known.onnx", bench / "vnnlib/prop_0_eps_0.05.vnnlib", "--method", METHOD,
                 "--timeout", "1e-6", "--out", out)
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == "timeout"
    assert out.read_text() == "timeout\n"


BOX = "\n".join(f"(declare-const X_{i} Real)" for i in range(4)) + "\n" + "\n".join(
    f"(declare-const Y_{j} Real)" for j in range(3))


def box_text(point: torch.Tensor, eps: float) -> str:
    return "\n".join(f"(assert (>= X_{i} {v - eps!r}))\n(assert (<= X_{i} {v + eps!r}))"
                     for i, v in enumerate(point.reshape(-1).double().tolist()))


@pytest.mark.parametrize(("point", "outputs", "expected"), [
    # multi-row conjunctions: class 1 or class 2 beats both others
    (0, "(assert (or (and (>= Y_1 Y_0) (>= Y_1 Y_2)) (and (>= Y_2 Y_0) (>= Y_2 Y_1))))", "unsat"),
    (1, "(assert (or (and (>= Y_1 Y_0) (>= Y_1 Y_2)) (and (>= Y_2 Y_0) (>= Y_2 Y_1))))", "sat"),
    (0, "", "sat"),  # no output constraint: every point of the box is a counterexample
    (1, "(assert (<= Y_0 0.1))", "unsat"),
], ids=["two-rows-robust", "two-rows-broken", "true", "offset"])
def test_disjunctions_of_conjunctions(bench, tmp_path, point, outputs, expected):
    prop = write_text(tmp_path / "p.vnnlib", f"{BOX}\n{box_text(POINTS[point], EPS)}\n{outputs}\n")
    found = solve_instance(bench / "onnx/known.onnx", prop, 20, method=METHOD)
    assert found.result == expected
    if expected == "sat":
        assert found.x is not None and found.y is not None
        assert read_property(prop).is_counterexample(found.x, found.y)
        assert np.array_equal(found.x, found.x.astype(np.float32))  # float32 values, inside the float64 box


def test_a_counterexample_that_fails_the_recheck_is_unknown(bench, monkeypatch, caplog):
    def wrong(self, model, lower, upper, spec, offset=None):  # the box's centre is no counterexample here
        return SpecResult(self.name, (Status.FALSIFIED,), torch.zeros(1, 1), torch.zeros(1), (lower + upper) / 2)

    monkeypatch.setattr(VERIFIERS[METHOD], "verify_spec", wrong)
    with caplog.at_level(logging.WARNING, logger="robustkit.vnncomp"):
        found = solve_instance(bench / "onnx/known.onnx", bench / "vnnlib/prop_0_eps_0.05.vnnlib", 20, method=METHOD)
    assert (found.result, found.x) == ("unknown", None)
    assert "re-check rejects" in caplog.text


def test_boxes_are_rounded_outward_to_the_nearest_float32():
    lower, upper = np.array([0.1, 1 / 3, 0.0, -0.7]), np.array([0.2, 2 / 3, 0.5, 1e-9])
    low, high = round_box_outward(lower, upper)
    assert low.dtype == high.dtype == np.float32
    assert np.all(low <= lower) and np.all(high >= upper)
    assert np.all(np.nextafter(low, np.float32(np.inf)) > lower)  # one step further in leaves the box
    assert np.all(np.nextafter(high, np.float32(-np.inf)) < upper)


def instances_file(bench: Path, tmp_path: Path) -> Path:
    write_text(tmp_path / "broken.vnnlib", "(declare-const X_0 Real)\n(assert (<= X_0 0.5)\n")
    return write_text(tmp_path / "instances.csv", "\n".join([
        f"{bench}/onnx/known.onnx,{bench}/vnnlib/prop_0_eps_0.05.vnnlib,20",
        "",
        f"{bench}/onnx/known.onnx,broken.vnnlib,20",  # relative to the CSV's folder
        f"{bench}/onnx/known.onnx,{bench}/vnnlib/prop_1_eps_0.05.vnnlib,20",
    ]) + "\n")


def test_instances_run_records_each_result_and_an_error(bench, tmp_path):
    csv = instances_file(bench, tmp_path)
    out = tmp_path / "results.csv"
    result = run("vnnlib", "--instances", csv, "--method", METHOD, "--out", out)
    assert result.exit_code == 0, result.output
    columns, rows = read_csv(out)
    assert columns == ["onnx", "vnnlib", "result", "seconds"]
    assert [Path(r["vnnlib"]).name for r in rows] == ["prop_0_eps_0.05.vnnlib", "broken.vnnlib",
                                                      "prop_1_eps_0.05.vnnlib"]
    assert [r["result"] for r in rows] == ["unsat", "error", "sat"]
    assert rows[1]["vnnlib"] == "broken.vnnlib"  # as the CSV names it, relative to its folder
    assert all(float(r["seconds"]) >= 0 for r in rows)
    assert "[2/3]" in result.stderr and "unbalanced parentheses" in result.stderr
    assert "3 instances (1 sat, 1 unsat, 1 error)" in result.stdout
    assert not (tmp_path / "results.csv.parts").exists()


def test_instances_in_worker_processes_give_the_same_rows(bench, tmp_path):
    csv = instances_file(bench, tmp_path)
    out = tmp_path / "results.csv"
    result = run("vnnlib", "--instances", csv, "--out", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out)
    assert [r["result"] for r in rows] == ["unsat", "error", "sat"]
    misuse = run("vnnlib", "--instances", csv, "--out", out, "--workers", "2", "--scheduler", "tcp://127.0.0.1:9")
    assert misuse.exit_code == 2


def test_resume_skips_finished_instances(bench, tmp_path):
    csv = instances_file(bench, tmp_path)
    out = tmp_path / "results.csv"
    parts = tmp_path / "results.csv.parts"
    parts.mkdir()
    # a run killed after its first instance: that instance's part file is all that is left
    part_path(parts, 0).write_text(json.dumps({
        "onnx": str(bench / "onnx/known.onnx"),
        "vnnlib": str(bench / "vnnlib/prop_0_eps_0.05.vnnlib"), "method": METHOD, "result": "unknown",
        "seconds": "123", "message": ""}))
    again = run("vnnlib", "--instances", csv, "--method", METHOD, "--out", out)
    one_line_error(again, "results.csv.parts", "--resume")
    result = run("vnnlib", "--instances", csv, "--method", METHOD, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    _, rows = read_csv(out)
    assert (rows[0]["result"], rows[0]["seconds"]) == ("unknown", "123")  # taken from the part, not re-run
    assert [r["result"] for r in rows[1:]] == ["error", "sat"]
    assert "1 finished before" in result.stdout


def cos_network(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 4), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Cos", ["h"], ["y"])], "cos",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case", ["malformed-vnnlib", "unsupported-op", "size-mismatch", "missing-file"])
def test_bad_input_is_one_line_exit_2(bench, tmp_path, case):
    network, prop = bench / "onnx/known.onnx", bench / "vnnlib/prop_0_eps_0.05.vnnlib"
    if case == "malformed-vnnlib":
        prop, fragments = write_text(tmp_path / "bad.vnnlib", BOX + "\n(assert (<= X_0 0.5)\n"), ["line 8"]
    elif case == "unsupported-op":
        network, fragments = cos_network(tmp_path / "cos.onnx"), ["unsupported operator", "Cos"]
    elif case == "size-mismatch":
        prop = write_text(tmp_path / "five.vnnlib", robustness_property(np.zeros(5), np.ones(5), 0, 3))
        fragments = ["property declares 5 inputs, the network takes 4"]
    else:
        network, fragments = tmp_path / "absent.onnx", ["absent.onnx", "does not exist"]
    out = tmp_path / "result.txt"
    one_line_error(run("vnnlib", network, prop, "--method", METHOD, "--out", out), *fragments)
    assert not out.exists()


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "give NETWORK PROPERTY"),
    (["{net}", "{prop}", "--instances", "{csv}", "--out", "r.csv"], "exclude each other"),
    (["--instances", "{csv}"], "--instances needs --out"),
    (["{net}", "{prop}", "--resume"], "--resume applies to --instances only"),
    (["--instances", "{csv}", "--out", "r.csv", "--timeout", "5"], "--timeout applies to NETWORK PROPERTY"),
], ids=["nothing", "both", "no-out", "resume-alone", "timeout-with-instances"])
def test_misuse_is_one_line_exit_2(bench, tmp_path, args, fragment):
    csv = write_text(tmp_path / "instances.csv", "onnx/known.onnx,vnnlib/prop_0_eps_0.05.vnnlib,20\n")
    world = {"{net}": str(bench / "onnx/known.onnx"), "{prop}": str(bench / "vnnlib/prop_0_eps_0.05.vnnlib"),
             "{csv}": str(csv)}
    one_line_error(run("vnnlib", *(world.get(a, a) for a in args)), fragment)


def test_bad_instances_row_names_its_line(tmp_path):
    csv = write_text(tmp_path / "instances.csv", "a.onnx,b.vnnlib,20\n\na.onnx,b.vnnlib,soon\n")
    one_line_error(run("vnnlib", "--instances", csv, "--out", tmp_path / "r.csv"), "line 3", "'soon'")


def test_vnnlib_export_command_writes_a_benchmark(tmp_path):
    out = tmp_path / "export"
    result = run("vnnlib-export", "--model", "mnist_fc_small", "--n-examples", "2", "--eps", "0.01,2/255",
                 "--timeout", "30", "--all-points", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Wrote 4 instances" in result.stdout
    instances = read_instances(out / "instances.csv")
    assert [i.vnnlib.name for i in instances] == [
        "prop_0_eps_0.01.vnnlib", f"prop_0_eps_{2 / 255!r}.vnnlib", "prop_1_eps_0.01.vnnlib",
        f"prop_1_eps_{2 / 255!r}.vnnlib"]
    assert {i.onnx.name for i in instances} == {"mnist_fc_small.onnx"} and {i.timeout for i in instances} == {30.0}
    prop = read_property(instances[0].vnnlib)
    assert (prop.n_inputs, prop.n_outputs) == (784, 10)
    assert np.all(prop.regions[0].lower >= 0) and np.all(prop.regions[0].upper <= 1)
