"""``torch.ops.agpe.sparse_linear``: the op every rewritten linear layer calls.

Two ops, each running the fastest path for its device (ops/paths.py) without touching
the graph rewrite:

* ``agpe::sparse_linear(x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense,
  counters, block_layout, block_size, saliency_mode, zero_inactive=False) -> y`` -- pure
  forward, mutates nothing.
* ``agpe::sparse_linear_backward(grad_out, x, weight, block_mask, saliency, dense_grad_sq,
  score_dense, counters, block_layout, block_size, saliency_mode, need_input_grad,
  need_weight_grad, zero_inactive=False) -> (grad_input, grad_weight)`` -- mutates
  ``saliency``, ``dense_grad_sq`` and ``counters`` (declared in ``mutates_args``), see Note
  [Saliency buffers] in reference.py.

``zero_inactive=True`` promises that the weight is exactly zero on every inactive block
(Note [Zero inactive weights] in ops/paths.py): the dense path then skips masking W.

``block_layout`` is the packed index buffer of the mask (Note [Packed layout]); the call
wrapper keeps it in sync with ``block_mask``. The backward adds the rows it saw to
``counters[0]`` (for FLOP accounting) and a call's scores only when all of them are
finite; otherwise it adds no scores and increments ``counters[1]``, so one overflowing
mixed-precision step cannot poison the running sums. All of this is decided on tensors:
toggling ``score_dense`` or hitting a non-finite gradient never recompiles.

Lowering (Note [Triton op lowering]): both are ``torch.library.triton_op`` when triton is
installed. On CUDA their bodies (Triton launchers through ``wrap_triton``, or cuBLAS plus
the fused mask-and-score kernel above the crossover density) are traced by AOTAutograd,
so Inductor sees and schedules the Triton kernels as user-defined kernels next to its own.
Every other device calls the opaque host ops ``agpe::sparse_linear_host`` /
``agpe::sparse_linear_backward_host`` (the CPU paths may read tensor contents, e.g. the
scoring flag, which a traced body must not). Without triton both public ops are plain
opaque custom ops with the same schema.

Example::

    >>> y = torch.ops.agpe.sparse_linear(x, w, None, mask, sal, dgs, flag, counters, layout, 32, "taylor")
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from agpe_compile import kernels

from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..env import switch
from . import dense_path, paths

_EMPTY = (0,)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"agpe.sparse_linear: expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"agpe.sparse_linear: expected input with last dim {k} (weight {tuple(weight.shape)}), "
            f"got input shape {tuple(x.shape)}"
        )
    expected = (n // block_size, k // block_size)
    if n % block_size or k % block_size or tuple(block_mask.shape) != expected:
        raise ValueError(
            f"agpe.sparse_linear: expected a block mask of shape {expected} for weight "
            f"{tuple(weight.shape)} and block size {block_size}, got {tuple(block_mask.shape)}"
        )
    if block_mask.dtype != torch.bool:
        raise ValueError(f"agpe.sparse_linear: expected a bool block mask, got {block_mask.dtype}")


def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_layout: torch.Tensor,
    block_size: int,
    saliency_mode: str,
    zero_inactive: bool = False,
) -> torch.Tensor:
    _check_inputs(x, weight, block_mask, block_size)
    layout = paths.layout_of(block_layout, block_mask, block_size)
    return paths.forward(x, weight, bias, block_mask, layout, paths.choose(x, weight, layout), zero_inactive)


def _backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_layout: torch.Tensor,
    block_size: int,
    saliency_mode: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    zero_inactive: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    layout = paths.layout_of(block_layout, block_mask, block_size)
    path = paths.choose(x, weight, layout)
    if path == "triton" and kernels.extent(grad_out) >= 2**31:  # a strided dY reaching past int32 offsets
        grad_out = grad_out.contiguous()  # (its numel is below 2**31: choose() checked rows * N; audit BP)
    grad_input = x.new_empty(_EMPTY)
    grad_weight = weight.new_empty(_EMPTY)
    if need_input_grad:
        grad_input = paths.grad_input(grad_out, weight, block_mask, layout, path, zero_inactive)
    if need_weight_grad:
        grad_weight, scores, dense_sq = paths.grad_weight_and_scores(
            grad_out, x, weight, block_mask, layout, score_dense, saliency_mode, path
        )
        accumulate_scores(scores, dense_sq, saliency, dense_grad_sq, counters, x.numel() // x.shape[-1])
    return grad_input, grad_weight


def accumulate_scores(scores, dense_sq, saliency, dense_grad_sq, counters, rows: int) -> None:
    """Add one call's scores to the running sums if all are finite, else count a skip.

    counters += [rows, not finite] in ONE in-place op on the whole buffer: two updates of
    its slices compiled to two more kernel launches per layer and step on the GPU (ninth
    session's Inductor code), and launches are what a non-graphed step's host time is.
    Where the tensors can be read for free (real CPU tensors, nothing tracing) the same sums
    are made with the flag read on the host, in a third of the small ops (Note [Host ops in
    place] in eager_lowering.py)."""
    if dense_path.host_readable(scores) and _get_current_dispatch_mode() is None and not torch.compiler.is_compiling():
        counters[0] += rows
        if _all_finite(scores) and _all_finite(dense_sq):
            saliency.add_(scores)
            dense_grad_sq.add_(dense_sq)
        else:
            counters[1] += 1
        return
    finite = torch.isfinite(scores).all() & torch.isfinite(dense_sq).all()
    saliency.add_(torch.where(finite, scores, torch.zeros_like(scores)))
    dense_grad_sq.add_(torch.where(finite, dense_sq, torch.zeros_like(dense_sq)))
    first = torch.arange(2, device=counters.device) == 0
    counters.add_(torch.where(first, rows, torch.logical_not(finite).to(counters.dtype)))


def _all_finite(t: torch.Tensor) -> bool:
    """Every element of a host-readable ``t`` finite. A NaN or an infinity makes the sum
    non-finite, so a finite sum settles it in one reduction (2.6 us against 35 us for
    ``isfinite(t).all()`` on a 125 x 125 grid); a non-finite sum of finite elements (an
    overflow) is told apart by the exact check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


_MUTATED = ("saliency", "dense_grad_sq", "counters")

# Host ops: opaque to tracing; every non-CUDA call (and every call without triton) runs here.
sparse_linear_host = torch.library.custom_op("agpe::sparse_linear_host", _forward_impl, mutates_args=())
sparse_linear_backward_host = torch.library.custom_op(
    "agpe::sparse_linear_backward_host", _backward_impl, mutates_args=_MUTATED)


@sparse_linear_host.register_fake
def _(x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
      block_size, saliency_mode, zero_inactive=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@sparse_linear_backward_host.register_fake
def _(grad_out, x, weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
      block_size, saliency_mode, need_input_grad, need_weight_grad, zero_inactive=False):
    # Contiguous, as every path returns them (empty_like would copy a non-contiguous x's
    # strides, e.g. the transposed output of nn.MultiheadAttention(batch_first=True)).
    grad_input = x.new_empty(x.shape) if need_input_grad else x.new_empty(_EMPTY)
    grad_weight = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(_EMPTY)
    return grad_input, grad_weight


# Set AGPE_INLINE_KERNELS=0 (or false/off/no; before import; agpe_compile/env.py) to keep the ops opaque on CUDA too: the host ops
# then launch the same kernels eagerly, and Inductor schedules around one opaque call.
INLINE_KERNELS = switch("AGPE_INLINE_KERNELS")
# Devices whose calls trace the op's body (below) instead of calling the opaque host op.
# Only CUDA in use; tests add "cpu" to run the traced body's tracing on CI machines.
TRACED_DEVICES = ("cuda",)


def _run_directly(x: torch.Tensor) -> bool:
    """Real CPU tensors, no tracing and no dispatch mode: run the host implementation
    without going through the opaque host op, whose custom-op dispatch costs ~0.1 ms a call
    (Note [Dense path passes] in ops/dense_path.py). Anything traced still meets the opaque
    op, so no graph ever records the implementation's data-dependent choices."""
    return (x.device.type not in TRACED_DEVICES and dense_path.host_readable(x)
            and _get_current_dispatch_mode() is None and not torch.compiler.is_compiling())


# Note [Triton op lowering]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# ``triton_op`` registers the body itself as the fake kernel and, under AOTAutograd's
# FunctionalTensorMode, decomposes the op into its body. So the body must be traceable
# with fake tensors: on CUDA it only looks at shapes and the layout's bucket (never at
# tensor contents) and launches kernels through ``wrap_triton`` (kernels/runtime.py);
# off CUDA it calls the opaque host op, which becomes one node of the traced graph.
def _lowered_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_layout: torch.Tensor,
    block_size: int,
    saliency_mode: str,
    zero_inactive: bool = False,
) -> torch.Tensor:
    if _run_directly(x):
        return _forward_impl(x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense, counters,
                             block_layout, block_size, saliency_mode, zero_inactive)
    if x.device.type not in TRACED_DEVICES or not INLINE_KERNELS:
        return torch.ops.agpe.sparse_linear_host(x, weight, bias, block_mask, saliency, dense_grad_sq,
                                                 score_dense, counters, block_layout, block_size, saliency_mode,
                                                 zero_inactive)
    return _forward_impl(x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense, counters,
                         block_layout, block_size, saliency_mode, zero_inactive)


def _lowered_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_layout: torch.Tensor,
    block_size: int,
    saliency_mode: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    zero_inactive: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if _run_directly(x):
        return _backward_impl(grad_out, x, weight, block_mask, saliency, dense_grad_sq, score_dense, counters,
                              block_layout, block_size, saliency_mode, need_input_grad, need_weight_grad,
                              zero_inactive)
    if x.device.type not in TRACED_DEVICES or not INLINE_KERNELS:
        return torch.ops.agpe.sparse_linear_backward_host(
            grad_out, x, weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
            block_size, saliency_mode, need_input_grad, need_weight_grad, zero_inactive)
    return _backward_impl(grad_out, x, weight, block_mask, saliency, dense_grad_sq, score_dense, counters,
                          block_layout, block_size, saliency_mode, need_input_grad, need_weight_grad, zero_inactive)


def _dense_bias_grad(grad_out: torch.Tensor) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


# Note [Bias gradient]
# ~~~~~~~~~~~~~~~~~~~~
# ``dY.sum(0)`` traced as an aten op lets Inductor fuse the sum with dY's pointwise
# producer (GELU's backward before fc1), which then runs twice; in the H200 profile of the
# training step that fused reduction took 152 us per call for an 8192 x 8192 dY. On
# traced devices the bias gradient is ``agpe::bias_grad``, whose body launches a column-sum
# kernel that reads the materialised dY once (kernels/column_sum.py); elsewhere it is the
# same ``sum`` as before.
def _lowered_bias_grad(grad_out: torch.Tensor) -> torch.Tensor:
    if (grad_out.device.type in TRACED_DEVICES and INLINE_KERNELS and grad_out.dtype in paths.TRITON_DTYPES
            and grad_out.dim() >= 2 and kernels.extent(grad_out) < 2**31):  # the kernel indexes with int32
        return kernels.bias_grad(grad_out)
    return _dense_bias_grad(grad_out)


if kernels.triton_available():
    sparse_linear = torch.library.triton_op("agpe::sparse_linear", _lowered_forward, mutates_args=())
    sparse_linear_backward = torch.library.triton_op("agpe::sparse_linear_backward", _lowered_backward,
                                                     mutates_args=_MUTATED)
    bias_grad = torch.library.triton_op("agpe::bias_grad", _lowered_bias_grad, mutates_args=())
else:  # same schema, opaque: the host ops' implementations serve every device
    sparse_linear = torch.library.custom_op("agpe::sparse_linear", _lowered_forward, mutates_args=())
    sparse_linear_backward = torch.library.custom_op("agpe::sparse_linear_backward", _lowered_backward,
                                                     mutates_args=_MUTATED)
    sparse_linear.register_fake(_lowered_forward)
    sparse_linear_backward.register_fake(_lowered_backward)
    bias_grad = _dense_bias_grad  # no kernels: the plain sum


def _setup_context(ctx, inputs, output) -> None:
    (x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
     block_size, mode, *rest) = inputs
    ctx.zero_inactive = bool(rest[0]) if rest else False
    ctx.save_for_backward(x, weight, block_mask, block_layout)
    # The accumulators are mutated by every backward that uses them: saving them would trip
    # autograd's version check when one weight feeds several calls (see test_golden).
    ctx.accumulators = (saliency, dense_grad_sq, score_dense, counters)
    ctx.block_size = block_size
    ctx.saliency_mode = mode
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, block_mask, block_layout = ctx.saved_tensors
    saliency, dense_grad_sq, score_dense, counters = ctx.accumulators
    need_input_grad, need_weight_grad, need_bias_grad = ctx.needs_input_grad[:3]
    grad_input, grad_weight = torch.ops.agpe.sparse_linear_backward(
        grad_out, x, weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
        ctx.block_size, ctx.saliency_mode, need_input_grad, need_weight_grad, ctx.zero_inactive,
    )
    grad_bias = None
    if ctx.has_bias and need_bias_grad:
        grad_bias = bias_grad(grad_out)  # Note [Bias gradient]
    return (
        grad_input if need_input_grad else None,
        grad_weight if need_weight_grad else None,
        grad_bias,
        None, None, None, None, None, None, None, None, None,
    )


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
