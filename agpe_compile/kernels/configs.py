"""Launch configurations of the block-sparse kernels, kept out of the kernel bodies.

BLOCK_N (and the dW tile) is the layer's block size; what is tuned here is the tile
height BLOCK_M, the reduction step BLOCK_K inside a weight block, the launch group and
the Hopper pipeline (``num_warps``, ``num_stages``). The table is keyed by
(kernel, block size, element bytes).

Provenance: chosen for Hopper (H100/H200, 228 KB shared memory per SM) by shared-memory
and register arithmetic, and checked to compile for sm_90 (wgmma, no spills) with
Triton 3.9's ptxas on a CPU host (``python -m agpe_compile.kernels.aot``). Timed on an
H200 for block 128 / bf16 only (docs/benchmarks.md): the sweep kept the forward and dW
defaults within 2-3% of the best candidate and moved grad_input to 128 x 64 (-10%).
``benchmarks/kernels.py`` times the alternatives in ``CANDIDATES``; move winners here.
Shared memory per stage is (BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_SIZE) * bytes.

Example::

    >>> config_for("forward", 128, torch.bfloat16, interpret=False).block_m
    256
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

KERNELS = ("forward", "grad_input", "grad_weight", "grad_scores")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile and pipeline of one launch; ``block_k`` must divide the layer's block size."""

    block_m: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


