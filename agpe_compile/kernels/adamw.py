"""Block-sparse AdamW step: update only the live blocks of a weight, in one pass.

One program per layout SLOT (``capacity`` programs, Note [Block layout]); a slot at or past
``live_count`` exits, so one compiled launch serves every mask of the bucket. A live block
(slot_row[s], col_idx[s]) is updated ROWS rows at a time, in fp32, with torch's AdamW
formulas (decoupled weight decay, bias-corrected moments):

    p *= 1 - lr * wd;  m += (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g * g
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Inactive blocks are never read or written. Under the Sparsifier's invariant (inactive
weights, gradients and moments exactly zero) dense AdamW leaves them at zero too, so the
two optimizers compute the same model; this one moves density x the bytes.
"""

import triton
import triton.language as tl


@triton.jit
def adamw_blocks_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr,
    stride_n, lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot >= tl.load(live_count_ptr):
        return
    block_row = tl.load(slot_row_ptr + slot)
    block_col = tl.load(col_idx_ptr + slot)
    cols = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        rows = block_row * BLOCK_SIZE + r0 + tl.arange(0, ROWS)
        offs = rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
        p = p * (1.0 - lr * weight_decay)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty))
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty))
