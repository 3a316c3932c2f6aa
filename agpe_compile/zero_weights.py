"""Keep inactive weights exactly zero where the dense path trusts it (Note [Zero inactive weights]).

The explicit Sparsifier marks its layers ``LayerState.zero_inactive`` and calls
:func:`install` with its optimizer. From then on:

* after every step of an optimizer holding the layers' weights (the Sparsifier's, or one
  that replaced it) the inactive blocks of every layer it stepped are written with zeros
  (a Triton kernel that touches only those blocks on CUDA; one in-place pass elsewhere);
  after any optimizer's step, also in each layer that skips masking
  (``ops.paths.may_skip_masking``: the dense path by density) or that ran outside a compiled
  graph since the last step (``LayerState.ran_eagerly``), and in every layer after a step
  of an optimizer not known to keep zero-gradient entries at zero (``keeps_zeros``: e.g.
  Muon, LBFGS, third-party preconditioners). The op's own gradient is exactly zero on
  inactive blocks, but not the weight's whole gradient: an eager penalty on the weight
  (``(W - W0).pow(2).sum()``), a gradient hook that adds noise, or a ``.grad`` written by
  hand reach them, and torch's optimizers then move them (helper audit BM). Only
  ``BlockSparseAdamW``'s block-sparse step (``sparse_stepped``) never writes an inactive
  block, so its layers are not re-zeroed;
* after a module's ``load_state_dict`` its layers are re-zeroed;
* ``LayerState.sync_layout`` re-zeroes a layer whose mask was edited by hand.

So whatever the optimizer does (momentum, preconditioners that mix elements), a compiled
call never sees a nonzero inactive weight on a layer that skips masking, and after every
optimizer step every inactive weight is zero (what eager calls, ``torch.export`` and a
plain model loading the state dict compute with).

Example::

    >>> install(optimizer, list(sparsifier.layers.values()))
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, List, Tuple

import torch

from . import kernels, sharding
from .optimizer_hooks import register_step_post_hook
from .step_nesting import inner_step
from .ops.dense_path import zero_weight_blocks_
from .ops.paths import may_skip_masking
from .ops.reference import expand_block_mask

log = logging.getLogger(__name__)
_KERNEL_BLOCK_SIZES = (16, 32, 64, 128)
_INT32_LIMIT = 2**31


def zero_outside_(weight: torch.Tensor, keep: torch.Tensor, block_size: int) -> None:
    """Write zeros into the blocks of ``weight`` where ``keep`` is False (NaN and inf there
    too: ``weight * mask`` would leave NaN * 0 = NaN), in place; call under ``no_grad``."""
    if zero_weight_blocks_(weight, keep, block_size) is None:  # not contiguous
        weight.masked_fill_(~expand_block_mask(keep, block_size, torch.bool), 0)


def zero_inactive_(state) -> None:
    """Write zeros into every inactive block of the layer's weight, in place."""
    weight = state.weight
    if weight is None:
        return
    sharding.refuse_reshaped(state.name, weight)  # Note [Sharded weights]
    with torch.no_grad():
        # the kernel reads the layout: only when it matches the mask (else the mask itself)
        if (weight.device.type == "cuda" and kernels.triton_available() and state.block_size in _KERNEL_BLOCK_SIZES
                and weight.is_contiguous() and weight.numel() < _INT32_LIMIT  # int32 offsets (audit BO)
                and state.layout_in_sync()):
            kernels.zero_inactive_blocks_(weight, state.layout())
        else:
            zero_outside_(weight, state.block_mask, state.block_size)


