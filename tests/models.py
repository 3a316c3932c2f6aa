"""Tiny models and helpers shared by the tests (CPU, fp32)."""

from __future__ import annotations

import os
import sys
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.ops.reference import expand_block_mask
from agpe_compile.state import state_of

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from gpt import Block as GPTBlock  # noqa: E402  (the examples' GPT block: qkv/proj/fc1/fc2 + causal SDPA)


class MLP(nn.Module):
    def __init__(self, sizes: Sequence[int] = (64, 128, 64, 32)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TiedLM(nn.Module):
    """Embedding whose table is also the output projection (weight tying)."""

    def __init__(self, vocab: int = 64, d_model: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.fc = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(F.relu(self.fc(self.embed(tokens))))


class BrokenMLP(MLP):
    """An MLP with a graph break between its layers (two Dynamo graphs)."""

    def forward(self, x):
        x = F.relu(self.layers[0](x))
        torch._dynamo.graph_break()
        return self.layers[1](x)


def set_random_masks(model: nn.Module, density: float, seed: int = 0, only: str = None) -> None:
    """Exactly round(density * blocks) active blocks per layer (at least 1); zero the rest.
    ``only``: just the layer of that name.

    Zeroing inactive weights is the invariant the controller keeps.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            state = state_of(param)
            if state is None or (only is not None and state.name != only):
                continue
            total = state.block_mask.numel()
            active = max(1, round(density * total))
            order = torch.randperm(total, generator=gen)
            flat = torch.zeros(total, dtype=torch.bool)
            flat[order[:active]] = True
            state.block_mask.copy_(flat.view(state.grid))
            param.mul_(expand_block_mask(state.block_mask, state.block_size, param.dtype))


def eager_masked(model: nn.Module, *inputs):
    """The oracle: eager forward with every agpe weight replaced by W * M."""
    params: Dict[str, torch.Tensor] = dict(model.named_parameters())
    for name, param in model.named_parameters():
        state = state_of(param)
        if state is not None:
            params[name] = param * expand_block_mask(state.block_mask, state.block_size, param.dtype)
    return torch.func.functional_call(model, params, inputs)


def grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def aot_backend(**options) -> agpe_compile.AgpeBackend:
    return agpe_compile.AgpeBackend({"inductor": False, **options})
