"""Image grids: clean test images beside their adversarial versions, each titled with the predicted class.

Rendering uses matplotlib's Agg canvas on a :class:`~matplotlib.figure.Figure` created directly (not through
``pyplot``), so it needs no display, leaves pyplot's global state alone and works in any backend setting.

>>> import tempfile, pathlib, torch
>>> clean = torch.rand(2, 1, 8, 8)
>>> columns = [ExampleColumn("pgd eps 0.1", (clean + 0.05).clamp(0, 1), (3, 1))]
>>> path = save_examples_grid(pathlib.Path(tempfile.mkdtemp()) / "g.png", clean, (1, 2), (1, 2), columns)
>>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from robustkit.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = ["ExampleColumn", "examples_figure", "save_examples_grid"]

CORRECT_COLOUR = "#1a7f37"
WRONG_COLOUR = "#cf222e"
MAX_NAME = 12
HEADER_INCHES = 0.9  # room above the first row for three-line column titles over the two-line cell titles


@dataclass(frozen=True, eq=False)
class ExampleColumn:
    """One column of the grid: ``images`` (rows, C, H, W) in [0, 1] and the model's prediction for each."""

    title: str
    images: Tensor
    predictions: Sequence[int]


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is None or not 0 <= label < len(class_names):
        return str(label)
    name = class_names[label]
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def _show(axes: Axes, image: Tensor) -> None:
    pixels = image.detach().cpu().float().clamp(0, 1)
    if pixels.shape[0] == 3:
        axes.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    else:  # one channel (or an unusual channel count: show the first)
        axes.imshow(pixels[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])


def examples_figure(
    clean: Tensor,
    labels: Sequence[int],
    clean_predictions: Sequence[int],
    columns: Sequence[ExampleColumn],
    class_names: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
) -> Figure:
    """A grid with one row per image: the clean image, then one column per entry of ``columns``.

    Every cell is titled with the predicted class, green where it is the true label and red where the model is
    fooled; the clean column also names the true label. ``row_titles`` (e.g. the test indices) label the rows.
    """
    from matplotlib.figure import Figure

    rows = int(clean.shape[0])
    if rows == 0:
        raise InputError("an examples grid needs at least one image")
    if len(labels) != rows or len(clean_predictions) != rows or (row_titles is not None and len(row_titles) != rows):
        raise InputError(f"labels, predictions and row titles must have one entry per image ({rows})")
    for column in columns:
        if tuple(column.images.shape) != tuple(clean.shape) or len(column.predictions) != rows:
            raise InputError(
                f"column {column.title!r} holds {tuple(column.images.shape)} images and {len(column.predictions)} "
                f"predictions; the clean images are {tuple(clean.shape)}"
            )
    count = 1 + len(columns)
    height = 1.6 * rows + HEADER_INCHES
    figure = Figure(figsize=(1.45 * count, height), dpi=100)
    grid = figure.subplots(rows, count, squeeze=False)
    titles = ["clean", *(column.title for column in columns)]
    for row in range(rows):
        label = int(labels[row])
        cells = [(clean[row], int(clean_predictions[row]))]
        cells += [(column.images[row], int(column.predictions[row])) for column in columns]
        for col, (image, prediction) in enumerate(cells):
            axes = grid[row][col]
            _show(axes, image)
            text = f"pred {_name(prediction, class_names)}"
            if col == 0:
                text = f"label {_name(label, class_names)}\n{text}"
            axes.set_title(text, fontsize=8, color=CORRECT_COLOUR if prediction == label else WRONG_COLOUR)
            if row == 0:
                axes.annotate(titles[col], (0.5, 1.0), xytext=(0, 26), xycoords="axes fraction",
                              textcoords="offset points", ha="center", va="bottom", fontsize=8, weight="bold")
        if row_titles is not None:
            grid[row][0].set_ylabel(row_titles[row], fontsize=8)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.02, top=1 - HEADER_INCHES / height,
                           hspace=0.55, wspace=0.1)
    return figure


def save_examples_grid(
    path: str | os.PathLike[str],
    clean: Tensor,
    labels: Sequence[int],
    clean_predictions: Sequence[int],
    columns: Sequence[ExampleColumn],
    class_names: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Render :func:`examples_figure` with the Agg canvas and write it as a PNG atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from robustkit.io import atomic_write_bytes

    figure = examples_figure(clean, labels, clean_predictions, columns, class_names, row_titles)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
