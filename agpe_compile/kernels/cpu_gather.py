"""Pure-torch "gathered-block" path: the block-sparse layer on CPU from the same layout.

Gather the live weight blocks (and the matching activation column blocks) into
[capacity, ...] batches, multiply them with one batched matmul, and scatter the partial
products back with ``index_add_`` / ``index_put_``. All ``capacity`` slots are processed and
padded slots are routed to a dummy row that is dropped, so nothing depends on the live
count on the host (no ``.item()``): the functions stay traceable and shape-stable within
a bucket. Like the kernels, everything is computed in float32 and rounded once at the end.

:func:`choose_cpu_path` says when this beats the dense-with-zeros matmul; measured data
below.

Example::

    >>> layout = build_layout(block_mask, 32)
    >>> y = gather_forward(x, weight, layout, bias)
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ..layout import BlockLayout
from .checks import as_2d, check_layout, check_operands, check_rows, check_saliency, check_tensor

_CHUNK_BYTES = 64 * 2**20  # bound on one gathered [slots, M, b] batch


def gather_forward(
    x: torch.Tensor, weight: torch.Tensor, layout: BlockLayout, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Y = X @ (W*M)^T + bias, like ``block_sparse_forward``, with torch ops only."""
    x2 = as_2d("x", x, check_layout(layout).shape[1])
    check_operands(layout, weight, [x2])
    if bias is not None:
        check_tensor("bias", bias, (layout.shape[0],), x.dtype, x.device)
    (rows, cols), b, m = layout.grid_shape, layout.block_size, x2.shape[0]
    x_blocks = x2.reshape(m, cols, b).transpose(0, 1)  # [C, M, b] view
    out = torch.zeros(rows + 1, m, b, dtype=torch.float32, device=x.device)
    for slot_rows, slot_cols, live in _slot_chunks(layout, m):
        part = torch.bmm(x_blocks[slot_cols].float(), _weight_blocks(weight, layout, slot_rows, slot_cols).mT)
        out.index_add_(0, torch.where(live, slot_rows, rows), part)
    y = out[:rows].transpose(0, 1).reshape(m, layout.shape[0])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], layout.shape[0])


def gather_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """dX = dY @ (W*M), like ``block_sparse_grad_input``."""
    dy2 = as_2d("grad_out", grad_out, check_layout(layout).shape[0])
    check_operands(layout, weight, [dy2])
    (rows, cols), b, m = layout.grid_shape, layout.block_size, dy2.shape[0]
    dy_blocks = dy2.reshape(m, rows, b).transpose(0, 1)  # [R, M, b] view
    out = torch.zeros(cols + 1, m, b, dtype=torch.float32, device=grad_out.device)
    for slot_rows, slot_cols, live in _slot_chunks(layout, m):
        part = torch.bmm(dy_blocks[slot_rows].float(), _weight_blocks(weight, layout, slot_rows, slot_cols))
        out.index_add_(0, torch.where(live, slot_cols, cols), part)
    dx = out[:cols].transpose(0, 1).reshape(m, layout.shape[1])
    return dx.to(grad_out.dtype).view(*grad_out.shape[:-1], layout.shape[1])


def gather_grad_weight(
    grad_out: torch.Tensor, x: torch.Tensor, layout: BlockLayout, *,
    weight: Optional[torch.Tensor] = None, saliency: Optional[torch.Tensor] = None,
    saliency_mode: Optional[str] = None,
) -> torch.Tensor:
    """dW = (dY^T X) * M (fresh, zeros outside live blocks) and optional saliency +=,
    like ``block_sparse_grad_weight``."""
    n, k = check_layout(layout).shape
    dy2, x2 = as_2d("grad_out", grad_out, n), as_2d("x", x, k)
    check_rows(dy2, x2)
    check_operands(layout, weight, [dy2, x2])
    check_saliency(saliency_mode, saliency, weight, layout, x.device)
    (rows, cols), b, m = layout.grid_shape, layout.block_size, dy2.shape[0]
    dy_blocks = dy2.reshape(m, rows, b).transpose(0, 1)
    x_blocks = x2.reshape(m, cols, b).transpose(0, 1)
    out = torch.zeros(rows + 1, cols, b, b, dtype=torch.float32, device=x.device)
    scores = torch.zeros(rows + 1, cols, dtype=torch.float32, device=x.device)
    for slot_rows, slot_cols, live in _slot_chunks(layout, m):
        grad = torch.bmm(dy_blocks[slot_rows].mT.float(), x_blocks[slot_cols].float())  # [slots, b, b]
        dest = (torch.where(live, slot_rows, rows), slot_cols)
        out.index_put_(dest, grad)
        if saliency_mode is not None:
            w = None if weight is None else _weight_blocks(weight, layout, slot_rows, slot_cols)
            scores.index_put_(dest, _block_scores(saliency_mode, w, grad), accumulate=True)
    if saliency_mode is not None:
        saliency.add_(scores[:rows])
    return out[:rows].transpose(1, 2).reshape(n, k).to(x.dtype)


