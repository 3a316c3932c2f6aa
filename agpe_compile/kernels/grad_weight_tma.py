"""Weight-gradient kernel with TMA loads: a candidate beside grad_weight.py, not the default.

Same work as grad_weight.py (one program per layout slot, and per split-K part: the
[BLOCK_SIZE, BLOCK_SIZE] block (slot_row[s], col_idx[s]) of dY^T @ X, written into dW and
scored, or written as an fp32 partial for ``grad_weight_finish_kernel``), with the dY and X
tiles of the M reduction fetched through tensor descriptors: on Hopper one bulk
asynchronous copy per [BLOCK_M, BLOCK_SIZE] tile instead of per-thread address arithmetic
(see forward_tma.py). The M reduction steps in whole tiles from a tile-aligned start
(``m_chunk`` is a multiple of BLOCK_M); rows past M are zero-filled by the TMA unit, so
they add nothing. ``benchmarks/kernels.py`` times it beside the default on a GPU.

Two entry points share the loop: ``*_tma_kernel`` takes host-built descriptors (eager only)
and ``*_tma_device_kernel`` builds them on the device from plain pointers (traceable;
Triton then needs a scratch allocator, set by the launcher).
"""

import triton
import triton.language as tl

from .common import dot_acc, store_block_and_score


@triton.jit
def grad_weight_tma_kernel(
    dy_desc, x_desc, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    M, m_chunk, capacity, num_block_cols, stride_wn, stride_wk, stride_dwn, stride_dwk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SALIENCY: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot < tl.load(live_count_ptr):
        _grad_weight_slot(dy_desc, x_desc, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr,
                          M, m_chunk, capacity, num_block_cols, stride_wn, stride_wk, stride_dwn, stride_dwk, slot,
                          BLOCK_SIZE, BLOCK_M, SALIENCY, SPLIT, INPUT_PRECISION, UPCAST)


@triton.jit
def grad_weight_tma_device_kernel(
    dy_ptr, x_ptr, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    M, N, K, m_chunk, capacity, num_block_cols, stride_dym, stride_xm, stride_wn, stride_wk, stride_dwn, stride_dwk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SALIENCY: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The same with descriptors built on the device (traceable; see forward_tma.py), once
    per program for the live slots pid, pid + P, ... (Note [Persistent TMA programs])."""
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[stride_dym, 1],
                                        block_shape=[BLOCK_M, BLOCK_SIZE])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_SIZE])
    for slot in range(tl.program_id(0), tl.load(live_count_ptr), tl.num_programs(0)):
        _grad_weight_slot(dy_desc, x_desc, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr,
                          M, m_chunk, capacity, num_block_cols, stride_wn, stride_wk, stride_dwn, stride_dwk, slot,
                          BLOCK_SIZE, BLOCK_M, SALIENCY, SPLIT, INPUT_PRECISION, UPCAST)


@triton.jit
def _grad_weight_slot(
    dy_desc, x_desc, w_ptr, dw_ptr, scores_ptr, ws_ptr, slot_row_ptr, col_idx_ptr,
    M, m_chunk, capacity, num_block_cols, stride_wn, stride_wk, stride_dwn, stride_dwk, slot,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SALIENCY: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Live slot ``slot``'s block (or its split-K part ``program_id(1)``)."""
    block_row = tl.load(slot_row_ptr + slot)
    block_col = tl.load(col_idx_ptr + slot)
    n0 = block_row * BLOCK_SIZE
    k0 = block_col * BLOCK_SIZE
    part = tl.program_id(1)
    m_start = part * m_chunk  # SPLIT == 1: part 0 and m_chunk >= M
    m_end = tl.minimum(m_start + m_chunk, M)
    acc = tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        dy = dy_desc.load([m0, n0])  # [BLOCK_M, BLOCK_SIZE]
        x = x_desc.load([m0, k0])  # [BLOCK_M, BLOCK_SIZE]
        acc = dot_acc(dy.T, x, acc, INPUT_PRECISION, UPCAST)
    if SPLIT == 1:
        store_block_and_score(acc, w_ptr, dw_ptr, scores_ptr, block_row, block_col, num_block_cols,
                              stride_wn, stride_wk, stride_dwn, stride_dwk, BLOCK_SIZE, SALIENCY)
    else:
        offs = tl.arange(0, BLOCK_SIZE)
        tile = (part * capacity + slot).to(tl.int64) * (BLOCK_SIZE * BLOCK_SIZE)
        tl.store(ws_ptr + tile + offs[:, None] * BLOCK_SIZE + offs[None, :], acc)
