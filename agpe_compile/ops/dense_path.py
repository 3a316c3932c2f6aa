"""The dense path off the Triton kernels: the reference's function with fewer passes over W.

The dense path runs ``F.linear`` / matmuls on the whole weight (MKL on the CPU, cuBLAS on
CUDA layers the kernels do not take). Next to the matmuls the reference spends up to eight
elementwise passes over an [N, K] tensor per training step (mask W twice, mask dW, the
score's product, ``abs``, block sums, the dense-gradient square and its sums), which on a
CPU cost more than the three matmuls themselves (Note [Dense path passes]).

Note [Dense path passes]
~~~~~~~~~~~~~~~~~~~~~~~~
Measured on the project's 2-core CI CPU (torch 2.13.0, fp32, 1000 x 1000 weight, block 8,
128 rows, 2026-11-27, ``python benchmarks/cpu_layer.py``): the op's forward + backward on
the reference's formulas took 9.2 ms against 3.3 ms for ``F.linear`` with autograd at full
density; with this module 5.4 ms against 2.8 ms (docs/benchmarks.md). It computes the same
values with:

* no masking of W when every block is live, or when the layer keeps its inactive weights
  at zero (``unmasked``: Note [Zero inactive weights] in ops/paths.py);
* the masked dW made in place in the fresh matmul output when the dense gradient is not
  needed afterwards (the dense-gradient flag is off or every block is live), or, at low
  density, computed on the live blocks only, on the scoring steps too (Note [CPU sampled
  dW] in ops/sampled_grad.py);
* block sums as two contiguous reductions (rows of a block, then its columns) instead of
  one reduction over a strided 4-D view, and ``abs`` in place;
* the inactive blocks' dense-gradient norms only when the flag is set.

Where the tensors can be read without cost (CPU tensors, not being traced) the flag and
"every block live" are read on the host; elsewhere (a traced body) the code keeps to
shape-only decisions and multiplies by the flag like the reference. Each function here is
tested against ops/reference.py, which stays the oracle (tests/test_dense_path.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from . import bsr_path, reference, sampled_grad
from .mask_cache import derived


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s contents costs nothing: a real CPU tensor (no sync, no trace)."""
    return t.device.type == "cpu" and not is_fake(t)


def all_live(block_mask: torch.Tensor, block_size: int) -> bool:
    """Every block active (read on the host; callers check :func:`host_readable` first;
    once per mask contents, Note [Mask-derived tensors])."""
    return derived(block_mask, block_size, "all_live", lambda: bool(block_mask.all()))


def forward(x, weight, bias, block_mask, block_size: int, unmasked: bool) -> torch.Tensor:
    if host_readable(block_mask) and not all_live(block_mask, block_size):
        if bsr_path.worth_it(x, weight, block_mask, block_size, bias):  # Note [CPU block-sparse products]
            return bsr_path.forward(x, weight, bias, block_mask, block_size)
    elif not unmasked and host_readable(block_mask):  # every block live
        unmasked = True
    w = weight if unmasked else masked_weight(weight, block_mask, block_size)
    return torch.nn.functional.linear(x, w, bias)


def grad_input(grad_out, weight, block_mask, block_size: int, unmasked: bool) -> torch.Tensor:
    if host_readable(block_mask) and not all_live(block_mask, block_size):
        if bsr_path.worth_it(grad_out, weight, block_mask, block_size):  # Note [CPU block-sparse products]
            return bsr_path.grad_input(grad_out, weight, block_mask, block_size)
    elif not unmasked and host_readable(block_mask):  # every block live
        unmasked = True
    w = weight if unmasked else masked_weight(weight, block_mask, block_size)
    return (grad_out.reshape(-1, grad_out.shape[-1]) @ w).reshape(*grad_out.shape[:-1], weight.shape[1])


def grad_weight_and_scores(
    grad_out, x, weight, block_mask, block_size: int, score_dense, mode: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked dW, block scores, inactive dense-grad scores) like ops/paths.py's contract."""
    b = block_size
    if not host_readable(block_mask):  # traced or on a device: shape-only, the reference's formulas
        dense = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_weight = _zeros_outside(dense, block_mask, b)
        scores = reference.block_scores(weight, grad_weight, b, mode) * block_mask
        dense_sq = reference.inactive_dense_grad_sq(dense, block_mask, b)
        dense_sq = torch.where(score_dense.to(torch.bool), dense_sq, torch.zeros_like(dense_sq))  # (inf * 0: NaN)
        return grad_weight, scores, dense_sq
    flag = bool(score_dense)
    live = all_live(block_mask, b)
    sampled = not live and sampled_grad.worth_it(grad_out, x, block_mask, b)  # Note [CPU sampled dW]
    dense = None
    if flag or not sampled:
        dense = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    dense_sq = inactive_grad_sq(dense, block_mask, b) if flag and not live else None
    if sampled:  # (also on scoring steps: dW's bits do not depend on the scoring flag)
        grad_weight = sampled_grad.grad_weight(grad_out, x, block_mask, b)
    else:  # `dense` is no longer needed: mask it in place
        grad_weight = dense if live else _mask_in_place(dense, block_mask, b)
    if live or not _few_live(block_mask, b):
        scores = block_scores(weight, grad_weight, b, mode)
        if mode == "magnitude" and not live:
            scores = scores * block_mask
    else:
        scores = live_block_scores(weight, grad_weight, block_mask, b, mode)
    if dense_sq is None:
        dense_sq = torch.zeros_like(scores)
    return grad_weight, scores, dense_sq


