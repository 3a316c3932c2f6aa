"""Keep inactive weights exactly zero where the dense path trusts it (Note [Zero inactive weights]).

The explicit Sparsifier marks its layers ``LayerState.zero_inactive`` and calls
:func:`install` with its optimizer. From then on:

* after every ``optimizer.step()`` the inactive blocks of each layer that skips masking
  (``ops.paths.skips_masking``: the dense path by density) are written with zeros
  (a Triton kernel that touches only those blocks on CUDA; one in-place pass elsewhere);
* after a module's ``load_state_dict`` its layers are re-zeroed;
* ``LayerState.sync_layout`` re-zeroes a layer whose mask was edited by hand.

So whatever the optimizer does (momentum, preconditioners that mix elements), a compiled
call never sees a nonzero inactive weight on a layer that skips masking.

Example::

    >>> install(optimizer, list(sparsifier.layers.values()))
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch

from . import kernels
from .ops.dense_path import zero_weight_blocks_
from .ops.paths import skips_masking
from .ops.reference import expand_block_mask

_KERNEL_BLOCK_SIZES = (16, 32, 64, 128)


def zero_inactive_(state) -> None:
    """Write zeros into every inactive block of the layer's weight, in place."""
    weight = state.weight
    if weight is None:
        return
    with torch.no_grad():
        # the kernel reads the layout: only when it matches the mask (else the mask itself)
        if (weight.device.type == "cuda" and kernels.triton_available() and state.block_size in _KERNEL_BLOCK_SIZES
                and weight.is_contiguous() and state.layout_mask_version == state.block_mask._version):
            kernels.zero_inactive_blocks_(weight, state.layout())
        elif zero_weight_blocks_(weight, state.block_mask, state.block_size) is None:  # not contiguous
            weight.masked_fill_(~expand_block_mask(state.block_mask, state.block_size, torch.bool), 0)


def skips(state) -> bool:
    """Whether the layer's compiled calls use its weight unmasked now."""
    weight = state.weight
    return weight is not None and skips_masking(state.layout(), weight.device, state.zero_inactive)


def install(optimizer: torch.optim.Optimizer, states: List) -> List:
    """Register the hooks above for ``states``; returns their handles."""
    refs = [weakref.ref(s) for s in states]
    decided: Dict[int, Tuple[int, bool]] = {}  # id(state) -> (id(layout buffer), skips)

    def after_step(opt, args, kwargs) -> None:
        for ref in refs:
            state = ref()
            if state is None:
                continue
            state.sync_layout()
            key = id(state.block_layout)
            cached = decided.get(id(state))
            if cached is None or cached[0] != key:
                cached = decided[id(state)] = (key, skips(state))
            if cached[1]:
                zero_inactive_(state)

    handles = [optimizer.register_step_post_hook(after_step)]
    modules = {}
    for state in states:
        module = state.module
        if module is not None:
            modules.setdefault(id(module), (module, []))[1].append(weakref.ref(state))
    for module, layer_refs in modules.values():
        handles.append(module.register_load_state_dict_post_hook(_ReZeroOnLoad(layer_refs)))
    return handles


class _ReZeroOnLoad:
    """load_state_dict post-hook: re-zero the layers' inactive blocks. A module with this
    hook can be pickled and deep-copied: the copy's hook is inert (the copy's layers are
    driven by no Sparsifier, Note [Copying prepared models] in state.py)."""

    def __init__(self, layer_refs: List) -> None:
        self.layer_refs = layer_refs

    def __call__(self, module, incompatible) -> None:
        for ref in self.layer_refs:
            state = ref()
            if state is not None and state.zero_inactive:
                zero_inactive_(state)

    def __reduce__(self):
        return _ReZeroOnLoad, ([],)
