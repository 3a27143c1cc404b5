"""Atomic writes: complete files or the old file, never a torn one, and no temporary files left behind."""

from __future__ import annotations

import csv
import os
import stat

import pytest
import torch

from robustkit.io import atomic_open, atomic_write_bytes, atomic_write_text, torch_save_atomic, write_csv


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_bytes_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    assert atomic_write_bytes(target, b"\x00first") == target
    assert target.read_bytes() == b"\x00first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert entries(target.parent) == ["data.bin"]


def test_write_text_keeps_newlines_and_unicode(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "eps ε = 0.1\nline two\n")
    assert target.read_bytes() == "eps ε = 0.1\nline two\n".encode()


def test_write_csv_round_trips(tmp_path):
    target = tmp_path / "results.csv"
    rows_in = [["interval", 0.1, True, None], ["crown", 0.3, False, "a,b"]]
    write_csv(target, ["method", "eps", "verified", "note"], rows_in)
    with target.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["method", "eps", "verified", "note"], ["interval", "0.1", "1", ""], ["crown", "0.3", "0", "a,b"]]
    assert target.read_text().count("\n") == 3 and "\r" not in target.read_text()


def test_csv_row_of_wrong_length_leaves_old_file(tmp_path):
    target = tmp_path / "results.csv"
    write_csv(target, ["a", "b"], [[1, 2]])
    before = target.read_bytes()
    with pytest.raises(ValueError, match="row 2 has 1 cells"):
        write_csv(target, ["a", "b"], [[3, 4], [5]])
    assert target.read_bytes() == before
    assert entries(tmp_path) == ["results.csv"]


def test_exception_mid_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "summary.csv"
    atomic_write_text(target, "old complete content\n")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(target) as handle:
        handle.write(b"new partial cont")
        handle.flush()
        temporaries = [name for name in entries(tmp_path) if name != "summary.csv"]
        assert len(temporaries) == 1 and temporaries[0].startswith(".summary.csv.")  # written beside the target
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old complete content\n"
    assert entries(tmp_path) == ["summary.csv"]


def test_failing_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "verify.csv"
    atomic_write_text(target, "old\n")

    def broken_replace(source, destination):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert entries(tmp_path) == ["verify.csv"]


def test_data_is_fsynced_before_the_replace(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISREG(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", os.path.getsize(source)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "x.bin", b"12345")
    assert events[:2] == [("fsync", True), ("replace", 5)]


def test_permissions_follow_umask_and_existing_mode(tmp_path):
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    private = tmp_path / "private.txt"
    private.write_text("secret")
    private.chmod(0o600)
    atomic_write_text(private, "still secret")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_torch_save_atomic_round_trip_and_failed_save(tmp_path):
    target = tmp_path / "checkpoint.pt"
    state = {"weight": torch.arange(6.0).reshape(2, 3), "epoch": torch.tensor(3)}
    torch_save_atomic(state, target)
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["weight"], state["weight"]) and int(loaded["epoch"]) == 3
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        torch_save_atomic({"weight": torch.ones(1000), "hook": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["weight"], state["weight"])
    assert entries(tmp_path) == ["checkpoint.pt"]
