"""Reading results.csv and epochs.csv: types, allowed NaN, extra columns and clear errors for bad files."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from robustkit.errors import RobustkitError
from robustkit.reports.records import (
    ACCURACY_METRICS,
    CELL_KEYS,
    EPOCHS_COLUMNS,
    METRIC_LABELS,
    METRICS,
    RESULTS_COLUMNS,
    RecordsError,
    cell_rows,
    format_eps,
    load_run,
    read_epochs,
    read_results,
    sweep_rows,
)
from tests.reports.runs import (
    BAND_CONFIG,
    CONFIG,
    N_SWEEP,
    SWEEP_EPS,
    TRAINERS,
    epoch_rows,
    make_run,
    results_rows,
    sweep_value,
)

TEXT = ("dataset", "model", "trainer", "trainer_name", "metric", "robustkit_version", "torch_version", "config")


def test_results_types_and_values(run_dir):
    frame = read_results(run_dir / "results.csv")
    assert len(frame) == len(results_rows())
    assert list(frame.columns) == [*RESULTS_COLUMNS, "host"]  # extra columns are kept
    for column in TEXT:
        assert pd.api.types.is_string_dtype(frame[column]), column
    for column in ("train_eps", "eval_eps", "value", "n", "time_s"):
        assert frame[column].dtype == "float64", column
    assert frame["seed"].dtype == "int64"
    assert set(frame["host"]) == {"node-1"}
    assert set(frame["config"]) == {CONFIG, BAND_CONFIG}  # quoted CSV cells come back as written
    assert frame["time_s"].isna().sum() == 2 * len(TRAINERS)  # peak memory and epochs rows carry no time
    first = frame.iloc[0]
    assert (first["trainer"], first["metric"], first["value"], first["n"]) == ("standard", "clean_acc", 0.989, 1000)


def test_epochs_types_and_missing_values(run_dir):
    frame = read_epochs(run_dir / "epochs.csv")
    assert len(frame) == len(epoch_rows())
    assert list(frame.columns) == [*EPOCHS_COLUMNS, "note"]
    assert frame["epoch"].dtype == "int64" and frame["seed"].dtype == "int64"
    assert all(frame[c].dtype == "float64" for c in EPOCHS_COLUMNS[7:])
    standard = frame.loc[frame["trainer"] == "standard"]
    assert standard["weight"].isna().all() and standard["loss_robust"].isna().all()
    mixtrain = frame.loc[(frame["trainer"] == "mixtrain")]
    assert mixtrain["weight"].tolist() == [0.1, 0.25, 0.6, 0.6]  # 0.1 x 2.5 per epoch, capped at 0.6
    assert mixtrain["train_time_s"].tolist() == [25.0, 50.0, 75.0, 100.0]


def test_cell_and_sweep_rows_partition_results(run_dir):
    frame = read_results(run_dir / "results.csv")
    cells, sweep = cell_rows(frame), sweep_rows(frame)
    assert len(cells) + len(sweep) == len(frame)
    assert (cells["eval_eps"] == cells["train_eps"]).all()
    assert sorted(set(sweep["eval_eps"])) == list(SWEEP_EPS)
    assert len(sweep) == len(TRAINERS) * len(SWEEP_EPS) * 4


def test_constants_are_consistent():
    assert set(METRICS) <= set(METRIC_LABELS)
    assert all(m in METRICS for m in ACCURACY_METRICS)
    assert len(set(RESULTS_COLUMNS)) == len(RESULTS_COLUMNS) == 14
    assert len(set(EPOCHS_COLUMNS)) == len(EPOCHS_COLUMNS) == 21


def test_format_eps():
    assert [format_eps(e) for e in (0.1, 0.3, 2 / 255, 8 / 255, 1.785 / 255, 0.0)] == [
        "0.1", "0.3", "2/255", "8/255", "0.007", "0"]


def _rewrite(path: Path, transform) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(transform(lines)) + "\n")


@pytest.mark.parametrize(("name", "reader", "dropped"), [
    ("results.csv", read_results, ["metric", "value"]),
    ("epochs.csv", read_epochs, ["epoch"]),
])
def test_missing_columns_are_named_with_the_file(run_dir, name, reader, dropped):
    frame = pd.read_csv(run_dir / name, dtype=str, keep_default_na=False)
    frame.drop(columns=dropped).to_csv(run_dir / name, index=False)
    with pytest.raises(RecordsError) as error:
        reader(run_dir / name)
    message = str(error.value)
    assert str(run_dir / name) in message
    assert f"lacks the required column(s) {', '.join(dropped)} " in message


@pytest.mark.parametrize(("edit", "fragments"), [
    (lambda lines: [lines[0], lines[1].replace(",0.989,", ",abc,")], ["line 2, column value", "'abc' is not a number"]),
    (lambda lines: [lines[0], lines[1].replace(",0.989,", ",1.5,")], ["line 2, column value", "outside [0, 1]"]),
    (lambda lines: [lines[0], lines[1], lines[2].replace("mnist5k,", ",", 1)],
     ["line 3, column dataset", "is missing"]),
    (lambda lines: [lines[0], lines[1].replace(",1000,", ",10.5,")], ["column n", "not a whole number"]),
    (lambda lines: [lines[0], lines[1].replace(",1000,", ",inf,")], ["column n", "not a finite number"]),
    (lambda lines: [lines[0], lines[1].replace("mnist_small,standard,standard,0.1,0.1,",
                                               "mnist_small,standard,standard,0.1,1.2,")],
     ["column eval_eps", "outside [0, 1]"]),
    (lambda lines: [lines[0], lines[1] + ',"unterminated'], ["results.csv is not a valid CSV file"]),
    (lambda lines: [], ["results.csv is empty"]),
])
def test_corrupt_results_cells(run_dir, edit, fragments):
    _rewrite(run_dir / "results.csv", edit)
    with pytest.raises(RecordsError) as error:
        read_results(run_dir / "results.csv")
    assert str(run_dir / "results.csv") in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_corrupt_epochs_cells(run_dir):
    _rewrite(run_dir / "epochs.csv", lambda lines: [lines[0], lines[1].replace("mnist_small,standard,standard,0.1,0,1,",
                                                                              "mnist_small,standard,standard,0.1,0,1.5,")])
    with pytest.raises(RecordsError, match=r"line 2, column epoch: '1.5' is not a whole number"):
        read_epochs(run_dir / "epochs.csv")


def test_binary_and_missing_files(run_dir):
    (run_dir / "garbage.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    with pytest.raises(RecordsError, match="garbage.csv is not a UTF-8 text file"):
        read_results(run_dir / "garbage.csv")
    with pytest.raises(RecordsError, match="nope.csv does not exist"):
        read_epochs(run_dir / "nope.csv")
    with pytest.raises(RecordsError, match="is not a file"):
        read_epochs(run_dir)
    (run_dir / "epochs.csv").unlink()
    with pytest.raises(RecordsError, match="epochs.csv does not exist"):
        load_run(run_dir)
    with pytest.raises(RecordsError, match="does not exist or is not a folder"):
        load_run(run_dir / "missing")
    assert issubclass(RecordsError, RobustkitError)  # so the CLI turns it into a one-line error, exit 2


def test_header_only_files_give_empty_frames(tmp_path):
    (tmp_path / "results.csv").write_text(",".join(RESULTS_COLUMNS) + "\n")
    (tmp_path / "epochs.csv").write_text(",".join(EPOCHS_COLUMNS) + "\n")
    records = load_run(tmp_path)
    assert records.results.empty and records.epochs.empty
    assert list(records.results.columns) == list(RESULTS_COLUMNS)


def test_repeated_measurement_keeps_the_first_row_with_a_warning(run_dir):
    lines = (run_dir / "results.csv").read_text().splitlines()
    (run_dir / "results.csv").write_text("\n".join([*lines, lines[1].replace(",0.989,", ",0.5,")]) + "\n")
    with pytest.warns(UserWarning, match="1 row"):
        frame = read_results(run_dir / "results.csv")
    assert len(frame) == len(lines) - 1
    clean = frame.loc[(frame["trainer"] == "standard") & (frame["metric"] == "clean_acc") & (frame["eval_eps"] == 0.1)]
    assert clean["value"].tolist() == [0.989]


@pytest.mark.parametrize("sweep_first", [False, True])
def test_sweep_at_the_training_eps_is_told_apart_by_n(tmp_path, sweep_first):
    folder = make_run(tmp_path / "run", sweep_eps=(0.05, 0.1, 0.2))
    if sweep_first:  # the choice must not depend on the order of the rows
        frame = pd.read_csv(folder / "results.csv", dtype=str, keep_default_na=False)
        frame.iloc[::-1].to_csv(folder / "results.csv", index=False)
    results = read_results(folder / "results.csv")
    cells, sweep = cell_rows(results), sweep_rows(results)
    assert len(cells) + len(sweep) == len(results)
    assert (cells["n"] != N_SWEEP).all()
    assert not cells.duplicated([*CELL_KEYS, "metric"]).any()
    pgd = cells.loc[(cells["trainer"] == "pgd") & (cells["metric"] == "pgd_acc")]
    assert pgd["value"].tolist() == [0.931, 0.62][:: -1 if sweep_first else 1]  # mnist_small, mnist_fc
    swept = sweep.loc[(sweep["trainer"] == "pgd") & (sweep["metric"] == "pgd_acc")].sort_values("eval_eps")
    assert swept["eval_eps"].tolist() == [0.05, 0.1, 0.2]
    assert swept["value"].tolist() == [sweep_value("pgd", "pgd_acc", e) for e in (0.05, 0.1, 0.2)]
    assert (swept["n"] == N_SWEEP).all()


def test_missing_tokens_are_nan_only_where_allowed(run_dir):
    _rewrite(run_dir / "epochs.csv", lambda lines: [lines[0], lines[1].replace(",0.001,", ",nan,")])
    assert math.isnan(read_epochs(run_dir / "epochs.csv")["lr"].iloc[0])
    _rewrite(run_dir / "epochs.csv", lambda lines: [lines[0], lines[1].replace(",0,1,", ",0,,")])
    with pytest.raises(RecordsError, match="line 2, column epoch: '' is missing"):
        read_epochs(run_dir / "epochs.csv")
