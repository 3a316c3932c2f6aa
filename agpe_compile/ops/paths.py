"""Which implementation runs a ``sparse_linear`` call: triton, gather or dense reference.

Decided per call from shapes, device and the layout's bucket capacity only (never from
tensor contents, so no host sync on GPU):

* CUDA, triton importable, dtype in {fp32, bf16, fp16}, block size 32/64/128, and the
  bucket below the crossover density of that block size: the Triton kernels.
* CPU: ``choose_cpu_path`` (a measured cost model, agpe_compile/kernels/cpu_gather.py)
  picks the gathered-block path or the dense reference.
* otherwise the dense reference ``F.linear(x, W*M)`` (cuBLAS/MKL on the masked weight):
  near full density this is the fastest, so agpe is never slower than dense by more
  than the masking. On CUDA its backward masks and scores the dense weight gradient in
  one fused Triton pass (kernels/mask_scores.py) instead of the reference's temporaries.

Every path computes the same function; tests/test_paths.py checks each against the
reference.
"""

from __future__ import annotations

import logging
from typing import Tuple

import torch

from agpe_compile import kernels
from agpe_compile.layout import BlockLayout
from agpe_compile.packed_layout import unpack

from . import dense_path, reference

TRITON_BLOCK_SIZES = (32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bucket capacity (fraction of blocks) at and above which CUDA uses the dense path.
# Measured on an H200 (torch 2.11, triton 3.6, bf16, 2026-11-26, benchmarks/kernels.py, two
# runs, shapes 8192x4096 @ 16384x4096 and 8192x16384 @ 4096x16384; docs/benchmarks.md):
# kernels fwd+bwd / cuBLAS at block 128: 0.95-1.04 at 0.75, 0.67-0.71 at 0.5; at block 64:
# 0.98-1.07 at 0.5, 0.71-0.76 at 0.35. Block 32 was not timed: it takes block 64's value
# (its tiles are smaller, so it cannot cross over later than 64).
GPU_DENSE_CROSSOVER = {32: 0.5, 64: 0.5, 128: 0.75}
# The same under AGPE_TMA=persistent for 16-bit weights on Hopper (Note [TMA by default] in
# kernels/launch.py), whose kernels are faster: on an H200 (twenty-fifth session, bf16, the
# three shapes of benchmarks/kernels.py) fwd+bwd / cuBLAS at block 128 was 0.87-0.95 at
# 0.75 (0.87-0.91 graphed) against 1.02 for the dense path, so block 128 runs the kernels
# up to the 0.75 bucket and the dense path only at full capacity. Blocks 32 and 64 were not
# timed with them: their plain values.
GPU_DENSE_CROSSOVER_PERSISTENT_TMA = {128: 1.0}

log = logging.getLogger(__name__)
_INT32_LIMIT = 2**31


def choose(x: torch.Tensor, weight: torch.Tensor, layout: BlockLayout) -> str:
    """``"triton"``, ``"gather"`` or ``"dense"`` for this call."""
    rows, cols = layout.grid_shape
    fraction = layout.capacity / (rows * cols)
    b = layout.block_size
    if x.device.type == "cuda":
        if fraction >= dense_from(b, x.device, weight.dtype):
            return "dense"  # by design: near full density cuBLAS on W*M is the fastest
        reason = _no_triton_reason(x, weight, b)
        if reason is None:
            return "triton"
        _warn_once(f"agpe: sparse_linear runs the dense path on CUDA because {reason}; "
                   f"no block-sparse speed-up for such layers")
        return "dense"
    if x.device.type == "cpu":
        if x.dtype not in TRITON_DTYPES or x.dtype != weight.dtype:  # the gathered path's dtypes (float64: dense)
            return "dense"
        m = max(1, x.numel() // x.shape[-1])
        n, k = weight.shape
        return kernels.choose_cpu_path(m, n, k, min(1.0, fraction), b)
    return "dense"


def _no_triton_reason(x: torch.Tensor, weight: torch.Tensor, block_size: int):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # what the int32 offsets reach: a strided input past its numel, the weight (audit BO)
    if max(kernels.extent(x), rows * weight.shape[0], kernels.extent(weight)) >= _INT32_LIMIT:
        return "its input, output or weight spans 2**31 or more elements (the kernels index with int32)"
    if block_size not in TRITON_BLOCK_SIZES:
        return f"block size {block_size} is not one of the kernels' {TRITON_BLOCK_SIZES}"
    if x.dtype not in TRITON_DTYPES or x.dtype != weight.dtype:
        return f"input/weight dtypes {x.dtype}/{weight.dtype} are not one of {TRITON_DTYPES} (both the same)"
    if not kernels.triton_available():
        return "triton is not installed"
    return None


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# Note [Zero inactive weights]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The dense path computes with W*M: one full pass over W in the forward and another for
# dX, both extra to cuBLAS's work. When the weight is exactly zero on every inactive
# block, W*M == W and both passes can go. The explicit Sparsifier (with an optimizer)
# keeps that true for the layers it manages and marks them ``LayerState.zero_inactive``,
# which the rewrite passes to the op as a static ``zero_inactive=True``:
#
# * every mask update re-zeroes all inactive blocks (controller/sparsifier.py);
# * after EVERY optimizer step a hook re-zeroes the inactive blocks of the layers that
#   may skip the masking (``may_skip_masking`` below: the lower crossover of any dtype,
#   AGPE_TMA setting and lowering), with a kernel that only writes inactive
#   blocks; so any optimizer (momentum, preconditioners that mix elements) and
#   ``load_state_dict`` of the module cannot leave a nonzero there. The same hook
#   re-zeroes every layer after a step of an optimizer that may write zero-gradient
#   entries, every layer the stepping optimizer holds (a gradient from outside the op can
#   reach inactive blocks; not after BlockSparseAdamW's block-sparse step, which never
#   writes them) and a layer that ran eagerly (zero_weights.py), so after each step every
#   inactive weight is zero;
# * not with LBFGS given to the Sparsifier, which evaluates the model inside its step after
#   moving the weights along its history: its layers get no flag and keep masking (an
#   LBFGS that replaces the Sparsifier's optimizer mid-run is warned about: the graphs
#   compiled with the flag cannot take it back).
#
# Only the dense path BY DENSITY (bucket at or above the crossover) skips the masking:
# those are exactly the layers the hook keeps zeroed; every other path reads live blocks
# only or masks as before. Without the flag (hand-edited masks, zero-code mode) nothing
# changes.
def skips_masking(layout: BlockLayout, device: torch.device, zero_inactive: bool,
                  dtype: torch.dtype = torch.float32) -> bool:
    """Whether a call with this layout (and a weight of ``dtype``) uses W unmasked (Note
    [Zero inactive weights])."""
    if not zero_inactive:
        return False
    rows, cols = layout.grid_shape
    return layout.capacity / (rows * cols) >= dense_from(layout.block_size, device, dtype)


def may_skip_masking(layout: BlockLayout, device: torch.device, zero_inactive: bool) -> bool:
    """Whether a compiled call with this layout MAY use W unmasked, whatever the dtype,
    AGPE_TMA setting, GPU or lowering it was compiled with: the step hook's test for
    re-zeroing (zero_weights.py). The op decides at trace time (skips_masking, with the
    weight's dtype and the setting then; the aot_eager lowering traces outside TMA), the hook
    at run time, so the hook takes the lower of the crossovers (re-audit BV: a layer at the
    0.75 bucket under AGPE_TMA=persistent lowered with inductor=False skipped masking while
    the hook, reading the setting, did not re-zero it)."""
    if not zero_inactive:
        return False
    rows, cols = layout.grid_shape
    fraction = layout.capacity / (rows * cols)
    if device.type == "cuda":
        b = layout.block_size
        plain = GPU_DENSE_CROSSOVER.get(b, 0.0)
        return fraction >= min(plain, GPU_DENSE_CROSSOVER_PERSISTENT_TMA.get(b, plain))
    return fraction >= dense_from(layout.block_size, device)


def dense_everywhere_from(block_size: int) -> float:
    """Smallest bucket capacity from which a layer of ``block_size`` runs the dense path on
    every device, for every dtype and AGPE_TMA setting (the largest of the crossovers):
    buckets from there up compute the same thing and are one for the layout (Note
    [Buckets no path tells apart] in buckets.py).

    >>> dense_everywhere_from(8), dense_everywhere_from(64), dense_everywhere_from(128)
    (0.0, 0.5, 1.0)
    """
    if block_size not in TRITON_BLOCK_SIZES:  # CUDA: no kernels for it
        cuda = 0.0
    else:
        plain = GPU_DENSE_CROSSOVER.get(block_size, 1.0)
        cuda = max(plain, GPU_DENSE_CROSSOVER_PERSISTENT_TMA.get(block_size, plain))
    return max(cuda, kernels.always_dense_from(block_size))


def dense_from(block_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Bucket capacity from which a layer runs the dense path by density on ``device``
    (for a weight of ``dtype``: on CUDA the crossover follows AGPE_TMA=persistent for 16-bit
    weights on Hopper, GPU_DENSE_CROSSOVER_PERSISTENT_TMA). On the CPU the cost model decides
    per call (from the row count too); this is where it picks the dense path for every row
    count, so the rule stays shape-only."""
    if device.type == "cuda":
        if kernels.persistent_tma_setting(device, dtype):
            return GPU_DENSE_CROSSOVER_PERSISTENT_TMA.get(block_size, GPU_DENSE_CROSSOVER.get(block_size, 0.0))
        return GPU_DENSE_CROSSOVER.get(block_size, 0.0)
    if device.type == "cpu":
        return kernels.always_dense_from(block_size)
    return 1.0


def forward(x, weight, bias, block_mask, layout: BlockLayout, path: str, zero_inactive: bool = False) -> torch.Tensor:
    if path == "triton":
        return kernels.block_sparse_forward(x, weight, layout, bias)
    if path == "gather":
        return kernels.gather_forward(x, weight, layout, bias)
    return dense_path.forward(x, weight, bias, block_mask, layout.block_size,
                              skips_masking(layout, x.device, zero_inactive, weight.dtype))


def grad_input(grad_out, weight, block_mask, layout: BlockLayout, path: str, zero_inactive: bool = False) -> torch.Tensor:
    if path == "triton":
        return kernels.block_sparse_grad_input(grad_out, weight, layout)
    if path == "gather":
        return kernels.gather_grad_input(grad_out, weight, layout)
    return dense_path.grad_input(grad_out, weight, block_mask, layout.block_size,
                                 skips_masking(layout, grad_out.device, zero_inactive, weight.dtype))


def grad_weight_and_scores(
    grad_out, x, weight, block_mask, layout: BlockLayout, score_dense, mode: str, path: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked dW, this call's block scores, this call's inactive dense-grad scores).

    The scores are fresh tensors: the caller adds them to the running sums only if they
    are finite (see ops/sparse_linear.py).
    """
    grid = layout.grid_shape
    b = layout.block_size
    if path in ("triton", "gather"):
        scores = torch.zeros(grid, dtype=torch.float32, device=x.device)
        fn = kernels.block_sparse_grad_weight if path == "triton" else kernels.gather_grad_weight
        grad_weight = fn(grad_out, x, layout, weight=weight, saliency=scores, saliency_mode=mode)
        dense_sq = torch.zeros(grid, dtype=torch.float32, device=x.device)
        if path == "triton":
            kernels.inactive_grad_sq_(grad_out, x, layout, dense_sq, enabled=score_dense)
        elif bool(score_dense):  # CPU: reading the flag costs no device sync
            _, _, dense = reference.backward(grad_out, x, weight, block_mask, b, False, True)
            dense_sq = reference.inactive_dense_grad_sq(dense, block_mask, b)
        return grad_weight, scores, dense_sq
    if x.device.type == "cuda" and _no_triton_reason(x, weight, b) is None:
        # cuBLAS for the whole gradient, then one fused pass masks it and scores its blocks.
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        scores = torch.zeros(grid, dtype=torch.float32, device=x.device)
        dense_sq = torch.zeros(grid, dtype=torch.float32, device=x.device)
        kernels.mask_and_score_(grad_weight, weight, layout, saliency=scores, saliency_mode=mode,
                                dense_grad_sq=dense_sq, enabled=score_dense)
        return grad_weight, scores, dense_sq
    return dense_path.grad_weight_and_scores(grad_out, x, weight, block_mask, b, score_dense, mode)


def layout_of(block_layout: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> BlockLayout:
    return unpack(block_layout, tuple(block_mask.shape), block_size)
