"""Tiny models and helpers shared by the tests (CPU, fp32)."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.ops.reference import expand_block_mask
from agpe_compile.state import state_of


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


class GPTBlock(nn.Module):
    """Pre-LN block: qkv/proj attention with causal SDPA, fc1/fc2 MLP."""

    def __init__(self, d_model: int = 64, n_heads: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


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


def set_random_masks(model: nn.Module, density: float, seed: int = 0) -> None:
    """Exactly round(density * blocks) active blocks per layer (at least 1); zero the rest.

    Zeroing inactive weights is the invariant the controller keeps.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            state = state_of(param)
            if state is None:
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
