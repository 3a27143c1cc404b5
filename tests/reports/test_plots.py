"""The plots: which are drawn, what they show, stable file names and reproducible bytes."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from PIL import Image

from robustkit.reports.plots import (
    PLOT_KINDS,
    plan_plots,
    plot_stem,
    render_plot,
    save_figure,
    sweep_description,
    sweep_points,
    trainer_styles,
    write_plots,
)
from robustkit.reports.records import load_run
from tests.reports.runs import (
    ACCURACY_ORDER,
    CELLS,
    CONFIG,
    GROUP,
    N_SWEEP,
    N_VAL,
    SMALL_CELLS,
    SMALL_GROUP,
    SWEEP_EPS,
    make_run,
    sweep_value,
)


@pytest.fixture
def records(run_dir):
    return load_run(run_dir)


def _spec(records, kind, group):
    (spec,) = [s for s in plan_plots(records) if s.kind == kind and s.group == group]
    return spec


def test_plan_covers_every_kind_with_data(records):
    plans = plan_plots(records)
    assert [(s.group, s.kind) for s in plans] == [
        *((GROUP, kind) for kind in PLOT_KINDS),
        *((SMALL_GROUP, kind) for kind in PLOT_KINDS if kind != "accuracy_vs_eps"),  # no eps sweep there
    ]
    assert plans[0].stem == "plots/verified_vs_time__mnist5k__mnist_small__eps0.1"
    assert plans[0].title == "Verified accuracy vs training time: mnist5k / mnist_small / train eps 0.1"
    assert f"{N_VAL} monitoring test samples" in plans[0].caption


def test_stems_are_safe_and_distinct():
    unsafe = plot_stem("train_time", ("my data/set", "m<1>", 2 / 255))
    other = plot_stem("train_time", ("my-data-set", "m<1>", 2 / 255))
    name = unsafe.split("/", 1)[1]
    assert unsafe.startswith("plots/train_time__my-data-set-") and unsafe != other
    assert all(c.isalnum() or c in "._-" for c in name)
    assert plot_stem("train_time", ("a", "b", 0.3)) == "plots/train_time__a__b__eps0.3"


def test_verified_vs_time_draws_the_monitoring_curves(records):
    figure = render_plot(_spec(records, "verified_vs_time", GROUP), records)
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
    assert list(lines) == list(CELLS)
    mixtrain = lines["mixtrain"]
    assert list(mixtrain.get_xdata()) == [25.0, 50.0, 75.0, 100.0]  # cumulative training time
    expected = [100 * CELLS["mixtrain"][0][6] * k / 4 for k in range(1, 5)]
    assert list(mixtrain.get_ydata()) == pytest.approx(expected)
    assert axes.get_xscale() == "log"  # 7.5 s to 1500 s
    assert lines["pgd"].get_color() == trainer_styles(records)["pgd"].colour


def test_accuracy_vs_eps_plots_only_the_sweep(records):
    figure = render_plot(_spec(records, "accuracy_vs_eps", GROUP), records)
    assert [a.get_title() for a in figure.axes] == ["Clean", "PGD", "Verified (symbolic)"]
    (line,) = [line for line in figure.axes[1].get_lines() if line.get_label() == "pgd"]
    # the sweep's points only: the cell's own number at the training eps (1,000 samples, other attacks) is left out
    assert list(line.get_xdata()) == list(SWEEP_EPS)
    assert list(line.get_ydata()) == pytest.approx([100 * sweep_value("pgd", "pgd_acc", e) for e in SWEEP_EPS])


def test_every_point_of_accuracy_vs_eps_has_the_same_samples_and_attack(tmp_path):
    # the bench's sweep measures the training eps (0.1) again, on the sweep's 200 samples with the sweep's PGD
    records = load_run(make_run(tmp_path / "run", sweep_eps=(0.05, 0.1, 0.2)))
    spec = _spec(records, "accuracy_vs_eps", GROUP)
    figure = render_plot(spec, records)
    points = sweep_points(records.results)
    points = points.loc[points["model"] == GROUP[1]]
    assert set(points["n"]) == {N_SWEEP} and set(points["eval_eps"]) == {0.05, 0.1, 0.2}
    assert set(points.loc[points["metric"] == "pgd_acc", "config"]) == {CONFIG}
    for axes, metric in zip(figure.axes, ("clean_acc", "pgd_acc", "verified_symbolic"), strict=True):
        curves = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
        assert list(curves) == list(CELLS)
        for trainer, line in curves.items():
            mine = points.loc[(points["trainer"] == trainer) & (points["metric"] == metric)].sort_values("eval_eps")
            assert list(line.get_xdata()) == [0.05, 0.1, 0.2]
            assert list(line.get_ydata()) == pytest.approx(list(100 * mine["value"]))
    own_pgd = dict(zip(ACCURACY_ORDER, CELLS["pgd"][0], strict=True))["pgd_acc"]
    pgd_at_train_eps = [y for x, y in zip(*_pgd_line(figure), strict=True) if x == 0.1]
    assert pgd_at_train_eps == pytest.approx([100 * sweep_value("pgd", "pgd_acc", 0.1)]) != [100 * own_pgd]
    assert f"every point on the first {N_SWEEP} test samples; PGD: {CONFIG}" in spec.caption
    assert sweep_description(points.iloc[:0]) == "n unknown; PGD: not recorded"


def _pgd_line(figure):
    (line,) = [line for line in figure.axes[1].get_lines() if line.get_label() == "pgd"]
    return list(line.get_xdata()), list(line.get_ydata())


def test_training_curves_and_time_bars(records):
    curves = render_plot(_spec(records, "training_curves", GROUP), records)
    assert [a.get_title() for a in curves.axes] == ["training loss", "training eps", "loss weight (a / kappa)"]
    weighted = [line.get_label() for line in curves.axes[2].get_lines()]
    assert weighted == ["verifiable-symbolic", "verifiable-interval", "mixtrain"]  # standard and pgd have none
    bars = render_plot(_spec(records, "train_time", GROUP), records)
    widths = [patch.get_width() for patch in bars.axes[0].patches]
    assert widths == [seconds for _, seconds in CELLS.values()]
    assert bars.axes[0].get_xscale() == "log"  # 30 s to 1500 s
    small = render_plot(_spec(records, "train_time", SMALL_GROUP), records)
    assert small.axes[0].get_xscale() == "linear"  # 12 s to 48 s
    assert [p.get_width() for p in small.axes[0].patches] == [s for _, s in SMALL_CELLS.values()]


def test_save_figure_is_byte_reproducible(records, tmp_path):
    spec = _spec(records, "accuracy_vs_eps", GROUP)
    first = save_figure(render_plot(spec, records), tmp_path / "a")
    second = save_figure(render_plot(spec, records), tmp_path / "b")
    assert [p.name for p in first] == ["a.png", "a.pdf"]
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes()
    assert first[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and first[1].read_bytes().startswith(b"%PDF-")
    assert b"CreationDate" not in first[1].read_bytes()
    with pytest.raises(ValueError, match="unknown plot format"):
        save_figure(render_plot(spec, records), tmp_path / "c", ("svgz",))


def test_write_plots_writes_png_and_pdf_per_plan(records, tmp_path):
    written = write_plots(records, tmp_path, formats=("png",))
    stems = [s.stem for s in plan_plots(records)]
    assert written == [tmp_path / f"{stem}.png" for stem in stems]
    for path in written:
        image = Image.open(io.BytesIO(path.read_bytes()))
        assert image.format == "PNG" and image.width >= 500 and image.height >= 150


def test_error_bars_are_the_95_percent_intervals(tmp_path):
    from robustkit.reports.stats import t_interval, wilson_interval

    records = load_run(make_run(tmp_path / "run"))
    figure = render_plot(_spec(records, "accuracy_vs_eps", GROUP), records)
    pgd_axes = figure.axes[1]
    # one seed: Wilson intervals over the sweep's 200 samples, one bar per point, centred on the point
    bars = [c for c in pgd_axes.collections if len(c.get_segments()) == len(SWEEP_EPS)]
    segments = {(float(seg[0][0]), round(float(seg[0][1]), 9), round(float(seg[1][1]), 9))
                for bar in bars for seg in bar.get_segments()}
    for eps in SWEEP_EPS:
        low, high = wilson_interval(sweep_value("pgd", "pgd_acc", eps), N_SWEEP)
        assert (eps, round(100 * low, 9), round(100 * high, 9)) in segments
    # three seeds: the mean over the seeds and a t interval over them
    results = records.results
    copies = []
    for seed, shift in ((0, -0.02), (1, 0.0), (2, 0.02)):
        copy = results.assign(seed=seed)
        sweep = copy["eval_eps"] != copy["train_eps"]
        copy.loc[sweep, "value"] = (copy.loc[sweep, "value"] + shift).clip(0, 1)
        copies.append(copy)
    seeded = type(records)(records.run_dir, pd.concat(copies, ignore_index=True), records.epochs)
    figure = render_plot(_spec(seeded, "accuracy_vs_eps", GROUP), seeded)
    (line,) = [line for line in figure.axes[1].get_lines() if line.get_label() == "pgd"]
    values = {eps: [min(1.0, max(0.0, sweep_value("pgd", "pgd_acc", eps) + d)) for d in (-0.02, 0.0, 0.02)]
              for eps in SWEEP_EPS}
    assert list(line.get_ydata()) == pytest.approx([100 * sum(v) / 3 for v in values.values()])
    segments = {(float(seg[0][0]), round(float(seg[0][1]), 6), round(float(seg[1][1]), 6))
                for bar in figure.axes[1].collections for seg in bar.get_segments()}
    for eps, found in values.items():
        low, high = t_interval(found)
        assert (eps, round(100 * low, 6), round(100 * high, 6)) in segments


def test_train_time_bars_of_several_seeds_are_their_mean_with_a_t_interval(tmp_path):
    from robustkit.reports.stats import t_interval

    records = load_run(make_run(tmp_path / "run"))
    copies = []
    for seed in (0, 1, 2):
        copy = records.results.assign(seed=seed)
        timing = copy["metric"] == "train_time_s"
        copy.loc[timing, "value"] = copy.loc[timing, "value"] * (1 + 0.1 * seed)
        copies.append(copy)
    seeded = type(records)(records.run_dir, pd.concat(copies, ignore_index=True), records.epochs)
    figure = render_plot(_spec(seeded, "train_time", GROUP), seeded)
    axes = figure.axes[0]
    assert [p.get_width() for p in axes.patches] == pytest.approx([s * 1.1 for _, s in CELLS.values()])
    segments = [seg for bar in axes.collections for seg in bar.get_segments()]
    assert len(segments) == len(CELLS)
    for (_, seconds), segment in zip(CELLS.values(), segments, strict=True):
        low, high = t_interval([seconds, 1.1 * seconds, 1.2 * seconds], bounds=(0.0, math.inf))
        assert (segment[0][0], segment[1][0]) == pytest.approx((low, high))
        assert high > 1.0  # seconds, not clipped to an accuracy's [0, 1]
