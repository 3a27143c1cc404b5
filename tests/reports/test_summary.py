"""The paper-style summary: numbers checked against the records, Time vs MixTrain, ordering and rendering."""

from __future__ import annotations

import csv
import math

import pandas as pd
import pytest

from robustkit.reports.records import RESULTS_COLUMNS, read_results
from robustkit.reports.summary import (
    ACCURACY_NOTE,
    INTERVAL_NOTE,
    SUMMARY_COLUMNS,
    TABLE_HEADERS,
    complete_note,
    format_duration,
    format_percent,
    format_ratio,
    mixtrain_reference,
    summary_frame,
    summary_markdown,
    write_summary,
)
from tests.reports.runs import (
    ACCURACY_ORDER,
    AUTOATTACK,
    BAND,
    BAND_ORDER,
    CELLS,
    EXACT,
    GROUP,
    SMALL_CELLS,
    SMALL_GROUP,
    TRAINERS,
    make_run,
)


@pytest.fixture
def summary(run_dir):
    return summary_frame(read_results(run_dir / "results.csv"))


def test_one_row_per_cell_with_the_recorded_numbers(summary):
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert len(summary) == len(CELLS) + len(SMALL_CELLS)
    for group, cells, n in ((GROUP, CELLS, 1000), (SMALL_GROUP, SMALL_CELLS, 500)):
        rows = summary.loc[(summary["dataset"] == group[0]) & (summary["model"] == group[1])]
        assert rows["train_eps"].tolist() == [group[2]] * len(cells)
        assert rows["trainer"].tolist() == list(cells)
        for (_, row), (label, (accuracies, train_time)) in zip(rows.iterrows(), cells.items(), strict=True):
            assert row["trainer_name"] == TRAINERS[label] and row["n"] == n and row["seed"] == 0
            for metric, value in zip(ACCURACY_ORDER, accuracies, strict=True):
                assert row[metric] == value, (label, metric)
            assert row["train_time_s"] == train_time
            exact = EXACT.get(label, math.nan) if group == GROUP else math.nan
            assert row["verified_exact"] == exact or (math.isnan(exact) and math.isnan(row["verified_exact"]))
            if group == GROUP:
                assert row["autoattack_acc"] == AUTOATTACK[label]
            else:
                assert math.isnan(row["autoattack_acc"])
    for label in CELLS:  # the band's metrics and which complete verifier ran, in the main group only
        row = summary.loc[(summary["model"] == GROUP[1]) & (summary["trainer"] == label)].iloc[0]
        assert tuple(row[m] for m in BAND_ORDER) == BAND[label]
        assert (row["complete_method"], row["complete_time_limit"]) == ("bab", 2.0)
    small = summary.loc[summary["model"] == SMALL_GROUP[1]]
    assert small[[*BAND_ORDER, "complete_method", "complete_time_limit"]].isna().all().all()
    # appended: the earlier columns keep their positions
    columns = list(SUMMARY_COLUMNS)
    assert columns[columns.index("verified_best_high") + 1:] == [
        "autoattack_acc_std", "autoattack_acc_low", "autoattack_acc_high", "autoattack_acc", *BAND_ORDER,
        *(f"{m}_{part}" for m in BAND_ORDER for part in ("std", "low", "high")), "complete_method",
        "complete_time_limit"]


def test_sweep_rows_do_not_leak_into_the_summary(summary):
    mixtrain = summary.loc[summary["trainer"] == "mixtrain"].iloc[0]
    assert mixtrain["pgd_acc"] == CELLS["mixtrain"][0][1]  # the sweep measures pgd_acc at 0.05 and 0.2 too
    assert mixtrain["n"] == 1000  # the sweep's n is 200


def test_sweep_at_the_training_eps_does_not_change_the_summary(summary, tmp_path):
    overlapping = make_run(tmp_path / "overlap", sweep_eps=(0.05, 0.1, 0.2))  # as the bench presets do
    pd.testing.assert_frame_equal(summary_frame(read_results(overlapping / "results.csv")), summary)


def test_time_vs_mixtrain(summary):
    main = summary.loc[summary["model"] == GROUP[1]]
    expected = [CELLS[t][1] / CELLS["mixtrain"][1] for t in CELLS]
    assert main["time_vs_mixtrain"].tolist() == pytest.approx(expected)
    assert main.loc[main["trainer"] == "verifiable-symbolic", "time_vs_mixtrain"].item() == pytest.approx(15.0)
    assert summary.loc[summary["model"] == SMALL_GROUP[1], "time_vs_mixtrain"].isna().all()  # no MixTrain cell


