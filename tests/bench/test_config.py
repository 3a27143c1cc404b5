"""Bench configuration: presets, the example file, and errors that name the key and the valid choices."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from robustkit.bench import PRESETS, load_config, parse_config, plan, preset
from robustkit.errors import InputError, UnknownNameError

ROOT = Path(__file__).resolve().parents[2]


def test_presets_parse_and_plan_the_paper_grid():
    paper = preset("paper")
    assert [c.trainer.label for c in plan(paper)] == [
        "standard", "pgd", "verifiable-symbolic", "verifiable-interval", "mixtrain"]
    assert paper.datasets == ("mnist5k",) and paper.models == ("mnist_small",) and paper.eps == (0.1,)
    symbolic = next(t for t in paper.trainers if t.label == "verifiable-symbolic")
    assert symbolic.name == "verifiable" and symbolic.options == {"method": "symbolic"}
    assert symbolic.training["batch_size"] == 50 and "epochs" in symbolic.training
    assert paper.evaluation.autoattack == "fast"  # the standard ensemble costs ~40 min per robust cell
    quick = preset("quick")
    assert quick.n_train > 0 and quick.n_test <= 200
    assert quick.evaluation.autoattack == "fast"
    assert set(PRESETS) == {"paper", "quick"}


def test_example_file_is_valid():
    config = load_config(str(ROOT / "examples" / "bench.toml"))
    assert len(plan(config)) == 12
    assert config.evaluation.eps_sweep == (0.02, 0.05, 0.1, 0.15, 0.2)
    assert (config.evaluation.complete, config.evaluation.complete_time_limit) == ("auto", 2.0)  # as the paper's
    assert config.evaluation.exact == "false"


def test_autoattack_is_off_unless_asked_for():
    config = base()
    del config["evaluation"]["autoattack"]
    assert parse_config(config, "test").evaluation.autoattack == "off"
    for version in ("standard", "fast", "off"):
        config["evaluation"]["autoattack"] = version
        assert parse_config(config, "test").evaluation.autoattack == version


def test_unknown_preset():
    with pytest.raises(UnknownNameError, match="Did you mean 'paper'"):
        preset("papr")


def base() -> dict:
    return tomllib.loads(PRESETS["quick"])


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c["grid"].update(models=["mnist_smal"]), r"grid.models: unknown model 'mnist_smal'.*mnist_small"),
    (lambda c: c["grid"].update(datasets=["cifar"]), r"grid.datasets: unknown dataset 'cifar'.*cifar10"),
    (lambda c: c["grid"].update(eps=[0.1, 1.5]), r"grid.eps: 1.5 is not a number in \[0, 1\]"),
    (lambda c: c["grid"].update(trainers=["standard", "mixtrian"]), r"grid.trainers: 'mixtrian'.*mixtrain"),
    (lambda c: c["trainers"]["pgd"].update(stepz=3), r"trainers.pgd.stepz: unknown option.*steps"),
    (lambda c: c["trainers"]["pgd"].update(trainer="pgdd"), r"trainers.pgd.trainer: unknown trainer 'pgdd'"),
    (lambda c: c["trainers"]["mixtrain"].update(k=0), r"trainers.mixtrain: k must be >= 1"),
    (lambda c: c["trainers"]["standard"].update(epochs=0), r"trainers.standard: epochs and batch size"),
    (lambda c: c["evaluation"].update(verifiers=["symbolc"]), r"evaluation.verifiers: unknown verifier 'symbolc'"),
    (lambda c: c["evaluation"].update(exact="maybe"), r"evaluation.exact: 'maybe' is not a choice.*auto"),
    (lambda c: c["evaluation"].update(pgd_stepz=3), r"evaluation.pgd_stepz: unknown key.*pgd_steps"),
    (lambda c: c.update(gird={}), r"gird: unknown section.*grid"),
    (lambda c: c["grid"].update(datasets=["mnist"]), r"data.data_dir: dataset 'mnist' is read from files"),
    (lambda c: c["data"].update(n_test=-1), r"data.n_test: must be >= 0, got -1"),
    (lambda c: c["evaluation"].update(interval_attack={"radius": -1}), r"evaluation.interval_attack"),
    (lambda c: c["evaluation"].update(autoattack="standart"),
     r"evaluation.autoattack: 'standart' is not a choice.*Did you mean 'standard'.*Valid: standard, fast, off"),
    (lambda c: c["evaluation"].update(autoattack=True), r"evaluation.autoattack: must be a string, got True"),
    (lambda c: c["evaluation"].update(complete="babb"),
     r"^bench config: evaluation.complete: 'babb' is not a choice .*Did you mean 'bab'.*Valid: auto, bab, exact, "
     r"off\.$"),
    (lambda c: c["evaluation"].update(complete=True), r"evaluation.complete: must be a string, got True"),
    (lambda c: c["evaluation"].update(complete_time_limit=0), r"evaluation.complete_time_limit: must be > 0, got 0"),
    (lambda c: c["evaluation"].update(complete_time_limit="10s"),
     r"evaluation.complete_time_limit: must be a finite number, got '10s'"),
    (lambda c: c["evaluation"].update(complete_tim_limit=1), r"evaluation.complete_tim_limit: unknown key.*"
                                                             r"complete_time_limit"),
    (lambda c: c.update(run={"jobs": 0}), r"run.jobs: must be a whole number >= 1 or \"auto\", got 0"),
    (lambda c: c.update(run={"jobs": "two"}), r"run.jobs: must be a whole number >= 1 or \"auto\", got 'two'"),
    (lambda c: c.update(run={"jobs": True}), r"run.jobs: must be a whole number >= 1 or \"auto\", got True"),
    (lambda c: c.update(run={"job": 2}), r"run.job: unknown key.*Valid: jobs"),
])
def test_invalid_configs_name_the_key(change, match):
    config = base()
    change(config)
    with pytest.raises(InputError, match=match):
        parse_config(config, "test")


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[grid\nmodels = 3")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(str(broken))


def test_a_trainer_label_typo_suggests_and_lists_each_choice_once():
    """The paper preset names tables after trainers (``[trainers.mixtrain]``): one suggestion, one listing."""
    config = tomllib.loads(PRESETS["paper"])
    config["grid"]["trainers"] = ["mixtrian"]
    with pytest.raises(InputError) as raised:
        parse_config(config, "test")
    message = str(raised.value)
    assert "Did you mean 'mixtrain'?" in message
    listed = message.split("Valid: ", 1)[1].rstrip(".").split(", ")
    assert len(listed) == len(set(listed)) and {"mixtrain", "verifiable-symbolic", "verifiable"} <= set(listed)


def test_seeds_run_every_cell_per_seed_and_the_paper_preset_has_one():
    assert preset("paper").seeds == (0,) and preset("quick").seeds == (0,)
    assert {c.seed for c in plan(preset("paper"))} == {0}
    grid = {"grid": {"trainers": ["standard", "pgd"]}}
    assert parse_config({**grid, "seed": 7}, "t").seeds == (7,)
    config = parse_config({**grid, "seeds": [0, 1, 2]}, "t")
    cells = plan(config)
    assert [(c.seed, c.trainer.label) for c in cells] == [
        (0, "standard"), (0, "pgd"), (1, "standard"), (1, "pgd"), (2, "standard"), (2, "pgd")]
    assert len({c.key for c in cells}) == 6 and cells[2].key == "mnist5k__mnist_small__standard__eps0.1__seed1"
    assert cells[2].legacy_key == "mnist5k__mnist_small__standard__eps0.1"
    for bad, fragment in (({"seed": 1, "seeds": [1, 2]}, "not both"), ({"seeds": []}, "non-empty list"),
                          ({"seeds": [1, 1]}, "twice"), ({"seeds": [0, "1"]}, "integers"), ({"seed": True}, "integer")):
        with pytest.raises(InputError, match=fragment):
            parse_config({**grid, **bad}, "t")


def test_the_complete_stage_settings_their_defaults_and_the_presets(monkeypatch):
    from robustkit.bench import EvaluationSettings
    from robustkit.verifiers import VERIFIERS

    assert (EvaluationSettings().complete, EvaluationSettings().complete_time_limit) == ("auto", 10.0)
    assert EvaluationSettings().exact == "false"  # the older exact stage: off unless asked for
    for name, budget in (("paper", 2.0), ("quick", 0.5)):
        evaluation = preset(name).evaluation
        assert (evaluation.complete, evaluation.complete_time_limit, evaluation.exact) == ("auto", budget, "false")
    config = base()
    for choice in ("auto", "exact", "off"):
        config["evaluation"]["complete"] = choice
        assert parse_config(config, "test").evaluation.complete == choice
    config["evaluation"]["exact"] = True  # the older key keeps working
    assert parse_config(config, "test").evaluation.exact == "true"
    monkeypatch.delitem(VERIFIERS._items, "bab", raising=False)  # a robustkit without bab
    config["evaluation"]["complete"] = "bab"
    with pytest.raises(InputError, match=r"evaluation.complete: 'bab' is not a complete verifier of this robustkit "
                                         r"\(complete verifiers: exact\)"):
        parse_config(config, "test")


def test_run_jobs_default_one_auto_in_the_paper_preset_and_the_example():
    assert parse_config(base(), "test").jobs == 1
    assert parse_config({**base(), "run": {"jobs": 3}}, "test").jobs == 3
    assert parse_config({**base(), "run": {"jobs": "auto"}}, "test").jobs is None
    assert preset("paper").jobs is None  # cells side by side where cores are free: 27 min instead of 43 idle
    assert preset("quick").jobs == 1
    assert load_config(str(ROOT / "examples" / "bench.toml")).jobs is None
