"""``robustkit attack``: robust accuracy of a model under several attacks and radii, and their per-sample worst case.

Each attack of ``--attack`` (registered names from :data:`robustkit.attacks.ATTACKS`, and ``foolbox:CLASS`` for
any foolbox attack) runs on every sample at every ``--eps`` (L-inf radii in input space), batch by batch, with a
progress bar per attack. Randomness comes from the root ``--seed``: every attack and eps gets its own
``torch.Generator`` seeded with it, so an attack's result does not depend on which other attacks run.

``--steps`` and ``--restarts`` override the attacks' own options where they have one (:data:`STEPS_OPTIONS`,
:data:`RESTARTS_OPTIONS`; for ``foolbox:CLASS``, ``--steps`` sets the foolbox class's ``steps`` argument when it
has one and ``--restarts`` re-runs it on the samples still robust); an attack without such an option ignores it
with a note.

Before anything is written, every adversarial example is re-checked: inside the eps-ball and [0, 1], and, where
the attack reports success, misclassified by a fresh forward pass. A failed re-check is a bug in an attack: it is
reported and the command exits with code 1 without writing results.

Pre-flight checks (:mod:`robustkit.attacks.preflight`) run before the attacks: randomised outputs, probabilities
instead of logits, zero or non-finite input gradients, a model in training mode; after them, at every eps at which
a gradient-free attack ran next to gradient attacks, the samples only it broke. Each warning is one line
``Warning: ...`` on stderr (``--quiet`` hides progress, never warnings); ``preflight.csv`` holds every check's
result (:mod:`robustkit.cli.preflight`), and attack.csv the per-sample ``zero_gradient`` (the cross-entropy or
margin input gradient at the clean sample is zero or non-finite) and ``gradient_free_only`` (broken at that eps by
a gradient-free attack and by no gradient attack; empty where no such pair of attacks ran).

An attack made of stages (``autoattack``: clean, apgd-ce, apgd-t, fab-t, square) also gets its robust accuracy
after each stage: printed as a table after the summary, and written to ``stages.csv`` (only when such an attack
ran), one row per attack, eps and stage in the order they ran, with the columns :data:`STAGE_COLUMNS`:
``dataset``, ``model``, ``checkpoint``, ``trainer`` (empty, as in summary.csv), ``method`` (the attack's label),
``config`` (its repr), ``eps``, ``seed``, ``n`` (samples attacked), ``stage_index`` (0 for ``clean``), ``stage``,
``robust_acc`` (the share of all n samples that the clean check and every stage up to this one left robust: the
per-sample worst case so far, non-increasing; the last row equals the attack's robust_acc in summary.csv),
``n_robust`` (those samples, counted) and ``robustkit_version``. summary.csv and attack.csv are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from robustkit.attacks import ATTACKS, Attack, FoolboxAttack, get_attack
from robustkit.cli import Command
from robustkit.cli.options import (
    DataArgs,
    ModelArgs,
    data_options,
    eps_option,
    global_options,
    load_cli_model,
    load_eval_data,
    model_options,
    out_option,
    output_folder,
)
from robustkit.errors import InputError, UnknownNameError
from robustkit.evaluation import worst_case

if TYPE_CHECKING:
    from torch import Tensor

    from robustkit.attacks.preflight import GradientFreeGap
    from robustkit.evaluation import AttackRun, EvalData, PreflightRun

FOOLBOX_PREFIX = "foolbox:"
ENSEMBLE = "worst-case"
WORST_CASE_LABEL = "worst case"
# which option of each attack --steps and --restarts set
STEPS_OPTIONS = {
    "pgd": "steps", "cw-linf": "steps", "cw-l2": "steps", "interval": "inner_steps", "apgd": "steps", "fab": "steps",
}
RESTARTS_OPTIONS = {
    "pgd": "restarts", "cw-linf": "restarts", "interval": "restarts", "foolbox": "restarts", "apgd": "restarts",
    "fab": "restarts", "square": "restarts",
}
STAGE_COLUMNS = (
    "dataset", "model", "checkpoint", "trainer", "method", "config", "eps", "seed", "n", "stage_index", "stage",
    "robust_acc", "n_robust", "robustkit_version",
)
EXAMPLE_ROWS = 8
MAX_REPORTED = 10

COMMON_COLUMNS = ("dataset", "model", "checkpoint", "trainer", "eps", "seed", "n")
PER_ATTACK_COLUMNS = ("success", "prediction", "linf", "l2")
SUMMARY_COLUMNS = (
    "dataset", "model", "checkpoint", "trainer", "method", "config", "eps", "seed", "n", "clean_acc", "robust_acc",
    "n_broken", "time_s", "time_per_sample_s", "robustkit_version",
)


def sample_columns(labels: Sequence[str]) -> tuple[str, ...]:
    """The header of ``attack.csv`` for the attacks ``labels``."""
    per_attack = tuple(f"{label}_{column}" for label in labels for column in PER_ATTACK_COLUMNS)
    return (*COMMON_COLUMNS, "index", "label", "clean_prediction", *per_attack, "worst_case_success",
            "zero_gradient", "gradient_free_only", "robustkit_version")


# ------------------------------------------------------------------------------------------ parsing


def _check_label(label: str) -> None:
    if label == ENSEMBLE:
        raise ValueError(
            "the per-sample worst case over the --attack list is always reported; list the attacks themselves "
            "(e.g. pgd,cw-linf,interval)"
        )
    if label.startswith(FOOLBOX_PREFIX):
        try:
            threat = FoolboxAttack(attack=label[len(FOOLBOX_PREFIX):]).threat
        except InputError as exc:
            raise ValueError(str(exc)) from None
    elif label in ATTACKS:
        threat = ATTACKS[label]().threat
    else:
        choices = [name for name in ATTACKS if name != ENSEMBLE]
        raise ValueError(f"{UnknownNameError('attack', label, choices)} Any foolbox attack runs as foolbox:CLASS.")
    if threat != "linf":
        raise ValueError(f"{label} attacks in the {threat} norm, but --eps gives L-inf radii: choose an L-inf attack")


def parse_attacks(text: str) -> list[str]:
    """Comma-separated attack names (registered ones and ``foolbox:CLASS``), each checked; repeats kept once.

    The worst case is not an attack of the list (it is always reported), and L2 attacks are refused because
    ``--eps`` gives L-inf radii.
    """
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise ValueError(f"give one or more comma-separated attack names, got {text!r}")
    for label in labels:
        _check_label(label)
    return list(dict.fromkeys(labels))


def _attack_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:  # missing: robustkit's Command reports it
        return None
    try:
        return parse_attacks(value)
    except ValueError as exc:
        raise click.BadParameter(" ".join(str(exc).split())) from None


def build_attack(label: str, steps: int | None, restarts: int | None) -> tuple[Attack, list[str]]:
    """The attack ``label`` with ``--steps``/``--restarts`` applied, and notes about overrides it ignores."""
    notes = []
    options: dict[str, Any] = {}
    name = "foolbox" if label.startswith(FOOLBOX_PREFIX) else label
    if name == "foolbox":
        class_name = label[len(FOOLBOX_PREFIX):] if label != name else FoolboxAttack().attack
        options["attack"] = class_name
        if steps is not None and FoolboxAttack(attack=class_name).accepts("steps"):
            options["options"] = {"steps": steps}
        elif steps is not None:
            notes.append(f"--steps is ignored by {label}: foolbox's {class_name} takes no steps")
    elif steps is not None:
        if name in STEPS_OPTIONS:
            options[STEPS_OPTIONS[name]] = steps
        else:
            notes.append(f"--steps is ignored by {label}: it has no steps option")
    if restarts is not None:
        if name in RESTARTS_OPTIONS:
            options[RESTARTS_OPTIONS[name]] = restarts
        else:
            notes.append(f"--restarts is ignored by {label}: it has no restarts")
    return get_attack(name, **options), notes


# ------------------------------------------------------------------------------------------ writing


def write_results(
    out: Path,
    runs: Sequence[AttackRun],
    data: EvalData,
    clean_prediction: Tensor,
    model_args: ModelArgs,
    seed: int,
    preflight: PreflightRun,
    gaps: Mapping[float, GradientFreeGap],
) -> list[Path]:
    """``attack.csv`` (one row per sample and eps) and ``summary.csv`` (one row per attack and eps, and the worst
    case per eps); returns the paths."""
    from robustkit import __version__
    from robustkit.io import write_csv

    labels = list(dict.fromkeys(r.label for r in runs))
    eps_list = list(dict.fromkeys(r.eps for r in runs))
    checkpoint = "" if model_args.checkpoint is None else str(model_args.checkpoint)
    x = data.split.x
    clean_acc = float((clean_prediction == data.split.y).float().mean())
    sample_rows: list[list[Any]] = []
    summary_rows: list[list[Any]] = []
    for eps in eps_list:
        common = [data.dataset.name, model_args.spec, checkpoint, "", eps, seed, data.n]
        same_eps = [r for r in runs if r.eps == eps]
        delta = [(r.x_adv - x).flatten(1) for r in same_eps]
        linf = [d.abs().amax(1).tolist() for d in delta]
        l2 = [d.norm(dim=1).tolist() for d in delta]
        broken = worst_case(runs, eps)
        for position, index in enumerate(data.indices):
            cells: list[Any] = [*common, index, int(data.split.y[position]), int(clean_prediction[position])]
            for number, run in enumerate(same_eps):
                cells += [bool(run.success[position]), int(run.prediction[position]),
                          format(linf[number][position], ".6g"), format(l2[number][position], ".6g")]
            gap = bool(gaps[eps].points[position]) if eps in gaps else None
            sample_rows.append([*cells, bool(broken[position]), bool(preflight.zero_gradient[position]), gap,
                                __version__])
        for run in same_eps:
            summary_rows.append([
                data.dataset.name, model_args.spec, checkpoint, "", run.label, run.config, eps, seed, data.n,
                format(clean_acc, ".6g"), format(1 - run.n_broken / data.n, ".6g"), run.n_broken,
                format(run.time_s, ".6g"), format(run.time_s / data.n, ".6g"), __version__,
            ])
        total = sum(r.time_s for r in same_eps)
        summary_rows.append([
            data.dataset.name, model_args.spec, checkpoint, "", ENSEMBLE,
            f"per-sample worst case over {', '.join(labels)}", eps, seed, data.n, format(clean_acc, ".6g"),
            format(1 - int(broken.sum()) / data.n, ".6g"), int(broken.sum()), format(total, ".6g"),
            format(total / data.n, ".6g"), __version__,
        ])
    return [
        write_csv(out / "attack.csv", sample_columns(labels), sample_rows),
        write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows),
    ]


def write_stages(out: Path, runs: Sequence[AttackRun], data: EvalData, model_args: ModelArgs, seed: int) -> Path:
    """``stages.csv``: the robust accuracy after each stage of the runs with stages (see the module docstring)."""
    from robustkit import __version__
    from robustkit.io import write_csv

    checkpoint = "" if model_args.checkpoint is None else str(model_args.checkpoint)
    rows = [
        [data.dataset.name, model_args.spec, checkpoint, "", run.label, run.config, run.eps, seed, data.n, position,
         stage, format(robust / data.n, ".6g"), robust, __version__]
        for run in runs for position, (stage, robust) in enumerate(run.stage_robust_counts())
    ]
    return write_csv(out / "stages.csv", STAGE_COLUMNS, rows)


def format_stages(runs: Sequence[AttackRun], data: EvalData) -> str:
    """The terminal table of the robust accuracy after each stage (one row per attack, eps and stage)."""
    from robustkit.reports.tables import format_table

    rows = [[run.label, f"{run.eps:g}", stage, f"{100 * robust / data.n:.1f}%", str(robust)]
            for run in runs for stage, robust in run.stage_robust_counts()]
    return format_table(["attack", "eps", "after stage", "robust acc", "robust"], rows)


def write_adversarial(out: Path, runs: Sequence[AttackRun], data: EvalData) -> Path:
    """``adv.npz``: ``x_adv`` (attacks, eps, N, C, H, W) float32 with ``attacks``, ``eps``, ``labels``,
    ``indices``, ``success`` and ``prediction`` (attacks, eps, N) to index it."""
    import numpy as np

    from robustkit.io import atomic_open

    labels = list(dict.fromkeys(r.label for r in runs))
    eps_list = list(dict.fromkeys(r.eps for r in runs))
    table = {(r.label, r.eps): r for r in runs}
    grid = [[table[label, eps] for eps in eps_list] for label in labels]
    path = out / "adv.npz"
    with atomic_open(path) as handle:
        np.savez(
            handle,
            x_adv=np.stack([np.stack([r.x_adv.numpy() for r in row]) for row in grid]).astype(np.float32),
            attacks=np.array(labels, dtype=str),
            eps=np.array(eps_list, dtype=np.float64),
            labels=data.split.y.numpy(),
            indices=np.array(list(data.indices), dtype=np.int64),
            success=np.stack([np.stack([r.success.numpy() for r in row]) for row in grid]),
            prediction=np.stack([np.stack([r.prediction.numpy() for r in row]) for row in grid]),
        )
    return path


def write_examples(out: Path, runs: Sequence[AttackRun], data: EvalData, clean_prediction: Tensor) -> Path:
    """``examples.png``: up to :data:`EXAMPLE_ROWS` samples (those broken at the largest eps first), clean and
    under every attack and eps, titled with the predicted classes; each row is labelled with its index in the test
    split (``test 107``), so a grid shown beside ``attack.csv`` or ``adv.npz`` names the same samples."""
    from robustkit.reports.images import ExampleColumn, save_examples_grid

    largest = max(r.eps for r in runs)
    broken = worst_case(runs, largest)
    order = [p for p in range(data.n) if bool(broken[p])] + [p for p in range(data.n) if not bool(broken[p])]
    rows = sorted(order[:EXAMPLE_ROWS])
    columns = [
        ExampleColumn(f"{run.label.replace(':', ':' + chr(10))}\neps {run.eps:g}", run.x_adv[rows],
                      run.prediction[rows].tolist())
        for run in runs
    ]
    return save_examples_grid(
        out / "examples.png", data.split.x[rows], data.split.y[rows].tolist(), clean_prediction[rows].tolist(),
        columns, data.dataset.class_names, [f"test {data.start + p}" for p in rows],
    )


def format_summary(runs: Sequence[AttackRun], data: EvalData, clean_prediction: Tensor) -> str:
    """The terminal table: one row per attack and eps, then the worst case per eps."""
    from robustkit.reports.tables import format_table

    clean = f"{100 * float((clean_prediction == data.split.y).float().mean()):.1f}%"
    rows = []
    for eps in dict.fromkeys(r.eps for r in runs):
        same_eps = [r for r in runs if r.eps == eps]
        for run in same_eps:
            rows.append([run.label, f"{eps:g}", clean, f"{100 * (1 - run.n_broken / data.n):.1f}%",
                         str(run.n_broken), f"{run.time_s / data.n:.3g}s"])
        broken = int(worst_case(runs, eps).sum())
        total = sum(r.time_s for r in same_eps)
        rows.append([WORST_CASE_LABEL, f"{eps:g}", clean, f"{100 * (1 - broken / data.n):.1f}%", str(broken),
                     f"{total / data.n:.3g}s"])
    return format_table(["attack", "eps", "clean acc", "robust acc", "broken", "time/sample"], rows)


# ------------------------------------------------------------------------------------------ command


@click.command("attack", cls=Command)
@model_options
@data_options
@eps_option()
@click.option("--attack", "attacks", required=True, callback=_attack_callback, metavar="NAME[,NAME...]",
              help=f"Comma-separated attacks: {', '.join(n for n in ATTACKS if n != ENSEMBLE)} (foolbox's LinfPGD) "
                   "or foolbox:CLASS for any L-inf attack class of foolbox.attacks (e.g. "
                   "foolbox:LinfDeepFoolAttack).")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Gradient steps: pgd/cw-linf/cw-l2/apgd/fab 'steps', interval 'inner_steps', foolbox 'steps'.")
@click.option("--restarts", type=click.IntRange(min=1), metavar="R",
              help="Restarts on the samples still robust: pgd/cw-linf/interval/apgd/fab/square/foolbox 'restarts'.")
@out_option("attack")
@click.option("--save-adv", is_flag=True, help="Also write the adversarial images to adv.npz.")
@click.pass_context
def attack(
    ctx: click.Context,
    model_args: ModelArgs,
    data_args: DataArgs,
    eps: list[float],
    attacks: list[str],
    steps: int | None,
    restarts: int | None,
    out: Path | None,
    save_adv: bool,
) -> None:
    """Attack a model on test samples with one or more attacks and report robust accuracy.

    Prints clean and robust accuracy, broken samples and the time per sample for every attack and eps, and the
    per-sample worst case over the attacks (robust accuracy counts all samples: clean-misclassified ones count
    as broken). Pre-flight checks for gradient masking print warnings on stderr. Writes attack.csv (per sample),
    summary.csv, preflight.csv, examples.png and, with --save-adv, adv.npz to --out; autoattack also prints and
    writes (stages.csv) its robust accuracy after each stage. Every adversarial example is
    re-checked first; a failed re-check is a bug (exit code 1).

    Example: robustkit attack --model mnist_small --checkpoint w.pt --eps 0.1,0.3 --attack pgd,cw-linf,interval
    """
    options = global_options(ctx)
    data = load_eval_data(data_args)
    model = load_cli_model(model_args, data.dataset, options)
    built: dict[str, Attack] = {}
    for label in attacks:
        built[label], notes = build_attack(label, steps, restarts)
        for note in notes:
            click.echo(f"Note: {note}.", err=True)

    from robustkit.cli.preflight import echo_warnings, gap_warning, write_preflight
    from robustkit.evaluation import gradient_free_gaps, predict, recheck, run_attack, run_preflight

    clean_prediction = predict(model, data)  # a model with NaN or infinite logits on these samples fails here
    # before the long part, so that a bad --out fails at once
    with output_folder(out, "attack") as folder:
        preflight = run_preflight(model, data, options.seed)
        echo_warnings(preflight.report.warnings)
        runs = [run for label, instance in built.items() for run in run_attack(model, data, label, instance, eps,
                                                                                options.seed)]
        problems = recheck(model, data, runs)
        if problems:
            for problem in problems[:MAX_REPORTED]:
                click.echo(f"Error: re-check failed: {problem}", err=True)
            cause = ("the model's outputs are randomised (see the pre-flight warning), so a fresh forward pass can "
                     "disagree with the attack's" if preflight.report.randomised_outputs else "a bug in the attack")
            raise click.ClickException(
                f"{len(problems)} adversarial example(s) failed the re-check ({cause}; first ones listed "
                "above); no results were written"
            )
        gaps = gradient_free_gaps(runs)
        echo_warnings([line for e, gap in gaps.items() if (line := gap_warning(e, gap)) is not None])
        written = write_results(folder, runs, data, clean_prediction, model_args, options.seed, preflight, gaps)
        staged = [run for run in runs if run.stages]
        if staged:
            written.append(write_stages(folder, staged, data, model_args, options.seed))
        written.append(write_preflight(folder, preflight, gaps, data, model_args, options.seed))
        written.append(write_examples(folder, runs, data, clean_prediction))
        if save_adv:
            written.append(write_adversarial(folder, runs, data))

        click.echo(format_summary(runs, data, clean_prediction))
        if staged:
            click.echo("\nRobust accuracy after each stage (the per-sample worst case of the stages so far):")
            click.echo(format_stages(staged, data))
        click.echo(
            f"{data.n} test samples of {data.dataset.name} (indices {data.start} to {data.start + data.n - 1}). "
            "Robust accuracy counts all of them: clean-misclassified samples count as broken. The worst case is per "
            "sample: broken when any of the attacks breaks it."
        )
        click.echo(f"Wrote {', '.join(str(path) for path in written)}.")
