"""Re-bucketing layouts: the one place where a compiled model is made to recompile.

Note [Recompile only at bucket crossings]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every prepared layer holds its layout in one buffer whose length is fixed by its density
bucket (Note [Packed layout]); a forward pre-hook reads that buffer, so Dynamo guards on
its length. Mask edits inside a bucket rewrite the layout in place (the call wrapper does
it before each call) and never recompile. :func:`rebucket`, called between steps, moves
every layer whose density left its bucket to the new one AT THE SAME TIME, so one
crossing event costs exactly one recompile of the frame however many layers moved (per
kind of call: a training call and a ``no_grad`` evaluation are two graphs).

Note [Recompile budget]
~~~~~~~~~~~~~~~~~~~~~~~
Each crossing leaves a dead cache entry behind, and layers of different shapes cross at
different updates (GMP, ERK budgets): an 8-layer MLP with periodic evaluation made 64
graphs of one frame in 51 steps. Past ``torch._dynamo.config.recompile_limit`` Dynamo
would run the frame eagerly, i.e. unmasked. So the backend keeps headroom: whenever it
compiles a frame for the ``k``-th time it raises the limits (``recompile_limit`` and
``accumulated_recompile_limit``, never lowering them) to at least ``k + RECOMPILE_HEADROOM``,
up to :func:`recompile_budget` compiles of one frame: ``RECOMPILE_FLOOR`` plus
``RECOMPILES_PER_CROSSING`` for every possible crossing of its layers. Past that budget
something other than crossings recompiles the frame (or many models of one class were
compiled in one process without ``torch._dynamo.reset()``), and the backend raises (with
the way to see why) instead of compiling forever. A ``recompile_limit`` the user set
(above Dynamo's default 8, for a frame with many static shapes, say) is added to that
budget: agpe's crossings come on top of the compiles the user allowed, and each static
shape may cross every bucket (24 batch shapes under ``dynamic=False`` with GMP crossing
7 buckets made ~170 graphs of one frame, which plain torch.compile ran under the user's
limit of 4096 and agpe's budget alone refused). The user's limit is the one in force
before agpe first raised it, or whatever the user set since. ``fail_on_recompile_limit_hit`` is left
alone; the limits are process-wide numbers: raising Dynamo's defaults is logged (INFO),
and raising a limit the user set is a warning (once).
Compiles made by :func:`agpe_compile.explain` (one per call) are added to the frame's
budget: explaining a model every epoch is not "something else recompiling it".

Note [Buckets no path tells apart]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A layout's capacity matters only to the paths that walk it (the Triton kernels, the CPU's
gathered blocks). A bucket at or above the dense crossover of every device, dtype and
AGPE_TMA setting (``ops.paths.dense_everywhere_from``: every bucket for blocks under 32,
from 0.5 up for 32 and 64, none for 128; other sizes by the CPU cost model's anchor too)
runs the dense path wherever the layer lives, exactly as a full-capacity layout does: the
path, the masking and the zero hook decide by ``capacity >= crossover``, true for both.
(Devices other than CPU and CUDA run the dense path at every bucket but skip the masking
only at full capacity: there such a layer now skips it under the zero-weight promise, and
the hook re-zeroes it after each optimizer step, as for a full layer; the values are the
same. BlockSparseAdamW launches one program per capacity slot, the extra ones exiting at
once: more launches at full capacity, not other values.) So a layer's layout takes the buckets
below that point plus 1.0 (:func:`layout_buckets`): it stays at full capacity until its
density falls below it, and crossings between buckets no path tells apart recompile
nothing. The main job's block-8 MLP compiled 6 graphs more for its 6 crossings (~0.5 s
each with aot_eager on a 2-core CPU); a block-64 run on a GPU skips the 0.75 and 0.5
crossings (a cold Inductor compile took 18-36 s per crossing on an H200). The schedule
still reasons in the configured buckets (``bucket_for(density, config.buckets)``).

Example::

    >>> state.block_mask.copy_(sparser_mask)      # density 0.3 -> bucket 0.35
    >>> agpe_compile.rebucket(model)              # ['fc1'] moved; next call recompiles once
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from .layout import DEFAULT_BUCKETS, _normalize_buckets, bucket_for, update_layout_
from .packed_layout import build_packed, unpack
from .state import LayerState, adopt_buffers, layer_states

log = logging.getLogger(__name__)

_warned_raise = False
RECOMPILE_FLOOR = 64
RECOMPILE_HEADROOM = 16
RECOMPILES_PER_CROSSING = 8  # kinds of call (train, no_grad, eval, ...) x shape variants


def layout_buckets(buckets: Iterable[float], block_size: int) -> tuple:
    """The buckets a layout of ``block_size`` takes: those below the point from which every
    device runs the dense path, and 1.0 (Note [Buckets no path tells apart]).

    >>> layout_buckets(DEFAULT_BUCKETS, 8), layout_buckets(DEFAULT_BUCKETS, 64)
    ((1.0,), (0.05, 0.1, 0.15, 0.25, 0.35, 1.0))
    """
    from .ops.paths import dense_everywhere_from

    top = dense_everywhere_from(block_size)
    return tuple(b for b in _normalize_buckets(buckets) if b < top) + (1.0,)


def recompile_budget(layers: int, buckets: int = len(DEFAULT_BUCKETS)) -> int:
    """Compiles of one frame that bucket crossings of ``layers`` layers can explain."""
    return RECOMPILE_FLOOR + RECOMPILES_PER_CROSSING * max(1, layers) * max(1, buckets - 1)


_limits_found: Dict[str, int] = {}  # each limit as agpe last found it set by someone else
_limits_set: Dict[str, int] = {}  # each limit as agpe last set it


def user_recompile_limit() -> int:
    """``torch._dynamo.config.recompile_limit`` as the user set it (or Dynamo's default):
    while the limit still holds the value agpe raised it to, the value agpe found before that
    raise; otherwise the current value (Note [Recompile budget])."""
    value = torch._dynamo.config.recompile_limit
    if _limits_set.get("recompile_limit") == value:
        return _limits_found["recompile_limit"]
    return value


def _set_by_user(name: str) -> bool:
    """Whether ``torch._dynamo.config.<name>`` was set (by anyone but Dynamo's defaults)."""
    is_default = getattr(torch._dynamo.config, "_is_default", None)
    return True if is_default is None else not is_default(name)


# What recompiles a frame for its input shapes (helper audit CO: the default's own cases).
_SHAPES = ("under dynamic=False, every new shape; under the default, the first size that varies, and each "
           "dimension of size 0 or 1, such as a last batch of one, which Dynamo always specializes; a no_grad "
           "evaluation between training calls doubles every one of these; torch.compile(..., dynamic=True) or "
           "torch._dynamo.mark_dynamic of the varying dimension avoids the first, a last batch of one dropped or "
           "padded the second")


def ensure_recompile_headroom(frame_compiles: int, layers: int, frame: str = "this frame", explained: int = 0) -> None:
    """Called by the backend at the ``frame_compiles``-th compile of a frame holding
    ``layers`` agpe layers (Note [Recompile budget]); ``explained`` of those compiles were
    :func:`agpe_compile.explain` calls, which the budget does not count against training."""
    user_limit = user_recompile_limit()
    budget = recompile_budget(layers) + explained + user_limit
    if frame_compiles > budget:
        raise RuntimeError(
            f"agpe: {frame} was compiled {frame_compiles} times, more than its {layers} agpe layer(s) can need for "
            f"density-bucket crossings on top of torch._dynamo.config.recompile_limit={user_limit} ({budget}). "
            f"Either many models of this class were compiled in one process (a sweep: call torch._dynamo.reset() "
            f"between them), or something recompiles it on every call: input shapes that change ({_SHAPES}) "
            f"or a changing Python value guarded by Dynamo. Run with TORCH_LOGS=recompiles to "
            f"see the reason. If the frame really has that many static variants, raise "
            f"torch._dynamo.config.recompile_limit to their number: agpe adds its crossing budget to it")
    config = torch._dynamo.config
    # budget + 2: Dynamo still compiles the budget + 1-th time, and the check above says why
    wanted = min(frame_compiles + RECOMPILE_HEADROOM, budget + 2)
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if getattr(config, name) < wanted:
            global _warned_raise
            users = _limits_set.get(name) != getattr(config, name) and _set_by_user(name)
            # A warning once, when it overrides a limit the user set; raising Dynamo's
            # default is what every agpe run does, so it is only logged (INFO).
            level = logging.WARNING if users and not _warned_raise else logging.INFO
            _warned_raise = _warned_raise or users
            log.log(level, "agpe: raising torch._dynamo.config.%s %d -> %d (%s compiled %d times; the limit is "
                    "process-wide, so other compiled code may recompile that often too before falling back)",
                    name, getattr(config, name), wanted, frame, frame_compiles)
            if _limits_set.get(name) != getattr(config, name):  # not agpe's value: the user's (or the default)
                _limits_found[name] = getattr(config, name)
            setattr(config, name, wanted)
            _limits_set[name] = wanted


# Note [Recompiles within a bucket set]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The budget above is sized for crossings, so a frame that recompiles for another reason
# on every call (input shapes under ``dynamic=False``, a guarded Python value) ran ~60 + 56
# compiles per agpe layer before it was refused: 184 compiles of a 2-layer MLP fed a new
# batch size per call (30 s on the CPU; an 8-layer GPT on a GPU: hours), where plain
# torch.compile stops at 8 with a warning. A crossing changes the length of a layout
# buffer; a compile that finds the same layouts (and the same static flags of the rewrite)
# as an earlier compile of its frame has another cause. So each frame may compile each
# set of layouts as often as Dynamo lets plain torch.compile compile the whole frame
# (``recompile_limit`` as the user set it, 8 by default); the next one is refused, with
# Dynamo's recompile reason. Plain torch.compile would run the frame eagerly from there;
# agpe cannot (its layers would run unmasked and unscored), so it raises. Returning to an
# earlier bucket set reuses its cached graph (no compile). explain()'s compiles are not
# counted (one per call).
#
# The counts must follow Dynamo's cache, never run ahead of it (a refusal where plain
# torch.compile would go on stops a healthy run):
# * they are kept per frame and ``isolate_recompiles`` region (torch 2.13's
#   ``torch.compile(..., isolate_recompiles=True)`` gives each compiled model its own
#   cache and its own limit);
# * a compile that Dynamo does not call a recompile (its cache for the frame and region
#   holds no graph for these objects: a first compile, or the first after
#   ``torch._dynamo.reset()``) starts that region's counts afresh, whichever backend's
#   compiles come next;
# * ``torch._dynamo.reset()`` also restarts Dynamo's frame ids from 0, so a frame id may
#   come back with a lower compile number than agpe last saw for it: that frame's counts
#   are dropped (this catches a reset whose first compile was another backend's, e.g. a
#   dense baseline of the same model class, or an explain() call);
# * and every count is dropped when agpe finds its marker gone from a set that
#   ``torch._dynamo.reset()`` clears (``dynamo_was_reset``): a dense baseline that compiled
#   its frame more often than agpe had before the reset hides the reset from the rule above.
# Where Dynamo's recompile reason cannot be read (a private record), only the last rule
# applies. A storm whose layouts also change at every compile (a crossing per call) is
# counted per set of layouts, so it is stopped later (~8 per set it visits).
_bucket_set_compiles: Dict[object, Dict[tuple, int]] = {}  # (frame id, region) -> layouts -> compiles
_last_frame_compile: Dict[object, int] = {}  # frame id -> the last compile number agpe saw


_RESET_MARKER = "agpe: marks Dynamo's state; torch._dynamo.reset() clears it"


def dynamo_was_reset() -> bool:
    """Whether ``torch._dynamo.reset()`` ran since the last call (True at the first call):
    agpe keeps a marker in ``torch._dynamo.utils.warn_once_cache``, a set of message strings
    that reset clears (torch 2.11 and 2.13). False where that set is missing."""
    cache = getattr(getattr(torch._dynamo, "utils", None), "warn_once_cache", None)
    if not isinstance(cache, set) or _RESET_MARKER in cache:
        return False
    cache.add(_RESET_MARKER)
    return True


def start_frame_compile(frame_id: object, frame_compile: int, region: object, first_in_cache: bool) -> bool:
    """Note the ``frame_compile``-th compile (from 0) of a Dynamo frame and drop the counts
    Dynamo's cache no longer backs (Note [Recompiles within a bucket set]). Returns whether
    the frame's compiles restarted (``torch._dynamo.reset()`` reuses frame ids): then every
    per-frame record of the caller is stale too (after a reset the caller's records of
    other frames are dropped when they compile again, by the same rule or this one)."""
    reset = dynamo_was_reset()
    if reset:
        _bucket_set_compiles.clear()
        _last_frame_compile.clear()
    restarted = reset or frame_compile <= _last_frame_compile.get(frame_id, -1)
    _last_frame_compile[frame_id] = frame_compile
    if restarted:
        for key in [key for key in _bucket_set_compiles if key[0] == frame_id]:
            del _bucket_set_compiles[key]
    elif first_in_cache:
        _bucket_set_compiles.pop((frame_id, region), None)
    return restarted


def check_bucket_set_recompiles(key: tuple, bucket_set: tuple, frame: str = "this frame",
                                reason: Optional[str] = None) -> None:
    """Count one compile of a frame (``key``: its frame id and region) with these layouts
    (``bucket_set``: hashable, one entry per agpe layer); refuse the compile that would pass
    the user's ``recompile_limit`` (Note [Recompiles within a bucket set])."""
    counts = _bucket_set_compiles.setdefault(key, {})
    limit = user_recompile_limit()
    if counts.get(bucket_set, 0) >= limit:  # refused compiles are not counted: none was made
        last = f" Dynamo's reason for this recompile: {reason}." if reason else ""
        raise RuntimeError(
            f"agpe: refusing compile {limit + 1} of {frame} with the same density buckets: "
            f"torch._dynamo.config.recompile_limit={limit} and these recompiles are not bucket crossings.{last} "
            f"Plain torch.compile would stop compiling this frame here and run it eagerly; agpe cannot (its layers "
            f"would run unmasked and unscored), so it stops. Usual causes: input shapes that change ({_SHAPES}), "
            f"a changing Python value guarded by Dynamo, or many models of one class compiled "
            f"in one process (a sweep: call torch._dynamo.reset() between them); TORCH_LOGS=recompiles lists every "
            f"reason. If the frame really has that many static variants, raise torch._dynamo.config.recompile_limit "
            f"to their number")
    counts[bucket_set] = counts.get(bucket_set, 0) + 1


def rebucket(
    model_or_states: Union[nn.Module, Dict[str, LayerState], Iterable[LayerState]],
    buckets: Iterable[float] = DEFAULT_BUCKETS,
    between_steps: bool = True,
) -> List[str]:
    """Move every layer whose mask density left its layout bucket; returns their names.

    Layers whose density is still within their bucket keep their layout buffer (rewritten
    in place). Call between training steps; the next compiled call recompiles once if any
    layer moved. A layer that cannot move keeps its layout while the mask still fits its
    capacity (correct, but no smaller kernels): layers that were never prepared (states the
    backend created at compile time; their full-capacity layout fits every mask), and every
    layer when ``between_steps`` is False (called inside a compiled call, where Dynamo has
    already chosen the graph: zero-code mode's tick). A mask that no longer fits raises.
    The masks are read with one device-to-host copy and the layouts written with one
    host-to-device copy (Note [Host-side updates] in controller/host_sync.py).
    """
    from .controller.host_sync import to_device, to_host

    states = _states(model_or_states)
    masks = to_host([state.block_mask for state in states])
    # Masks edited by hand since their layouts were last synced: under the zero-weight promise
    # (a Sparsifier drives the layer) their new inactive blocks must be zeroed, as the call
    # wrapper's sync would have done; marking them synced below would skip that.
    edited = [s for s in states if s.zero_inactive and not s.layout_in_sync()]
    moved, writes = plan_layouts(states, masks, buckets, between_steps)
    to_device(writes)
    mark_layouts_synced(states)
    if edited:
        from .zero_weights import zero_inactive_

        for state in edited:
            zero_inactive_(state)
    return moved


@torch.inference_mode(False)  # layouts made during an inference_mode eval must serve the next training step
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
        own = layout_buckets(buckets, state.block_size)
        bucket = bucket_for(float(mask.float().mean()), own)
        if bucket == state.layout_bucket or state.module is None or not between_steps:
            if bucket != state.layout_bucket:
                log.debug("agpe.rebucket: %s keeps its layout of bucket %s (%s)", state.name, state.layout_bucket,
                          "not prepared" if state.module is None else "inside a compiled call")
            packed = torch.zeros(state.block_layout.shape, dtype=state.block_layout.dtype)
            if not update_layout_(unpack(packed, state.grid, state.block_size), mask):
                _raise_outgrown(state, float(mask.float().mean()))
            writes.append((state.block_layout, packed))
            continue
        packed, bucket = build_packed(mask, state.block_size, own)
        if packed.shape == state.block_layout.shape:
            writes.append((state.block_layout, packed))  # same capacity: stay in place, no recompile
        else:
            state.block_layout = packed.to(state.block_layout.device)
            state.module.register_buffer(state.layout_buffer_name, state.block_layout)
        state.layout_bucket = bucket
        moved.append(state.name)
    if moved:
        log.info("agpe.rebucket: %d layer(s) changed bucket: %s", len(moved), ", ".join(moved))
    return moved, writes


def mark_layouts_synced(states: List[LayerState]) -> None:
    """Record that each layout matches its mask as of now (the call wrapper then skips it)."""
    for state in states:
        state.mark_layout_synced()


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
    states = list(model_or_states.values() if isinstance(model_or_states, dict) else model_or_states)
    adopt_buffers(states)  # Note [Replaced buffers]
    return states
