"""Crossover of Note [CPU block-sparse products] (agpe_compile/ops/bsr_path.py): the
forward and dX of one layer as MKL BSR products (values gathered from the dense-shaped
weight each call, as shipped) against the dense path's products with the zero-weight
promise (F.linear(x, W, b) and dY @ W, W zero on inactive blocks), fp32, best of 5 rounds.

    OMP_NUM_THREADS=2 python benchmarks/results/2026-11-29-cpu-bsr-session31/sweep.py --threads 2 --out sweep_t2.json
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agpe_compile.ops import bsr_path  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")


def best(fn, budget=0.1):
    for _ in range(2):
        fn()
    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    n = max(1, int(budget / 5 / max(one, 1e-6)))
    t = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = min(t, (time.perf_counter() - start) / n * 1e3)
    return t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", default="8,16")
    parser.add_argument("--rows", default="32,128,512,2048")
    parser.add_argument("--shapes", default="1000x784,1000x1000,1024x1024,2048x2048")
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for b in (int(v) for v in args.blocks.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            if n % b or k % b:
                continue
            for m in (int(v) for v in args.rows.split(",")):
                x, dy, bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)
                for d in (float(v) for v in args.densities.split(",")):
                    mask = torch.rand(n // b, k // b) < d
                    w = torch.randn(n, k) * mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
                    assert torch.allclose(bsr_path.forward(x, w, bias, mask, b), torch.nn.functional.linear(x, w, bias),
                                          atol=1e-3, rtol=1e-4)
                    assert torch.allclose(bsr_path.grad_input(dy, w, mask, b), dy @ w, atol=1e-3, rtol=1e-4)
                    row = dict(block=b, n=n, k=k, m=m, density=round(float(mask.float().mean()), 4),
                               fwd_dense=best(lambda: torch.nn.functional.linear(x, w, bias)),
                               fwd_bsr=best(lambda: bsr_path.forward(x, w, bias, mask, b)),
                               dx_dense=best(lambda: dy @ w),
                               dx_bsr=best(lambda: bsr_path.grad_input(dy, w, mask, b)))
                    row["fwd_ratio"] = row["fwd_bsr"] / row["fwd_dense"]
                    row["dx_ratio"] = row["dx_bsr"] / row["dx_dense"]
                    results.append(row)
                    print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}),
                          flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