# Note [A promise outlives its Sparsifier]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A graph compiled while a Sparsifier drove a layer has the promise baked in: on the dense
# path by density it uses W unmasked. ``Sparsifier.close()`` withdraws the promise (no step
# hook re-zeroes any more), but Dynamo keeps calling that graph; and a second instance of
# the model class (an EMA copy, another model) may be handed the same graph. Inactive
# weights stay zero by themselves after close (zero gradients, zero moments) until the
# user edits a mask by hand: the newly inactive blocks keep their weights and momentum,
# and the graph computed with them (found by an audit of the docs: 0.16 off the masked
# reference on a 2-layer MLP, on every call, with no word). So for a layer without the
# promise the call wrapper hands such a graph ``W * M`` in place of W (backend.py,
# ``_with_masked_weight``): out of place, so nothing is written into the weight (a first
# version zeroed the weight in place, which broke autograd when the weight was saved for
# a backward still to come: gradient accumulation, an eager weight penalty), and the
# gradient reaches W through the product, masked. It costs one pass over W per call,
# only for such layers; a new Sparsifier or ``torch._dynamo.reset()`` ends it. GraphedStep
# replays skip the wrapper: they need a live Sparsifier. Checked on the CPU (aot_eager and
# Inductor); not yet run on a GPU, where ``mode="reduce-overhead"`` treats parameters as
# static CUDA-graph inputs and a fresh ``W * M`` per call may make it re-record.


