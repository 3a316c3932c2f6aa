"""Zero the INACTIVE blocks of a weight in place, writing nothing else.

Keeps the promise of Note [Zero inactive weights] (ops/paths.py) after every optimizer
step for the layers whose dense path skips masking. One program per block of the R x C
grid: a live block (``block_slot >= 0``) exits after one load; an inactive one stores
zeros, ROWS rows at a time. So the cost is (1 - density) of the weight's bytes, written
only, where masking the weight reads and writes all of it.
"""

import triton
import triton.language as tl


@triton.jit
def zero_blocks_kernel(
    w_ptr, block_slot_ptr, num_block_cols, stride_wn, stride_wk,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
):
    block = tl.program_id(0)
    if tl.load(block_slot_ptr + block) >= 0:
        return
    block_row = block // num_block_cols
    block_col = block % num_block_cols
    offs_k = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    zeros = tl.zeros((ROWS, BLOCK_SIZE), dtype=w_ptr.dtype.element_ty)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        offs_n = block_row * BLOCK_SIZE + r0 + tl.arange(0, ROWS)
        tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, zeros)
