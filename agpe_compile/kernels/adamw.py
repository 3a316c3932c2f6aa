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

The step count t and the learning rate come either as numbers from the host (the bias
corrections precomputed in double) or, for CUDA-graph capture (``capturable``), from 0-d
device tensors read by every program (STEP_ON_DEVICE, LR_ON_DEVICE; each independently):
a replayed graph then sees the step the optimizer counted on the device and the learning
rate a scheduler wrote into the tensor, as torch's capturable AdamW does. On the device
the corrections 1 - beta^t are computed in fp64 from log(beta) (``log_betas``, computed
on the host in double).
"""

import triton
import triton.language as tl


@triton.jit
def adamw_blocks_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, slot_row_ptr, col_idx_ptr, live_count_ptr, step_ptr, lr_ptr, log_betas_ptr,
    stride_n, lr, beta1, beta2, eps, weight_decay, inv_bias_correction1, bias_correction2_sqrt,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, STEP_ON_DEVICE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
):
    slot = tl.program_id(0)
    if slot >= tl.load(live_count_ptr):
        return
    rate = lr
    if LR_ON_DEVICE:
        rate = tl.load(lr_ptr).to(tl.float32)
    inv_correction1 = inv_bias_correction1
    correction2_sqrt = bias_correction2_sqrt
    if STEP_ON_DEVICE:
        # 1 - beta^t in fp64 from log(beta) computed on the host in double: in fp32,
        # 1 - exp(t * log(beta)) cancels (beta2 = 0.9999 lost 2e-4 relative).
        t = tl.load(step_ptr).to(tl.float64)
        inv_correction1 = (1.0 / (1.0 - tl.exp(t * tl.load(log_betas_ptr)))).to(tl.float32)
        correction2_sqrt = tl.sqrt(1.0 - tl.exp(t * tl.load(log_betas_ptr + 1))).to(tl.float32)
    size = rate * inv_correction1
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
        p = p * (1.0 - rate * weight_decay)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - size * m / (tl.sqrt(v) / correction2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty))
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty))
