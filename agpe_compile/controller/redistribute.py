"""Split a global block budget into exact per-layer counts, and move it by saliency share.

* :func:`apportion` -- integers that sum exactly to a budget, within per-layer bounds,
  as close as possible to real-valued targets (water-filling, then largest remainder).
* :func:`redistribute` -- SNFS-style: keep ``1 - rate`` of each layer's (rescaled) count
  and hand the remaining ``rate`` of the budget out by each layer's share of a score
  (mean saliency or momentum per active block), so layers that need capacity grow.

Worked example: counts [6, 2], budget 8, scores [1, 3], rate 0.5: rescaled counts [6, 2],
kept half [3, 1], the other 4 blocks go 1:3 -> [1, 3]; result [4, 4].
"""

from __future__ import annotations

import math
from typing import List, Sequence


def apportion(targets: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]) -> List[int]:
    """Integers n with sum(n) == total and lo <= n <= hi, closest to ``targets``.

    Targets are scaled by one factor until the clamped values sum to ``total``; the
    fractional parts then go to the largest remainders (ties to the lower index).

    >>> apportion([2.5, 2.5, 5.0], 10, [0, 0, 0], [10, 10, 4])
    [3, 3, 4]
    """
    if sum(lo) > total or sum(hi) < total or any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"agpe: cannot split {total} blocks within bounds lo={list(lo)} hi={list(hi)}")
    weights = [max(float(t), 0.0) for t in targets]
    if sum(weights) == 0.0:
        weights = [float(b - a) for a, b in zip(lo, hi)]

    def filled(scale: float) -> List[float]:
        return [min(max(scale * w, a), b) for w, a, b in zip(weights, lo, hi)]

    low, high = 0.0, 1.0
    while sum(filled(high)) < total and high < 1e18:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if sum(filled(mid)) < total else (low, mid)
    reals = filled(high)
    counts = [min(max(math.floor(r + 1e-9), a), b) for r, a, b in zip(reals, lo, hi)]
    order = sorted(range(len(reals)), key=lambda i: (-(reals[i] - math.floor(reals[i] + 1e-9)), i))
    missing = total - sum(counts)
    while missing != 0:
        step = 1 if missing > 0 else -1
        for i in order if step > 0 else reversed(order):
            if missing != 0 and lo[i] <= counts[i] + step <= hi[i]:
                counts[i] += step
                missing -= step
    return counts


def redistribute(current: Sequence[int], budget: int, scores: Sequence[float], rate: float,
                 lo: Sequence[int], hi: Sequence[int]) -> List[int]:
    """New per-layer counts summing to ``budget``; ``rate`` of it moved by score share.

    >>> redistribute([6, 2], 8, [1.0, 3.0], 0.5, [1, 1], [8, 8])
    [4, 4]
    """
    have = sum(current)
    base = [c * budget / have for c in current] if have else [budget / len(current)] * len(current)
    clean = [s if math.isfinite(s) and s > 0 else 0.0 for s in scores]
    mass = sum(clean)
    if mass == 0.0 or rate == 0.0:
        return apportion(base, budget, lo, hi)
    targets = [(1.0 - rate) * b + rate * budget * s / mass for b, s in zip(base, clean)]
    return apportion(targets, budget, lo, hi)
