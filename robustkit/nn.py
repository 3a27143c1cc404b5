"""The layer types of robustkit's own: :class:`Normalize`, :class:`Residual` and :class:`Opaque`.

Every other layer of a robustkit model is a standard ``torch.nn`` layer. These exist because the bound
engine must recognise them: normalisation is an affine map the verifiers propagate exactly, a skip
connection is the sum of two branches that the verifiers bound jointly, and an opaque model is one that runs
(for the gradient attacks) but that the engine must refuse with the importer's reason.
"""


import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustkit.errors import InputError


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std`` for NCHW inputs in [0, 1].

    ``mean`` and ``std`` have one value per channel (or a single value for all channels). They are buffers,
    not parameters: training never changes them and they are saved in the state_dict.

    >>> layer = Normalize([0.5], [0.25])
    >>> layer(torch.ones(1, 1, 2, 2)).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_list = [float(v) for v in mean]
        std_list = [float(v) for v in std]
        if not mean_list or len(mean_list) != len(std_list):
            raise InputError(
                f"Normalize needs one mean and one std per channel, got {len(mean_list)} mean(s) "
                f"and {len(std_list)} std(s)"
            )
        if not all(math.isfinite(v) for v in mean_list + std_list):
            raise InputError("Normalize mean and std must be finite numbers")
        if any(v <= 0 for v in std_list):
            raise InputError(f"Normalize std must be positive, got {std_list}")
        self.register_buffer("mean", torch.tensor(mean_list, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_list, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        """Number of channels this layer normalises (1 means: the same values for every channel)."""
        return int(self.mean.numel())

    def forward(self, x: Tensor) -> Tensor:
        # written so that torch.jit.script and torch.jit.trace accept it
        if x.dim() != 4:
            raise InputError("Normalize expects NCHW input, got a tensor with " + str(x.dim()) + " dimensions")
        channels = self.mean.shape[1]
        if channels != 1 and x.shape[1] != channels:
            raise InputError(
                "Normalize has " + str(channels) + " channel(s) but the input has " + str(x.shape[1])
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 6) for v in self.mean.flatten().tolist()]
        std = [round(v, 6) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


class Residual(nn.Module):
    """A skip connection: ``main(x) + skip(x)``, where a missing ``skip`` is the identity.

    >>> block = Residual(nn.Identity(), None)
    >>> block(torch.ones(2)).tolist()
    [2.0, 2.0]
    """

    def __init__(self, main: nn.Module, skip: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        out: Tensor = self.main(x) + shortcut
        return out


class Opaque(nn.Module):
    """A model that runs but that the bound engine cannot read, with the reason why.

    The importers wrap a file whose operators they cannot lower to the engine's layers (for example a TorchScript
    file using ``aten::gelu``) in this module: the forward pass is the file's own, so the gradient attacks work,
    and the verifiers and the interval attack refuse it with ``reason``, which names what is missing.

    >>> model = Opaque(nn.Identity(), "unsupported operators in net.pt: aten::gelu")
    >>> model(torch.ones(1, 2)).tolist()
    [[1.0, 1.0]]
    """

    def __init__(self, inner: nn.Module, reason: str) -> None:
        super().__init__()
        self.inner = inner
        self.reason = reason

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        return out

    def extra_repr(self) -> str:
        return f"reason={self.reason!r}"