def test_mixtrain_reference_prefers_the_cell_labelled_mixtrain():
    group = pd.DataFrame({
        "trainer": ["mixtrain-geometric", "mixtrain", "pgd"],
        "trainer_name": ["mixtrain", "mixtrain", "pgd"],
        "train_time_s": [80.0, 100.0, 50.0],
    })
    assert mixtrain_reference(group) == 100.0
    assert mixtrain_reference(group.iloc[[0, 2]]) == 80.0
    assert math.isnan(mixtrain_reference(group.iloc[[2]]))
    assert math.isnan(mixtrain_reference(group.assign(train_time_s=[0.0, 0.0, 50.0])))


def test_trainers_keep_their_order_in_results(tmp_path):
    order = ["mixtrain", "verifiable-interval", "standard", "pgd", "verifiable-symbolic"]
    summary = summary_frame(read_results(make_run(tmp_path / "run", order) / "results.csv"))
    assert summary["trainer"].tolist()[:5] == order


def test_markdown_tables(summary):
    text = summary_markdown(summary)
    assert ACCURACY_NOTE in text and "clean-misclassified samples count as broken" in text
    assert INTERVAL_NOTE in text and "Wilson score interval" in text
    sections = text.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "mnist5k / mnist_small / train eps 0.1", "mnist5k / mnist_fc / train eps 0.3"]
    main_rows = [line for line in sections[0].splitlines() if line.startswith("| ")]
    assert main_rows[0] == "| " + " | ".join(TABLE_HEADERS) + " |"
    assert "| Verified (symbolic) | Verified (CROWN) | Verified (best) |" in main_rows[0]  # crown has its column
    assert "| Verified (best) | Falsified | Undecided | Train time |" in main_rows[0]
    # Verified (best), Falsified and Undecided: the band's verified_complete, falsified and undecided
    assert main_rows[1:] == [
        "| standard | 98.9% (98.0-99.4) | 2.1% (1.4-3.2) | 1.3% (0.8-2.2) | 0.4% (0.2-1.0) | 0.2% (0.1-0.7) | "
        "0.0% (0.0-0.4) | 0.0% (0.0-0.4) | 0.1% (0.0-0.6) | 0.2% (0.1-0.7) | 99.8% (99.3-99.9) | 0.0% (0.0-0.4) | "
        "30.0 s | 0.30x |",
        "| pgd | 98.5% (97.5-99.1) | 93.1% (91.4-94.5) | 92.5% (90.7-94.0) | 91.2% (89.3-92.8) | 90.6% (88.6-92.3) | "
        "0.0% (0.0-0.4) | 12.4% (10.5-14.6) | 30.1% (27.3-33.0) | 65.2% (62.2-68.1) | 29.5% (26.8-32.4) | "
        "5.3% (4.1-6.9) | 1.6 min | 0.95x |",
        "| verifiable-symbolic | 97.5% (96.3-98.3) | 95.3% (93.8-96.4) | 95.1% (93.6-96.3) | "
        "95.0% (93.5-96.2) | 94.9% (93.4-96.1) | "
        "90.0% (88.0-91.7) | 95.2% (93.7-96.4) | 95.3% (93.8-96.4) | 94.8% (93.2-96.0) | 5.2% (4.0-6.8) | "
        "0.0% (0.0-0.4) | 25.0 min | 15.0x |",
        "| verifiable-interval | 98.0% (96.9-98.7) | 94.0% (92.4-95.3) | 93.9% (92.2-95.2) | "
        "93.5% (91.8-94.9) | 93.1% (91.4-94.5) | "
        "92.2% (90.4-93.7) | 92.5% (90.7-94.0) | 92.6% (90.8-94.1) | 92.8% (91.0-94.2) | 7.0% (5.6-8.8) | "
        "0.2% (0.1-0.7) | 2.0 min | 1.20x |",
        "| mixtrain | 98.4% (97.4-99.0) | 95.5% (94.0-96.6) | 95.1% (93.6-96.3) | "
        "95.2% (93.7-96.4) | 95.1% (93.6-96.3) | "
        "91.0% (89.1-92.6) | 95.1% (93.6-96.3) | 95.5% (94.0-96.6) | 95.0% (93.5-96.2) | 5.0% (3.8-6.5) | "
        "0.0% (0.0-0.4) | 1.7 min | 1.00x |",
    ]
    assert TABLE_HEADERS[5] == "AutoAttack"
    assert "\n\nComplete verifier on the undecided band: bab, at most 2 s per sample.\n" in sections[0]
    # a run made before the bench measured AutoAttack: n/a in its column
    small_rows = [line for line in sections[1].splitlines() if line.startswith("| ")]
    assert all(line.split(" | ")[5] == "n/a" for line in small_rows[2:])
    # and before its complete stage: Verified (best) is the best relaxation's, as it was, and the band n/a
    for line, label in zip(small_rows[1:], SMALL_CELLS, strict=True):
        cells = line.split(" | ")
        assert cells[9].split(" (")[0] == f"{100 * SMALL_CELLS[label][0][-1]:.1f}%" and cells[10:12] == ["n/a", "n/a"]
    assert "Complete verifier on the undecided band: none (evaluated before the bench had a complete stage" in (
        sections[1])
    assert "n = 1,000 test samples." in sections[0] and "n = 500 test samples." in sections[1]
    small_rows = [line for line in sections[1].splitlines() if line.startswith("| ")][1:]
    assert all(line.endswith("| n/a |") for line in small_rows)


