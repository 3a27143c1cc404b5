"""Exceptions that robustkit raises for bad input.

Every error a user can cause (an unknown name, a missing file, an unsafe checkpoint, an unsupported layer)
is a :class:`RobustkitError`; the command-line interface prints such errors as one line and exits with code 2.
Anything else that escapes is a bug in robustkit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class RobustkitError(Exception):
    """Base class of all errors caused by the user's input, data or files."""


class InputError(RobustkitError, ValueError):
    """A value is out of range, has the wrong shape, or contains NaN."""


class NonFiniteError(InputError):
    """A model's outputs, a training loss or trained weights hold NaN or infinite values."""


class UnknownNameError(RobustkitError, LookupError):
    """A name is not in a registry; the message lists close matches and the valid choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]) -> None:
        import difflib

        self.kind = kind
        self.name = name
        self.choices = sorted(choices)
        close = difflib.get_close_matches(name, self.choices, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        valid = ", ".join(self.choices) if self.choices else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid choices: {valid}.")


class DataError(RobustkitError):
    """A dataset folder or file is missing, unreadable or corrupt."""


class ModelLoadError(RobustkitError):
    """A model specification or checkpoint cannot be turned into a model."""


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint holds Python objects that could run code when unpickled; it was refused, not loaded."""


class UnsupportedLayerError(RobustkitError, TypeError):
    """A model contains layers that the bound engine cannot analyse; ``layers`` lists every one of them."""

    def __init__(self, layers: Sequence[str], supported: Iterable[str] = ()) -> None:
        self.layers = list(layers)
        supported_list = sorted(supported)
        tail = f" Supported layers: {', '.join(supported_list)}." if supported_list else ""
        super().__init__(
            f"the model has {len(self.layers)} unsupported layer(s): {'; '.join(self.layers)}.{tail}"
        )


class UnreadableModelError(UnsupportedLayerError):
    """An imported model whose operators the engine cannot read; the message is the importer's own (it names
    every unsupported operator of the file at once)."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.layers = list(reasons)
        Exception.__init__(self, "; ".join(self.layers))
