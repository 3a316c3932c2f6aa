"""Re-bucketing layouts: the one place where a compiled model is made to recompile.

Note [Recompile only at bucket crossings]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every prepared layer holds its layout in one buffer whose length is fixed by its density
bucket (Note [Packed layout]); a forward pre-hook reads that buffer, so Dynamo guards on
its length. Mask edits inside a bucket rewrite the layout in place (the call wrapper does
it before each call) and never recompile. :func:`rebucket`, called between steps, moves
every layer whose density left its bucket to the new one AT THE SAME TIME, so one
crossing event costs exactly one recompile of the frame however many layers moved. Each
crossing leaves a dead cache entry behind, so the first rebucket raises Dynamo's
recompile limit and turns on ``fail_on_recompile_limit_hit``: past the limit Dynamo
raises instead of silently running the model eagerly.

Example::

    >>> state.block_mask.copy_(sparser_mask)      # density 0.4 -> bucket 0.5
    >>> agpe_compile.rebucket(model)              # ['fc1'] moved; next call recompiles once
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Union

import torch
from torch import nn

from .layout import DEFAULT_BUCKETS, bucket_for, update_layout_
from .packed_layout import build_packed, unpack
from .state import LayerState, layer_states

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def ensure_recompile_budget(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise Dynamo's per-frame recompile limit to ``limit`` and make hitting it an error."""
    config = torch._dynamo.config
    if config.recompile_limit < limit:
        log.info("agpe: raising torch._dynamo.config.recompile_limit %d -> %d", config.recompile_limit, limit)
        config.recompile_limit = limit
    config.fail_on_recompile_limit_hit = True


def rebucket(
    model_or_states: Union[nn.Module, Dict[str, LayerState], Iterable[LayerState]],
    buckets: Iterable[float] = DEFAULT_BUCKETS,
    between_steps: bool = True,
) -> List[str]:
    """Move every layer whose mask density left its layout bucket; returns their names.

    Layers whose density is still within their bucket keep their layout buffer (rewritten
    in place). Call between training steps; the next compiled call recompiles once if any
    layer moved. A layer that cannot move keeps its layout while the mask still fits its
    capacity (correct, but no smaller kernels): layers compiled before
    :func:`agpe_compile.prepare` (their full-capacity layout fits every mask), and every
    layer when ``between_steps`` is False (called inside a compiled call, where Dynamo has
    already chosen the graph: zero-code mode's tick). A mask that no longer fits raises.
    The masks are read with one device-to-host copy and the layouts written with one
    host-to-device copy (Note [Host-side updates] in controller/host_sync.py).
    """
    from .controller.host_sync import to_device, to_host

    states = _states(model_or_states)
    masks = to_host([state.block_mask for state in states])
    moved, writes = plan_layouts(states, masks, buckets, between_steps)
    to_device(writes)
    mark_layouts_synced(states)
    return moved


def plan_layouts(states: List[LayerState], host_masks: List[torch.Tensor], buckets: Iterable[float] = DEFAULT_BUCKETS,
                 between_steps: bool = True):
    """Layouts of ``host_masks`` (the layers' masks, on the host), built on the host.

    Returns ``(moved, writes)``: the names of the layers that changed bucket, and the
    (device layout buffer, host packed layout) pairs to copy in place. A layer that changes
    bucket gets its new buffer here (a fresh length: one transfer, only at crossings).
    The caller copies ``writes`` (with the masks, if they are new) and then calls
    :func:`mark_layouts_synced`.
    """
    buckets = tuple(buckets)
    moved, writes = [], []
    for state, mask in zip(states, host_masks):
        bucket = bucket_for(float(mask.float().mean()), buckets)
        if bucket == state.layout_bucket or state.module is None or not between_steps:
            if bucket != state.layout_bucket:
                log.debug("agpe.rebucket: %s keeps its layout of bucket %s (%s)", state.name, state.layout_bucket,
                          "not prepared" if state.module is None else "inside a compiled call")
            packed = torch.zeros(state.block_layout.shape, dtype=state.block_layout.dtype)
            if not update_layout_(unpack(packed, state.grid, state.block_size), mask):
                _raise_outgrown(state, float(mask.float().mean()))
            writes.append((state.block_layout, packed))
            continue
        packed, bucket = build_packed(mask, state.block_size, buckets)
        if packed.shape == state.block_layout.shape:
            writes.append((state.block_layout, packed))  # same capacity: stay in place, no recompile
        else:
            state.block_layout = packed.to(state.block_layout.device)
            state.module.register_buffer(state.layout_buffer_name, state.block_layout)
        state.layout_bucket = bucket
        moved.append(state.name)
    if moved:
        ensure_recompile_budget()
        log.info("agpe.rebucket: %d layer(s) changed bucket: %s", len(moved), ", ".join(moved))
    return moved, writes


def mark_layouts_synced(states: List[LayerState]) -> None:
    """Record that each layout matches its mask as of now (the call wrapper then skips it)."""
    for state in states:
        state.layout_mask_version = state.block_mask._version


def _raise_outgrown(state: LayerState, density: float) -> None:
    if state.module is None:
        raise ValueError(
            f"agpe.rebucket: layer {state.name!r} is not a module buffer yet; call "
            f"agpe_compile.prepare(model) BEFORE torch.compile so bucket changes can recompile"
        )
    raise RuntimeError(
        f"agpe.rebucket: layer {state.name!r} grew to density {density:.3f}, above the capacity "
        f"of its layout bucket {state.layout_bucket}, inside a compiled call, where the layout cannot "
        f"change; in zero-code mode this happens when no torch.optim optimizer holding the layer's "
        f"weight steps (the controller then counts compiled calls): use agpe_compile.Sparsifier, or "
        f"do not prepare the model before torch.compile (full-capacity layouts fit every mask)"
    )


def _states(model_or_states) -> List[LayerState]:
    if isinstance(model_or_states, nn.Module):
        return list(layer_states(model_or_states).values())
    if isinstance(model_or_states, dict):
        return list(model_or_states.values())
    return list(model_or_states)
