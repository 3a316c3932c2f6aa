"""Weight-gradient kernel: dW = (dY^T @ X) * M as a sparse-output kernel, with fused saliency.

The grid has one program per layout SLOT (``capacity`` programs, Note [Block layout]); a
program whose slot is at or past ``live_count`` exits at once, so one compiled launch
serves every mask of the bucket. A live slot computes block (slot_row[s], col_idx[s]) over
the full M reduction, writes it, and adds the block's saliency score to ``scores[r, c]``.
Each block belongs to exactly one program, so the += needs no atomics.
"""

import triton
import triton.language as tl

from .common import block_grad

# SALIENCY (constexpr) picks the score added to scores[r, c]: 0 none, 1 taylor sum|W*G|,
# 2 gradient sum|G|, 3 magnitude sum|W|, 4 movement -sum(W*G) (checks.SALIENCY_MODES order).


@triton.jit
def grad_weight_kernel(
    dy_ptr, x_ptr, w_ptr, dw_ptr, scores_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    M, num_block_cols,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dwn, stride_dwk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SALIENCY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot >= tl.load(live_count_ptr):
        return
    block_row = tl.load(slot_row_ptr + slot)
    block_col = tl.load(col_idx_ptr + slot)
    grad = block_grad(dy_ptr, x_ptr, block_row, block_col, M, stride_dym, stride_dyn,
                      stride_xm, stride_xk, BLOCK_SIZE, BLOCK_M, INPUT_PRECISION, UPCAST)

    offs_n = block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_k = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    dw = dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw, grad.to(dw_ptr.dtype.element_ty))

    if SALIENCY != 0:
        if SALIENCY != 2:  # every score but "gradient" needs the weight block
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk).to(tl.float32)
        if SALIENCY == 1:
            score = tl.sum(tl.sum(tl.abs(w * grad), axis=1), axis=0)
        elif SALIENCY == 2:
            score = tl.sum(tl.sum(tl.abs(grad), axis=1), axis=0)
        elif SALIENCY == 3:
            score = tl.sum(tl.sum(tl.abs(w), axis=1), axis=0)
        else:
            score = -tl.sum(tl.sum(w * grad, axis=1), axis=0)
        score_ptr = scores_ptr + block_row * num_block_cols + block_col
        tl.store(score_ptr, tl.load(score_ptr) + score)