def _block_scores(mode: str, w: Optional[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    if mode == "taylor":
        return (w * grad).abs().sum(dim=(1, 2))
    if mode == "gradient":
        return grad.abs().sum(dim=(1, 2))
    if mode == "magnitude":
        return w.abs().sum(dim=(1, 2))
    return -(w * grad).sum(dim=(1, 2))


def _weight_blocks(weight: torch.Tensor, layout: BlockLayout, slot_rows, slot_cols) -> torch.Tensor:
    rows, cols = layout.grid_shape
    b = layout.block_size
    return weight.reshape(rows, b, cols, b).transpose(1, 2)[slot_rows, slot_cols].float()  # [slots, b, b]


def _slot_chunks(layout: BlockLayout, m: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(block rows, block cols, is-live) of the layout's slots, in chunks of bounded memory."""
    capacity, b = layout.capacity, layout.block_size
    live = torch.arange(capacity, device=layout.live_count.device) < layout.live_count
    step = max(1, _CHUNK_BYTES // (4 * max(m, 1) * b))
    for start in range(0, capacity, step):
        chunk = slice(start, start + step)
        yield layout.slot_row[chunk].long(), layout.col_idx[chunk].long(), live[chunk]


# Cost model of one training step's layer (forward + dX + dW), gather vs dense-with-zeros.
# gather time / dense time ~= KAPPA[b] * bucket capacity (gather pays for every capacity
# slot), plus a fixed overhead worth ~40 MFLOP of dense matmul. Re-measured 2026-11-28 on
# a 2-core AMD EPYC VM (torch 2.13.0+cpu, fp32, 1 thread, process time, min of
# 5, the op's own forward + backward through autograd, dense with the zero-weight promise;
# 261 shapes: M in {64, 128, 256, 512, 1024, 2048}, N x K from 512x512 to 2048x2048 and
# non-square, capacities 0.10-0.5; benchmarks/results/2026-11-28-cpu-gather-cost-model/).
# KAPPA is the median per block size. It grows with the layer's size (gather's efficiency
# falls with M while MKL's rises: ~11 / 5.3 / 3 at 1024 x 2048 x 2048), but a size term
# did not pick better on shapes it was not fitted on. The first table (8 / 5 / 3, 2026-11-26)
# was that large-size end: it ran the dense path where gather was up to 1.5x faster (block
# 64 at capacity 0.25, 0.65-0.85 of the dense time), 6.5% slower than the better path on
# average over the shapes above; this one 1.7%.
_GATHER_KAPPA = {32: 5.0, 64: 3.0, 128: 2.2}
_GATHER_FIXED_FLOPS = 40e6


def always_dense_from(block_size: int) -> float:
    """Smallest bucket capacity from which :func:`choose_cpu_path` picks the dense path for
    every row count (shape-only, so a layer's path by density is known before any call).

    >>> always_dense_from(8), always_dense_from(32), always_dense_from(128)
    (0.0, 0.2, 0.45454545454545453)
    """
    anchors = [size for size in _GATHER_KAPPA if size <= block_size]
    if not anchors:
        return 0.0
    return 1.0 / _GATHER_KAPPA[max(anchors)]


def choose_cpu_path(m: int, n: int, k: int, density: float, block_size: int) -> str:
    """``"gather"`` or ``"dense"`` (X @ (W*M)^T and friends) for a layer's step on CPU.

    >>> choose_cpu_path(1024, 1024, 1024, 0.1, 128), choose_cpu_path(1024, 1024, 1024, 0.5, 128)
    ('gather', 'dense')
    >>> choose_cpu_path(16, 256, 256, 0.05, 64)  # too small: fixed overhead dominates
    'dense'
    """
    for name, value in (("m", m), ("n", n), ("k", k), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"agpe cpu_gather: expected a positive int {name}, got {value!r}")
    anchors = [size for size in _GATHER_KAPPA if size <= block_size]
    if not anchors:  # smaller blocks than measured: batched matmuls of tiny blocks lose
        return "dense"
    # density is the layout's capacity / blocks, a shade above its bucket where the capacity
    # rounds up: taken as is (bucket_for would cost a layer at the next bucket up)
    relative = _GATHER_KAPPA[max(anchors)] * density
    saved_flops = 6.0 * m * n * k * (1.0 - relative)
    return "gather" if saved_flops > _GATHER_FIXED_FLOPS else "dense"
