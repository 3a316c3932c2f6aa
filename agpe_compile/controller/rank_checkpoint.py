"""Each data-parallel rank's own part of a checkpoint.

Note [Ranks' own state]
~~~~~~~~~~~~~~~~~~~~~~~
Under data parallelism the ranks hold the same masks and weights, but each rank's saliency
sums, dense-gradient scores and row counters of the current update interval come from its
own shard (they are averaged only at the update, Note [Data-parallel masks] in
distributed.py), and so do its Sparsifier's loss window and FLOP counts. A checkpoint that
rank 0 writes (``model.state_dict()`` and ``sparsifier.state_dict()``) holds rank 0's:
resumed from a save between two updates, every rank would start from rank 0's sums, and the
next update would average rank 0's scores twice (a 2-rank run resumed from step 5 with
updates every 2 steps ended with other masks than the run without the interruption). At an
update-interval boundary the sums are empty and the shared checkpoint alone resumes exactly.

So each rank also saves ``sparsifier.rank_state_dict()`` to a file of its own (as
Hugging Face's Trainer does for its RNG states) and, on resume, loads it with
``sparsifier.load_rank_state_dict`` LAST, after the model's and the Sparsifier's shared state
(the model's state dict would overwrite the buffers with rank 0's).

Example (every rank)::

    >>> torch.save(sparsifier.rank_state_dict(), f"ckpt/agpe_rank_{dist.get_rank()}.pt")
    >>> ...  # resume: model, optimizer and sparsifier from rank 0's checkpoint, then
    >>> sparsifier.load_rank_state_dict(torch.load(f"ckpt/agpe_rank_{dist.get_rank()}.pt"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from agpe_compile import distributed

from . import checkpoint

if TYPE_CHECKING:
    from .sparsifier import Sparsifier

# Layer buffers that differ between the ranks: the interval's sums and the row counters.
RANK_BUFFERS = ("saliency", "dense_grad_sq", "counters")


def save_rank(sp: "Sparsifier") -> dict:
    """This rank's Sparsifier state and its layers' rank-local buffers (copies, on the CPU)."""
    return {
        "world_size": distributed.world_size(),
        "rank": distributed.rank(),
        "sparsifier": checkpoint.save(sp),
        "buffers": {name: {key: getattr(state, key).detach().cpu().clone() for key in RANK_BUFFERS}
                    for name, state in sp.layers.items()},
    }


def load_rank(sp: "Sparsifier", state: dict) -> None:
    """Restore :func:`save_rank`'s ``state`` of THIS rank (checked) into ``sp`` and its layers.
    Every part is read and checked first: a refused state changes nothing."""
    if not isinstance(state, dict) or not {"rank", "world_size", "sparsifier", "buffers"} <= set(state):
        got = (f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict)
               else f"a {type(state).__name__}")
        hint = ("; a Sparsifier.state_dict() goes to load_state_dict()"
                if isinstance(state, dict) and "format_version" in state else "")
        raise ValueError(f"agpe: expected a Sparsifier.rank_state_dict() (rank, world_size, sparsifier, buffers), "
                         f"got {got}{hint}; nothing was loaded")
    world, rank = distributed.world_size(), distributed.rank()
    if state.get("world_size") != world or state.get("rank") != rank:
        raise ValueError(f"agpe: this rank state was saved by rank {state.get('rank')} of "
                         f"{state.get('world_size')}, but this is rank {rank} of {world}: load each rank's own file, "
                         f"saved with the same number of ranks (or resume from an update-interval boundary, where "
                         f"the shared checkpoint alone is exact)")
    saved = state["buffers"]
    if not isinstance(saved, dict) or set(saved) != set(sp.layers):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"agpe: rank state layers {got} do not match the Sparsifier's {sorted(sp.layers)}")
    try:
        buffers = {name: {key: checkpoint._buffer(name, key, saved[name][key], getattr(layer, key), "buffers")
                          for key in RANK_BUFFERS} for name, layer in sp.layers.items()}
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        what = f"missing entry {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"agpe: the rank state's buffers are malformed or incomplete ({what}); nothing was "
                         f"loaded") from error
    checkpoint.load(sp, state["sparsifier"])  # checks all of its own fields before writing any
    with torch.no_grad():
        for name, layer in sp.layers.items():
            for key in RANK_BUFFERS:
                getattr(layer, key).copy_(buffers[name][key])
    sp._snapshot_awaits_model_load = {}  # the counters are the snapshot's now
