"""Per-block saliency EMAs, fed from the buffers the compiled backward fills.

The backward adds each call's block scores into ``LayerState.saliency`` (Note [Saliency
buffers] in ops/reference.py). At every update interval the controller takes that running
sum, divides it by the training steps it covers (one backward per step; gradient
accumulation makes it a per-step total) and folds it into an exponential moving average:

    ema = decay * ema + (1 - decay) * interval_mean     (blocks with history)
    ema = interval_mean                                 (fresh blocks: just grown, or first update)

then zeroes the buffers in place. Non-finite values never reach the EMA: the backward
already skips a call whose scores are not finite (``counters[1]``); if a running sum is
still not finite (overflow), the whole interval is skipped for that layer and logged.

Example::

    >>> ema = SaliencyEMA(decay=0.5)
    >>> ema.add_layer("fc", (1, 2))
    >>> ema.update("fc", torch.tensor([[4.0, 2.0]]), steps=2)
    True
    >>> ema.values["fc"].tolist()
    [[2.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Tuple

import torch

log = logging.getLogger(__name__)


def next_ema(ema: torch.Tensor, fresh: torch.Tensor, interval_mean: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA step; ``fresh`` blocks take the interval mean as they have no history.

    >>> next_ema(torch.tensor([2.0, 2.0]), torch.tensor([False, True]), torch.tensor([4.0, 4.0]), 0.5).tolist()
    [3.0, 4.0]
    """
    blended = decay * ema + (1.0 - decay) * interval_mean
    return torch.where(fresh, interval_mean, blended)


@dataclasses.dataclass
class SaliencyEMA:
    """EMA of each layer's per-block saliency, plus which blocks have no history yet."""

    decay: float
    values: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    fresh: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def add_layer(self, name: str, grid: Tuple[int, int], device=None) -> None:
        self.values[name] = torch.zeros(grid, dtype=torch.float32, device=device)
        self.fresh[name] = torch.ones(grid, dtype=torch.bool, device=device)

    def update(self, name: str, interval_sum: torch.Tensor, steps: int) -> bool:
        """Fold one interval's summed scores in; False (and nothing changes) if not finite."""
        if steps <= 0:
            return False
        if not bool(torch.isfinite(interval_sum).all()):
            log.warning("agpe: %s: saliency sum is not finite; interval skipped, masks keep "
                        "the previous scores", name)
            return False
        mean = interval_sum.float() / steps
        self.values[name] = next_ema(self.values[name], self.fresh[name], mean, self.decay)
        self.fresh[name] = torch.zeros_like(self.fresh[name])
        return True

    def mark_fresh(self, name: str, blocks: torch.Tensor) -> None:
        """Blocks just grown: their next interval replaces, not blends, the EMA."""
        self.fresh[name] = self.fresh[name] | blocks
        self.values[name] = self.values[name].masked_fill(blocks, 0.0)

    def load_state_dict(self, state: dict) -> None:
        for name in self.values:
            self.values[name] = state["values"][name].to(self.values[name].device, torch.float32).clone()
            self.fresh[name] = state["fresh"][name].to(self.fresh[name].device, torch.bool).clone()
