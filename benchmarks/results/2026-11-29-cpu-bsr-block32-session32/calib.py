"""Blocks of 32 and 64 on the CPU: one layer's training step through the op (forward + backward
with autograd, taylor scoring, zero-weight promise) on three paths, fp32, best of 5 (wall clock):
  gather      the gathered-block path (kernels/cpu_gather.py)
  dense       the dense path with MKL's dense products only
  dense_bsr   the dense path with its forward and dX as BSR products (ops/bsr_path.py forced on)
and the path the shipped cost model picks for the call.

    OMP_NUM_THREADS=1 python benchmarks/results/2026-11-29-cpu-bsr-block32-session32/calib.py --threads 1 --out calib_t1.jsonl
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
from agpe_compile import kernels  # noqa: E402
from agpe_compile.layout import DEFAULT_BUCKETS, build_layout  # noqa: E402
from agpe_compile.ops import bsr_path  # noqa: E402
from agpe_compile.packed_layout import build_packed  # noqa: E402
from kernels import expanded, random_mask  # noqa: E402  (benchmarks/kernels.py)


def bench(fn, reps=5):
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def op_step(x, w, mask, b, dy):
    layout, _ = build_packed(mask, b, DEFAULT_BUCKETS)
    rows, cols = mask.shape
    state = (torch.zeros(rows, cols), torch.zeros(rows, cols), torch.zeros((), dtype=torch.bool),
             torch.zeros(2, dtype=torch.int64))

    def run():
        xr = x.detach().requires_grad_()
        wr = w.detach().requires_grad_()
        y = torch.ops.agpe.sparse_linear(xr, wr, None, mask, *state, layout, b, "taylor", True)
        y.backward(dy)
        return y.detach(), xr.grad, wr.grad
    return run, build_layout(mask, b).capacity / (rows * cols)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", default="32,64")
    p.add_argument("--rows", default="128,512,2048")
    p.add_argument("--shapes", default="512x128,128x512,384x128,1024x1024,1536x512,512x1536,2048x2048")
    p.add_argument("--densities", default="0.05,0.1,0.15,0.25,0.35")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pick, blocks, bound = kernels.choose_cpu_path, bsr_path.BLOCK_SIZES, bsr_path.max_density
    out = open(a.out, "w") if a.out else None
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    for b, (n, k), m, d in itertools.product(map(int, a.blocks.split(",")), shapes, map(int, a.rows.split(",")),
                                             map(float, a.densities.split(","))):
        if n % b or k % b:
            continue
        x, dy = torch.randn(m, k), torch.randn(m, n)
        mask = random_mask(n // b, k // b, d, "cpu")
        if not mask.any():
            continue
        w = torch.randn(n, k) / k ** 0.5 * expanded(mask, b)
        res = {}
        try:
            for arm in ("gather", "dense", "dense_bsr"):
                kernels.choose_cpu_path = lambda *args, p=("gather" if arm == "gather" else "dense"): p
                bsr_path.BLOCK_SIZES = blocks + (b,) if arm == "dense_bsr" else blocks
                bsr_path.max_density = (lambda *args: 1.0) if arm == "dense_bsr" else (lambda *args: 0.0)
                run, cap = op_step(x, w, mask, b, dy)
                res[arm] = bench(run)
                results = run()
                if arm == "gather":
                    expected = results
                else:  # every path computes the same function
                    assert all(torch.allclose(r, e, rtol=1e-4, atol=1e-3) for r, e in zip(results, expected)), arm
        finally:
            kernels.choose_cpu_path, bsr_path.BLOCK_SIZES, bsr_path.max_density = pick, blocks, bound
        row = dict(threads=a.threads, m=m, n=n, k=k, b=b, d=d, live=round(float(mask.float().mean()), 4),
                   capacity=round(cap, 4), **{key: round(v, 3) for key, v in res.items()},
                   pick=pick(m, n, k, cap, b))
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
