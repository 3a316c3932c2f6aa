"""A layer's BlockLayout packed into ONE int32 buffer, so each layer adds one graph input.

Note [Packed layout]
~~~~~~~~~~~~~~~~~~~~
``BlockLayout`` (agpe_compile/layout.py, Note [Block layout]) has seven index tensors.
The module holds them as one 1-D int32 buffer ``weight_block_layout``::

    [ row_ptr (R+1) | col_ptr (C+1) | block_slot (R*C) | live_count (1) |
      col_idx (cap) | slot_row (cap) | row_idx (cap) ]

and :func:`unpack` returns views of it, so an in-place ``update_layout_`` on the views
rewrites the buffer. The length is fixed by the grid and the bucket's capacity: within a
bucket the buffer is edited in place (no recompile); crossing a bucket replaces it with
one of another length, which is what makes Dynamo recompile (see agpe_compile/buckets.py).

For the 2 x 3 example of Note [Block layout] (capacity 5) the buffer has
3 + 4 + 6 + 1 + 3 * 5 = 29 entries.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .layout import BlockLayout, build_layout

FIXED = 3  # the +1 of row_ptr, the +1 of col_ptr, live_count


def packed_length(grid: Tuple[int, int], capacity: int) -> int:
    rows, cols = grid
    return rows + cols + rows * cols + FIXED + 3 * capacity


def capacity_of(packed: torch.Tensor, grid: Tuple[int, int]) -> int:
    rows, cols = grid
    return (packed.shape[0] - rows - cols - rows * cols - FIXED) // 3


def pack(layout: BlockLayout) -> torch.Tensor:
    """One int32 buffer holding ``layout``'s tensors (a copy)."""
    parts = [layout.row_ptr, layout.col_ptr, layout.block_slot.reshape(-1), layout.live_count.reshape(1),
             layout.col_idx, layout.slot_row, layout.row_idx]
    return torch.cat(parts)


def unpack(packed: torch.Tensor, grid: Tuple[int, int], block_size: int) -> BlockLayout:
    """A BlockLayout whose tensors are views of ``packed``; reads no tensor contents."""
    rows, cols = grid
    capacity = capacity_of(packed, grid)
    sizes = (rows + 1, cols + 1, rows * cols, 1, capacity, capacity, capacity)
    row_ptr, col_ptr, block_slot, live, col_idx, slot_row, row_idx = packed.split(sizes)
    return BlockLayout.from_tensors(
        [row_ptr, col_idx, slot_row, col_ptr, row_idx, block_slot.view(rows, cols), live.view(())],
        block_size=block_size,
        bucket=min(1.0, capacity / (rows * cols)),
    )


def build_packed(block_mask: torch.Tensor, block_size: int, buckets) -> Tuple[torch.Tensor, float]:
    """(packed buffer, bucket) for ``block_mask`` at the bucket of its density."""
    layout = build_layout(block_mask, block_size, buckets)
    return pack(layout), layout.bucket
