"""Block mask <-> bucketed index tensors: the contract between masks and the kernels.

Note [Block layout]
~~~~~~~~~~~~~~~~~~~
A weight W [N, K] with block size b has a grid of R x C = N/b x K/b blocks and a bool
``block_mask`` [R, C]. W stays dense-shaped (inactive blocks hold zeros that no kernel
reads), so a block is named by its (row, col) alone and the transposed view needs no
permutation of block data (unlike stk, whose blocks are stored compactly).

The layout holds CSR-like flat arrays sized to the CAPACITY of the mask's density bucket
(``capacity = ceil(bucket * R * C)``), padded with 0 past the live count, plus pointer
arrays of fixed length R+1 / C+1. Within a bucket every shape is fixed, so the tensors can
be module buffers rewritten in place and torch.compile never recompiles inside a bucket.
Worked 2 x 3 example, live blocks marked x::

    block_mask = [[x . x]      4 of 6 blocks live: density 0.67 -> bucket 0.75
                  [. x x]]     capacity = ceil(0.75 * 6) = 5 slots

    row_ptr    = [0, 2, 4]              slots of block-row r: row_ptr[r]:row_ptr[r+1]
    col_idx    = [0, 2, 1, 2, 0]        block column of each slot (row-major order)
    slot_row   = [0, 0, 1, 1, 0]        block row of each slot
    col_ptr    = [0, 1, 2, 4]           entries of block-col c: col_ptr[c]:col_ptr[c+1]
    row_idx    = [0, 1, 0, 1, 0]        block row of each entry (column-major order)
    block_slot = [[0, -1, 1],           slot of each live block, -1 where inactive
                  [-1, 2, 3]]
    live_count = 4                      0-d tensor; the last slot is padding

Who reads what: the forward program of block-row r walks col_idx over its row_ptr range;
the dX program of block-col c walks row_idx over its col_ptr range; the dW program of slot
s exits when s >= live_count, else computes block (slot_row[s], col_idx[s]); the
dense-gradient scoring program of block (r, c) exits when block_slot[r, c] >= 0.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import Iterable, List, Sequence, Tuple

import torch

DEFAULT_BUCKETS: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.10, 0.05)
INDEX_DTYPE = torch.int32
TENSOR_NAMES = ("row_ptr", "col_idx", "slot_row", "col_ptr", "row_idx", "block_slot", "live_count")


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Index tensors of one layer's block mask, sized to its bucket; see Note [Block layout].

    The metadata (``block_size``, ``shape``, ``capacity``, ``bucket``) is fixed for the life
    of the object; the tensors' contents change in place through :func:`update_layout_`.

    Example::

        >>> layout = build_layout(torch.tensor([[True, False, True], [False, True, True]]), 32)
        >>> layout.shape, layout.capacity, int(layout.live_count)
        ((64, 96), 5, 4)
    """

    block_size: int
    shape: Tuple[int, int]  # (N, K) of the dense-shaped weight
    capacity: int
    bucket: float
    row_ptr: torch.Tensor  # [R+1] int32
    col_idx: torch.Tensor  # [capacity] int32
    slot_row: torch.Tensor  # [capacity] int32
    col_ptr: torch.Tensor  # [C+1] int32
    row_idx: torch.Tensor  # [capacity] int32
    block_slot: torch.Tensor  # [R, C] int32
    live_count: torch.Tensor  # [] int32

    @property
    def grid_shape(self) -> Tuple[int, int]:
        """(R, C): the block grid."""
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    def tensors(self) -> List[torch.Tensor]:
        """The tensors in ``TENSOR_NAMES`` order (for module buffers and op arguments)."""
        return [getattr(self, name) for name in TENSOR_NAMES]

    def to_mask(self) -> torch.Tensor:
        """The bool [R, C] block mask, rebuilt from the row-wise arrays.

        >>> mask = torch.tensor([[True, False], [True, True]])
        >>> torch.equal(build_layout(mask, 16).to_mask(), mask)
        True
        """
        rows, cols = self.grid_shape
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        live_rows = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts.long())
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=counts.device)
        mask[live_rows, self.col_idx[: live_rows.numel()].long()] = True
        return mask

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, block_size: int, bucket: float) -> "BlockLayout":
        """Rebuild a layout from ``tensors()`` (e.g. inside a custom op that got them as args).

        Only shapes are checked, never contents, so this is safe to trace.

        >>> layout = build_layout(torch.ones(2, 2, dtype=torch.bool), 16)
        >>> BlockLayout.from_tensors(layout.tensors(), block_size=16, bucket=1.0).capacity
        4
        """
        _check_block_size(block_size)
        if len(tensors) != len(TENSOR_NAMES):
            raise ValueError(
                f"agpe layout: expected {len(TENSOR_NAMES)} tensors {TENSOR_NAMES}, got {len(tensors)}"
            )
        fields = dict(zip(TENSOR_NAMES, tensors))
        rows, cols = fields["block_slot"].shape
        capacity = fields["col_idx"].shape[0]
        expected = {"row_ptr": (rows + 1,), "col_idx": (capacity,), "slot_row": (capacity,),
                    "col_ptr": (cols + 1,), "row_idx": (capacity,), "live_count": ()}
        for name, shape in expected.items():
            if tuple(fields[name].shape) != shape:
                raise ValueError(
                    f"agpe layout: expected {name} of shape {shape}, got {tuple(fields[name].shape)}"
                )
        shape = (rows * block_size, cols * block_size)
        return cls(block_size, shape, capacity, float(bucket), **fields)