def test_markdown_escapes_pipes_in_labels(summary):
    summary.loc[0, "trainer"] = "a|b"
    assert "| a\\|b | 98.9% (98.0-99.4) |" in summary_markdown(summary)


def test_csv_round_trip(summary, tmp_path):
    written = write_summary(summary, tmp_path)
    assert written == [tmp_path / "summary.csv", tmp_path / "summary.md"]
    back = pd.read_csv(tmp_path / "summary.csv")
    assert list(back.columns) == list(SUMMARY_COLUMNS)
    pd.testing.assert_frame_equal(back, summary, check_dtype=False)
    with (tmp_path / "summary.csv").open(newline="") as handle:
        first = next(csv.DictReader(handle))
    assert (first["seed"], first["n"], first["clean_acc"], first["verified_exact"]) == ("0", "1000", "0.989", "")
    assert first["train_time_s"] == "30.0" and first["time_vs_mixtrain"] == "0.3"


def test_time_vs_mixtrain_is_written_to_three_significant_digits(tmp_path):
    run = make_run(tmp_path / "run")
    results = read_results(run / "results.csv")
    # a pgd training time of 95.123456 s against MixTrain's 100 s: the ratio 0.95123456 is written as 0.951
    results.loc[(results["trainer"] == "pgd") & (results["metric"] == "train_time_s"), "value"] = 95.123456
    write_summary(summary_frame(results), tmp_path, formats=("csv",))
    with (tmp_path / "summary.csv").open(newline="") as handle:
        written = {row["trainer"]: row for row in csv.DictReader(handle) if row["model"] == GROUP[1]}
    assert written["pgd"]["time_vs_mixtrain"] == "0.951" and written["pgd"]["train_time_s"] == "95.123456"
    assert written["verifiable-symbolic"]["time_vs_mixtrain"] == "15.0"


def test_empty_results(tmp_path):
    (tmp_path / "results.csv").write_text(",".join(RESULTS_COLUMNS) + "\n")
    summary = summary_frame(read_results(tmp_path / "results.csv"))
    assert summary.empty and list(summary.columns) == list(SUMMARY_COLUMNS)
    assert "No cell has been evaluated yet." in summary_markdown(summary)
    write_summary(summary, tmp_path)
    assert (tmp_path / "summary.csv").read_text() == ",".join(SUMMARY_COLUMNS) + "\n"


def test_formatting():
    assert [format_percent(v) for v in (0.0, 0.9712, 1.0, math.nan)] == ["0.0%", "97.1%", "100.0%", "n/a"]
    assert [format_duration(s) for s in (0.0, 59.99, 3599.0, 86400.0, math.nan)] == [
        "0 s", "1.0 min", "1.0 h", "1.0 d", "n/a"]
    assert [format_ratio(r) for r in (0.333, 1.0, 9.999, 15.24, 150.4)] == ["0.33x", "1.00x", "10.0x", "15.2x", "150x"]


