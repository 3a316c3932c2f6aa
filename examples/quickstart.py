"""Quick start: compile a GPT-style model with the agpe backend, inspect it, train a few steps.

    python examples/quickstart.py

Masks are set by hand here (half the blocks of every layer); the Sparsifier
(agpe_compile.Sparsifier) is what changes them during real training.
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

import agpe_compile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT  # noqa: E402


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    model = GPT(vocab=96, d_model=128, n_heads=4, n_layers=2, seq_len=64)
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

    # Done training: fold the masks into the weights and drop agpe's buffers and hooks. The
    # plain model computes what the compiled one did (at dense speed) and its state_dict
    # has only the keys of GPT itself.
    with torch.no_grad():
        expected = cmodel(idx)
    densities = agpe_compile.strip(model)
    with torch.no_grad():
        error = float((model(idx) - expected).abs().max())
    print(f"stripped {len(densities)} layers (mean density {sum(densities.values()) / len(densities):.2f}); "
          f"{len(model.state_dict())} state_dict keys; max |plain - agpe| = {error:.1e}")


if __name__ == "__main__":
    main()
