"""Input-gradient kernel with TMA loads: a candidate beside grad_input.py, not the default.

Same work as grad_input.py (one [BLOCK_M, BLOCK_SIZE] tile of dX per program, walking the
live block rows of one block column of W), with the dY and W tiles fetched through
host-built ``TensorDescriptor``s (one bulk asynchronous copy per tile on Hopper; see
forward_tma.py). ``benchmarks/kernels.py`` times it beside the default on a GPU.

Two entry points share the loop: ``*_tma_kernel`` takes host-built descriptors (eager only:
torch.compile's ``wrap_triton`` drops such arguments, checked with torch 2.13, so the
launcher refuses traced calls) and ``*_tma_device_kernel`` builds them on the device from
plain pointers (traceable; Triton then needs a scratch allocator, set by the launcher).
"""

import triton
import triton.language as tl

from .common import dot_acc, grouped_tile


@triton.jit
def grad_input_tma_kernel(
    dy_desc, w_desc, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M, num_block_cols, stride_dxm, stride_dxk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    _grad_input_tile(dy_desc, w_desc, dx_ptr, col_ptr_ptr, row_idx_ptr, M, num_block_cols, stride_dxm, stride_dxk,
                     tl.program_id(0), BLOCK_SIZE, BLOCK_M, BLOCK_K, GROUP_M, INPUT_PRECISION, UPCAST)


@triton.jit
def grad_input_tma_device_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M, N, K, num_block_cols, stride_dym, stride_wn, stride_dxm, stride_dxk,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The same with descriptors built on the device (traceable; see forward_tma.py), once
    per program for tiles pid, pid + P, ... (Note [Persistent TMA programs] there)."""
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_K, BLOCK_SIZE])
    num_tiles = tl.cdiv(M, BLOCK_M) * num_block_cols
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        _grad_input_tile(dy_desc, w_desc, dx_ptr, col_ptr_ptr, row_idx_ptr, M, num_block_cols, stride_dxm,
                         stride_dxk, tile, BLOCK_SIZE, BLOCK_M, BLOCK_K, GROUP_M, INPUT_PRECISION, UPCAST)


@triton.jit
def _grad_input_tile(
    dy_desc, w_desc, dx_ptr, col_ptr_ptr, row_idx_ptr,
    M, num_block_cols, stride_dxm, stride_dxk, tile,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    steps_per_block = BLOCK_SIZE // BLOCK_K
    pid_m, block_col = grouped_tile(tile, tl.cdiv(M, BLOCK_M), num_block_cols, GROUP_M)
    m0 = pid_m * BLOCK_M
    k0 = block_col * BLOCK_SIZE
    first = tl.load(col_ptr_ptr + block_col)
    last = tl.load(col_ptr_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for step in range(first * steps_per_block, last * steps_per_block):
        block_row = tl.load(row_idx_ptr + step // steps_per_block)
        n = block_row * BLOCK_SIZE + (step % steps_per_block) * BLOCK_K
        dy = dy_desc.load([m0, n])  # [BLOCK_M, BLOCK_K]
        w = w_desc.load([n, k0])  # [BLOCK_K, BLOCK_SIZE]: W's rows as stored
        acc = dot_acc(dy, w, acc, INPUT_PRECISION, UPCAST)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_SIZE)
    dx = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
