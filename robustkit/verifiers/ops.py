"""Bound operators: one class per supported layer type, all with the same small contract.

Every affine operator y = L(x) + b exposes

* ``forward(x)``: the layer itself;
* ``linear(x)``: the linear part L without the bias, applied to a batch of shaped tensors (generator rows of
  symbolic intervals, identity bases for Jacobians);
* ``abs_linear(r)``: |L| applied to a non-negative radius (interval arithmetic in centre/radius form);
* ``adjoint(lam, in_shape)``: L transposed, for backward (CROWN) bound propagation;
* ``bias(out_shape)``: b as a tensor of the output shape.

``ReLUOp`` and ``AddOp`` are the two non-affine operators; the bound engines handle them themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.nn import Normalize


class BoundOp:
    """Base of all bound operators."""

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape (without batch) for an input of shape ``in_shape``."""
        with torch.no_grad():
            probe = torch.zeros((1, *in_shape), device=self.device, dtype=self.dtype)
            return tuple(self.forward(probe).shape[1:])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class AffineOp(BoundOp):
    """An affine layer y = L(x) + b (see the module docstring for the contract)."""

    def linear(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def abs_linear(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        raise NotImplementedError

    def linear_rows(self, x: Tensor) -> Tensor:
        """``linear`` on a (B, m, *in_shape) tensor of generator rows, returning (B, m, *out_shape)."""
        b, m = x.shape[:2]
        out = self.linear(x.reshape(b * m, *x.shape[2:]))
        return out.reshape(b, m, *out.shape[1:])


class LinearOp(AffineOp):
    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Linear)
        self.module = module

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.module.weight, self.module.bias)

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.module.weight)

    def linear_rows(self, x: Tensor) -> Tensor:
        return F.linear(x, self.module.weight)

    def abs_linear(self, r: Tensor) -> Tensor:
        return F.linear(r, self.module.weight.abs())

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam @ self.module.weight

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return self.module.bias


class Conv2dOp(AffineOp):
    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)
        self.module = module
        self.stride = (int(module.stride[0]), int(module.stride[1]))
        self.padding = (int(module.padding[0]), int(module.padding[1]))
        self.dilation = (int(module.dilation[0]), int(module.dilation[1]))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.module.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.module.weight, self.module.bias)

    def linear(self, x: Tensor) -> Tensor:
        return self._conv(x, self.module.weight, None)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self._conv(r, self.module.weight.abs(), None)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        lead = lam.shape[:-3]
        flat = lam.reshape(-1, *lam.shape[-3:])
        stride, padding, dilation = self.stride, self.padding, self.dilation
        kernel = self.module.weight.shape[2:]
        # conv_transpose2d needs the output padding that restores the exact input size
        extra = [
            in_shape[1 + i] - ((flat.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        ]
        out = F.conv_transpose2d(
            flat, self.module.weight, None, stride, padding, (extra[0], extra[1]), self.module.groups, dilation
        )
        return out.reshape(*lead, *out.shape[1:])

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        if self.module.bias is None:
            return None
        return self.module.bias.view(-1, 1, 1).expand(out_shape)


class ChannelAffineOp(AffineOp):
    """y = x * scale[c] + shift[c] per channel of NCHW inputs (Normalize, BatchNorm2d in eval mode)."""

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _view(self, v: Tensor, ndim: int) -> Tensor:
        return v.view(-1, *([1] * (ndim - 1)))

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return x * self._view(scale, 3) + self._view(shift, 3)

    def linear(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale_shift()[0], 3)

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * self._view(self.scale_shift()[0].abs(), 3)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam * self._view(self.scale_shift()[0], 3)

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return self._view(self.scale_shift()[1], 3).expand(out_shape)

    def channel_scale(self, channels: int) -> Tensor:
        scale = self.scale_shift()[0]
        return scale.expand(channels) if scale.numel() == 1 else scale


class NormalizeOp(ChannelAffineOp):
    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, Normalize)
        self.module = module

    @property
    def device(self) -> torch.device:
        return self.module.mean.device

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        std = self.module.std.flatten()
        return 1.0 / std, -self.module.mean.flatten() / std


class BatchNorm2dOp(ChannelAffineOp):
    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, nn.BatchNorm2d)
        self.module = module

    @property
    def device(self) -> torch.device:
        assert self.module.running_var is not None
        return self.module.running_var.device

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        m = self.module
        assert m.running_mean is not None and m.running_var is not None
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        return scale, shift


class PoolOp(AffineOp):
    """Average pooling: a linear map with non-negative weights and no bias."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x)
        return out

    def linear(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def abs_linear(self, r: Tensor) -> Tensor:
        return self.forward(r)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        lead = lam.shape[:-3]
        flat = lam.reshape(-1, *lam.shape[-3:])
        probe = torch.zeros((flat.shape[0], *in_shape), device=lam.device, dtype=lam.dtype, requires_grad=True)
        with torch.enable_grad():
            out = self.forward(probe)
            (grad,) = torch.autograd.grad(out, probe, flat, create_graph=lam.requires_grad)
        return grad.reshape(*lead, *in_shape)

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return None


class FlattenOp(AffineOp):
    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def linear(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def linear_rows(self, x: Tensor) -> Tensor:
        return x.flatten(2)

    def abs_linear(self, r: Tensor) -> Tensor:
        return r.flatten(1)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam.reshape(*lam.shape[:-1], *in_shape)

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return None


class IdentityOp(AffineOp):
    def forward(self, x: Tensor) -> Tensor:
        return x

    def linear(self, x: Tensor) -> Tensor:
        return x

    def linear_rows(self, x: Tensor) -> Tensor:
        return x

    def abs_linear(self, r: Tensor) -> Tensor:
        return r

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return None


class ScalarAffineOp(AffineOp):
    """y = x * scale + shift with scalar constants (from traced code such as ``(x - 0.5) * 2``)."""

    def __init__(self, scale: float, shift: float) -> None:
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def linear(self, x: Tensor) -> Tensor:
        return x * self.scale

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * abs(self.scale)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam * self.scale

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        # a plain number, broadcast where it is used (so it follows the device and dtype of the bound)
        return torch.tensor(self.shift).expand(out_shape) if self.shift else None


class ReLUOp(BoundOp):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class AddOp(BoundOp):
    """The join of a skip connection: the sum of its two inputs."""


def check_module(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot be analysed, or None."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}; use explicit numbers"
    if isinstance(module, nn.Flatten) and (module.start_dim != 1 or module.end_dim != -1):
        return f"Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}); only start_dim=1 is supported"
    return None


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