def _with_seeds(results: pd.DataFrame, shifts: dict[int, float]) -> pd.DataFrame:
    """The records as if every cell had run once per seed of ``shifts``, each seed's accuracies shifted by its
    value (clipped to [0, 1]) and its training time by 10 s per seed."""
    copies = []
    for seed, shift in shifts.items():
        copy = results.assign(seed=seed)
        accuracy = copy["metric"].str.endswith("_acc") | copy["metric"].str.startswith("verified_")
        copy.loc[accuracy, "value"] = (copy.loc[accuracy, "value"] + shift).clip(0, 1)
        timing = copy["metric"] == "train_time_s"
        copy.loc[timing, "value"] = copy.loc[timing, "value"] + 10 * seed
        copies.append(copy)
    return pd.concat(copies, ignore_index=True)


def test_several_seeds_give_the_mean_the_spread_and_a_t_interval(run_dir):
    results = _with_seeds(read_results(run_dir / "results.csv"), {0: -0.02, 1: 0.0, 2: 0.02})
    summary = summary_frame(results)
    assert len(summary) == len(CELLS) + len(SMALL_CELLS)  # one row per cell, not per seed
    pgd = summary.loc[(summary["trainer"] == "pgd") & (summary["model"] == GROUP[1])].iloc[0]
    assert pgd["seed"] == "0;1;2" and pgd["n_seeds"] == 3 and pgd["interval"] == "t"
    # pgd_acc 0.911, 0.931, 0.951: mean 0.931, sd 0.02, t(0.975, 2) = 4.3027 -> 0.931 +- 0.04968
    assert pgd["pgd_acc"] == pytest.approx(0.931)
    assert pgd["pgd_acc_std"] == pytest.approx(0.02)
    assert (pgd["pgd_acc_low"], pgd["pgd_acc_high"]) == pytest.approx((0.931 - 0.049683, 0.931 + 0.049683), abs=1e-6)
    assert pgd["train_time_s"] == pytest.approx(95.0 + 10.0)  # the mean of 95, 105 and 115 s
    assert pgd["time_vs_mixtrain"] == pytest.approx(105.0 / 110.0)
    text = summary_markdown(summary)
    assert "n = 1,000 test samples, 3 seeds per cell (0, 1, 2)." in text
    # clean 0.965, 0.985 and 1.0 (0.985 + 0.02 clipped): mean 98.3%, sd 1.8 points, the interval clipped at 100%
    assert "| pgd | 98.3% ± 1.8 (94.0-100.0) | 93.1% ± 2.0 (88.1-98.1) |" in text
    back = run_dir / "seeds"
    write_summary(summary, back, formats=("csv",))
    with (back / "summary.csv").open(newline="") as handle:
        written = {(r["model"], r["trainer"]): r for r in csv.DictReader(handle)}
    row = written[(GROUP[1], "pgd")]
    assert (row["seed"], row["n_seeds"], row["interval"]) == ("0;1;2", "3", "t")
    assert float(row["pgd_acc_std"]) == pytest.approx(0.02)


def test_one_seed_gets_wilson_intervals_over_the_test_samples(summary):
    standard = summary.loc[(summary["trainer"] == "standard") & (summary["model"] == GROUP[1])].iloc[0]
    assert standard["n_seeds"] == 1 and standard["interval"] == "wilson" and math.isnan(standard["clean_acc_std"])
    # 989 of 1,000: Wilson's centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) sqrt(p(1-p)/n + z^2/4n^2)
    z, p, n = 1.959964, 0.989, 1000
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (standard["clean_acc_low"], standard["clean_acc_high"]) == pytest.approx((centre - half, centre + half))
    assert (standard["clean_acc_low"], standard["clean_acc_high"]) == pytest.approx((0.98041, 0.99385), abs=1e-5)
    # none verified by interval: the interval starts at 0 and ends at z^2/n / (1 + z^2/n)
    assert standard["verified_interval_low"] == 0.0
    assert standard["verified_interval_high"] == pytest.approx(z * z / n / (1 + z * z / n))


def test_the_note_under_a_table_names_each_complete_verifier_and_budget():
    group = pd.DataFrame({
        "trainer": ["standard", "pgd", "mixtrain", "old"],
        "complete_method": ["bab", "bab", "none", math.nan],
        "complete_time_limit": [0.5, 0.5, math.nan, math.nan],
    })
    assert complete_note(group.iloc[:2]) == "Complete verifier on the undecided band: bab, at most 0.5 s per sample."
    assert complete_note(group) == (
        "Complete verifier on the undecided band: bab, at most 0.5 s per sample for standard, pgd; none "
        "(evaluation.complete off, or no complete verifier applies: the band stays undecided) for mixtrain; none "
        "(evaluated before the bench had a complete stage: Verified (best) is the best relaxation's, Falsified and "
        "Undecided are n/a) for old.")
