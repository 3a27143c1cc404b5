"""Optionally keep freed memory in the process for the next tensor of its size (glibc's malloc settings).

The bound engine's hot loops allocate and free tensors of tens to hundreds of MB many times per call
(symbolic intervals hold one row per input pixel for every neuron; their gradients as many again). glibc
serves every request above 32 MB with a fresh ``mmap`` and gives it back to the kernel on ``free``, so each
such tensor starts with one page fault per 4 KiB page, which the kernel fills with zeros first: on a
2-vCPU AMD EPYC VM a (50, 784, 800) float32 product took 75 ms, of which the multiplication is 13 ms (the
time it takes with the memory kept). ``ROBUSTKIT_ALLOCATOR=kept`` turns that off for the process
(:func:`configure`): no ``mmap`` for large requests (``M_MMAP_MAX`` 0; glibc still falls back to ``mmap``
when the heap cannot grow) and up to 2 GiB of free memory at the top of the heap kept (``M_TRIM_THRESHOLD``),
so a freed tensor's pages serve the next one.

It is opt-in because of what it costs in memory. ``benchmarks/allocator.py`` measured on that VM (mnist_small,
eps 0.1, 2 threads): symbolic verifiable training 1.38x faster for one epoch of 500 samples at 1.10x the peak
resident memory, but 1.6x faster at 2.0x the peak (4.4 against 2.2 GB) over three epochs of 1,500 samples
with monitoring: torch's 64-byte-aligned requests do not fit exactly into the freed chunks of the same size,
so the heap fragments and resident memory grows with the run. The default (unset, or ``system``) keeps
glibc's behaviour. The command line applies the variable once per process (its worker processes too);
Python callers call :func:`configure` themselves. Any ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` or
``GLIBC_TUNABLES`` in the environment (the user's own malloc settings) wins over ``kept``, and other C
libraries (macOS, musl, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

from robustkit.errors import InputError

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
KEPT_BYTES = 2**31 - 1  # mallopt takes an int: the largest free top of the heap kept is just under 2 GiB
USER_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_APPLIED: str | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def configure() -> str:
    """Apply ``ROBUSTKIT_ALLOCATOR`` (``system``, the default, or ``kept``) to this process, once; return what
    the process's allocator does: ``system``, ``kept``, or ``system (...)`` with the reason ``kept`` was not
    applied (``kept (...)`` if glibc took only half of it). Another value is an
    :class:`~robustkit.errors.InputError`."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    wanted = os.environ.get("ROBUSTKIT_ALLOCATOR", "").strip().lower() or "system"
    if wanted not in ("system", "kept"):
        raise InputError(f"ROBUSTKIT_ALLOCATOR must be system or kept, got {os.environ['ROBUSTKIT_ALLOCATOR']!r}")
    if wanted == "system":
        _APPLIED = "system"
    elif any(name in os.environ for name in USER_VARIABLES):
        _APPLIED = "system (" + ", ".join(name for name in USER_VARIABLES if name in os.environ) + " set)"
    elif (libc := _glibc()) is None:
        _APPLIED = "system (not glibc)"
    else:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        no_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
        kept = no_mmap and libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES) == 1
        _APPLIED = "kept" if kept else ("kept (large requests in the heap; glibc refused the trim threshold)"
                                        if no_mmap else "system (glibc refused M_MMAP_MAX)")
    return _APPLIED


def current() -> str:
    """What :func:`configure` did in this process; ``system`` when it was not called."""
    return _APPLIED or "system"
