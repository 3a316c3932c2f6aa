"""Zero the optimizer's per-element state of blocks that were pruned or regrown.

A pruned block must stay exactly zero: its masked gradient is 0, but SGD momentum or
Adam's ``exp_avg`` would keep moving it. A regrown block must start from zero, not from
moments it collected before it was pruned. So at every mask update, every optimizer state
tensor shaped like the weight (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``; likewise RMSprop, Adagrad...) is reset on the changed
blocks to the value a fresh parameter starts from: zero, except Rprop's ``step_size`` (the
group's ``lr``) and Adagrad's ``sum`` (its ``initial_accumulator_value``); a zeroed Rprop
step size would clamp to ``step_sizes[0]`` and leave a regrown block ~1000x slower.
Per-parameter scalars (Adam's ``step``) cannot be reset per block and are left: a regrown
block's bias correction is then that of an old parameter, and for its first few hundred
steps it moves up to 3-6x as far per step as a fresh parameter would (helper audit CV,
constant gradient, regrown at step 2,000: 2.9x at its first step, 6.1x at its tenth).
A per-element step count reset with the moments lowered char_lm ``--quick`` agpe-75's
validation loss by 0.07-0.62 % over 3 seeds
(benchmarks/results/2026-11-29-cpu-adam-regrowth-session36/): small, so not done here.

Example::

    >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)   # after a step
    >>> zero_optimizer_state(opt, w, torch.tensor([[True, False]]), block_size=2)
    ['momentum_buffer']
"""

from __future__ import annotations

from typing import List, Optional

import torch

from agpe_compile.ops.reference import expand_block_mask


def zero_optimizer_state(optimizer: Optional[torch.optim.Optimizer], weight: torch.Tensor,
                         blocks: torch.Tensor, block_size: int) -> List[str]:
    """Reset ``weight``'s optimizer state on ``blocks`` (bool [R, C]) to its fresh value; the keys touched."""
    if optimizer is None:
        return []
    state = optimizer.state.get(weight)
    if not state:
        return []
    touched = []
    element_mask = None
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == weight.shape:
            fresh = _fresh_value(optimizer, weight, key)
            if not _fill_blocks_(value, blocks, block_size, fresh):
                if element_mask is None:
                    element_mask = expand_block_mask(blocks.to(value.device), block_size, torch.bool)
                value.masked_fill_(element_mask, fresh)
            touched.append(key)
    return touched


# Up to this fraction of changed blocks, writing them by index beats masking every element
# (a 1000 x 1000 momentum at block 8, 2 threads: 0.04-0.12 ms vs 0.8-1.3 ms at 0.5-10%
# changed; 0.50 vs 0.73 at 50%, 0.95 vs 0.69 at 100%; 2-core CPU, 2026-11-29).
_BY_INDEX_UP_TO = 0.5


def _fill_blocks_(value: torch.Tensor, blocks: torch.Tensor, block_size: int, fresh: float) -> bool:
    """Write ``fresh`` into the b x b blocks of a contiguous 2-D CPU ``value`` flagged in the
    CPU ``blocks``, by index; False (nothing written) where that does not apply: device
    tensors (finding the blocks would wait for the device), tensor subclasses, or most blocks
    changed."""
    if (type(value) is not torch.Tensor or value.device.type != "cpu" or blocks.device.type != "cpu"
            or value.dim() != 2 or not value.is_contiguous()):  # (a subclass: the element mask, as before)
        return False
    rows, cols = blocks.nonzero(as_tuple=True)
    if rows.numel() > _BY_INDEX_UP_TO * blocks.numel():
        return False
    r, c = blocks.shape
    value.view(r, block_size, c, block_size)[rows, :, cols, :] = fresh
    return True


def _fresh_value(optimizer: torch.optim.Optimizer, weight: torch.Tensor, key: str) -> float:
    """What ``optimizer`` initialises ``state[key]`` of a new parameter to (see module doc)."""
    fresh = {(torch.optim.Rprop, "step_size"): "lr", (torch.optim.Adagrad, "sum"): "initial_accumulator_value"}
    option = next((name for (kind, k), name in fresh.items() if k == key and isinstance(optimizer, kind)), None)
    if option is None:
        return 0.0
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    value = group[option]
    return float(value.item() if torch.is_tensor(value) else value)


def momentum_of(optimizer: Optional[torch.optim.Optimizer], weight: torch.Tensor) -> Optional[torch.Tensor]:
    """SGD's ``momentum_buffer`` or Adam's ``exp_avg`` of ``weight`` (None if absent)."""
    if optimizer is None:
        return None
    state = optimizer.state.get(weight, {})
    for key in ("momentum_buffer", "exp_avg"):
        if torch.is_tensor(state.get(key)):
            return state[key]
    return None
