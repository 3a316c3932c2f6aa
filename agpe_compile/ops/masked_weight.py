"""``torch.ops.agpe.masked_weight``: W * M for weights consumed by fused attention ops.

``F.multi_head_attention_forward`` (and the eval fast path of ``nn.TransformerEncoderLayer``)
take ``in_proj_weight`` / ``out_proj.weight`` and run the linear layers inside one opaque
call, so there is no ``x @ W^T`` node to rewrite. The backend instead feeds them
``masked_weight(W, ...)``: same mask semantics, and the backward still fills the saliency
buffers (the gradient that reaches W*M is exactly the dense weight gradient). The compute
stays dense: these layers get no speed-up, and ``counters[0]`` (rows) is not advanced, so
FLOP accounting treats them as dense. ``explain`` reports them as ``masked_weight``.

Example::

    >>> wm = torch.ops.agpe.masked_weight(w, mask, sal, dgs, flag, counters, 32, "taylor")
"""

from __future__ import annotations

import torch

from . import reference
from .sparse_linear import _check_inputs, accumulate_scores


@torch.library.custom_op("agpe::masked_weight", mutates_args=())
def masked_weight(
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_size: int,
    saliency_mode: str,
) -> torch.Tensor:
    _check_inputs(weight[:1], weight, block_mask, block_size)
    return reference.masked_weight(weight, block_mask, block_size).contiguous()


# Both ops return contiguous tensors, and their fake kernels say so: a gradient that reaches
# W*M transposed (``einsum``, ``x @ W``) must not leave the real op's strides differing
# from the fake ones (Inductor checks them).
@masked_weight.register_fake
def _(weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_size, saliency_mode):
    return weight.new_empty(weight.shape)


@torch.library.custom_op(
    "agpe::masked_weight_backward", mutates_args=("saliency", "dense_grad_sq", "counters")
)
def masked_weight_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    saliency: torch.Tensor,
    dense_grad_sq: torch.Tensor,
    score_dense: torch.Tensor,
    counters: torch.Tensor,
    block_size: int,
    saliency_mode: str,
) -> torch.Tensor:
    grad_weight = grad * reference.expand_block_mask(block_mask, block_size, grad.dtype)
    scores = reference.block_scores(weight, grad_weight, block_size, saliency_mode) * block_mask
    dense_sq = reference.inactive_dense_grad_sq(grad, block_mask, block_size) * score_dense.to(torch.float32)
    accumulate_scores(scores, dense_sq, saliency, dense_grad_sq, counters, 0)
    return grad_weight.contiguous()


@masked_weight_backward.register_fake
def _(grad, weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_size, saliency_mode):
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    weight, block_mask, saliency, dense_grad_sq, score_dense, counters, block_size, mode = inputs
    ctx.save_for_backward(weight, block_mask)
    # The accumulators are mutated by every backward that uses them: saving them would trip
    # autograd's version check when one weight feeds several calls (see test_golden).
    ctx.accumulators = (saliency, dense_grad_sq, score_dense, counters)
    ctx.block_size = block_size
    ctx.saliency_mode = mode


def _backward(ctx, grad):
    weight, block_mask = ctx.saved_tensors
    saliency, dense_grad_sq, score_dense, counters = ctx.accumulators
    grad_weight = torch.ops.agpe.masked_weight_backward(
        grad, weight, block_mask, saliency, dense_grad_sq, score_dense, counters,
        ctx.block_size, ctx.saliency_mode,
    )
    return grad_weight, None, None, None, None, None, None, None


masked_weight.register_autograd(_backward, setup_context=_setup_context)