def block_sum(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``reference.block_sum`` as two contiguous reductions: [N, K] -> [N/b, K/b] float32."""
    n, k = values.shape
    b = block_size
    values = values.float()
    return values.reshape(n // b, b, k).sum(1).reshape(n // b, k // b, b).sum(2)


def block_scores(weight, grad_weight, block_size: int, mode: str) -> torch.Tensor:
    """``reference.block_scores`` with the product's ``abs`` in place."""
    if mode == "taylor":
        return block_sum((weight * grad_weight).abs_(), block_size)
    if mode == "gradient":
        return block_sum(grad_weight.abs(), block_size)
    if mode == "magnitude":
        return block_sum(weight.abs(), block_size)
    if mode == "movement":
        return block_sum((weight * grad_weight).neg_(), block_size)
    raise ValueError(f"agpe: saliency mode {mode!r} is not one of taylor/gradient/magnitude/movement")


# Up to this fraction of live blocks, scoring gathers the live blocks (two gathers of that
# fraction of W and dW) instead of passing over all of W and dW (CPU, fp32, 1000 x 1000,
# block 8: the gathers cost about what one full elementwise pass does at 0.3).
GATHER_SCORES_BELOW = 0.3


def _few_live(block_mask: torch.Tensor, block_size: int) -> bool:
    live = derived(block_mask, block_size, "live_count", lambda: int(block_mask.sum()))
    return live <= GATHER_SCORES_BELOW * block_mask.numel()


def live_block_scores(weight, grad_weight, block_mask, block_size: int, mode: str) -> torch.Tensor:
    """:func:`block_scores` computed on the live blocks only (inactive blocks score 0)."""
    rows, cols, runs = derived(block_mask, block_size, "live_runs", lambda: _live_runs(block_mask, block_size))
    r, c = block_mask.shape
    b = block_size
    scores = torch.zeros(r, c, dtype=torch.float32, device=weight.device)

    def blocks(t):  # [live, b * b]: the live blocks' b-long row runs, one index_select
        return t.reshape(-1, b).index_select(0, runs).view(-1, b * b)

    if mode == "taylor":
        values = (blocks(weight) * blocks(grad_weight)).abs_()
    elif mode == "gradient":
        values = blocks(grad_weight).abs_()
    elif mode == "magnitude":
        values = blocks(weight).abs_()
    elif mode == "movement":
        values = (blocks(weight) * blocks(grad_weight)).neg_()
    else:
        raise ValueError(f"agpe: saliency mode {mode!r} is not one of taylor/gradient/magnitude/movement")
    scores.index_put_((rows, cols), values.float().sum(dim=1))
    return scores


# Note [Gathering live blocks]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Scoring at low density reads the live blocks only. Advanced indexing of an [R, b, C, b]
# view (``t.reshape(R, b, C, b)[rows, :, cols, :]``) computes each element's offset in a
# loop whose innermost run is b long; ``index_select`` of the [R*b*C, b] view with the flat
# indices of the live blocks' rows copies whole b-long runs. The magnitude scores of a
# 1000 x 1000 fp32 weight at block 8 took ~100 us against ~225 us at density 0.1, ~190
# against ~490 us at 0.25 (one thread, 2026-11-29,
# benchmarks/results/2026-11-29-cpu-step-session31/elementwise_time.txt). The run indices
# are int64, one per b weights of a live block (8/b bytes per live weight: 1 byte at block
# 8, against 4 for an fp32 weight), kept with the mask's other derived tensors.
def _live_runs(block_mask: torch.Tensor, block_size: int):
    """(rows, cols, runs): the live blocks' grid positions and, block by block, the indices
    of their b row runs in a [R*b*C, b] view of a weight (Note [Gathering live blocks])."""
    rows, cols = block_mask.nonzero(as_tuple=True)
    c = block_mask.shape[1]
    b = block_size
    lines = torch.arange(b, device=block_mask.device)
    runs = ((rows[:, None] * b + lines[None, :]) * c + cols[:, None]).reshape(-1)
    return rows, cols, runs


def inactive_grad_sq(dense_grad, block_mask, block_size: int) -> torch.Tensor:
    """``reference.inactive_dense_grad_sq`` (squared block norms, 0 on active blocks)."""
    inactive = derived(block_mask, block_size, "inactive_float", lambda: torch.logical_not(block_mask).float())
    return block_sum(dense_grad.float().square(), block_size) * inactive


def row_mask(block_mask: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, C] block mask -> [R, 1, C*b] mask of ``dtype``: each block's value repeated along
    its columns, to broadcast over the b rows of a block row (an [R, b, K] view of W).
    Built once per mask contents (Note [Mask-derived tensors]): do not write into it."""
    rows, cols = block_mask.shape

    def build() -> torch.Tensor:  # a copy: a view would hold the mask, whose entry then never goes
        return block_mask.to(dtype).view(rows, cols, 1).expand(rows, cols, block_size).reshape(
            rows, 1, cols * block_size).clone()

    return derived(block_mask, block_size, ("row_mask", dtype), build)


# Note [Row-broadcast masks]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``reference.apply_block_mask`` broadcasts the [R, C] mask over an [R, b, C, b] view: its
# innermost run is b elements, so on the CPU the elementwise loop barely vectorises
# (block 8, 1000 x 1000 fp32, one thread: ~500 us for the in-place product, 1,100-1,370 us
# for the ``masked_fill_`` of the zero hook). Expanding the mask along the columns first (an
# [R, 1, K] tensor, 1/b of W's size, built in ~90 us, once per mask contents: Note
# [Mask-derived tensors]) makes the innermost run K long: ~60 us for the same product
# (benchmarks/results/2026-11-29-cpu-step-session31/elementwise_time.txt). The values are
# the reference's to the bit (each element is multiplied by the same 1 or 0). The zero
# hook clears inactive blocks with a bitwise AND on W's integer view (0 or all ones per
# element): NaN and inf become +0.0, like ``masked_fill_``, at the product's speed (~60 us).
# Only host-readable (CPU) tensors take these forms; traced bodies keep the reference's.
def masked_weight(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``reference.masked_weight`` (``W * M``), with a row-broadcast mask for CPU tensors."""
    if not (host_readable(weight) and weight.is_contiguous()):
        return reference.masked_weight(weight, block_mask, block_size)
    n, k = weight.shape
    rows = block_mask.shape[0]
    return (weight.view(rows, block_size, k) * row_mask(block_mask, block_size, weight.dtype)).view(n, k)


# The gradient's inactive blocks are written with zeros, not multiplied by 0: a 16-bit dense
# gradient that overflowed there only (inputs that feed pruned blocks alone) would be NaN
# (inf * 0), skip the call's scores and a GradScaler step, where the kernels and the gathered
# path, which never compute those blocks, give 0 (helper audit BO).
def _mask_in_place(values: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    if zero_weight_blocks_(values, block_mask, block_size) is None:  # not contiguous
        return _zeros_outside(values, block_mask, block_size)
    return values


def _zeros_outside(values: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values`` with zeros on the inactive blocks, out of place (traceable)."""
    n, k = values.shape
    rows, cols = block_mask.shape
    keep = block_mask.reshape(rows, 1, cols, 1)
    blocks = values.reshape(rows, block_size, cols, block_size)
    return torch.where(keep, blocks, torch.zeros((), dtype=values.dtype, device=values.device)).reshape(n, k)


_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_weight_blocks_(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> Optional[torch.Tensor]:
    """Write zeros into the inactive blocks in one pass (NaN and inf there too, unlike
    ``W *= M``) when the weight is contiguous; None otherwise. Every block live: nothing
    to write (read on the host for CPU tensors)."""
    if not weight.is_contiguous():
        return None
    if host_readable(block_mask) and all_live(block_mask, block_size):
        return weight
    n, k = weight.shape
    rows = block_mask.shape[0]
    int_dtype = _INT_VIEWS.get(weight.element_size())
    if weight.is_floating_point() and int_dtype is not None and not weight.is_complex():
        # all ones (-1) on live blocks, 0 on inactive ones: AND keeps or clears every bit
        keep = derived(block_mask, block_size, ("keep", int_dtype),
                       lambda: row_mask(block_mask, block_size, int_dtype).neg())  # (cached: not in place)
        weight.view(int_dtype).view(rows, block_size, k).bitwise_and_(keep)
        return weight
    weight.view(rows, block_size, k).masked_fill_(derived(
        block_mask, block_size, "drop", lambda: torch.logical_not(row_mask(block_mask, block_size, torch.bool))), 0)
    return weight
