"""``BlockSparseAdamW``: AdamW whose step touches only the live blocks of agpe weights.

Dense AdamW reads and writes every element of every weight on every step (parameter,
gradient and both moments: ~14 bytes per bf16 element), whatever the masks say. On a
block-sparse model that is most of the optimizer's time spent on blocks whose weight,
gradient and moments are all exactly zero. This subclass of ``torch.optim.AdamW`` updates
each agpe weight (a parameter with a LayerState, see agpe_compile/state.py) with one
Triton kernel over its live blocks (agpe_compile/kernels/adamw.py) and hands every other
parameter (biases, norms, embeddings, dense layers) to AdamW unchanged.

Equivalence. With the Sparsifier's invariant -- an inactive block's weight, gradient and
moments are exactly zero, and a regrown block's moments are reset -- dense AdamW leaves
inactive blocks at zero, so both optimizers train the same model (the kernel rounds once
from fp32 where foreach AdamW rounds after each op: equal up to that rounding). Without
the Sparsifier (masks edited by hand), inactive blocks keep whatever weight and moments
they had instead of decaying; the model is the same, since masked blocks are not used.

The state has AdamW's keys (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, the
Sparsifier's moment reset and ``load_state_dict`` work as with AdamW. Not supported on
the sparse path: ``amsgrad``, ``maximize``, ``differentiable`` (such groups raise).
Parameters off CUDA (unless the Triton interpreter is on) take the dense AdamW path, as
do weights whose block size is not one of 16, 32, 64 and 128 (blocks of 8 and smaller too).

CUDA graphs. With ``capturable=True`` (as for torch's AdamW) the step count lives on the
device and the kernel reads it, and a tensor ``lr`` is read there too: the whole
optimizer step can be captured and replayed by :class:`agpe_compile.GraphedStep`
(``fused=True, capturable=True`` gives the other parameters torch's fused capturable
path). Without it the bias correction is computed on the host from the step count, and
capture is refused. A float ``lr`` is baked into a captured graph (as with torch's
optimizers): give a 0-d tensor ``lr`` on the parameters' device to a scheduler that changes
it between replays. ``load_state_dict`` replaces the parameter groups with the saved ones,
``capturable`` included (as torch's AdamW does): set ``group["capturable"] = True`` again
after loading a checkpoint saved without it. With ``capturable=True`` the parameters that
take AdamW's own path (biases, norms) must be on a GPU, as torch requires.

Example::

    >>> optimizer = agpe_compile.BlockSparseAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    >>> sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(target_sparsity=0.9))
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch

from . import kernels
from .state import LayerState, state_of

_SPARSE_BLOCK_SIZES = (16, 32, 64, 128)
_UNSUPPORTED = ("amsgrad", "maximize", "differentiable")


class BlockSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with a live-blocks-only step for agpe weights (see module doc)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        for group in self.param_groups:
            bad = [name for name in _UNSUPPORTED if group.get(name)]
            if bad:
                raise ValueError(f"BlockSparseAdamW: expected {bad[0]}=False (not supported), got True")
        self.sparse_updates = 0  # parameters stepped on the block-sparse path, cumulative
        # ids of the parameters the last step updated on the block-sparse path: it wrote none of
        # their inactive blocks, so the Sparsifier's step hook need not re-zero them (zero_weights.py)
        self.sparse_stepped: frozenset = frozenset()
        self._layouts = {}
        self._log_betas = {}  # (device, beta1, beta2) -> kernels.adamw_log_betas, for capture

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
                and not all(group.get("capturable", False) for group in self.param_groups)):
            raise RuntimeError(
                "agpe.BlockSparseAdamW cannot be captured in a CUDA graph without capturable=True: its bias "
                "correction is then computed on the host from the step count. Create it with "
                "BlockSparseAdamW(..., fused=True, capturable=True) for agpe_compile.GraphedStep")
        sparse: List[Tuple[torch.Tensor, torch.Tensor, dict, LayerState]] = []
        for group in self.param_groups:
            # groups added or loaded after __init__ are checked here too
            bad = [name for name in _UNSUPPORTED if group.get(name)]
            if bad:
                raise ValueError(f"BlockSparseAdamW: expected {bad[0]}=False in every parameter group (not "
                                 f"supported), got True")
            for param in group["params"]:
                state = state_of(param)
                if param.grad is not None and state is not None and _sparse_ok(param, state):
                    sparse.append((param, param.grad, group, state))
            if group.get("capturable", False):
                _check_capturable_group(group, {id(p) for p, _, _, _ in sparse})
        for param, _, _, _ in sparse:  # hidden from AdamW's dense step, restored below
            param.grad = None
        try:
            super().step()
        finally:
            for param, grad, _, _ in sparse:
                param.grad = grad
        self.sparse_stepped = frozenset()
        for param, grad, group, layer in sparse:
            self._sparse_step(param, grad, group, layer)
        self.sparse_stepped = frozenset(id(param) for param, _, _, _ in sparse)
        return loss

    def _sparse_step(self, param: torch.Tensor, grad: torch.Tensor, group: dict, layer: LayerState) -> None:
        state = self.state[param]
        capturable = group.get("capturable", False)
        lr = group["lr"]  # checked before the step count moves
        if isinstance(lr, torch.Tensor):
            if capturable:
                if lr.dim() != 0 or lr.device != param.device:
                    raise ValueError(f"BlockSparseAdamW: with capturable=True, expected lr as a float or a 0-d "
                                     f"tensor on {param.device}, got a tensor of shape {tuple(lr.shape)} on "
                                     f"{lr.device}")
                if not lr.is_floating_point():
                    lr = lr.float()
            else:
                lr = float(lr)
        if len(state) == 0:
            # as torch's AdamW: the step count on the device when capturable, else on the host
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if capturable else "cpu")
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif capturable and state["step"].device != param.device:  # loaded from a host checkpoint
            state["step"] = state["step"].to(param.device, torch.float32)
        state["step"] += 1
        layer.sync_layout()
        beta1, beta2 = group["betas"]
        step = state["step"] if capturable else int(state["step"].item())
        log_betas = None
        if capturable:
            key = (param.device, float(beta1), float(beta2))
            log_betas = self._log_betas.get(key)
            if log_betas is None:  # made on the first (eager) step, reused inside a capture
                log_betas = self._log_betas[key] = kernels.adamw_log_betas(beta1, beta2, param.device)
        kernels.block_sparse_adamw_(
            param, grad, state["exp_avg"], state["exp_avg_sq"], self._layout(layer), lr=lr, beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step, log_betas=log_betas,
        )
        self.sparse_updates += 1

    def _layout(self, layer: LayerState):
        """The layer's BlockLayout, unpacked once per layout buffer: its views follow the
        in-place edits of ``sync_layout``; a bucket crossing brings a new buffer."""
        cached = self._layouts.get(id(layer))
        if cached is None or cached[0] is not layer.block_layout:
            cached = (layer.block_layout, layer.layout())
            self._layouts[id(layer)] = cached
        return cached[1]


def _check_capturable_group(group: dict, sparse_ids) -> None:
    """torch's capturable AdamW asserts that its parameters are on a GPU; say which ones."""
    on_cpu = [tuple(p.shape) for p in group["params"]
              if p.grad is not None and id(p) not in sparse_ids and p.device.type == "cpu"]
    if on_cpu:
        raise ValueError(f"BlockSparseAdamW: capturable=True needs the parameters that take AdamW's own path "
                         f"(not agpe weights: biases, norms, embeddings) on a GPU; got CPU parameters of shapes "
                         f"{on_cpu[:4]}{' ...' if len(on_cpu) > 4 else ''}")


def _sparse_ok(param: torch.Tensor, layer: LayerState) -> bool:
    if not kernels.triton_available() or layer.block_size not in _SPARSE_BLOCK_SIZES:
        return False
    if param.device.type != "cuda" and not (param.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    grad = param.grad
    return (param.dtype in (torch.float32, torch.bfloat16, torch.float16) and param.is_contiguous()
            and grad.dtype == param.dtype and grad.is_contiguous() and not grad.is_sparse
            and param.dim() == 2 and tuple(param.shape) == tuple(layer.weight.shape))
