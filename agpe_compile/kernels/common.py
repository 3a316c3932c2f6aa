"""Triton helpers shared by the kernels (imported only once triton is known to exist)."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_m_tiles, num_block_cols, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (m tile, output block column) in grouped order.

    Consecutive programs sweep all block columns for a group of GROUP_M row tiles before
    moving on, so a group's input rows and the weight blocks they share stay in L2
    (the ordering of the Triton matmul tutorial).
    """
    per_group = GROUP_M * num_block_cols
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (set by the launchers only under the interpreter, for bf16) does
    the product in fp32, because the interpreter multiplies bf16 bit patterns (triton#11584)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def block_grad(
    dy_ptr, x_ptr, block_row, block_col, m_start, m_end,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 [BLOCK_SIZE, BLOCK_SIZE] block (block_row, block_col) of dY^T @ X over rows
    [m_start, m_end) of M.

    One program owns the block's whole range, so the partial is written once, needs no
    atomics and (when the range is all of M) its saliency is taken from the accumulator.
    """
    offs_n = block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_k = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_m = tl.arange(0, BLOCK_M)
    dy_cols = dy_ptr + offs_n[:, None] * stride_dyn  # dY read transposed: [BLOCK_SIZE, BLOCK_M]
    x_cols = x_ptr + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + offs_m
        dy_t = tl.load(dy_cols + m[None, :] * stride_dym, mask=m[None, :] < m_end, other=0.0)
        x = tl.load(x_cols + m[:, None] * stride_xm, mask=m[:, None] < m_end, other=0.0)
        acc = dot_acc(dy_t, x, acc, INPUT_PRECISION, UPCAST)
    return acc


@triton.jit
def store_block_and_score(
    grad, w_ptr, dw_ptr, scores_ptr, block_row, block_col, num_block_cols,
    stride_wn, stride_wk, stride_dwn, stride_dwk, BLOCK_SIZE: tl.constexpr, SALIENCY: tl.constexpr,
):
    """Write the fp32 block ``grad`` into dW at (block_row, block_col) and add its saliency.

    SALIENCY (constexpr) picks the score added to scores[r, c]: 0 none, 1 taylor sum|W*G|,
    2 gradient sum|G|, 3 magnitude sum|W|, 4 movement -sum(W*G) (checks.SALIENCY_MODES order).
    Each block belongs to one program, so the += needs no atomics.
    """
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
