"""The plain-torch reference of the block-sparse linear layer: CPU path and test oracle.

Every fast path (Triton kernels, the CPU gathered-block path) is checked against these
functions, which compute the dense layer with the inactive blocks of the weight set to
zero ("dense-with-zeros"). They run on any device.

Note [Saliency buffers]
~~~~~~~~~~~~~~~~~~~~~~~
A layer with weight W [N, K] and block size b has a block grid of R x C = N/b x K/b.
Its backward adds, per block, into two float32 [R, C] buffers (running sums that the
controller reads and resets):

* ``saliency`` += score of each block, from W and the masked gradient G = (dY^T X) * M:
  taylor: sum |W*G|, gradient: sum |G|, magnitude: sum |W|, movement: sum -(W*G).
  Inactive blocks score 0 in every mode (the scores are multiplied by the mask).
* ``dense_grad_sq`` += squared Frobenius norm of the DENSE gradient dY^T X of each
  inactive block, and only when the 0-d ``score_dense`` flag is true. This is what
  regrowth (RigL-style) needs; active blocks get 0 here.

Tiny example, b = 1, W = [[2, 0]], M = [[1, 0]], X = [[1, 3]], dY = [[1]]:
dense dW = [[1, 3]], masked G = [[1, 0]], taylor saliency += [[2, 0]],
dense_grad_sq += [[0, 9]] when the flag is set.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def expand_block_mask(block_mask: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, C] block mask -> [R*b, C*b] element mask of ``dtype``.

    >>> expand_block_mask(torch.tensor([[True, False]]), 2, torch.float32)
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.]])
    """
    rows, cols = block_mask.shape
    b = block_size
    return block_mask.to(dtype)[:, None, :, None].expand(rows, b, cols, b).reshape(rows * b, cols * b)


def block_sum(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum an [N, K] tensor over b x b blocks -> [N/b, K/b] (float32)."""
    n, k = values.shape
    b = block_size
    return values.float().reshape(n // b, b, k // b, b).sum(dim=(1, 3))


def apply_block_mask(values: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values * expand_block_mask(...)`` in one pass: the [R, C] mask is broadcast over a
    [R, b, C, b] view, so no [N, K] mask is materialised.

    >>> apply_block_mask(torch.ones(2, 4), torch.tensor([[True, False]]), 2)
    tensor([[1., 1., 0., 0.],
            [1., 1., 0., 0.]])
    """
    n, k = values.shape
    rows, cols = block_mask.shape
    b = block_size
    blocks = values.reshape(rows, b, cols, b)
    return (blocks * block_mask.to(values.dtype).view(rows, 1, cols, 1)).reshape(n, k)


def masked_weight(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    return apply_block_mask(weight, block_mask, block_size)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    block_mask: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Y = X @ (W*M)^T + bias, for X of shape [..., K]."""
    return torch.nn.functional.linear(x, masked_weight(weight, block_mask, block_size), bias)


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    need_input_grad: bool,
    need_weight_grad: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dX, masked dW, dense dW) of the layer; None where not needed.

    The dense dW is returned so the caller can score inactive blocks without a second
    matmul; fast paths compute only the active blocks and score the others separately.
    """
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_input = None
    if need_input_grad:
        grad_input = (grad_2d @ masked_weight(weight, block_mask, block_size)).reshape(x.shape)
    grad_weight = dense_grad = None
    if need_weight_grad:
        dense_grad = grad_2d.t() @ x.reshape(-1, x.shape[-1])
        grad_weight = apply_block_mask(dense_grad, block_mask, block_size)
    return grad_input, grad_weight, dense_grad


def block_scores(
    weight: torch.Tensor, grad_weight: torch.Tensor, block_size: int, mode: str
) -> torch.Tensor:
    """Per-block saliency of one backward call; see Note [Saliency buffers]."""
    if mode == "taylor":
        return block_sum((weight * grad_weight).abs(), block_size)
    if mode == "gradient":
        return block_sum(grad_weight.abs(), block_size)
    if mode == "magnitude":
        return block_sum(weight.abs(), block_size)
    if mode == "movement":
        return block_sum(-(weight * grad_weight), block_size)
    raise ValueError(f"agpe: saliency mode {mode!r} is not one of taylor/gradient/magnitude/movement")


def inactive_dense_grad_sq(
    dense_grad: torch.Tensor, block_mask: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Squared Frobenius norm of the dense gradient on inactive blocks, 0 on active ones."""
    return block_sum(dense_grad.float().square(), block_size) * torch.logical_not(block_mask).float()