_C = KernelConfig
# forward and grad_input walk a list of live blocks: their index load takes one pipeline
# stage, so num_stages=S keeps S-2 tiles in flight (seen in the sm_90 shared-memory sizes).
# 16-bit, blocks >= 64: 256 x b tiles, the shape of Triton's fast Hopper GEMM (128 x 256),
# because 128 x 128 x 64 steps need ~64 FLOP per byte of L2 traffic, near L2's limit.
# Key: (block size, element bytes).
_MATMUL: Dict[Tuple[int, int], KernelConfig] = {
    (128, 2): _C(256, 64, num_warps=8, num_stages=5),  # 3 x 48 KB, 188 registers
    (64, 2): _C(256, 64, num_warps=8, num_stages=5),  # 3 x 40 KB
    (32, 2): _C(128, 32, num_warps=4, num_stages=6),  # 4 x 10 KB
    (16, 2): _C(64, 16, num_warps=4, num_stages=5),
    (128, 4): _C(128, 32, num_warps=8, num_stages=5),  # tf32: 3 x 32 KB
    (64, 4): _C(128, 32, num_warps=4, num_stages=5),  # 3 x 24 KB
    (32, 4): _C(64, 32, num_warps=4, num_stages=5),
    (16, 4): _C(64, 16, num_warps=4, num_stages=5),
}
# grad_input overrides of _MATMUL, timed on an H200 (torch 2.11, triton 3.6, 2026-11-26,
# benchmarks/kernels.py sweep, 8192x4096 @ 16384x4096, d=0.25, bf16): 128 x 64 took 0.514 ms
# against 0.572 ms for the 256 x 64 forward tile.
_GRAD_INPUT: Dict[Tuple[int, int], KernelConfig] = {
    (128, 2): _C(128, 64, num_warps=8, num_stages=5),
}
# grad_weight / grad_scores: the tile is BLOCK_SIZE x BLOCK_SIZE (block_k = block size),
# block_m is the step of the M reduction; a plain loop keeps num_stages tiles in flight.
_BLOCK_GRAD: Dict[Tuple[int, int], KernelConfig] = {
    (128, 2): _C(64, 128, num_warps=8, num_stages=4),  # 4 x 32 KB
    (64, 2): _C(128, 64, num_warps=4, num_stages=4),  # 4 x 32 KB
    (32, 2): _C(128, 32, num_warps=4, num_stages=4),  # 4 x 16 KB
    (16, 2): _C(128, 16, num_warps=4, num_stages=4),
    (128, 4): _C(32, 128, num_warps=8, num_stages=4),  # 4 x 32 KB
    (64, 4): _C(64, 64, num_warps=4, num_stages=4),  # 4 x 32 KB
    (32, 4): _C(128, 32, num_warps=4, num_stages=4),
    (16, 4): _C(128, 16, num_warps=4, num_stages=4),
}
# Alternatives timed by ``benchmarks/kernels.py`` (bf16, block 128); the first is the default.
CANDIDATES: Dict[str, Tuple[KernelConfig, ...]] = {
    "forward": (_MATMUL[(128, 2)], _C(128, 64, num_warps=8, num_stages=5), _C(128, 128, num_warps=8, num_stages=4),
                _C(256, 32, num_warps=8, num_stages=6)),
    "grad_input": (_GRAD_INPUT[(128, 2)], _MATMUL[(128, 2)], _C(128, 128, num_warps=8, num_stages=4)),
    "grad_weight": (_BLOCK_GRAD[(128, 2)], _C(128, 128, num_warps=8, num_stages=3),
                    _C(32, 128, num_warps=4, num_stages=6)),
}
# The TMA kernels' own defaults (AGPE_TMA, Note [TMA by default] in launch.py), from the
# TMA sweep of the ninth session (H200, host descriptors, 8192x4096 @ 16384x4096, d=0.5,
# bf16, one run): forward 128 x 64 took 0.867 ms against 0.966 ms for the 256 x 64 tile;
# grad_input with 4 warps and 6 stages 0.888 ms against 0.940 ms. Keyed like _MATMUL.
_TMA: Dict[Tuple[str, int, int], KernelConfig] = {
    ("forward", 128, 2): _C(128, 64, num_warps=8, num_stages=5),
    ("grad_input", 128, 2): _C(128, 64, num_warps=4, num_stages=6),
}
# Configurations for the TMA candidates (kernels/forward_tma.py, grad_input_tma.py,
# grad_weight_tma.py), timed by ``benchmarks/kernels.py`` at d=0.5 on its first shape; all
# compile for sm_90 without spills and within shared memory (checked on a CPU host with
# kernels/aot.py). grad_weight's, first timed in the twenty-first session (H200, host
# descriptors, one run): 0.944 / 0.963 / 0.928 / 0.860 ms in the order below. Its default
# stays the first (the plain kernel's tile): the TMA kernels are off by default and showed
# no step gain (Note [TMA by default]), and the 32-row tile has not run with device
# descriptors.
TMA_CANDIDATES: Dict[str, Tuple[KernelConfig, ...]] = {
    "forward": (_MATMUL[(128, 2)], _C(256, 64, num_warps=8, num_stages=4), _C(128, 64, num_warps=8, num_stages=5),
                _C(128, 128, num_warps=8, num_stages=4), _C(256, 32, num_warps=8, num_stages=6)),
    "grad_input": (_GRAD_INPUT[(128, 2)], _C(256, 64, num_warps=8, num_stages=4), _C(128, 128, num_warps=8, num_stages=4),
                   _C(128, 64, num_warps=4, num_stages=6)),
    # grad_weight_tma.py (block_k unused: the tile is the block): BLOCK_M rows of the M
    # reduction per step, a dY and an X tile of BLOCK_M x 128 each per stage.
    "grad_weight": (_BLOCK_GRAD[(128, 2)], _C(128, 128, num_warps=8, num_stages=3),
                    _C(64, 128, num_warps=4, num_stages=5), _C(32, 128, num_warps=4, num_stages=6)),
}
# The interpreter runs each program in Python: few, large programs are fastest there.
_INTERPRETER = KernelConfig(block_m=64, block_k=0, group_m=2, num_warps=1, num_stages=1)


def config_for(kernel: str, block_size: int, dtype: torch.dtype, *, interpret: bool,
               tma: bool = False) -> KernelConfig:
    """The launch configuration of ``kernel`` for a layer's block size and dtype (``tma``:
    of its TMA variant, where it has its own)."""
    if kernel not in KERNELS:
        raise ValueError(f"agpe kernels: expected kernel in {KERNELS}, got {kernel!r}")
    if interpret:
        return dataclasses.replace(_INTERPRETER, block_k=block_size)
    if tma and (kernel, block_size, 4 if dtype == torch.float32 else 2) in _TMA:
        return _TMA[(kernel, block_size, 4 if dtype == torch.float32 else 2)]
    table = _MATMUL if kernel in ("forward", "grad_input") else _BLOCK_GRAD
    element_bytes = 4 if dtype == torch.float32 else 2
    if kernel == "grad_input" and (block_size, element_bytes) in _GRAD_INPUT:
        return _GRAD_INPUT[(block_size, element_bytes)]
    try:
        return table[(block_size, element_bytes)]
    except KeyError:
        sizes = sorted({size for size, _ in table})
        raise ValueError(f"agpe kernels: expected block_size in {sizes}, got {block_size}") from None
