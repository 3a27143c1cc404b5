"""The affine bound operators: exact in every method through ``linear``, ``abs_linear``, ``adjoint``, ``bias``
(see :class:`~robustkit.verifiers.ops.base.AffineOp`)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.nn import Normalize
from robustkit.verifiers.ops.base import AffineOp


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


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

    @property
    def weight_matrix(self) -> Tensor:
        return self.module.weight

    def forward(self, *inputs: Tensor) -> Tensor:
        return F.linear(inputs[0], self.module.weight, self.module.bias)

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

    def forward(self, *inputs: Tensor) -> Tensor:
        return self._conv(inputs[0], self.module.weight, self.module.bias)

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

    def window(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
        kernel = self.module.weight.shape[2:]
        return (int(kernel[0]), int(kernel[1])), self.stride, self.padding, self.dilation

    def window_apply(self, canvas: Tensor) -> Tensor:
        return F.conv2d(canvas, self.module.weight, None, self.stride, 0, self.dilation, self.module.groups)


class ChannelAffineOp(AffineOp):
    """y = x * scale[c] + shift[c] per channel of NCHW inputs (Normalize, BatchNorm2d in eval mode)."""

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _view(self, v: Tensor, ndim: int) -> Tensor:
        return v.view(-1, *([1] * (ndim - 1)))

    def forward(self, *inputs: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return inputs[0] * self._view(scale, 3) + self._view(shift, 3)

    def linear(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale_shift()[0], 3)

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * self._view(self.scale_shift()[0].abs(), 3)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam * self._view(self.scale_shift()[0], 3)

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        return self._view(self.scale_shift()[1], 3).expand(out_shape)

    def channel_factor(self, channels: int) -> Tensor:
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

    def forward(self, *inputs: Tensor) -> Tensor:
        out: Tensor = self.module(inputs[0])
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

    def window(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        pool = self.module
        if not isinstance(pool, nn.AvgPool2d):
            return None
        padding = _pair(pool.padding)
        if pool.ceil_mode or pool.divisor_override is not None or (padding != (0, 0) and not pool.count_include_pad):
            return None
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return _pair(pool.kernel_size), _pair(stride), padding, (1, 1)

    def window_apply(self, canvas: Tensor) -> Tensor:
        window = self.window()
        assert window is not None
        kernel, stride = window[0], window[1]
        return F.avg_pool2d(canvas, kernel, stride, 0, ceil_mode=False, count_include_pad=True)


class FlattenOp(AffineOp):
    reshape: ClassVar[str | None] = "flatten"

    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[0].flatten(1)

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
    reshape: ClassVar[str | None] = "identity"

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[0]

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

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[0] * self.scale + self.shift

    def linear(self, x: Tensor) -> Tensor:
        return x * self.scale

    def abs_linear(self, r: Tensor) -> Tensor:
        return r * abs(self.scale)

    def adjoint(self, lam: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return lam * self.scale

    def bias(self, out_shape: tuple[int, ...]) -> Tensor | None:
        # a plain number, broadcast where it is used (so it follows the device and dtype of the bound)
        return torch.tensor(self.shift).expand(out_shape) if self.shift else None
