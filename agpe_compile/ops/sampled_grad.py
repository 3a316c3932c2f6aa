"""dW of a sparse CPU layer as a sampled product: dY^T X on the live blocks' elements only.

Note [CPU sampled dW]
~~~~~~~~~~~~~~~~~~~~~
The CPU dense path (ops/dense_path.py) computes dW = dY^T X in full and then writes zeros
into the inactive blocks: at density 0.1 nine tenths of that product are thrown away, and
with the forward and dX on MKL's block-sparse products (Note [CPU block-sparse products])
it was the largest product left in a sparse layer's step. ``torch.sparse.sampled_addmm``
computes ``(dY^T X)`` only where a CSR pattern has entries: the pattern here is every
element of the live blocks (built once per mask contents, Note [Mask-derived tensors],
with the elements' flat positions), and its values are copied into a dense-shaped zero
tensor, which is the masked dW the dense path returns (zeros on the inactive blocks,
exact, as its in-place masking writes them).

Taken under the same conditions as the BSR products (fp32, real strided CPU tensors, no
trace, dispatch mode, torch.func transform, CPU autocast or autograd caller, AGPE_CPU_BSR
not 0), for any block size of 8 and more, when the live fraction is at most
:func:`max_density`. The steps that score the inactive blocks (``score_dense`` set) compute
the whole dense product for those norms as well, and still take dW from the sampled
product: dW's last bits then never depend on the scoring flag (zero-code mode under
gradient accumulation sets it on other micro-batches than the explicit Sparsifier, and the
two stay bit-identical, tests/test_zero_code_backend.py). The pattern and positions hold 20 bytes
per live weight (int64 column indices and positions, fp32 values), about twice the live
weights' own size, kept while the mask's contents stay the same.
"""

from __future__ import annotations

import warnings

import torch

from . import bsr_path
from .mask_cache import derived

# Live fraction up to which the sampled product beats the dense one masked in place (one
# layer's dW, fp32, best of 7; benchmarks/results/2026-11-29-cpu-sampled-dw-session32/:
# weights 1000 x 784, 1000 x 1000 and 2048 x 2048, blocks 8 / 16 / 32, 32-2048 rows, 2-core
# AMD EPYC VM, torch 2.13.0+cpu). sampled / dense on one thread: 0.08-0.47 at density 0.05,
# 0.14-0.63 at 0.1, 0.26-0.88 at 0.15, 0.63-1.09 at 0.2, 0.99-1.54 at 0.3; on two threads
# 0.10-0.47, 0.38-0.80, 0.20-0.94, 0.64-1.64, 0.36-1.70. The bound keeps to the densities
# where every measured layer won (0.16 takes in the 0.15 bucket's rounding). More threads
# and blocks under 8 were not measured: there the dense product stays.
_MAX_DENSITY = 0.16
MIN_BLOCK_SIZE = 8


def max_density(rows: int, weight_numel: int, threads: int, block_size: int) -> float:
    """Live-block fraction up to which the sampled dW is faster than the dense one (0 where
    it was not measured)."""
    if block_size < MIN_BLOCK_SIZE or threads > 2:
        return 0.0
    return _MAX_DENSITY


def worth_it(grad_out: torch.Tensor, x: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> bool:
    """Whether the sampled dW beats the dense product for this call; reads the mask on the
    host: call only where dense_path.host_readable holds."""
    if not bsr_path.ENABLED or grad_out.dtype != torch.float32 or x.dtype != torch.float32:
        return False
    if not (bsr_path._plain(grad_out) and bsr_path._plain(x)) or x.numel() == 0:
        return False
    if not bsr_path.plain_call(grad_out, x):
        return False
    live = derived(block_mask, block_size, "live_count", lambda: int(block_mask.sum()))
    rows = x.numel() // x.shape[-1]
    numel = grad_out.shape[-1] * x.shape[-1]
    return live <= max_density(rows, numel, torch.get_num_threads(), block_size) * block_mask.numel()


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(dY^T X) with zeros on the inactive blocks, computed on the live blocks only."""
    n, k = grad_out.shape[-1], x.shape[-1]
    pattern, positions = derived(block_mask, block_size, "sampled_dw", lambda: _pattern(block_mask, block_size))
    dy = grad_out.reshape(-1, n)
    values = torch.sparse.sampled_addmm(pattern, dy.t(), x.reshape(-1, k), beta=0.0).values()
    return torch.zeros(n * k, dtype=values.dtype).index_copy_(0, positions, values).view(n, k)


def _pattern(block_mask: torch.Tensor, block_size: int):
    """(CSR pattern of the live blocks' elements, their flat positions in the weight), built
    from the live blocks' coordinates (expanding the mask to the weight's shape and scanning
    it took 4-5 ms for the main job's layers, 0.7 ms this way; rebuilt after every mask
    update, benchmarks/results/2026-11-29-cpu-step-after-update-session33/)."""
    r, c = block_mask.shape
    b, k = block_size, c * block_size
    rows, cols = block_mask.nonzero(as_tuple=True)  # the live blocks, row-major
    counts = torch.bincount(rows, minlength=r)  # live blocks per block row
    starts = torch.cumsum(counts, 0) - counts  # index of each block row's first live block
    lines = torch.arange(b)
    line, element = lines[None, :, None], lines[None, None, :]  # [1, b, 1] (row in block), [1, 1, b]
    # the element (line j, column t) of the live block (i, col) lies at this position in W ...
    position = (rows[:, None, None] * b + line) * k + cols[:, None, None] * b + element
    # ... and at this index in the CSR order: block row i, then line j, then i's live blocks in
    # column order, then t
    index = ((starts[rows] * (b * b))[:, None, None] + line * (counts[rows] * b)[:, None, None]
             + ((torch.arange(rows.numel()) - starts[rows]) * b)[:, None, None] + element)
    positions = torch.empty(position.numel(), dtype=torch.int64)
    positions[index.reshape(-1)] = position.reshape(-1)
    crow = torch.zeros(r * b + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum((counts * b).repeat_interleave(b), 0)
    values = torch.ones(positions.numel(), dtype=torch.float32)
    pattern = torch.sparse_csr_tensor(crow, positions % k, values, (r * b, k), check_invariants=False)
    return pattern, positions


def _silence_first_warnings() -> None:
    """Build one CSR tensor and product at import, so the format's once-per-process "in beta"
    warning never reaches the user (agpe chose the format; at import for the reason
    bsr_path._silence_first_warnings gives)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks are implicitly)")
        pattern = _pattern(torch.ones(1, 1, dtype=torch.bool), 1)[0]
        torch.sparse.sampled_addmm(pattern, torch.ones(1, 1), torch.ones(1, 1), beta=0.0)


if bsr_path.ENABLED:
    _silence_first_warnings()