def _check_block_size(block_size: object) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"agpe layout: expected block_size to be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"agpe layout: expected a positive block_size, got {block_size}")


def _check_mask(block_mask: object) -> None:
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"agpe layout: expected block_mask to be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"agpe layout: expected block_mask of dtype torch.bool, got {block_mask.dtype}")
    if block_mask.dim() != 2 or block_mask.numel() == 0:
        raise ValueError(
            f"agpe layout: expected a non-empty 2-D block_mask [R, C], got shape {tuple(block_mask.shape)}"
        )


def _normalize_buckets(buckets: Iterable[float]) -> Tuple[float, ...]:
    values = tuple(buckets)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"agpe layout: expected buckets to be real numbers, got {value!r} in {values}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"agpe layout: expected buckets in (0, 1], got {value!r} in {values}")
    if not values or max(values) != 1.0:
        # Without 1.0 some densities would have no bucket at all.
        raise ValueError(f"agpe layout: expected buckets to include 1.0, got {values}")
    return tuple(sorted(set(float(v) for v in values)))


def bucket_for(density: float, buckets: Iterable[float] = DEFAULT_BUCKETS) -> float:
    """The smallest bucket value >= ``density``.

    >>> bucket_for(0.3), bucket_for(0.0), bucket_for(0.5)
    (0.35, 0.05, 0.5)
    """
    if isinstance(density, bool) or not isinstance(density, Real):
        raise TypeError(f"agpe layout: expected density to be a real number, got {type(density).__name__}")
    if not 0.0 <= density <= 1.0:  # also rejects NaN
        raise ValueError(f"agpe layout: expected density in [0, 1], got {density!r}")
    return next(b for b in _normalize_buckets(buckets) if b >= density)


