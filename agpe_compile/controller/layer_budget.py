"""How many blocks each layer keeps, drops and grows at one update.

Note [Layer budgets and buckets]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The global target density d gives a budget of ``round(d * all blocks)`` active blocks.

* Policies that do not redistribute split it by the config's distribution (ERK or
  uniform), the same split every time the target is the same.
* Redistributing policies (SNFS, AGPE) start from the current counts rescaled to the new
  budget and move a ``rate`` share of it by layer score (redistribute.py). While the
  global target stays put, each layer stays inside its current density bucket (the
  kernels' layout capacity); layers may change bucket only at an update where the global
  target changes. So all re-bucketing, hence all recompiles, happens at the few updates
  where the global target moves.
* When the global target returns to a value it had before (AGPE's back-offs, and the
  descent after them), each layer is held to the layout bucket it had the last time the
  target was there (``remembered``; Note [Layouts a target had before] in sparsifier.py),
  so a return finds the compiled graph of that visit instead of a new one.

Then a layer with ``a`` active blocks and new count ``n`` swaps
``s = min(round(f * min(a, n)), blocks - max(a, n))`` blocks on top of the net change:
``n_drop = max(a - n, 0) + s`` and ``n_grow = max(n - a, 0) + s``.
Example: a = 10, n = 8, f = 0.3, 100 blocks: s = 2, drop 4, grow 2.

Note [Policies that never grow]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A policy without a grow score (``gmp``) cannot give a layer more blocks than it has. A
plan that asks for that (a layer thawed after being frozen, masks adopted from a
checkpoint whose split differs from the distribution's) would leave that layer where it is
while the others shrink to their shares: the global density ended below the target with
no word (0.195 for a target of 0.25 after a freeze). So for such policies every count is
capped at the layer's current count and the blocks a capped layer cannot take go to the
layers that can (water-filling, ``apportion``). Only when all the layers together have
fewer blocks than the budget does the global density stay below the target; the
Sparsifier says so.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from agpe_compile.layout import bucket_for

from .init_layouts import block_counts, layer_densities
from .redistribute import apportion, redistribute


def global_density(masks) -> float:
    """The fraction of active blocks over all ``masks`` (bool [R, C] each; 1.0 for none).

    >>> import torch
    >>> global_density([torch.tensor([[True, False]]), torch.tensor([[True, True]])])
    0.75
    """
    masks = list(masks)
    total = sum(m.numel() for m in masks)
    return sum(int(m.sum()) for m in masks) / total if total else 1.0


def swap_counts(active: int, target: int, blocks: int, fraction: float) -> Tuple[int, int]:
    """(n_drop, n_grow) for one layer; see Note [Layer budgets and buckets].

    >>> swap_counts(10, 8, 100, 0.3)
    (4, 2)
    """
    swap = min(round(fraction * min(active, target)), blocks - max(active, target))
    return max(active - target, 0) + swap, max(target - active, 0) + swap


def bucket_bounds(count: int, blocks: int, buckets: Sequence[float], cap: float) -> Tuple[int, int]:
    """The range of counts whose density has the same bucket as ``count``'s, capped.

    >>> bucket_bounds(30, 100, (1.0, 0.5, 0.25), 1.0)
    (26, 50)
    """
    lo, hi = bucket_range(bucket_for(count / blocks, buckets), blocks, buckets, cap)
    return min(lo, count), max(hi, count)


def bucket_range(bucket: float, blocks: int, buckets: Sequence[float], cap: float = 1.0) -> Tuple[int, int]:
    """The counts (at least one block) whose density has bucket ``bucket`` (a value of
    ``buckets``) in a layer of ``blocks`` blocks, capped at ``cap``; empty (lo > hi) where
    no count of that layer falls in it.

    >>> bucket_range(0.5, 100, (1.0, 0.5, 0.25)), bucket_range(0.25, 100, (1.0, 0.5, 0.25))
    ((26, 50), (1, 25))
    """
    below = [b for b in buckets if b < bucket]
    lo = math.floor(round(max(below) * blocks, 6)) + 1 if below else 1
    hi = min(math.floor(round(bucket * blocks, 6)), math.floor(round(cap * blocks, 6)), blocks)
    return max(lo, 1), hi


def plan_counts(current: Sequence[int], grids: Sequence[Tuple[int, int]], block_size: Sequence[int],
                target: float, target_moved: bool, distribution: str, scores: Optional[Sequence[float]],
                rate: float, buckets: Sequence[float], cap: float, floor: float = 0.0,
                grows: bool = True, no_growth: Optional[Sequence[bool]] = None,
                remembered: Optional[Sequence[Tuple[int, int]]] = None) -> List[int]:
    """New active-block count per layer for global density ``target``.

    ``floor``: when redistributing, no layer goes below ``floor * target`` density (a share
    of the global target), so saliency cannot starve a layer. ``grows=False``: no layer
    gains blocks (Note [Policies that never grow]); ``no_growth``: the layers marked True
    gain none, the others take what they cannot (up to ``cap``). ``remembered``: when the
    target moved, per layer the range of counts of the layout bucket it had the last time
    the target was here; the redistribution keeps each layer in it where the budget, the
    floors and the caps allow it (else it is ignored, as a whole).
    """
    counts = _plan(current, grids, block_size, target, target_moved, distribution, scores, rate, buckets, cap, floor,
                   remembered)
    if not grows:
        return without_growth(counts, current)
    if no_growth is not None and any(no_growth):
        sizes = [r * c for r, c in grids]
        raw = [max(1, min(math.floor(round(cap * s, 6)), s)) for s in sizes]
        most = [a if held else max(n, r) for a, n, r, held in zip(current, counts, raw, no_growth)]
        # the plan raises caps rounded down on tiny layers by the blocks they lack (_fit_caps):
        # as many here, on the layers that can grow; max_layer_density holds otherwise
        extra = max(0, sum(counts) - sum(raw))
        while extra > 0:
            free = [i for i, held in enumerate(no_growth) if not held and most[i] < sizes[i]]
            if not free:
                break
            i = max(free, key=lambda j: (sizes[j] - most[j], -j))
            most[i], extra = most[i] + 1, extra - 1
        return without_growth(counts, current, most)
    return counts


def without_growth(counts: Sequence[int], current: Sequence[int],
                   most: Optional[Sequence[int]] = None) -> List[int]:
    """``counts`` with no layer above ``most`` (default: its ``current`` count), the same
    total where the layers have the room (Note [Policies that never grow]).

    >>> without_growth([30, 30], [10, 60])
    [10, 50]
    >>> without_growth([30, 30], [10, 60], most=[10, 100])
    [10, 50]
    """
    most = list(current) if most is None else list(most)
    if all(n <= m for n, m in zip(counts, most)):
        return list(counts)
    total = min(sum(counts), sum(most))
    return apportion([float(n) for n in counts], total, [min(1, m) for m in most], most)


def _plan(current, grids, block_size, target, target_moved, distribution, scores, rate, buckets, cap, floor,
          remembered=None):
    sizes = [r * c for r, c in grids]
    if scores is None:
        shapes = [(r * b, c * b) for (r, c), b in zip(grids, block_size)]
        return block_counts(layer_densities(distribution, shapes, target, cap), grids, target)
    budget = min(max(round(target * sum(sizes)), len(sizes)), sum(sizes))
    caps = _fit_caps([max(1, min(math.floor(round(cap * s, 6)), s)) for s in sizes], sizes, budget)
    floors = _fit(
        [min(max(1, math.ceil(round(floor * target * s, 6))), c) for s, c in zip(sizes, caps)], budget)
    lo, hi = floors, caps
    if not target_moved:
        bounds = [bucket_bounds(a, s, buckets, cap) for a, s in zip(current, sizes)]
        kept = [(max(b[0], f), b[1]) for b, f in zip(bounds, floors)]
    elif remembered is not None:
        kept = [(max(r[0], f), min(r[1], c)) for r, f, c in zip(remembered, floors, caps)]
    else:
        kept = None
    if kept is not None and all(l <= h for l, h in kept) and sum(k[0] for k in kept) <= budget <= sum(
            k[1] for k in kept):
        lo, hi = [k[0] for k in kept], [k[1] for k in kept]
    return redistribute(current, budget, scores, rate, lo, hi)


def _fit(floors: List[int], budget: int) -> List[int]:
    """Floors rounded up per layer can add up to more blocks than the global budget
    (``min_layer_share`` near 1, or small layers at one block each): lower the largest ones
    a block at a time until they fit (never below one block; ``budget`` is at least one
    block per layer)."""
    floors = list(floors)
    while sum(floors) > budget:
        i = max(range(len(floors)), key=lambda j: (floors[j], j))
        if floors[i] <= 1:
            break
        floors[i] -= 1
    return floors


def _fit_caps(caps: List[int], sizes: Sequence[int], budget: int) -> List[int]:
    """Caps rounded down per layer can add up to fewer blocks than the global budget (small
    layers under ``max_layer_density``): raise the ones with the most room a block at a
    time until the budget fits (it never exceeds the blocks there are)."""
    caps = list(caps)
    while sum(caps) < budget:
        i = max(range(len(caps)), key=lambda j: (sizes[j] - caps[j], -j))
        if caps[i] >= sizes[i]:
            break
        caps[i] += 1
    return caps
