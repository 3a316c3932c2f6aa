"""Mask-and-score kernel of the CUDA dense path: one pass over a dense weight gradient.

Above the crossover density the op runs cuBLAS on the whole layer (ops/paths.py) and gets
the DENSE gradient G = dY^T @ X. One program per block (r, c) of the R x C grid then does,
in place and in one read of G:

* live block (``block_slot[r, c] >= 0``): G is left as it is and the block's saliency
  score (mode as in grad_weight.py) is added to ``scores[r, c]``;
* inactive block: ``||G_block||_F^2`` is added to ``dense_grad_sq[r, c]`` when the 0-d
  ``enabled`` flag is non-zero, and the block of G is overwritten with zeros (the masked
  gradient).

So masking, saliency and dense-gradient scoring cost one pass over G (and W for live
blocks) instead of the reference's five full-size temporaries.
"""

import triton
import triton.language as tl


@triton.jit
def mask_scores_kernel(
    g_ptr, w_ptr, scores_ptr, dense_sq_ptr, block_slot_ptr, enabled_ptr,
    num_block_cols, stride_gn, stride_gk, stride_wn, stride_wk,
    BLOCK_SIZE: tl.constexpr, SALIENCY: tl.constexpr, HAS_FLAG: tl.constexpr,
):
    block = tl.program_id(0)
    block_row = block // num_block_cols
    block_col = block % num_block_cols
    offs_n = block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_k = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g_block = g_ptr + offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gk
    if tl.load(block_slot_ptr + block) >= 0:
        if SALIENCY != 0:
            grad = tl.load(g_block).to(tl.float32)
            if SALIENCY != 2:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk).to(tl.float32)
            if SALIENCY == 1:
                score = tl.sum(tl.sum(tl.abs(w * grad), axis=1), axis=0)
            elif SALIENCY == 2:
                score = tl.sum(tl.sum(tl.abs(grad), axis=1), axis=0)
            elif SALIENCY == 3:
                score = tl.sum(tl.sum(tl.abs(w), axis=1), axis=0)
            else:
                score = -tl.sum(tl.sum(w * grad, axis=1), axis=0)
            tl.store(scores_ptr + block, tl.load(scores_ptr + block) + score)
    else:
        enabled = 1
        if HAS_FLAG:
            enabled = (tl.load(enabled_ptr) != 0).to(tl.int32)  # any non-zero value, as grad_scores reads it
        if enabled != 0:
            grad = tl.load(g_block).to(tl.float32)
            tl.store(dense_sq_ptr + block, tl.load(dense_sq_ptr + block) + tl.sum(tl.sum(grad * grad, axis=1), axis=0))
        tl.store(g_block, tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=g_ptr.dtype.element_ty))
