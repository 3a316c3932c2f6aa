"""Weight-gradient kernel: dW = (dY^T @ X) * M as a sparse-output kernel, with fused saliency.

The grid has one program per layout SLOT (``capacity`` programs, Note [Block layout]) and,
with split-K, ``split`` programs per slot; a program whose slot is at or past
``live_count`` exits at once, so one compiled launch serves every mask of the bucket.

* ``SPLIT == 1``: a live slot computes block (slot_row[s], col_idx[s]) over the full M
  reduction, writes it and adds its saliency score to ``scores[r, c]``.
* ``SPLIT > 1`` (few live blocks, long M: a one-program-per-block grid would leave most
  of the GPU idle): program (s, j) reduces rows [j * m_chunk, (j + 1) * m_chunk) into an
  fp32 workspace ``ws[j, s]``; ``grad_weight_finish_kernel`` then sums the ``SPLIT``
  partials in a fixed order (deterministic, no atomics), writes the block and scores it.
"""

import triton
import triton.language as tl

from .common import block_grad, store_block_and_score


@triton.jit
def grad_weight_kernel(
    dy_ptr, x_ptr, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    M, m_chunk, capacity, num_block_cols,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dwn, stride_dwk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SALIENCY: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot >= tl.load(live_count_ptr):
        return
    block_row = tl.load(slot_row_ptr + slot)
    block_col = tl.load(col_idx_ptr + slot)
    if SPLIT == 1:
        grad = block_grad(dy_ptr, x_ptr, block_row, block_col, 0, M, stride_dym, stride_dyn,
                          stride_xm, stride_xk, BLOCK_SIZE, BLOCK_M, INPUT_PRECISION, UPCAST)
        store_block_and_score(grad, w_ptr, dw_ptr, scores_ptr, block_row, block_col, num_block_cols,
                              stride_wn, stride_wk, stride_dwn, stride_dwk, BLOCK_SIZE, SALIENCY)
    else:
        part = tl.program_id(1)
        m_start = part * m_chunk
        m_end = tl.minimum(m_start + m_chunk, M)
        grad = block_grad(dy_ptr, x_ptr, block_row, block_col, m_start, m_end, stride_dym, stride_dyn,
                          stride_xm, stride_xk, BLOCK_SIZE, BLOCK_M, INPUT_PRECISION, UPCAST)
        offs = tl.arange(0, BLOCK_SIZE)
        tile = (part * capacity + slot).to(tl.int64) * (BLOCK_SIZE * BLOCK_SIZE)
        tl.store(ws_ptr + tile + offs[:, None] * BLOCK_SIZE + offs[None, :], grad)


@triton.jit
def grad_weight_finish_kernel(
    ws_ptr, w_ptr, dw_ptr, scores_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    capacity, num_block_cols, stride_wn, stride_wk, stride_dwn, stride_dwk,
    BLOCK_SIZE: tl.constexpr, SALIENCY: tl.constexpr, SPLIT: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot >= tl.load(live_count_ptr):
        return
    block_row = tl.load(slot_row_ptr + slot)
    block_col = tl.load(col_idx_ptr + slot)
    offs = tl.arange(0, BLOCK_SIZE)
    inner = offs[:, None] * BLOCK_SIZE + offs[None, :]
    grad = tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=tl.float32)
    for part in range(SPLIT):
        tile = (part * capacity + slot).to(tl.int64) * (BLOCK_SIZE * BLOCK_SIZE)
        grad += tl.load(ws_ptr + tile + inner)
    store_block_and_score(grad, w_ptr, dw_ptr, scores_ptr, block_row, block_col, num_block_cols,
                          stride_wn, stride_wk, stride_dwn, stride_dwk, BLOCK_SIZE, SALIENCY)