def skips(state) -> bool:
    """Whether the layer's compiled calls may use its weight unmasked now (the lower
    crossover of any setting: ops.paths.may_skip_masking)."""
    weight = state.weight
    return weight is not None and may_skip_masking(state.layout(), weight.device, state.zero_inactive)


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a weight entry at zero when its gradient and its state
    are zero (elementwise updates; multiplicative or L2 weight decay): torch's elementwise
    optimizers and BlockSparseAdamW. Anything else (Muon's orthogonalised update, LBFGS's
    history of directions, subclasses and unknown classes) is assumed to write inactive
    blocks."""
    from .optim import BlockSparseAdamW

    known = [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
             torch.optim.Adamax, torch.optim.Adadelta, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Rprop,
             torch.optim.ASGD, torch.optim.SparseAdam, BlockSparseAdamW]
    if hasattr(torch.optim, "Adafactor"):  # update = gradient / factored RMS
        known.append(torch.optim.Adafactor)
    return type(optimizer) in known  # a subclass may change step(): assumed to write anywhere


def install(optimizer: torch.optim.Optimizer, states: List, on_step=None) -> List:
    """Register the hooks above for ``states``; returns the list of their handles (to which
    the load hooks registered later on optimizers are appended). ``on_step`` (optional) is
    also called after each such optimizer step.

    Note [Optimizer state on inactive blocks]: the first step of an optimizer that holds the
    layers (the given one, or one created or swapped in later) and its first step after a
    ``load_state_dict`` also reset its state on inactive blocks and re-zero them: state loaded
    from another point of the run, or left by steps before the Sparsifier adopted masks, would
    move the inactive weights again (a helper audit, twentieth session).

    The step hook is global (one of ``torch.optim``'s, Note [One global optimizer hook]) and acts
    after the step of ANY optimizer that holds one of the layers' weights, compared by
    identity: a user who replaces the optimizer mid-run (a new learning-rate phase, a
    restarted AdamW) keeps the zeros, which the dense path relies on. ``optimizer`` is the
    one the Sparsifier was given; it is always followed."""
    refs = [weakref.ref(s) for s in states]
    weights = {id(s.weight): weakref.ref(s.weight) for s in states if s.weight is not None}
    # id(state) -> (layout buffer, zero_inactive, weight device, skips): the buffer itself, not
    # its id (a freed layout's id can be reused by the next one: re-audit BW)
    decided: Dict[int, Tuple[torch.Tensor, bool, object, bool]] = {}
    holders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> (param count, held ids)
    warned_lbfgs: List[bool] = []
    given = weakref.ref(optimizer)
    # Optimizers whose state on inactive blocks was reset since they first stepped these
    # layers or last loaded a state_dict (Note [Optimizer state on inactive blocks]).
    cleaned: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    hooked: "weakref.WeakSet" = weakref.WeakSet()

    def state_loaded(opt) -> None:
        cleaned.pop(opt, None)

    def first_time(opt, ours) -> bool:
        if not ours:
            return False
        try:
            if opt in cleaned:
                return False
            cleaned[opt] = True
            if opt not in hooked:
                hooked.add(opt)
                # removed with the others (close(), or the Sparsifier's finalizer): one per
                # Sparsifier made on this optimizer would pile up otherwise (audit AT)
                handles.append(opt.register_load_state_dict_post_hook(state_loaded))
        except (TypeError, AttributeError):  # not weak-referenceable, or no load hooks
            return False
        return True

    def held(opt) -> frozenset:
        """ids of the layers' weights that ``opt`` holds."""
        count = sum(len(g["params"]) for g in opt.param_groups)
        cached = holders.get(opt)
        if cached is None or cached[0] != count:
            ids = frozenset(id(p) for g in opt.param_groups for p in g["params"] if weights.get(id(p), _dead)() is p)
            cached = (count, ids)
            try:
                holders[opt] = cached
            except TypeError:  # not weak-referenceable: decide every time
                pass
        return cached[1]

    def after_step(opt, args, kwargs) -> None:
        if inner_step(opt):  # super().step() of a subclass: the whole step ends later
            return
        ours = held(opt)
        if not ours and opt is not given():
            return
        mixes = not keeps_zeros(opt)
        fresh = first_time(opt, ours)
        if isinstance(opt, torch.optim.LBFGS) and opt is not given() and not warned_lbfgs:
            warned_lbfgs.append(True)
            log.warning("agpe: an LBFGS optimizer steps layers whose Sparsifier was given another optimizer: graphs "
                        "compiled under that Sparsifier skip masking zero weights, and LBFGS evaluates the model "
                        "inside its step with pruned weights moved (outputs inside its closure are then off). Give "
                        "the LBFGS to the Sparsifier (Sparsifier(model, lbfgs, config)), which keeps masking")
        for ref in refs:
            state = ref()
            if state is None:
                continue
            sharding.refuse_sharded_state(state.name, state.weight, state.block_mask)  # Note [Sharded weights]
            if not state.stripped:
                state.check_identity()  # Note [Replaced buffers]: model.to(device) since the last call
            state.sync_layout()
            weight = state.weight
            cached = decided.get(id(state))
            if (cached is None or cached[0] is not state.block_layout or cached[1] != state.zero_inactive
                    or cached[2] != (weight.device if weight is not None else None)):
                cached = decided[id(state)] = (state.block_layout, state.zero_inactive,
                                               weight.device if weight is not None else None, skips(state))
            stray = state.ran_eagerly or state.traced_elsewhere  # computed with the raw weight somewhere
            stray = stray or (fresh and id(state.weight) in ours)  # its state may predate the masks
            # stepped by this optimizer on a gradient that may hold more than the op's (audit BM)
            stepped = id(state.weight) in ours and id(state.weight) not in getattr(opt, "sparse_stepped", ())
            if cached[3] or mixes or stray or stepped:
                zero_inactive_(state)
            if stray and id(state.weight) in ours:
                # its eager gradient reached inactive blocks: their moments too (else compiled
                # steps would go on moving them); cleared only by an optimizer that steps it
                from .controller.optimizer_state import zero_optimizer_state

                zero_optimizer_state(opt, state.weight, ~state.block_mask, state.block_size)
                state.ran_eagerly = False
        if on_step is not None:
            on_step(opt)

    # Never traced: an optimizer step inside a compiled function would otherwise make Dynamo
    # trace these host-side checks (graph breaks in agpe's own code, recompiles of its helpers
    # as masks change); disabled, the hook runs eagerly after the compiled step, as it must.
    handles = [register_step_post_hook(torch.compiler.disable(after_step))]
    modules = {}
    for state in states:
        module = state.module
        if module is not None:
            modules.setdefault(id(module), (module, []))[1].append(weakref.ref(state))
    for module, layer_refs in modules.values():
        handles.append(module.register_load_state_dict_post_hook(_ReZeroOnLoad(layer_refs)))
    return handles


def _dead() -> None:
    return None


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