def capacity_for(density: float, num_blocks: int, buckets: Iterable[float] = DEFAULT_BUCKETS) -> int:
    """Slots a layout needs for ``density`` of ``num_blocks``: ceil(bucket * num_blocks).

    >>> capacity_for(0.3, 100), capacity_for(0.0, 4)
    (35, 1)
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"agpe layout: expected a positive int num_blocks, got {num_blocks!r}")
    return _capacity(bucket_for(density, buckets), num_blocks)


def _capacity(bucket: float, num_blocks: int) -> int:
    # Rounding first keeps 0.35 * 100 = 35.000000000000004 from taking a 36th slot.
    return max(1, math.ceil(round(bucket * num_blocks, 6)))


def build_layout(
    block_mask: torch.Tensor, block_size: int, buckets: Iterable[float] = DEFAULT_BUCKETS
) -> BlockLayout:
    """The layout of ``block_mask`` on the mask's device, at the bucket of its density.

    >>> layout = build_layout(torch.tensor([[True, False, True], [False, True, True]]), 16)
    >>> layout.bucket, layout.col_idx.tolist(), layout.row_idx.tolist()
    (0.75, [0, 2, 1, 2, 0], [0, 1, 0, 1, 0])
    """
    _check_mask(block_mask)
    _check_block_size(block_size)
    rows, cols = block_mask.shape
    live = int(block_mask.sum())
    bucket = bucket_for(live / (rows * cols), buckets)
    capacity = _capacity(bucket, rows * cols)
    assert live <= capacity, (live, capacity, bucket)

    def index(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=INDEX_DTYPE, device=block_mask.device)

    layout = BlockLayout(
        block_size=block_size, shape=(rows * block_size, cols * block_size), capacity=capacity,
        bucket=bucket, row_ptr=index(rows + 1), col_idx=index(capacity), slot_row=index(capacity),
        col_ptr=index(cols + 1), row_idx=index(capacity), block_slot=index(rows, cols), live_count=index(),
    )
    _fill_(layout, block_mask)
    return layout


def update_layout_(layout: BlockLayout, block_mask: torch.Tensor) -> bool:
    """Rewrite ``layout`` in place for ``block_mask`` if it fits the capacity.

    Returns True when rewritten (tensor identities and shapes unchanged), False when the
    mask has more live blocks than ``layout.capacity``: then nothing changed and the caller
    must ``build_layout`` at the new bucket. A sparser mask stays in the larger bucket
    (padding grows); rebuilding to shrink is the caller's choice.

    >>> layout = build_layout(torch.tensor([[True, False], [False, False]]), 16)
    >>> update_layout_(layout, torch.tensor([[False, True], [False, False]]))
    True
    >>> update_layout_(layout, torch.ones(2, 2, dtype=torch.bool))
    False
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"agpe layout: expected layout to be a BlockLayout, got {type(layout).__name__}")
    _check_mask(block_mask)
    if tuple(block_mask.shape) != layout.grid_shape:
        raise ValueError(
            f"agpe layout: expected block_mask of shape {layout.grid_shape}, got {tuple(block_mask.shape)}"
        )
    if int(block_mask.sum()) > layout.capacity:
        return False
    _fill_(layout, block_mask.to(layout.row_ptr.device))
    return True


def _fill_(layout: BlockLayout, block_mask: torch.Tensor) -> None:
    rows, cols = torch.nonzero(block_mask, as_tuple=True)  # row-major order
    t_cols, t_rows = torch.nonzero(block_mask.t(), as_tuple=True)  # column-major order
    live = rows.numel()
    _fill_pointers_(layout.row_ptr, block_mask.sum(dim=1))
    _fill_pointers_(layout.col_ptr, block_mask.sum(dim=0))
    for name, values in (("col_idx", cols), ("slot_row", rows), ("row_idx", t_rows)):
        flat = getattr(layout, name)
        flat.zero_()  # padding points at block (0, 0): in bounds, never read past live_count
        flat[:live] = values
    layout.block_slot.fill_(-1)
    layout.block_slot[rows, cols] = torch.arange(live, dtype=INDEX_DTYPE, device=rows.device)
    layout.live_count.fill_(live)


def _fill_pointers_(pointers: torch.Tensor, counts: torch.Tensor) -> None:
    pointers[0] = 0
    pointers[1:].copy_(torch.cumsum(counts, dim=0))
