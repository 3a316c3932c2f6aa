"""Old vs new builds of the three update-path pieces the thirty-third session changed, at the
main job's shapes (125 x 125 and 125 x 98 block grids of 8, 1000 x 1000 / 1000 x 784 weights),
best of 5 rounds of 20 calls each, interleaved, one process:

    OMP_NUM_THREADS=2 python benchmarks/results/2026-11-29-cpu-step-after-update-session33/micro.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agpe_compile.controller import drop_grow, optimizer_state  # noqa: E402
from agpe_compile.ops import sampled_grad  # noqa: E402
from agpe_compile.ops.reference import expand_block_mask  # noqa: E402


def old_pattern(block_mask, b):  # the thirty-second session's build
    elements = block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return elements.to(torch.float32).to_sparse_csr(), elements.reshape(-1).nonzero().squeeze(1)


def old_pick(candidates, score, count, lowest):  # a stable sort of every candidate
    index = torch.nonzero(candidates).reshape(-1)
    return index[torch.sort(score[index], descending=not lowest, stable=True).indices[:count]]


def old_fill(value, blocks, block_size):
    value.masked_fill_(expand_block_mask(blocks, block_size, torch.bool), 0.0)


def new_fill(value, blocks, block_size):
    assert optimizer_state._fill_blocks_(value, blocks, block_size, 0.0)


def best(fn, rounds=5, calls=20):
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
gen = torch.Generator().manual_seed(0)
for grid, density in (((125, 125), 0.09), ((125, 98), 0.127)):
    mask = torch.rand(grid, generator=gen) < density
    print(f"grid {grid} density {density}: sampled-dW pattern old {best(lambda: old_pattern(mask, 8)):.2f} ms, "
          f"new {best(lambda: sampled_grad._pattern(mask, 8)):.2f} ms")
    score = torch.randn(grid, generator=gen).reshape(-1)
    inactive = ~mask.reshape(-1)
    count = int(0.3 * int(mask.sum()))
    print(f"  grow pick ({int(inactive.sum())} candidates, {count} picked): old "
          f"{best(lambda: old_pick(inactive, score, count, False)):.2f} ms, "
          f"new {best(lambda: drop_grow._pick(inactive, score, count, False)):.2f} ms")
    momentum = torch.randn(grid[0] * 8, grid[1] * 8)
    changed = torch.rand(grid, generator=gen) < 2 * count / mask.numel()  # dropped + grown blocks
    print(f"  optimizer-state reset ({int(changed.sum())} changed blocks): old "
          f"{best(lambda: old_fill(momentum, changed, 8)):.2f} ms, new {best(lambda: new_fill(momentum, changed, 8)):.2f} ms")
