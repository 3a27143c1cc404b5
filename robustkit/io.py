"""Atomic file writing for every result robustkit writes (CSV tables, text reports, checkpoints).

A reader never sees a half-written file: the data goes to a temporary file in the destination's folder, is
flushed and fsync'ed, and then replaces the destination in one :func:`os.replace` (atomic on POSIX and
Windows when both names are on the same file system, which the shared folder guarantees). If anything fails
before the replace, the old file is left untouched and the temporary file is removed.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = write_csv(folder / "t.csv", ["method", "eps"], [["interval", 0.1]])
>>> (folder / "t.csv").read_text()
'method,eps\\ninterval,0.1\\n'
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text", "save_safetensors", "torch_save_atomic", "write_csv",
]


def _temporary_path(target: Path) -> tuple[Path, int]:
    """Create a new hidden temporary file next to ``target``; the OS applies the umask to its mode, so the
    final file gets the same permissions as one written with :func:`open` (unlike ``mkstemp``'s 0600)."""
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return candidate, fd
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened for fsync on some platforms (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing so that it appears only complete, on leaving the ``with`` block.

    Missing parent folders are created. An existing file keeps its permission bits. If the block raises, the
    destination is unchanged and the temporary file is deleted.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, fd = _temporary_path(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation: ``\\n`` stays ``\\n``); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_value(value: Any) -> Any:
    """``value`` ready for strict JSON: a NaN or infinite float becomes ``None`` (``null``), the rest stays."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cell(value: Any) -> Any:
    # csv writes None as an empty field already; booleans read back more usefully as 0/1 than True/False
    return int(value) if isinstance(value, bool) else value


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV table (a header line, then one line per row, ``\\n`` line endings) atomically.

    Every row must have as many cells as the header; a row that does not raises :class:`ValueError` and
    nothing is written. ``None`` becomes an empty cell, booleans 0/1, other values ``str(value)``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for number, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise ValueError(f"row {number} has {len(row)} cells but the header has {len(header)}: {list(row)!r}")
        writer.writerow([_cell(value) for value in row])
    return atomic_write_text(path, buffer.getvalue())


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (a state_dict on CPU) as a safetensors file, atomically, with text ``metadata``."""
    from safetensors.torch import save

    # safetensors refuses tensors that share memory (tied weights): every tensor gets its own copy
    data = save({name: value.detach().cpu().clone().contiguous() for name, value in tensors.items()},
                metadata=metadata)
    return atomic_write_bytes(path, data)


def torch_save_atomic(obj: object, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that never leaves a truncated checkpoint behind; returns the path."""
    import torch

    with atomic_open(path) as handle:
        torch.save(obj, handle)
    return Path(path)
