"""Blocks of 32 and 64 on the CPU: one layer's step (forward + dX + dW) three ways, fp32, best of 5:
dense products with the zero-weight promise; the gathered-block path (kernels/cpu_gather.py, all
three products); BSR forward + dX (ops/bsr_path.py products, called directly) with the dense dW.

    OMP_NUM_THREADS=1 python benchmarks/results/2026-11-29-cpu-bsr-block32-session32/probe.py --threads 1
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agpe_compile.kernels import cpu_gather  # noqa: E402
from agpe_compile.layout import build_layout  # noqa: E402
from agpe_compile.ops import bsr_path  # noqa: E402


def best(fn, budget=0.2):
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
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", default="32,64")
    p.add_argument("--rows", default="128,512,2048")
    p.add_argument("--shapes", default="512x128,1024x1024,2048x2048")
    p.add_argument("--densities", default="0.1,0.25,0.5")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for b in map(int, a.blocks.split(",")):
        for shape in a.shapes.split(","):
            n, k = map(int, shape.split("x"))
            if n % b or k % b:
                continue
            for m in map(int, a.rows.split(",")):
                x, dy, bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)
                for d in map(float, a.densities.split(",")):
                    mask = torch.rand(n // b, k // b) < d
                    if not mask.any():
                        continue
                    full = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
                    w = torch.randn(n, k) * full
                    layout = build_layout(mask, b)

                    def dense():
                        torch.nn.functional.linear(x, w, bias)
                        dy @ w
                        (dy.t() @ x).mul_(full)

                    def gather():
                        cpu_gather.gather_forward(x, w, layout, bias)
                        cpu_gather.gather_grad_input(dy, w, layout)
                        cpu_gather.gather_grad_weight(dy, x, layout)

                    def bsr():
                        bsr_path.forward(x, w, bias, mask, b)
                        bsr_path.grad_input(dy, w, mask, b)
                        (dy.t() @ x).mul_(full)

                    assert torch.allclose(bsr_path.forward(x, w, bias, mask, b),
                                          torch.nn.functional.linear(x, w, bias), atol=1e-3, rtol=1e-4)
                    row = dict(block=b, n=n, k=k, m=m, density=round(float(mask.float().mean()), 4),
                               dense=best(dense), gather=best(gather), bsr=best(bsr),
                               model=cpu_gather.choose_cpu_path(m, n, k, layout.capacity / mask.numel(), b))
                    row["gather/dense"] = row["gather"] / row["dense"]
                    row["bsr/dense"] = row["bsr"] / row["dense"]
                    rows.append(row)
                    print(json.dumps({kk: round(v, 3) if isinstance(v, float) else v for kk, v in row.items()}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
