"""The run-folder lock: exclusive while held (also against another process), released on exit, and a lock file
left by a killed process taken over with a note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustkit.errors import InputError
from robustkit.runlock import LOCK_FILE, run_lock

HOLD = """
import sys
from robustkit.runlock import run_lock
with run_lock(sys.argv[1], "robustkit bench --resume"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_lock_on_the_folder_fails_naming_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with run_lock(folder, "robustkit train"):
        owner = json.loads((folder / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["command"] == "robustkit train"
        taken = rf"in use by another robustkit run: process {os.getpid()} \(robustkit train, started \d{{4}}-"
        with pytest.raises(InputError, match=taken), run_lock(folder, "robustkit bench"):
            pytest.fail("locked twice")
    assert not (folder / LOCK_FILE).exists()
    with run_lock(folder, "robustkit bench") as locked:  # released: free again
        assert locked == folder


def test_the_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), run_lock(tmp_path, "robustkit bench"):
        raise KeyboardInterrupt
    assert not (tmp_path / LOCK_FILE).exists()


def test_another_process_holding_the_lock_is_named(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        taken = rf"process {holder.pid} \(robustkit bench --resume, started"
        with pytest.raises(InputError, match=taken), run_lock(tmp_path, "robustkit bench"):
            pytest.fail("locked while another process holds the lock")
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not (tmp_path / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()  # no clean-up runs: the file stays, but the operating system released the flock
    holder.wait(timeout=60)
    assert (tmp_path / LOCK_FILE).is_file()
    notes: list[str] = []
    with run_lock(tmp_path, "robustkit bench", notes.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"left by process {holder.pid} (robustkit bench --resume" in notes[0]
    assert "no longer runs" in notes[0]


def test_a_folder_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot create the output folder .*a-file/run"), \
            run_lock(blocker / "run", "robustkit train"):
        pytest.fail("locked a folder under a file")

