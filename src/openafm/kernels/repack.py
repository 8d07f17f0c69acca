"""The kernels' layout of palettized indices: 4-row tiles x 32-column blocks of bit planes.

`repack` turns indices `(rows, cols)` into it and `unpack` turns it back (the on-disk format
stays bit-packed rows; this layout exists only in memory). See `csrc/lut_kernels.cpp` for the
byte layout.
"""

from __future__ import annotations

import torch

TILE_ROWS = 4
BLOCK_COLS = 32
SUPPORTED_BITS = (2, 3, 4, 6)


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def planes_nbytes(rows: int, cols: int, bits: int) -> int:
    return padded(rows, TILE_ROWS) * padded(cols, BLOCK_COLS) * bits // 8


def _blocks(indices: torch.Tensor) -> torch.Tensor:
    """(rows, cols) → zero-padded (tiles, blocks, 4, 32) uint8."""
    rows, cols = indices.shape
    grid = torch.zeros(padded(rows, TILE_ROWS), padded(cols, BLOCK_COLS), dtype=torch.uint8)
    grid[:rows, :cols] = indices
    return grid.view(-1, TILE_ROWS, grid.shape[1] // BLOCK_COLS, BLOCK_COLS).permute(0, 2, 1, 3)


def repack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices `(rows, cols)` (each < 2**bits) → the kernels' flat uint8 planes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the kernels take {SUPPORTED_BITS} bits, not {bits}")
    b = _blocks(indices)
    planes = []
    if bits in (4, 6):
        low = b & 15
        planes.append(low[..., :16] | (low[..., 16:] << 4))
    if bits in (2, 3, 6):
        two = (b >> 4) & 3 if bits == 6 else b & 3
        planes.append(
            two[..., 0:8] | two[..., 8:16] << 2 | two[..., 16:24] << 4 | two[..., 24:] << 6
        )
    if bits == 3:
        one = ((b >> 2) & 1).view(*b.shape[:-1], 4, 8)
        weights = 1 << torch.arange(8, dtype=torch.uint8)
        planes.append((one * weights).sum(-1, dtype=torch.uint8))
    return torch.cat(planes, dim=-1).contiguous().view(-1)


def unpack(planes: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `repack`: int64 indices `(rows, cols)`."""
    tiles, blocks = padded(rows, TILE_ROWS) // TILE_ROWS, padded(cols, BLOCK_COLS) // BLOCK_COLS
    p = planes.view(tiles, blocks, TILE_ROWS, 4 * bits).to(torch.int64)
    if bits in (4, 6):
        nib = p[..., :16]
        idx = torch.cat((nib & 15, nib >> 4), dim=-1)
    else:
        idx = torch.zeros(tiles, blocks, TILE_ROWS, BLOCK_COLS, dtype=torch.int64)
    if bits in (2, 3, 6):
        two = p[..., 16:24] if bits == 6 else p[..., :8]
        two = torch.cat([(two >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
        idx = idx | (two << 4) if bits == 6 else two
    if bits == 3:
        one = p[..., 8:12]
        one = ((one.unsqueeze(-1) >> torch.arange(8)) & 1).flatten(-2)
        idx = idx | (one << 2)
    grid = idx.permute(0, 2, 1, 3).reshape(tiles * TILE_ROWS, blocks * BLOCK_COLS)
    return grid[:rows, :cols]
