"""Input-gradient kernel: dX = dY @ (W*M), dense dY times block-sparse W -> dense dX.

One program computes a [BLOCK_M, BLOCK_SIZE] tile of dX for one block-column c of W: it
walks the live block rows of c through the transposed arrays
(``row_idx[col_ptr[c]:col_ptr[c+1]]``, Note [Block layout]). W is dense-shaped, so block
(r, c) is read in place, no transposed copy of the weight exists. Each block's reduction
(over its BLOCK_SIZE rows) runs in BLOCK_SIZE // BLOCK_K steps of one flat loop.
"""

import triton
import triton.language as tl

from .common import dot_acc, grouped_tile


@triton.jit
def grad_input_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M, num_block_cols,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    steps_per_block = BLOCK_SIZE // BLOCK_K
    pid_m, block_col = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_block_cols, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_r = tl.arange(0, BLOCK_K)
    in_rows = offs_m < M
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk  # W block read as is: [BLOCK_K, BLOCK_SIZE]

    first = tl.load(col_ptr_ptr + block_col)
    last = tl.load(col_ptr_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for step in range(first * steps_per_block, last * steps_per_block):
        block_row = tl.load(row_idx_ptr + step // steps_per_block)
        n = block_row * BLOCK_SIZE + (step % steps_per_block) * BLOCK_K + offs_r
        dy = tl.load(dy_rows + n[None, :] * stride_dyn, mask=in_rows[:, None], other=0.0)
        w = tl.load(w_cols + n[:, None] * stride_wn)
        acc = dot_acc(dy, w, acc, INPUT_PRECISION, UPCAST)

    dx = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=in_rows[:, None])
