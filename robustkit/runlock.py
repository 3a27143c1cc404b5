"""One writer per run folder: an exclusive lock that ``robustkit bench`` and ``robustkit train`` hold on ``--out``.

The lock is the file ``robustkit.lock`` in the folder, holding the owner's process id, command and start time,
and locked with ``flock`` while the owner runs; the operating system releases that lock when the process ends,
however it ends. On a normal exit the owner also deletes the file. A second run on the same folder fails at once
with an :class:`~robustkit.errors.InputError` naming the running one. A file left behind by a process that was
killed is not locked by anyone: the next run takes it over and says so in a note.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
>>> with run_lock(folder, "robustkit bench"):
...     (folder / LOCK_FILE).is_file()
True
>>> (folder / LOCK_FILE).exists()
False
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from robustkit.errors import InputError

__all__ = ["LOCK_FILE", "run_lock"]

LOCK_FILE = "robustkit.lock"
_ATTEMPTS = 5  # a lock file deleted by its owner between our open and our flock is opened again


def _describe(text: str) -> str:
    """Who holds (or held) a lock, from the file's content."""
    try:
        owner = json.loads(text)
        return f"process {int(owner['pid'])} ({owner['command']}, started {owner['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (its lock file is unreadable)"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", errors="replace").strip()


def _open_locked(path: Path) -> tuple[int, str]:
    """Open and ``flock`` the lock file; returns the descriptor and what the file held before (empty if new)."""
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot write in the output folder {str(path.parent)!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise InputError(
                f"the folder {str(path.parent)!r} is in use by another robustkit run: {holder}. Wait for it to "
                "finish, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read(fd)
        os.close(fd)  # the owner finished and deleted the file we opened: lock the new one
    raise InputError(f"could not lock {path}: other robustkit runs keep replacing it")


@contextmanager
def run_lock(folder: str | os.PathLike[str], command: str,
             on_note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock on ``folder`` (created if needed) for the ``with`` block; yields the folder.

    ``command`` describes this run to a second one that finds the folder taken. ``on_note`` receives the note
    about a stale lock taken over (the file of a process that no longer runs).
    """
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {str(target)!r}: {exc.strerror or exc}") from None
    path = target / LOCK_FILE
    fd, previous = _open_locked(path)
    try:
        if previous and on_note is not None:
            on_note(f"took over the lock of {target} left by {_describe(previous)}, which no longer runs")
        owner = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(owner) + "\n").encode())
        os.fsync(fd)
        yield target
    finally:
        with suppress(FileNotFoundError):
            path.unlink()  # before the unlock, so a waiting run never locks a file about to vanish
        os.close(fd)
