"""Progress bars for long loops: tqdm on stderr, off when stderr is not a terminal or under ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_enabled = True


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for this process (the CLI's ``--quiet`` turns them off)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether a progress bar would be shown now."""
    return _enabled and sys.stderr.isatty()


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when progress bars are enabled; keyword arguments go to tqdm."""
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    bar: Iterable[T] = tqdm(iterable, disable=not progress_enabled(), file=sys.stderr, **kwargs)
    return bar
