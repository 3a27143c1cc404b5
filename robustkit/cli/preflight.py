"""The pre-flight (gradient-masking) checks in the outputs of ``robustkit attack`` (a helper module, not a command).

Every warning is one line ``Warning: ...`` on stderr, also under ``--quiet`` (which silences progress only).
``preflight.csv`` holds one row per check (and per eps for the gradient-free check), with the columns
:data:`PREFLIGHT_COLUMNS`: ``dataset``, ``model``, ``checkpoint``, ``seed``, ``n`` (samples evaluated), ``check``,
``eps`` (empty for the checks of the model before the attacks), ``n_checked`` (samples the check looked at),
``value``, ``flagged`` (1 when the check warned), ``warning`` (its text, else empty) and ``robustkit_version``.
The checks and their values (:mod:`robustkit.attacks.preflight` defines them):

- ``randomised_outputs``: the largest change between two identical forward passes, relative to the logit scale;
- ``output_kind``: ``logits``, ``probabilities`` (flagged) or ``log-probabilities`` (harmless, not flagged);
- ``zero_gradient``: the share of the checked samples whose cross-entropy or margin input gradient is zero or
  non-finite (flagged above 10%); attack.csv's per-sample ``zero_gradient`` covers every sample;
- ``train_mode``: how many modules of the model are in training mode;
- ``gradient_free_gap``, one row per eps at which a gradient-free attack ran next to gradient attacks: how many
  samples a gradient-free attack broke that no gradient attack broke (flagged when any).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from robustkit.attacks.preflight import GradientFreeGap
    from robustkit.cli.options import ModelArgs
    from robustkit.evaluation import EvalData, PreflightRun

PREFLIGHT_COLUMNS = ("dataset", "model", "checkpoint", "seed", "n", "check", "eps", "n_checked", "value", "flagged",
                     "warning", "robustkit_version")


def gap_warning(eps: float, gap: GradientFreeGap) -> str | None:
    """The warning of the gradient-free check at ``eps``, or None."""
    return None if gap.warning is None else f"at eps {eps:g}, {gap.warning}"


def echo_warnings(lines: Iterable[str]) -> None:
    """Print each warning as one line ``Warning: ...`` on stderr."""
    for line in lines:
        click.echo(f"Warning: {line}", err=True)


def write_preflight(out: Path, run: PreflightRun, gaps: Mapping[float, GradientFreeGap], data: EvalData,
                    model_args: ModelArgs, seed: int) -> Path:
    """``preflight.csv`` (see the module docstring); returns its path."""
    from robustkit import __version__
    from robustkit.io import write_csv

    report = run.report
    values: dict[str, Any] = {
        "randomised_outputs": format(report.output_change, ".6g"), "output_kind": report.output_kind,
        "zero_gradient": format(report.zero_gradient_fraction, ".6g"), "train_mode": len(report.training_modules),
    }
    common = [data.dataset.name, model_args.spec, "" if model_args.checkpoint is None else str(model_args.checkpoint),
              seed, data.n]
    rows = [[*common, check, "", report.n_checked, value, check in report.flagged, report.warning(check) or "",
             __version__] for check, value in values.items()]
    for eps, gap in gaps.items():
        rows.append([*common, "gradient_free_gap", eps, data.n, gap.count, gap.count > 0, gap_warning(eps, gap) or "",
                     __version__])
    return write_csv(out / "preflight.csv", PREFLIGHT_COLUMNS, rows)
