"""robustkit.allocator: ROBUSTKIT_ALLOCATOR=kept lets freed large tensors serve the next ones, the default and the
user's own malloc settings leave glibc alone, and a bad value is a clear error."""

import json
import os
import platform
import subprocess
import sys

import pytest

from robustkit.errors import InputError

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
OLD_GLIBC = GLIBC and tuple(int(part) for part in platform.libc_ver()[1].split(".")[:2]) < (2, 33)
USER = ("ROBUSTKIT_ALLOCATOR", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

# a 128 MiB tensor allocated, written and freed: glibc's own counts (mallinfo2) of the bytes it holds in mmap
# chunks while the tensor lives and of the free bytes it keeps in the heap after it is freed
FAULTS = """
import ctypes, json, torch
from robustkit.allocator import configure
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
state = configure()
x = torch.empty(32 * 2**20); x.fill_(1.0)
mapped = libc.mallinfo2().hblkhd
del x
print(json.dumps({"state": state, "mapped": mapped, "kept": libc.mallinfo2().fordblks}))
"""
SIZE = 128 * 2**20


def _run(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER}
    done = subprocess.run([sys.executable, "-c", FAULTS], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC or OLD_GLIBC, reason="glibc's settings (mallinfo2 needs glibc 2.33)")
def test_kept_memory_stays_in_the_heap_for_the_next_tensor():
    system, kept = _run(), _run(ROBUSTKIT_ALLOCATOR="kept")
    assert (system["state"], kept["state"]) == ("system", "kept")
    # glibc's default: the tensor is an mmap chunk, unmapped (and its pages given back) when freed
    assert system["mapped"] >= SIZE and system["kept"] < SIZE
    # kept: it comes from the heap, and its bytes stay there, free for the next allocation
    assert kept["mapped"] < SIZE and kept["kept"] >= SIZE


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize("variable", USER[1:])
def test_the_users_malloc_settings_win_over_kept(variable):
    value = "glibc.malloc.arena_max=2" if variable == "GLIBC_TUNABLES" else "65536"
    found = _run(ROBUSTKIT_ALLOCATOR="kept", **{variable: value})
    assert found["state"] == f"system ({variable} set)"


def test_the_setting_is_applied_once_and_checked(monkeypatch):
    from robustkit import allocator

    monkeypatch.setattr(allocator, "_APPLIED", None)
    assert allocator.current() == "system"
    monkeypatch.setenv("ROBUSTKIT_ALLOCATOR", "fast")
    with pytest.raises(InputError, match="ROBUSTKIT_ALLOCATOR must be system or kept, got 'fast'"):
        allocator.configure()
    monkeypatch.setenv("ROBUSTKIT_ALLOCATOR", " System ")
    assert allocator.configure() == "system" == allocator.current()
    monkeypatch.setenv("ROBUSTKIT_ALLOCATOR", "kept")
    assert allocator.configure() == "system"  # applied once per process: the first call's choice stays


def test_a_bad_value_stops_the_command_line_with_one_line():
    env = {**{k: v for k, v in os.environ.items() if k not in USER}, "ROBUSTKIT_ALLOCATOR": "fast"}
    done = subprocess.run([sys.executable, "-m", "robustkit", "verify", "--help"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "Error: ROBUSTKIT_ALLOCATOR must be system or kept, got 'fast'"
