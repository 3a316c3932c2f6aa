"""Refuse models whose weights FSDP or tensor parallelism shards (Note [Sharded weights]).

Note [Sharded weights]
~~~~~~~~~~~~~~~~~~~~~~
agpe keeps each layer's mask, layout and scores in module buffers beside one whole [N, K]
weight, and its hooks and kernels read that weight in place. FSDP (``FullyShardedDataParallel``,
``fully_shard``) and tensor parallelism replace it: FSDP1 flattens the parameters into a
``FlatParameter`` (``use_orig_params=True`` leaves 1-D views of shards), FSDP2 and tensor
parallelism make them ``DTensor`` shards and hand the forward transient unsharded copies.
Without this check (helper audit BX, twenty-fifth session, 2 gloo ranks): FSDP2 in zero-code
mode pruned the transient copies only (the real weights kept values in pruned blocks and
the saved model was dense), FSDP1 trained dense with a warning about "no eligible layer",
others failed with unrelated messages ("not enough values to unpack", "mixed torch.Tensor
and DTensor", a parametrize hint). So ``prepare``, the ``Sparsifier`` and the backend
refuse such models, naming what they found. DDP works (a whole weight per rank).
In zero-code mode the backend also refuses linear weights that are views of a FlatParameter
(FSDP1 with ``use_orig_params=True``: Dynamo skips FSDP1's forward, so no FSDP class is in
the graph's module stack), and the first optimizer step names sharded parameters when no
graph held a linear layer (FSDP2 per layer: Dynamo skips the sharded layers' forwards, so
nothing is pruned; a warning, since a DTensor there need not be FSDP's).
FSDP1 with ``use_orig_params=False`` never reaches agpe (Dynamo runs it eagerly): not caught.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch
from torch import nn

SUPPORTED = _SUPPORTED = ("agpe cannot prune weights that FSDP or tensor parallelism shards (it keeps each layer's mask beside "
              "one whole [N, K] weight): train with DistributedDataParallel, which agpe supports, or without "
              "agpe (Note [Sharded weights] in agpe_compile/sharding.py)")


@functools.lru_cache(maxsize=1)
def _types():
    """(FSDP1 wrapper, FSDP2 module, DTensor, FlatParameter) classes, None where unavailable.
    Looked up once: the optimizer step hook asks for every layer at every step, and four
    imports per layer cost ~40 us of host time (twenty-seventh session's CPU profile)."""
    if not torch.distributed.is_available():
        return None, None, None, None
    found = []
    for module, name in (("torch.distributed.fsdp", "FullyShardedDataParallel"), ("torch.distributed.fsdp", "FSDPModule"),
                         ("torch.distributed.tensor", "DTensor"), ("torch.distributed.fsdp._flat_param", "FlatParameter")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            found.append(None)
    return tuple(found)


def tensor_reason(t: object) -> Optional[str]:
    """Why ``t`` is a sharded weight (a DTensor or an FSDP FlatParameter), or None."""
    _, _, dtensor, flat = _types()
    if dtensor is not None and isinstance(t, dtensor):
        return "a DTensor (FSDP2 fully_shard or tensor parallelism)"
    if flat is not None and isinstance(t, flat):
        return "an FSDP FlatParameter"
    return None


_LINEAR_TYPES = (nn.Linear, nn.MultiheadAttention)


def module_reason(module: nn.Module, weights: Optional[Iterable] = None) -> Optional[str]:
    """Why ``module``'s linear layers are sharded, or None: an FSDP module over a linear
    layer, or a linear weight that is a DTensor. ``weights``: (name, tensor) of the weights
    agpe would prune (default: every 2-D parameter of an nn.Linear or MultiheadAttention);
    a DTensor elsewhere (an embedding split by tensor parallelism, a buffer) is not refused
    (re-audit BZ)."""
    fsdp1, fsdp2, _, _ = _types()
    for name, sub in module.named_modules():
        where = f" ({name})" if name else ""
        if not any(isinstance(m, _LINEAR_TYPES) for m in sub.modules()):
            continue
        if fsdp1 is not None and isinstance(sub, fsdp1):
            return f"the model holds an FSDP FullyShardedDataParallel module{where}"
        if fsdp2 is not None and isinstance(sub, fsdp2):
            return f"the model holds a module sharded by FSDP2 fully_shard{where}"
    if weights is None:
        weights = [(name if param_name == "weight" and name else f"{name}.{param_name}".lstrip("."), param)
                   for name, sub in module.named_modules() if isinstance(sub, _LINEAR_TYPES)
                   for param_name, param in sub.named_parameters(recurse=False) if param.dim() == 2]
    for name, param in weights:
        reason = tensor_reason(param)
        if reason is not None:
            return f"the weight of its linear layer {name} is {reason}"
    return None


def classes_reason(classes: Iterable[type]) -> Optional[str]:
    """Why modules of these classes (a compiled graph's module stack) are sharded, or None."""
    fsdp1, fsdp2, _, _ = _types()
    for cls in classes:
        if not isinstance(cls, type):
            continue
        if fsdp1 is not None and issubclass(cls, fsdp1):
            return "the compiled code runs inside an FSDP FullyShardedDataParallel module"
        if fsdp2 is not None and issubclass(cls, fsdp2):
            return f"the compiled code runs inside a module sharded by FSDP2 fully_shard ({cls.__name__})"
    return None


def refuse_sharded_state(name: str, weight: Optional[torch.Tensor], mask: torch.Tensor) -> None:
    """A layer whose weight or mask became a DTensor after agpe prepared it (tensor parallelism
    applied after the Sparsifier: ``parallelize_module`` turns its buffers into DTensors too,
    and the step hook failed in torch's sharding propagation: re-audit BZ)."""
    for what, t in (("weight", weight), ("mask", mask)):
        reason = tensor_reason(t)
        if reason is not None:
            raise RuntimeError(f"agpe: layer {name}'s {what} became {reason} after agpe prepared it; {_SUPPORTED}")


def refuse_reshaped(name: str, weight: torch.Tensor) -> None:
    """A layer's weight that stopped being 2-D: FSDP1 with ``use_orig_params=True`` wrapped
    the model after agpe prepared it (its parameters became 1-D views of shards)."""
    if weight.dim() != 2:
        raise RuntimeError(f"agpe: layer {name}'s weight is now {tuple(weight.shape)}, not the [N, K] matrix its mask "
                           f"describes (FSDP with use_orig_params=True makes parameters 1-D shards); {_SUPPORTED}")


def refuse(reason: Optional[str], where: str) -> None:
    if reason is not None:
        raise ValueError(f"{where}: {reason}; {_SUPPORTED}")
