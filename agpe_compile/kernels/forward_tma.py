"""Forward kernel with tensor-memory-accelerator (TMA) loads: a candidate, not the default.

Same work as forward.py (one [BLOCK_M, BLOCK_SIZE] tile of Y per program, walking the live
block columns of one block row of W), but the X and W tiles come through host-built
``TensorDescriptor``s: on Hopper each tile is one bulk asynchronous copy instead of
per-thread address arithmetic and loads, which is how the fastest Triton GEMMs feed wgmma.
The forward kernel runs at 56-66% of cuBLAS's FLOP rate on an H200 (docs/benchmarks.md),
the weakest of the three; ``benchmarks/kernels.py`` times this variant beside it on a GPU.
Rows past M are zero-filled by the TMA unit; the epilogue store is masked.

Two entry points share the loop: ``*_tma_kernel`` takes host-built descriptors (eager only:
torch.compile's ``wrap_triton`` drops such arguments, checked with torch 2.13, so the
launcher refuses traced calls) and ``*_tma_device_kernel`` builds them on the device from
plain pointers (traceable; Triton then needs a scratch allocator, set by the launcher).

Note [Persistent TMA programs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Building a descriptor on the device costs a global-memory write of the tensormap and a
fence before its first use. With one tile per program (``tma="device"``) every program
pays that: on an H200 the device-descriptor kernels took 0.83-0.98x the plain kernels'
time where the host-descriptor ones took 0.79-0.82x (forward; twenty-first session,
docs/benchmarks.md). So the device kernels loop over tiles, ``tile = pid, pid + P, ...``
for a grid of P programs: the launcher's ``tma="device"`` keeps one tile per program (P =
the tile count, the loop runs once), ``tma="persistent"`` launches about one program per
SM (``persistent_programs`` in launch.py) that builds its descriptors once and walks ~the
tile count / SMs tiles in the grouped order. The dW kernel walks the live slots the same
way (``slot = pid, pid + P, ... < live count``), so its persistent grid also skips the
padded slots' programs. Same arithmetic in the same order per tile: the results equal the
one-tile-per-program launch bit for bit (tests/test_kernels.py). On an H200 (twenty-fifth
session) the persistent forward took 0.72-0.92x the plain kernel's time, the device
variant 0.77-0.96x, the host variant 0.76-0.86x (docs/benchmarks.md).
"""

import triton
import triton.language as tl

from .common import dot_acc, grouped_tile


@triton.jit
def forward_tma_kernel(
    x_desc, w_desc, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, num_block_rows, stride_ym, stride_yn,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    _forward_tile(x_desc, w_desc, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr, M, num_block_rows, stride_ym, stride_yn,
                  tl.program_id(0), BLOCK_SIZE, BLOCK_M, BLOCK_K, GROUP_M, HAS_BIAS, INPUT_PRECISION, UPCAST)


@triton.jit
def forward_tma_device_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, K, N, num_block_rows, stride_xm, stride_wn, stride_ym, stride_yn,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The same with descriptors built on the device: plain pointer arguments, so the
    launch can be traced (``wrap_triton``); needs Triton's scratch allocator. Each program
    builds them once and computes tiles pid, pid + P, ... (Note [Persistent TMA programs])."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_SIZE, BLOCK_K])
    num_tiles = tl.cdiv(M, BLOCK_M) * num_block_rows
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        _forward_tile(x_desc, w_desc, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr, M, num_block_rows, stride_ym,
                      stride_yn, tile, BLOCK_SIZE, BLOCK_M, BLOCK_K, GROUP_M, HAS_BIAS, INPUT_PRECISION, UPCAST)


@triton.jit
def _forward_tile(
    x_desc, w_desc, bias_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, num_block_rows, stride_ym, stride_yn, tile,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    steps_per_block = BLOCK_SIZE // BLOCK_K
    pid_m, block_row = grouped_tile(tile, tl.cdiv(M, BLOCK_M), num_block_rows, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = block_row * BLOCK_SIZE
    first = tl.load(row_ptr_ptr + block_row)
    last = tl.load(row_ptr_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for step in range(first * steps_per_block, last * steps_per_block):
        block_col = tl.load(col_idx_ptr + step // steps_per_block)
        k = block_col * BLOCK_SIZE + (step % steps_per_block) * BLOCK_K
        x = x_desc.load([m0, k])  # [BLOCK_M, BLOCK_K]
        w = w_desc.load([n0, k])  # [BLOCK_SIZE, BLOCK_K]: W's rows as stored
        acc = dot_acc(x, w.T, acc, INPUT_PRECISION, UPCAST)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_SIZE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
