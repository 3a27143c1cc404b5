"""``robustkit models``: list the model zoo."""

from __future__ import annotations

import click

from robustkit.cli import Command


@click.command("models", cls=Command)
def models() -> None:
    """List the zoo networks with input shape, classes and parameter counts (paper networks first)."""
    from robustkit.models import MODELS, build_model, count_parameters
    from robustkit.reports.tables import format_table

    specs = sorted(MODELS.values(), key=lambda s: not s.paper)
    rows = [
        [
            spec.name,
            "yes" if spec.paper else "",
            "x".join(map(str, spec.input_shape)),
            str(spec.num_classes),
            f"{count_parameters(build_model(spec.name)):,}",
            spec.description,
        ]
        for spec in specs
    ]
    click.echo(format_table(["model", "paper", "input", "classes", "parameters", "description"], rows))
