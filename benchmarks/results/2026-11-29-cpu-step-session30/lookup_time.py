"""Time one lookup of a cached mask-derived tensor (agpe_compile.ops.mask_cache.derived).

The main job's grid: a 125 x 125 bool block mask on the CPU (a 1000 x 1000 layer at
block 8), density 0.1. The key is built once before timing, so every timed call is a
cache hit: it copies the mask's bytes and compares them with the entry's copy. One
thread; the best of ROUNDS rounds of LOOKUPS lookups each is reported (and the median,
to show the spread).

    OMP_NUM_THREADS=1 PYTHONPATH=. python \
        benchmarks/results/2026-11-29-cpu-step-session30/lookup_time.py
"""

import platform
import statistics
import time

import torch

from agpe_compile.ops import mask_cache

ROUNDS = 20
LOOKUPS = 10_000
GRID = 125
BLOCK = 8


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(GRID, GRID, generator=generator) < 0.1
    built = mask_cache.derived(mask, BLOCK, "lookup_time", lambda: mask.repeat_interleave(BLOCK, 0))
    assert mask_cache.derived(mask, BLOCK, "lookup_time", lambda: None) is built  # cached

    def build():
        raise AssertionError("the key should be cached")

    per_lookup_us = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(LOOKUPS):
            mask_cache.derived(mask, BLOCK, "lookup_time", build)
        per_lookup_us.append((time.perf_counter() - start) / LOOKUPS * 1e6)

    equal_us = []  # torch.equal of the mask against a copy, for comparison
    copy = mask.clone()
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(LOOKUPS):
            torch.equal(mask, copy)
        equal_us.append((time.perf_counter() - start) / LOOKUPS * 1e6)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}")
    print(f"mask {GRID} x {GRID} bool, block {BLOCK}, {ROUNDS} rounds of {LOOKUPS} lookups")
    print("mask_cache.derived, cached key, us per lookup: best %.2f, median %.2f, worst %.2f"
          % (min(per_lookup_us), statistics.median(per_lookup_us), max(per_lookup_us)))
    print("torch.equal(mask, copy), us per call: best %.2f, median %.2f, worst %.2f"
          % (min(equal_us), statistics.median(equal_us), max(equal_us)))


if __name__ == "__main__":
    main()
