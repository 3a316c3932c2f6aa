"""Tiny models and a training loop shared by the controller tests (CPU, fp32, aot_eager)."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.ops.reference import expand_block_mask


class TinyMLP(nn.Module):
    """16 -> 32 -> 32 -> 8 with block size 4: grids 8x4, 8x8, 2x8 (32, 64, 16 blocks)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def batches(n: int, seed: int = 0, rows: int = 32):
    """A fixed, seeded stream of (x, y) batches: identical in every process."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 8, generator=gen)
    for _ in range(n):
        x = torch.randn(rows, 16, generator=gen)
        yield x, (x @ teacher).argmax(1)


def make_run(config: AGPEConfig, optimizer: str = "sgd", seed: int = 0):
    """(model, optimizer, sparsifier, compiled model, backend) for TinyMLP."""
    torch.manual_seed(seed)
    model = TinyMLP()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    backend = agpe_compile.AgpeBackend({"inductor": False})
    sparsifier = Sparsifier(model, opt, config, recompile_counter=lambda: backend.graph_count)
    return model, opt, sparsifier, torch.compile(model, backend=backend), backend


def train(cmodel, opt, sparsifier: Optional[Sparsifier], data, tick=None) -> List[float]:
    """Plain training loop; ``tick`` (zero-code mode) runs before each compiled call."""
    losses = []
    for x, y in data:
        if tick is not None:
            tick()
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sparsifier is not None:
            sparsifier.step(loss)
        losses.append(loss.item())
    return losses


def inactive_elements(state) -> torch.Tensor:
    """Bool [N, K]: weights of inactive blocks."""
    return expand_block_mask(~state.block_mask, state.block_size, torch.bool)
