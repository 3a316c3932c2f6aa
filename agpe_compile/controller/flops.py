"""Training-FLOP accounting of agpe layers, from the live masks and the backward's row counter.

Note [Training FLOPs]
~~~~~~~~~~~~~~~~~~~~~
A layer with weight [N, K], block size b and ``a`` active blocks (of R * C) that sees
``rows`` rows (tokens) in a training step executes, counting a multiply-add as 2 FLOPs:

    forward  Y  = X W^T     2 * rows * a * b^2
    backward dX = dY W      2 * rows * a * b^2
    backward dW = dY^T X    2 * rows * a * b^2   (active blocks only)
    scoring  |dY^T X|^2     2 * rows * (R*C - a) * b^2   (only on steps with score_dense set)

so ``6 * rows * a * b^2`` per step, plus the dense-gradient scoring of inactive blocks on
update steps. The dense equivalent is ``6 * rows * N * K``. Counting from the number of
live blocks (not a layout's padded capacity) gives the work the algorithm needs; ``rows``
comes from ``LayerState.counters[0]``, which every backward increments, so it is exact for
any batch size. Everything is an integer, so hand counts match exactly.

Tiny example: N = K = 4, b = 2 (4 blocks), 1 active, 8 rows, one scored step:
sparse = 6*8*1*4 + 2*8*3*4 = 192 + 192 = 384, dense = 6*8*16 = 768.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, Tuple


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """Cumulative training FLOPs of one layer."""

    sparse: int = 0
    dense: int = 0
    rows: int = 0


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """Per-layer and total training FLOPs, sparse (executed) and dense-equivalent.

    >>> report = FlopReport({"fc": LayerFlops(sparse=384, dense=768, rows=8)})
    >>> report.sparse, report.dense, report.ratio
    (384, 768, 0.5)
    """

    layers: Dict[str, LayerFlops]

    @property
    def sparse(self) -> int:
        return sum(layer.sparse for layer in self.layers.values())

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers.values())

    @property
    def ratio(self) -> float:
        return self.sparse / self.dense if self.dense else 1.0


def step_flops(rows: int, active: int, blocks: int, block_size: int, scored_rows: int = 0) -> int:
    """Executed FLOPs of ``rows`` rows at ``active`` of ``blocks``; see Note [Training FLOPs].

    >>> step_flops(rows=8, active=1, blocks=4, block_size=2, scored_rows=8)
    384
    """
    area = block_size * block_size
    return 6 * rows * active * area + 2 * scored_rows * (blocks - active) * area


class FlopAccountant:
    """Accumulates :func:`step_flops` per layer; the caller feeds row deltas at each mask change.

    >>> acc = FlopAccountant({"fc": ((4, 4), 2)})
    >>> acc.add("fc", rows=8, active=1, scored_rows=8)
    >>> acc.report().layers["fc"]
    LayerFlops(sparse=384, dense=768, rows=8)
    """

    def __init__(self, layers: Dict[str, Tuple[Tuple[int, int], int]]):
        self.shapes = dict(layers)
        self.totals = {name: LayerFlops() for name in self.shapes}

    def add(self, name: str, rows: int, active: int, scored_rows: int = 0) -> None:
        (n, k), b = self.shapes[name]
        old = self.totals[name]
        self.totals[name] = LayerFlops(
            sparse=old.sparse + step_flops(rows, active, (n // b) * (k // b), b, scored_rows),
            dense=old.dense + 6 * rows * n * k,
            rows=old.rows + rows,
        )

    def report(self) -> FlopReport:
        return FlopReport(dict(self.totals))

    def state_dict(self) -> dict:
        return {name: dataclasses.asdict(f) for name, f in self.totals.items()}

    def load_state_dict(self, state: dict) -> None:
        """Every layer's ``{sparse, dense, rows}``, each an integer (an int, a numpy integer
        or a 0-d integer tensor); raises on anything else before changing any. (Negative
        totals load: earlier versions wrote them after a model whose counters were rewound.)"""
        loaded = {name: _layer_flops(name, state[name]) for name in self.totals}
        self.totals.update(loaded)


def _layer_flops(name: str, entry) -> LayerFlops:
    fields = [f.name for f in dataclasses.fields(LayerFlops)]
    if not isinstance(entry, dict) or set(entry) != set(fields):
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"flops[{name!r}] must hold exactly {fields}, got {keys}")
    values = {}
    for field in fields:
        value = entry[field]
        if hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == ():
            value = value.item()  # numpy scalars and 0-d tensors
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"flops[{name!r}][{field!r}] is {value!r}, expected an int")
        values[field] = int(value)
    return LayerFlops(**values)
