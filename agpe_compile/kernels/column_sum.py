"""Bias-gradient kernel: column sums of dY [M, N] -> partial sums [SPLIT, N] (fp32).

The bias gradient of ``Y = X W^T + b`` is ``dY.sum(0)``. Left to Inductor inside a
compiled training step, that sum was fused with the pointwise producer of dY (GELU's
backward), which then ran twice: the fused reduction kernel took 152 us per call for an
8192 x 8192 bf16 dY in the H200 profile of docs/benchmarks.md, where one read of dY at
the card's 4.8 TB/s peak bandwidth takes 28 us (arithmetic, not a measurement). As an
opaque user kernel this one cannot be fused: it reads dY once. Program (j, s) sums rows
[s * rows_per_split, (s + 1) * rows_per_split) of the BLOCK_N columns of tile j in a
[BLOCK_M, BLOCK_N] fp32 accumulator and writes one row of partial sums; the launcher adds
the SPLIT rows (no atomics, so the result is deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def column_sum_kernel(
    g_ptr, partial_ptr, M, N, rows_per_split, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = offs_n < N
    if EVEN_N:  # no column mask: the loads vectorise (N % BLOCK_N == 0, checked by the launcher)
        in_cols = tl.full((BLOCK_N,), 1, tl.int1)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + offs_m
        g = tl.load(g_ptr + m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=(m[:, None] < m_end) & in_cols[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(partial_ptr + split * N + offs_n, tl.sum(acc, axis=0), mask=in_cols)
