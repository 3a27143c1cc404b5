"""Device selection and seeding shared by every command."""

from __future__ import annotations

import gc
import re
import resource
from pathlib import Path
from types import TracebackType

import torch

from robustkit.errors import InputError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a usable :class:`torch.device`.

    ``auto`` picks the first CUDA device when one is available and the CPU otherwise. Asking for a device
    that this machine does not have is an :class:`~robustkit.errors.InputError`, not a silent fallback.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise InputError(f"invalid device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError(f"device {device!r} requested but only {count} CUDA device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but MPS is not available on this machine")
    return torch.device(name)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh :class:`torch.Generator` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block, above the level at its start.

    On Linux the kernel's high-water mark is reset at the start (``/proc/self/clear_refs``), so each block is
    measured on its own; elsewhere the process-wide ``ru_maxrss`` is used, which only shows new peaks.
    """

    def __init__(self) -> None:
        self.how = "ru_maxrss"
        self.baseline = 0
        self.peak_bytes = 0

    def _now_peak(self) -> int:
        if self.how == "VmHWM":
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how, self.baseline = "VmHWM", _status_kib("VmRSS") * 1024
        except OSError:
            self.how, self.baseline = "ru_maxrss", self._now_peak()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.peak_bytes = max(0, self._now_peak() - self.baseline)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
