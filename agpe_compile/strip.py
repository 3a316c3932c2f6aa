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

A checkpoint already on disk (``model.state_dict()`` of a prepared model, agpe buffers
included) is finished the same way without building the model: :func:`strip_state_dict`,
or from the shell ``python -m agpe_compile.strip_checkpoint run.pt model.pt [--key model]``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from . import distributed
from .ops.reference import expand_block_mask
from .state import (BUFFER_SUFFIXES, EXCLUDED_ATTR, EXCLUSIONS_ATTR, LAYERS_ATTR, LAYOUT_NAMES_ATTR, PREPARED_BLOCK_SIZE_ATTR,
                    PREPARED_BLOCK_SIZES_ATTR, STATE_ATTR, STRIPPED_ATTR, LayerState,
                    _adopt_assigned_weights, _read_layouts, _read_out_projection_layouts, _resize_layouts_on_load, _same_call_path, buffer_paths,
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
        if hook in (_read_layouts, _same_call_path, _read_out_projection_layouts):  # Note [One call path per module class]
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


_MASK_SUFFIX = "_" + BUFFER_SUFFIXES[0]  # "_block_mask"


def strip_state_dict(state_dict: Mapping[str, object]) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, float]]:
    """:func:`strip` for a saved ``model.state_dict()``: (plain state dict, densities).

    An agpe layer is a ``<prefix><weight>`` entry with the six agpe entries beside it
    (``<weight>_block_mask``, ``_block_layout``, ...; any other ``*_block_mask`` entry is the
    model's own and passes through). The returned dict holds each such weight with the
    inactive blocks written as zeros, the same folded tensor under every entry that shared
    the weight's storage (tied weights, as ``torch.load`` restores them), and none of the
    agpe entries; every other entry is passed through (the same tensor objects).
    ``state_dict`` itself is not changed. The result loads with ``strict=True`` into a model
    built without agpe (wrapper prefixes such as ``module.`` stay), like the ``state_dict()``
    of a model :func:`strip` finished. Densities are keyed by the weight's entry name
    (``strip`` keys them by layer name).

    >>> sd = {"fc.weight": torch.ones(2, 4), "fc.bias": torch.ones(2)}
    >>> sd.update({f"fc.weight_{suffix}": torch.zeros(1) for suffix in BUFFER_SUFFIXES})  # agpe's six
    >>> sd["fc.weight_block_mask"] = torch.tensor([[True, False]])
    >>> plain, densities = strip_state_dict(sd)
    >>> plain["fc.weight"].tolist(), list(plain), densities
    ([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], ['fc.weight', 'fc.bias'], {'fc.weight': 0.5})
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"agpe.strip_state_dict: expected a state dict (a mapping of names to tensors), "
                        f"got {type(state_dict).__name__}")
    weights = {key[:-len(_MASK_SUFFIX)] for key in state_dict
               if isinstance(key, str) and key.endswith(_MASK_SUFFIX)
               and all(f"{key[:-len(_MASK_SUFFIX)]}_{suffix}" in state_dict for suffix in BUFFER_SUFFIXES)}
    if not weights:
        raise ValueError("agpe.strip_state_dict: no agpe layer in this state dict (no weight with the six agpe "
                         f"entries '<weight>_block_mask', '<weight>_block_layout', ... among its {len(state_dict)} "
                         "entries); it is plain already, or it is a whole checkpoint: pass its model entry (--key "
                         "on the command line)")
    agpe_keys = {f"{weight}_{suffix}" for weight in weights for suffix in BUFFER_SUFFIXES}
    folded: Dict[str, torch.Tensor] = {}
    densities: Dict[str, float] = {}
    for weight_key in sorted(weights):
        folded[weight_key], densities[weight_key] = _fold(state_dict, weight_key)
    _fold_tied(state_dict, folded, agpe_keys)
    plain = OrderedDict((key, folded.get(key, value)) for key, value in state_dict.items() if key not in agpe_keys)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        plain._metadata = metadata  # module versions, which load_state_dict passes to the modules
    return plain, densities


def _storage(t: object):
    """(storage address, offset, shape, stride, dtype) of a tensor holding memory, else None."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or type(t) not in (torch.Tensor, nn.Parameter):
        return None
    address = t.untyped_storage().data_ptr()
    return None if address == 0 else (address, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _bytes(t: torch.Tensor) -> Tuple[int, int]:
    """The byte range of ``t``'s storage its elements span."""
    size = t.element_size()
    start = t.storage_offset() * size
    return start, start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)) * size


def _fold_tied(state_dict: Mapping[str, object], folded: Dict[str, torch.Tensor], agpe_keys) -> None:
    """Put each folded weight under every other entry that is the same tensor in memory (a
    tied weight saved under two names: the live :func:`strip` zeroes the one Parameter both
    names hold); refuse an entry that overlaps it in another shape or a second mask for it."""
    owners = {}
    for key in sorted(folded):
        where = _storage(state_dict[key])
        if where is None:
            continue
        if where in owners:
            raise ValueError(f"agpe.strip_state_dict: {key!r} and {owners[where]!r} are one tied weight with two "
                             f"agpe masks; call agpe_compile.strip on the model instead")
        owners[where] = key
    by_address: Dict[int, List[str]] = {}
    for where, key in owners.items():
        by_address.setdefault(where[0], []).append(key)
    for key, value in state_dict.items():
        where = _storage(value)
        if where is None or key in folded or key in agpe_keys or where[0] not in by_address:
            continue
        if where in owners:
            folded[key] = folded[owners[where]]
            continue
        start, end = _bytes(value)
        for weight_key in by_address[where[0]]:
            other_start, other_end = _bytes(state_dict[weight_key])
            if start < other_end and other_start < end:  # overlapping memory, another view
                raise ValueError(f"agpe.strip_state_dict: {key!r} shares memory with the agpe weight {weight_key!r} "
                                 f"in another shape or offset, so folding the mask would leave it stale; call "
                                 f"agpe_compile.strip on the model instead")


def _fold(state_dict: Mapping[str, object], weight_key: str) -> Tuple[torch.Tensor, float]:
    mask_key = weight_key + _MASK_SUFFIX
    mask, weight = state_dict[mask_key], state_dict.get(weight_key)
    if weight is None:
        raise ValueError(f"agpe.strip_state_dict: {mask_key!r} has no weight {weight_key!r} beside it")
    for key, value in ((weight_key, weight), (mask_key, mask)):
        if type(value) not in (torch.Tensor, nn.Parameter):  # DTensor / FSDP shards: the mask is per rank
            raise TypeError(f"agpe.strip_state_dict: {key!r} is a {type(value).__name__}, not a plain tensor; "
                            f"save a full (gathered) state dict, or call agpe_compile.strip on the model")
    if mask.dtype != torch.bool or mask.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"agpe.strip_state_dict: expected a 2-D bool {mask_key!r} and a 2-D {weight_key!r}, "
                         f"got {mask.dtype} {tuple(mask.shape)} and {tuple(weight.shape)}")
    (rows, cols), (n, k) = mask.shape, weight.shape
    block = n // rows if rows else 0
    if block == 0 or n != rows * block or k != cols * block:
        raise ValueError(f"agpe.strip_state_dict: {mask_key!r} of shape {tuple(mask.shape)} does not tile "
                         f"{weight_key!r} of shape {tuple(weight.shape)} with square blocks")
    density = float(mask.float().mean())
    weight = weight.detach()
    if not bool(mask.all()):
        keep = expand_block_mask(mask.to(weight.device), block, torch.bool)
        weight = weight.masked_fill(~keep, 0)
    return weight, density
