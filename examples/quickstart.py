"""Quick start: compile a GPT-style model with the agpe backend, inspect it, train a few steps.

    python examples/quickstart.py

Masks are set by hand here (half the blocks of every layer); the Sparsifier
(agpe_compile.Sparsifier) is what changes them during real training.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 96, d_model: int = 128, n_heads: int = 4, n_layers: int = 2, seq: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_heads) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def main() -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    states = agpe_compile.prepare(model, options={"block_size": 32, "exclude": ["head"]})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for state in states.values():
            state.block_mask.copy_(torch.rand(state.grid, generator=gen) < 0.5)
            state.weight.mul_(agpe_compile.ops.reference.expand_block_mask(state.block_mask, 32, state.weight.dtype))

    idx = torch.randint(0, 96, (8, 64))
    print(agpe_compile.explain(model, idx, options={"exclude": ["head"]}))

    cmodel = torch.compile(model, backend="agpe", options={"exclude": ["head"]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable toy task: predict the next token of a fixed random sequence.
    data = torch.randint(0, 96, (64, 65), generator=gen)
    for step in range(20):
        batch = data[torch.randint(0, 64, (8,), generator=gen)]
        start = time.perf_counter()
        loss = F.cross_entropy(cmodel(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.3f}  {1e3 * (time.perf_counter() - start):7.1f} ms")
    top = max(states.values(), key=lambda s: float(s.saliency.sum()))
    print(f"most salient layer so far: {top.name} (density {top.density:.2f})")


if __name__ == "__main__":
    main()
