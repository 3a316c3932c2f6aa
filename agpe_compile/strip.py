"""``agpe_compile.strip``: finish a sparse training run and hand back a plain model.

After training, a user who ships the model wants the weights, not agpe: this folds every
layer's block mask into its weight (inactive blocks become exact zeros) and removes
everything :func:`agpe_compile.prepare` and the backend put on the model (the six buffers
per layer, the module hooks, the attributes on the weights). What is left is the
model as its class defines it:

* ``model.state_dict()`` has exactly the keys of an unprepared instance of the same class,
  so it loads with ``strict=True`` into a model built without agpe (or agpe installed);
* eager, ``torch.compile`` with any backend, ``torch.export`` and ``torch.save`` see plain
  weights whose zeros are where the masks had inactive blocks;
* it computes what the agpe-compiled model computed (the op's math is ``x·(W∘M)ᵀ + b``;
  tested against it).

The zeros stay dense: the stripped model runs at dense speed. To keep the block-sparse
kernels at inference, keep the model prepared and compile it with ``backend="agpe"``
(``model.eval()`` under ``torch.no_grad()`` runs only the forward kernel).

Example::

    >>> sparsifier.close()                       # stop driving the masks first
    >>> densities = agpe_compile.strip(model)    # {layer name: density}
    >>> torch.save(model.state_dict(), "model.pt")
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import nn

from . import distributed
from .ops.reference import expand_block_mask
from .state import (EXCLUDED_ATTR, EXCLUSIONS_ATTR, LAYERS_ATTR, LAYOUT_NAMES_ATTR, PREPARED_BLOCK_SIZE_ATTR,
                    PREPARED_BLOCK_SIZES_ATTR, STATE_ATTR, STRIPPED_ATTR, LayerState,
                    _adopt_assigned_weights, _read_layouts, _resize_layouts_on_load, _same_call_path, buffer_paths,
                    adopt_buffers, state_of)
from .controller.model_loads import _AfterLoad, _BeforeLoad
from .zero_weights import _ReZeroOnLoad

log = logging.getLogger(__name__)


def strip(model: nn.Module) -> Dict[str, float]:
    """Fold each agpe layer's mask into its weight and remove agpe's state from ``model``.

    Returns the density each layer had, by layer name. Raises, changing nothing, while an
    :class:`agpe_compile.Sparsifier` still drives a layer (call ``close()`` first). Zero-code
    mode's controllers are stopped here (they only run inside compiled calls, which raise
    after strip).
    A graph compiled with ``backend="agpe"`` before raises at its next call (the stripped
    weights carry one plain marker, ``_agpe_stripped``, so that the backend refuses to treat
    them as new, unprepared layers); compile the stripped model anew with another backend,
    or ``prepare`` it to train it sparse again. Idempotent: a model without agpe state is
    returned unchanged (``{}``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.strip: expected an nn.Module, got {type(model).__name__}")
    states = _states(model)
    _check_released(states)
    adopt_buffers(states)  # Note [Replaced buffers]: fold the module's mask, not one it replaced
    _stop_zero_code(states)
    for module in model.modules():  # the prepared model may sit inside a wrapper (torch.compile, DDP)
        if distributed.DDP_IGNORE_ATTR in module.__dict__:
            distributed.forget_in_ddp(module, buffer_paths(module, states))
    densities: Dict[str, float] = {}
    folded = set()
    with torch.no_grad():
        for state in states:
            densities[state.name] = state.density
            module = state.module  # its current parameter: load_state_dict(assign=True) may have replaced it
            weight = module._parameters.get(state.param_name) if module is not None else state.weight
            if weight is not None:
                folded.add(id(weight))
            if weight is not None and not bool(state.block_mask.all()):
                mask = expand_block_mask(state.block_mask.to(weight.device), state.block_size, torch.bool)
                weight.masked_fill_(~mask, 0)
    for state in states:
        _detach(state)
    for param in model.parameters():
        for attr in (STATE_ATTR, EXCLUDED_ATTR, PREPARED_BLOCK_SIZE_ATTR):
            if hasattr(param, attr):
                delattr(param, attr)
        if id(param) in folded:
            setattr(param, STRIPPED_ATTR, True)
    for module in model.modules():
        _remove_hooks(module)
    return densities


def _states(model: nn.Module) -> List[LayerState]:
    """Every LayerState on the model, once: through its weights and through its modules
    (a module keeps its states in ``_agpe_layers`` even where a weight was replaced)."""
    found: Dict[int, LayerState] = {}
    for param in model.parameters():
        state = state_of(param)
        if state is not None:
            found.setdefault(id(state), state)
    for module in model.modules():
        for state in module.__dict__.get(LAYERS_ATTR, {}).values():
            found.setdefault(id(state), state)
    return list(found.values())


def _check_released(states: List[LayerState]) -> None:
    for state in states:
        sparsifier = None if state.sparsifier_ref is None else state.sparsifier_ref()
        controller = None if state.controller_ref is None else state.controller_ref()
        if controller is not None and sparsifier is controller.sparsifier:
            continue  # zero-code mode: _stop_zero_code closes its controller
        if sparsifier is not None:
            raise RuntimeError(
                f"agpe.strip: a Sparsifier still drives layer {state.name!r}; call sparsifier.close() "
                f"before strip (nothing was changed)")


def _stop_zero_code(states: List[LayerState]) -> None:
    """Zero-code mode ticks only inside compiled calls, and those meet stripped weights and
    raise: strip stops its controllers itself (an explicit Sparsifier is the user's to close).
    Dynamo may keep a compiled function, and with it the controller, alive after
    ``torch._dynamo.reset()`` (Hugging Face models: in their module's globals)."""
    controllers = {id(c): c for c in (None if s.controller_ref is None else s.controller_ref() for s in states)
                   if c is not None}
    for controller in controllers.values():
        controller.close()
    if controllers:
        log.info("agpe.strip: stopped %d zero-code controller(s); graphs compiled with them raise at their next call",
                 len(controllers))


def _detach(state: LayerState) -> None:
    module = state.module
    if module is not None:
        for name in state.buffer_names():
            module._buffers.pop(name, None)
        names = module.__dict__.get(LAYOUT_NAMES_ATTR)
        if names is not None and state.layout_buffer_name in names:
            names.remove(state.layout_buffer_name)
        layers = module.__dict__.get(LAYERS_ATTR)
        if layers is not None and layers.get(state.param_name) is state:
            del layers[state.param_name]
    state.stripped = True  # a graph compiled before raises instead of running on stale tensors
    state.module_ref = None  # weight_ref stays (a weak reference): the call wrapper finds this state by it


def _remove_hooks(module: nn.Module) -> None:
    """Remove the hooks ``LayerState.attach`` (and a Sparsifier, on a copied module) registered,
    once the module has no layer left."""
    if module.__dict__.get(LAYOUT_NAMES_ATTR) or module.__dict__.get(LAYERS_ATTR):
        return
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _read_layouts or hook is _same_call_path:  # Note [One call path per module class]
            del module._forward_pre_hooks[key]
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        hook = getattr(hook, "hook", hook)
        if hook is _resize_layouts_on_load or isinstance(hook, _BeforeLoad):
            del module._load_state_dict_pre_hooks[key]
    for key, hook in list(module._load_state_dict_post_hooks.items()):
        # _ReZeroOnLoad, _AfterLoad: inert on copies (a closed Sparsifier removed its own)
        if isinstance(hook, (_ReZeroOnLoad, _AfterLoad)) or hook is _adopt_assigned_weights:
            del module._load_state_dict_post_hooks[key]
    for attr in (LAYOUT_NAMES_ATTR, LAYERS_ATTR, EXCLUSIONS_ATTR, PREPARED_BLOCK_SIZES_ATTR):
        module.__dict__.pop(attr, None)
