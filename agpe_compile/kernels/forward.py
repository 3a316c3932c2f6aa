"""Forward kernel: Y = X @ (W*M)^T + bias, dense X times block-sparse W^T -> dense Y.

One program computes a [BLOCK_M, BLOCK_SIZE] tile of Y for one block-row r of W: it walks
the live block columns of r (``col_idx[row_ptr[r]:row_ptr[r+1]]``, Note [Block layout]) and
never touches an inactive block. Each weight block is consumed in BLOCK_SIZE // BLOCK_K
steps of one flat loop, so the software pipeline spans block boundaries.
"""

import triton
import triton.language as tl

from .common import dot_acc, grouped_tile


@triton.jit
def forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, num_block_rows,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    steps_per_block = BLOCK_SIZE // BLOCK_K
    pid_m, block_row = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_block_rows, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_k = tl.arange(0, BLOCK_K)
    in_rows = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn  # W block read transposed: [BLOCK_K, BLOCK_SIZE]

    first = tl.load(row_ptr_ptr + block_row)
    last = tl.load(row_ptr_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for step in range(first * steps_per_block, last * steps_per_block):
        block_col = tl.load(col_idx_ptr + step // steps_per_block)
        k = block_col * BLOCK_SIZE + (step % steps_per_block) * BLOCK_K + offs_k
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=in_rows[:, None], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wk)
        acc = dot_acc(x, w, acc, INPUT_PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_rows[:, None])
