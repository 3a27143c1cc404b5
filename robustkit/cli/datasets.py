"""``robustkit datasets``: list the registered datasets."""

from __future__ import annotations

import click

from robustkit.cli import Command


@click.command("datasets", cls=Command)
def datasets() -> None:
    """List the registered datasets with input shape, classes and split sizes."""
    from robustkit.data import DATASETS
    from robustkit.reports.tables import format_table

    rows = []
    for name, loader in DATASETS.items():
        info = loader.info
        rows.append([
            name,
            "x".join(map(str, info.input_shape)),
            str(info.num_classes),
            f"{info.train_size:,}",
            f"{info.test_size:,}",
            "--data-dir" if info.needs_data_dir else "embedded",
            info.description,
        ])
    click.echo(format_table(["dataset", "input", "classes", "train", "test", "source", "description"], rows))
