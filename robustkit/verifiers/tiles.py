"""Tiled input rows: the input block of symbolic intervals while it still has local support.

Through convolutions, the generator row of one input pixel is non-zero only in a small window (its receptive
field's image). Stored densely, the input block of ``mnist_small`` after the first convolution is
784 rows x 3,136 neurons per sample, almost all zeros, and the second convolution is applied to all of it.
Here the input pixels are grouped into square tiles; each tile's rows are kept only on the rectangle of the
current layer they can reach, and convolutions (and average pooling) are applied to that rectangle alone, with
the exact zero padding the full layer would use. A Flatten followed by a Linear layer multiplies each tile by
the matching slice of the weight matrix. The numbers are those of the dense computation; only the zeros are
skipped. Anything else turns the tiles back into dense rows (:func:`densify`).

Rows are kept unscaled: the generator of input coordinate i is ``scale[:, i] * row_i``, so the per-sample
input radius is applied only where rows are summed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from robustkit.verifiers.ops.base import AffineOp


@dataclass
class Tile:
    """Rows of the input coordinates ``index`` (m,) on the rectangle at (top, left) of the spatial grid:
    (m, C, h, w) while shared by the batch, (B, m, C, h, w) afterwards."""

    rows: Tensor
    top: int
    left: int
    index: Tensor
    key: int


@dataclass
class TiledRows:
    """The input block as tiles over a (C, H, W) grid; ``flat`` once a Flatten has been passed; ``identity``
    while the rows are still the unit rows of :func:`make_tiles` (only a Flatten passed)."""

    tiles: list[Tile]
    scale: Tensor
    shared: bool
    grid: tuple[int, int, int]
    flat: bool = False
    identity: bool = False

    @property
    def inputs(self) -> int:
        return int(self.scale.shape[1])


def make_tiles(scale: Tensor, shape: tuple[int, ...], per_side: int, always: bool = False) -> TiledRows | None:
    """Identity rows of a (C, H, W) grid scaled by ``scale`` (B, C*H*W), in about ``per_side`` x ``per_side``
    square tiles; None when the grid is not an image worth tiling (unless ``always``)."""
    if per_side <= 0 or len(shape) != 3:
        return None
    size = max(1, math.ceil(max(shape[1], shape[2]) / per_side))
    if not always and shape[1] * shape[2] < 4 * size * size:
        return None
    channels, height, width = shape
    tiles = _identity_tiles(channels, height, width, size, scale.device, scale.dtype)
    return TiledRows(list(tiles), scale, shared=True, grid=(channels, height, width), identity=True)


@functools.lru_cache(maxsize=32)
def _identity_tiles(channels: int, height: int, width: int, size: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[Tile, ...]:
    """The unscaled identity tiles of a grid: they depend only on its shape, so they are built once (every
    operation on tiles makes new tensors; these are never written to)."""
    tiles: list[Tile] = []
    for top in range(0, height, size):
        for left in range(0, width, size):
            h, w = min(size, height - top), min(size, width - left)
            c, y, x = torch.meshgrid(
                torch.arange(channels), torch.arange(top, top + h), torch.arange(left, left + w), indexing="ij"
            )
            index = (c * height * width + y * width + x).reshape(-1).to(device)
            m = index.numel()
            rows = torch.eye(m, device=device, dtype=dtype).view(m, channels, h, w)
            tiles.append(Tile(rows, top, left, index, key=len(tiles)))
    return tuple(tiles)


def spread(tiled: TiledRows) -> float:
    """Mean share of the grid that a tile covers: near 1, tiles cost as much as dense rows and add overhead."""
    area = sum(t.rows.shape[-1] * t.rows.shape[-2] for t in tiled.tiles) / max(len(tiled.tiles), 1)
    return area / (tiled.grid[1] * tiled.grid[2])


def passes_tiles(op: AffineOp) -> bool:
    """Whether tiles go through ``op`` without becoming dense (convolutions, average pooling)."""
    return op.window() is not None


def _out_range(
    start: int, length: int, kernel: int, stride: int, padding: int, dilation: int, size: int
) -> tuple[int, int]:
    """Output positions [first, last] whose window reads any of the input positions [start, start + length)."""
    extent = dilation * (kernel - 1) + 1
    first = max(0, math.ceil((start + padding - extent + 1) / stride))
    last = min(size - 1, (start + length - 1 + padding) // stride)
    return first, last


def _region_apply(
    op: AffineOp, rows: Tensor, tile: Tile, out_hw: tuple[int, int]
) -> tuple[Tensor, int, int] | None:
    """Apply a convolution-like layer to rows living on a rectangle; returns the rows on the output rectangle."""
    window = op.window()
    assert window is not None
    kernel, stride, padding, dilation = window
    h, w = rows.shape[-2:]
    first_y, last_y = _out_range(tile.top, h, kernel[0], stride[0], padding[0], dilation[0], out_hw[0])
    first_x, last_x = _out_range(tile.left, w, kernel[1], stride[1], padding[1], dilation[1], out_hw[1])
    if first_y > last_y or first_x > last_x:
        return None
    # the input rectangle these outputs read, in input coordinates (may reach into the zero padding)
    start_y, start_x = first_y * stride[0] - padding[0], first_x * stride[1] - padding[1]
    stop_y = last_y * stride[0] - padding[0] + dilation[0] * (kernel[0] - 1) + 1
    stop_x = last_x * stride[1] - padding[1] + dilation[1] * (kernel[1] - 1) + 1
    canvas = F.pad(rows, (tile.left - start_x, stop_x - (tile.left + w), tile.top - start_y, stop_y - (tile.top + h)))
    return op.window_apply(canvas), first_y, first_x


def tiled_affine(op: AffineOp, tiled: TiledRows, out_shape: tuple[int, ...]) -> TiledRows | None:
    """The tiles after an affine layer, or None when the layer needs dense rows (the caller densifies)."""
    if op.reshape == "identity":
        return tiled
    if op.reshape == "flatten":
        return replace(tiled, flat=True)
    if tiled.flat:
        return None
    channel_factor = op.channel_factor(tiled.grid[0])
    if channel_factor is not None:
        factor = channel_factor.view(-1, 1, 1)
        return replace(tiled, tiles=[replace(t, rows=t.rows * factor) for t in tiled.tiles], identity=False)
    if op.window() is None or len(out_shape) != 3:
        return None
    tiles = []
    for tile in tiled.tiles:
        lead = tile.rows.shape[:-3]
        flat = tile.rows.reshape(-1, *tile.rows.shape[-3:])
        found = _region_apply(op, flat, tile, (out_shape[1], out_shape[2]))
        if found is not None:
            out, top, left = found
            tiles.append(Tile(out.reshape(*lead, *out.shape[1:]), top, left, tile.index, tile.key))
    return TiledRows(tiles, tiled.scale, tiled.shared, (out_shape[0], out_shape[1], out_shape[2]))


def tiled_linear(matrix: Tensor, tiled: TiledRows) -> Tensor:
    """Flatten + Linear (weight ``matrix``, out x in) on tiles: each tile times its slice of the weight; rows
    in input order, unscaled: (n_in, out) while shared, (B, n_in, out) afterwards."""
    if tiled.identity and tiled.shared:
        # unit rows times the weight are its columns: the same numbers without a product per tile
        return matrix.t().contiguous()
    channels, height, width = tiled.grid
    weight = matrix.view(-1, channels, height, width)
    lead = () if tiled.shared else (int(tiled.scale.shape[0]),)
    products = []
    for tile in tiled.tiles:
        h, w = tile.rows.shape[-2:]
        piece = weight[:, :, tile.top : tile.top + h, tile.left : tile.left + w].reshape(weight.shape[0], -1)
        products.append(tile.rows.flatten(-3) @ piece.t())
    out = torch.zeros(*lead, tiled.inputs, weight.shape[0], device=weight.device, dtype=weight.dtype)
    return _place(out, len(lead), tiled.tiles, products)


def _place(out: Tensor, dim: int, tiles: list[Tile], pieces: list[Tensor]) -> Tensor:
    """The fresh zeros ``out`` with the rows of every tile's piece written in place at the tile's input coordinates
    along ``dim``, in one copy: placing tile by tile copied the whole block once per tile (a copy per tile in the
    backward pass too), which was a quarter of a symbolic training step of ``mnist_small``."""
    if not tiles:
        return out
    index = torch.cat([tile.index for tile in tiles])
    return out.index_copy_(dim, index, torch.cat(pieces, dim))


def densify(tiled: TiledRows) -> Tensor:
    """All rows on the full grid, in input order, unscaled: (n_in, C, H, W) or (B, n_in, C, H, W)."""
    lead = () if tiled.shared else (int(tiled.scale.shape[0]),)
    full = torch.zeros(*lead, tiled.inputs, *tiled.grid, device=tiled.scale.device, dtype=tiled.scale.dtype)
    placed = []
    for tile in tiled.tiles:
        h, w = tile.rows.shape[-2:]
        placed.append(F.pad(tile.rows, (tile.left, tiled.grid[2] - tile.left - w, tile.top,
                                        tiled.grid[1] - tile.top - h)))
    return _place(full, len(lead), tiled.tiles, placed)


def tiled_radius(tiled: TiledRows) -> Tensor:
    """Sum over the rows of |scale * row| per neuron: (B, C, H, W)."""
    batch = int(tiled.scale.shape[0])
    total = torch.zeros(batch, *tiled.grid, device=tiled.scale.device, dtype=tiled.scale.dtype)
    for tile in tiled.tiles:
        h, w = tile.rows.shape[-2:]
        weights = tiled.scale[:, tile.index].abs()
        if tiled.shared:
            part = weights @ tile.rows.flatten(1).abs()
        else:
            part = torch.bmm(weights.unsqueeze(1), tile.rows.flatten(2).abs()).squeeze(1)
        part = part.view(batch, -1, h, w)
        total = total + F.pad(part, (tile.left, tiled.grid[2] - tile.left - w, tile.top, tiled.grid[1] - tile.top - h))
    return total


def tiled_relu(tiled: TiledRows, slope: Tensor) -> TiledRows:
    """Multiply every row by the per-sample ReLU slopes (B, C, H, W); the tiles become per-sample."""
    tiles = []
    for tile in tiled.tiles:
        h, w = tile.rows.shape[-2:]
        window = slope[:, :, tile.top : tile.top + h, tile.left : tile.left + w].unsqueeze(1)
        rows = tile.rows.unsqueeze(0) * window if tiled.shared else tile.rows * window
        tiles.append(replace(tile, rows=rows))
    return replace(tiled, tiles=tiles, shared=False, identity=False)


def tiled_add(first: TiledRows, second: TiledRows) -> TiledRows | None:
    """Tile-wise sum of two tilings of the same input block (the two branches of a skip connection)."""
    if first.flat or second.flat or first.grid != second.grid or first.scale is not second.scale:
        return None
    shared = first.shared and second.shared
    batch = int(first.scale.shape[0])
    left_tiles = [t if shared else _per_sample(t, first.shared, batch) for t in first.tiles]
    right_tiles = {t.key: (t if shared else _per_sample(t, second.shared, batch)) for t in second.tiles}
    tiles = []
    for tile in left_tiles:
        other = right_tiles.pop(tile.key, None)
        if other is None:
            tiles.append(tile)
            continue
        top, left = min(tile.top, other.top), min(tile.left, other.left)
        bottom = max(tile.top + tile.rows.shape[-2], other.top + other.rows.shape[-2])
        right = max(tile.left + tile.rows.shape[-1], other.left + other.rows.shape[-1])
        padded = [
            F.pad(t.rows, (t.left - left, right - t.left - t.rows.shape[-1],
                           t.top - top, bottom - t.top - t.rows.shape[-2]))
            for t in (tile, other)
        ]
        tiles.append(Tile(padded[0] + padded[1], top, left, tile.index, tile.key))
    tiles.extend(right_tiles.values())
    return TiledRows(tiles, first.scale, shared, first.grid)


def _per_sample(tile: Tile, shared: bool, batch: int) -> Tile:
    return replace(tile, rows=tile.rows.unsqueeze(0).expand(batch, *tile.rows.shape)) if shared else tile
