"""Dense-gradient scoring kernel: ||(dY^T @ X)[block]||_F^2 of every INACTIVE block.

Used only on scoring steps (RigL-style regrowth needs the gradient a dead block would
get). One program per block of the R x C grid; live blocks (``block_slot >= 0``, Note
[Block layout]) exit at once, and so does every program when the optional 0-d ``enabled``
flag is 0, so the caller can switch scoring with data instead of a graph branch. The dense
gradient is reduced to one number per block in registers and never written to memory.
"""

import triton
import triton.language as tl

from .common import block_grad


@triton.jit
def grad_scores_kernel(
    dy_ptr, x_ptr, scores_ptr, block_slot_ptr, enabled_ptr,
    M, num_block_cols,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, HAS_FLAG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    if HAS_FLAG:
        if tl.load(enabled_ptr) == 0:
            return
    if tl.load(block_slot_ptr + block) >= 0:
        return
    block_row = block // num_block_cols
    block_col = block % num_block_cols
    grad = block_grad(dy_ptr, x_ptr, block_row, block_col, 0, M, stride_dym, stride_dyn,
                      stride_xm, stride_xk, BLOCK_SIZE, BLOCK_M, INPUT_PRECISION, UPCAST)
    score_ptr = scores_ptr + block
    tl.store(score_ptr, tl.load(score_ptr) + tl.sum(tl.sum(grad * grad, axis=1), axis=0))
