"""Per-layer densities for a global density (uniform, ERK) and the initial block masks.

Note [ERK densities]
~~~~~~~~~~~~~~~~~~~~
Erdos-Renyi-Kernel (Evci et al. 2020, for linear layers = Erdos-Renyi): a layer with
weight [N, K] gets density ``eps * (N + K) / (N * K)``, with one ``eps`` for the model
chosen so that the number of active weights equals ``density * total``. A layer whose
density would exceed the cap is set to the cap and ``eps`` is solved again over the others.

Tiny example, layers [4, 4] and [2, 4] at density 0.5 (12 of 24 weights):
raw densities 8/16 = 0.5 and 6/8 = 0.75; eps * (8 + 6) = 12 gives eps = 6/7, so
densities 3/7 and 9/14 (48/7 + 36/7 = 12 weights). At density 0.9 the second layer would
get 1.16: it is capped at 1 (8 weights) and eps * 8 = 21.6 - 8 gives the first 0.85.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .redistribute import apportion


def uniform_densities(shapes: Sequence[Tuple[int, int]], density: float) -> List[float]:
    """Every layer at ``density``.

    >>> uniform_densities([(4, 4), (2, 8)], 0.5)
    [0.5, 0.5]
    """
    return [density for _ in shapes]


def erk_densities(shapes: Sequence[Tuple[int, int]], density: float, cap: float = 1.0) -> List[float]:
    """ERK densities of weights of ``shapes``; see Note [ERK densities].

    >>> [round(d, 4) for d in erk_densities([(4, 4), (2, 4)], 0.5)]
    [0.4286, 0.6429]
    """
    sizes = [n * k for n, k in shapes]
    raw = [(n + k) / (n * k) for n, k in shapes]
    capped: set = set()
    while True:
        budget = density * sum(sizes) - sum(cap * sizes[i] for i in capped)
        divisor = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in capped)
        eps = budget / divisor if divisor else 0.0
        over = [i for i in range(len(shapes)) if i not in capped and eps * raw[i] > cap]
        if not over:
            return [cap if i in capped else eps * raw[i] for i in range(len(shapes))]
        capped.add(max(over, key=lambda i: raw[i]))


def layer_densities(distribution: str, shapes: Sequence[Tuple[int, int]], density: float,
                    cap: float = 1.0) -> List[float]:
    """Dispatch on the config's ``distribution`` name (``erk`` or ``uniform``)."""
    if distribution == "erk":
        return erk_densities(shapes, density, cap)
    if distribution == "uniform":
        return uniform_densities(shapes, min(density, cap))
    raise ValueError(f"agpe: distribution got {distribution!r}; expected 'erk' or 'uniform'")


def block_counts(densities: Sequence[float], grids: Sequence[Tuple[int, int]], density: float) -> List[int]:
    """Active blocks per layer: exactly ``round(density * all blocks)`` in total, >= 1 each.

    >>> block_counts([0.25, 0.75], [(2, 2), (2, 2)], 0.5)
    [1, 3]
    """
    sizes = [r * c for r, c in grids]
    total = min(max(round(density * sum(sizes)), len(sizes)), sum(sizes))
    return apportion([d * s for d, s in zip(densities, sizes)], total, [1] * len(sizes), sizes)


def random_block_mask(grid: Tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """A bool [R, C] mask with exactly ``count`` active blocks chosen uniformly at random.

    >>> int(random_block_mask((3, 4), 5, torch.Generator().manual_seed(0)).sum())
    5
    """
    rows, cols = grid
    order = torch.randperm(rows * cols, generator=generator)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(rows, cols)


def initial_masks(states: Sequence, config, generator: torch.Generator) -> List[Optional[torch.Tensor]]:
    """Each layer's starting mask at ``config.start_density`` (random blocks, counts by the
    config's distribution); ``None`` for every layer when the start is dense."""
    density = config.start_density
    if density >= 1.0 or not states:
        return [None] * len(states)
    shapes = [s.weight_shape for s in states]
    counts = block_counts(layer_densities(config.distribution, shapes, density, config.max_layer_density),
                          [s.grid for s in states], density)
    return [random_block_mask(s.grid, count, generator).to(s.block_mask.device) for s, count in zip(states, counts)]
