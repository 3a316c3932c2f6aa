"""Data-parallel training: one mask decision for all ranks.

Note [Data-parallel masks]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Under DistributedDataParallel every rank holds the same weights and sees its own shard of
the batch. DDP averages the gradients, so the weights stay equal, but each rank's op
accumulates saliency, dense-gradient scores and loss from its own shard only. Deciding on
those, the ranks would drop and grow different blocks, zero different weights and from
then on train different models (measured before this existed: masks 8 of 32 blocks apart,
weights 0.27 apart after 60 steps; with DDP's buffer broadcast the masks were forced
equal but the weights still drifted apart). So, when ``torch.distributed`` is initialized
with more than one rank, the Sparsifier at each update interval:

1. averages the interval's saliency sums, dense-gradient scores and mean loss over the
   ranks (:func:`mean_over_ranks`: one all-reduce of one float64 vector), which is what
   every rank then decides on: the mean of the ranks' block scores, not the score of the
   global batch's gradient (each rank's scores are computed from its own gradient,
   before DDP's all-reduce);
2. checks that every rank holds the same masks before and after the decision
   (:func:`check_same_on_every_rank`, part of the same all-reduce before, one more after)
   and raises if not, instead of training diverged replicas.

The decisions are then identical: same inputs, same code, and a random generator seeded by
``AGPEConfig.seed`` on every rank. So that every later collective matches, the Sparsifier
checks when it is created that all ranks have the same AGPEConfig and layers
(:func:`check_same_setup`) and the same initial masks. Rank 0 alone writes the audit file. The counters behind ``Sparsifier.flops`` stay per rank
(the FLOPs this rank executed). ``prepare`` lists the agpe buffers in
``_ddp_params_and_buffers_to_ignore`` of the model it prepares, so DDP does not broadcast
rank 0's running sums over the other ranks' at every forward; wrap that same module in DDP.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel.__init__


def world_size() -> int:
    """Ranks in the default process group; 1 when torch.distributed is not in use."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's rank in the default group; 0 without torch.distributed."""
    return torch.distributed.get_rank() if world_size() > 1 else 0


def _collective_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return next((t.device for t in tensors if t.device.type == "cuda"),
                    torch.device("cuda", torch.cuda.current_device()))
    return torch.device("cpu")


def mean_over_ranks(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The elementwise mean of ``tensors`` over all ranks (one all-reduce); same shapes and
    dtypes, on the collective's device. Every rank must pass tensors of the same shapes and
    dtypes in the same order."""
    from .controller.host_sync import pack_flat, unpack_flat  # here: state.py imports this module

    if not tensors:
        return []
    flat, order = pack_flat(tensors)
    flat = flat.to(_collective_device(tensors))
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    return unpack_flat(flat, tensors, order)


def check_same_on_every_rank(masks: Dict[str, torch.Tensor], when: str,
                             summed: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Raise if a block mask differs between ranks. ``summed``: the masks already summed over
    the ranks (from an all-reduce done anyway); else one all-reduce here."""
    world = world_size()
    if summed is None:
        names = list(masks)
        reduced = mean_over_ranks([masks[n].to(torch.float64) for n in names])
        summed = {n: r * world for n, r in zip(names, reduced)}
    for name, mask in masks.items():
        total = summed[name].to("cpu", torch.float64)
        if not torch.equal(total, mask.to("cpu", torch.float64) * world):
            differ = int((total != mask.to("cpu", torch.float64) * world).sum())
            raise RuntimeError(
                f"agpe: the block masks differ between the {world} ranks {when} (layer {name!r}: {differ} blocks). "
                f"Each rank must prepare the same model with the same AGPEConfig (seed included), create its "
                f"Sparsifier before wrapping the model in DistributedDataParallel, call sparsifier.step() on "
                f"every rank at every step, and not edit masks on one rank only (Note [Data-parallel masks] in "
                f"agpe_compile/distributed.py)")


def _spellings(names: Sequence[str]) -> List[str]:
    # DDP names the buffers of the module it wraps; ``DDP(torch.compile(model))`` wraps the
    # OptimizedModule, which reads the attribute through to ``model`` and names them
    # ``_orig_mod.<name>``.
    return [spelling for name in names for spelling in (name, f"_orig_mod.{name}")]


def check_same_setup(config, layers: Dict) -> None:
    """Raise on every rank, at once, unless all ranks have the same AGPEConfig (the audit path
    aside) and the same layers (names, grids, block sizes): later collectives would otherwise
    meet different vectors, which gloo answers by aborting the process and NCCL by hanging."""
    import hashlib
    import json

    setup = {key: value for key, value in config.to_dict().items() if key != "audit_path"}
    setup["layers"] = [(name, list(state.grid), state.block_size) for name, state in layers.items()]
    digest = int.from_bytes(hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).digest()[:6], "big")
    device = _collective_device([state.block_mask for state in layers.values()])
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if int(both[0]) != digest or int(both[1]) != -digest:
        raise RuntimeError(
            f"agpe: the {world_size()} ranks created their Sparsifiers with different AGPEConfigs or different "
            f"layers (compared: every AGPEConfig field but audit_path, and each layer's name, block grid and "
            f"block size). Data-parallel ranks must train the same model with the same config; ranks that train "
            f"different models set AGPEConfig(data_parallel='off') (Note [Data-parallel masks] in "
            f"agpe_compile/distributed.py)")


def ignore_in_ddp(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Keep buffers ``names`` (fully qualified in ``model``) out of DDP's broadcast, whether
    DDP wraps ``model`` or ``torch.compile(model)``."""
    listed = list(getattr(model, DDP_IGNORE_ATTR, None) or [])
    listed += [n for n in _spellings(names) if n not in listed]
    setattr(model, DDP_IGNORE_ATTR, listed)


def forget_in_ddp(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Undo :func:`ignore_in_ddp` for ``names`` (``agpe_compile.strip``)."""
    listed = getattr(model, DDP_IGNORE_ATTR, None)
    if listed is None:
        return
    kept = [n for n in listed if n not in set(_spellings(names))]
    if kept:
        setattr(model, DDP_IGNORE_ATTR, kept)
    else:
        delattr(model, DDP_IGNORE_ATTR)
