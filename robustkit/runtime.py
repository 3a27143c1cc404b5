"""Device selection and seeding shared by every command."""

from __future__ import annotations

import re

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
