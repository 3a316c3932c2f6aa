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
not off), for blocks of 8, 16 and 32, when the live fraction is at most :func:`max_density`,
which depends on the weight's size, the call's rows and the thread count (measured below). The steps that score the inactive blocks (``score_dense`` set) compute
the whole dense product for those norms as well, and still take dW from the sampled
product: dW's last bits then never depend on the scoring flag (zero-code mode under
gradient accumulation sets it on other micro-batches than the explicit Sparsifier, and the
two stay bit-identical, tests/test_zero_code_backend.py). The pattern and positions hold 20 bytes
per live weight (int64 column indices and positions, fp32 values), five times the live fp32
weights' own size (half the dense weight's at density 0.1), kept while the mask's contents
stay the same.
"""

from __future__ import annotations

import warnings

import torch

from . import bsr_path
from .mask_cache import derived

# Where the sampled product beats the dense one masked in place: one layer's
# dense_path.grad_weight_and_scores with the sampled dW against the same call with it off,
# interleaved in one process, best of 10 rounds (benchmarks/results/2026-11-29-cpu-sampled-dw-
# envelope-session34/: weights 128 x 128 to 2048 x 2048, 32-8192 rows, blocks 8 / 16 / 32,
# live fractions 0.1 and 0.16; 2-core AMD EPYC VM, torch 2.13.0+cpu). The thirty-second
# session's bound, 0.16 everywhere, came from weights of 1000 x 784 and more, up to 2048 rows,
# against a dense product masked by a materialized mask (slower than the code's): audit CR
# found the sampled dW 1.9x slower on a 128 x 128 weight with 8192 rows. sampled / dense, best
# of the rounds, by class (ranges.py, ranges.txt there):
# * one thread: 128 x 128 lost everywhere (1.01-2.84). At 128-2048 rows weights from 600k
#   elements won at 0.1 (0.48-0.65) and at 0.16 (0.70-0.94), from 256 x 256 at 0.1
#   (0.61-0.99; at 0.16 5 of 30 lost); at 32 rows 0.16 lost everywhere (1.07-1.25) and 0.1 won
#   from 600k elements (0.77-0.89); at 4096 rows 0.1 won from 600k (0.58-0.77), at 8192 from
#   1000 x 784 (0.78-0.90); 0.16 lost at 4096 and 8192 rows (4 of 5 and 5 of 5 from 600k).
# * two threads (the dense product uses both, the sampled one barely): from 1000 x 784 at
#   128-4096 rows 0.1 won (0.61-0.83) and 0.16 tied (0.77-1.10, 5 of 16 lost); smaller weights
#   lost at 0.1 in 16 of 24 cases (0.85-2.83), 32 rows in 3 of 6 (from 600k), 8192 rows in 3 of
#   4 (from 1000 x 784).
# Each row: (fewest rows, most rows, fewest weight elements, bound); the first that holds
# applies (fewer than 32 rows were not measured). A bound of 0.105 takes in the 0.1 bucket's rounding, 0.16 the 0.15 bucket's. More
# threads, blocks other than 8, 16 and 32 (32 only from 1024 x 1024 elements, _BLOCK_32_FROM) and shapes outside these rows were not measured: there the
# dense product stays.
_ENVELOPE = {
    1: ((32, 127, 600_000, 0.105), (128, 2048, 600_000, 0.16), (128, 2048, 65_536, 0.105),
        (2049, 4096, 600_000, 0.105), (4097, 8192, 784_000, 0.105)),
    2: ((128, 4096, 784_000, 0.105),),
}
BLOCK_SIZES = (8, 16, 32)
_BLOCK_32_FROM = 1024 * 1024  # blocks of 32 were measured on 1024 x 1024 and 2048 x 2048 only


def max_density(rows: int, weight_numel: int, threads: int, block_size: int) -> float:
    """Live-block fraction up to which the sampled dW is faster than the dense one, for a
    call of ``rows`` rows on a weight of ``weight_numel`` elements with ``threads`` intra-op
    threads and blocks of ``block_size`` (0 where it was not measured or lost)."""
    if block_size not in BLOCK_SIZES or (block_size == 32 and weight_numel < _BLOCK_32_FROM):
        return 0.0
    for low, high, numel, bound in _ENVELOPE.get(max(threads, 1), ()):
        if low <= rows <= high and weight_numel >= numel:
            return bound
    return 0.0


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
    return torch.zeros(n * k, dtype=values.dtype, device=values.device).index_copy_(0, positions, values).view(n, k)


def _pattern(block_mask: torch.Tensor, block_size: int):
    """(CSR pattern of the live blocks' elements, their flat positions in the weight), built
    from the live blocks' coordinates (expanding the mask to the weight's shape and scanning
    it took 4-5 ms for the main job's layers, 0.7 ms this way; rebuilt after every mask
    update, benchmarks/results/2026-11-29-cpu-step-after-update-session33/)."""
    r, c = block_mask.shape
    b, k = block_size, c * block_size
    device = block_mask.device  # explicit: a default device (torch.device(...) context) must not move these
    rows, cols = block_mask.nonzero(as_tuple=True)  # the live blocks, row-major
    counts = torch.bincount(rows, minlength=r)  # live blocks per block row
    starts = torch.cumsum(counts, 0) - counts  # index of each block row's first live block
    lines = torch.arange(b, device=device)
    line, element = lines[None, :, None], lines[None, None, :]  # [1, b, 1] (row in block), [1, 1, b]
    # the element (line j, column t) of the live block (i, col) lies at this position in W ...
    position = (rows[:, None, None] * b + line) * k + cols[:, None, None] * b + element
    # ... and at this index in the CSR order: block row i, then line j, then i's live blocks in
    # column order, then t
    index = ((starts[rows] * (b * b))[:, None, None] + line * (counts[rows] * b)[:, None, None]
             + ((torch.arange(rows.numel(), device=device) - starts[rows]) * b)[:, None, None] + element)
    positions = torch.empty(position.numel(), dtype=torch.int64, device=device)
    positions[index.reshape(-1)] = position.reshape(-1)
    crow = torch.zeros(r * b + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum((counts * b).repeat_interleave(b), 0)
    values = torch.ones(positions.numel(), dtype=torch.float32, device=device)
    pattern = torch.sparse_csr_tensor(crow, positions % k, values, (r * b, k), device=device,
                                      check_invariants=False)
    return pattern, positions


def _silence_first_warnings() -> None:
    """Build one CSR tensor and product at import, so the format's once-per-process "in beta"
    warning never reaches the user (agpe chose the format; at import for the reason
    bsr_path._silence_first_warnings gives)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks are implicitly)")
        cpu = torch.device("cpu")  # named: an import under a default-device context stays on the CPU
        pattern = _pattern(torch.ones(1, 1, dtype=torch.bool, device=cpu), 1)[0]
        torch.sparse.sampled_addmm(pattern, torch.ones(1, 1, device=cpu), torch.ones(1, 1, device=cpu), beta=0.0)


if bsr_path.ENABLED:
    _silence_first_warnings()
