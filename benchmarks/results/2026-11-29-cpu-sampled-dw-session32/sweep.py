"""dW of a sparse CPU layer: the dense path's dense product masked in place, against
torch.sparse.sampled_addmm on the live blocks' CSR pattern (elements of the live blocks) scattered
into a dense-shaped zero tensor, fp32, best of 7.

    OMP_NUM_THREADS=1 python benchmarks/results/2026-11-29-cpu-sampled-dw-session32/sweep.py --threads 1 --out sweep_t1.jsonl
"""
import argparse
import itertools
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def best(fn, reps=7):
    fn()
    t = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", default="8,16,32")
    p.add_argument("--rows", default="32,128,512,2048")
    p.add_argument("--shapes", default="1000x784,1000x1000,1024x1024,2048x2048")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = open(a.out, "w") if a.out else None
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    for b, (n, k), m, d in itertools.product(map(int, a.blocks.split(",")), shapes, map(int, a.rows.split(",")),
                                             map(float, a.densities.split(","))):
        if n % b or k % b:
            continue
        mask = torch.rand(n // b, k // b) < d
        full = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
        dy, x = torch.randn(m, n), torch.randn(m, k)
        pattern = full.float().to_sparse_csr()
        flat = full.reshape(-1).nonzero().squeeze(1)

        def dense():
            return (dy.t() @ x).mul_(full)

        def sampled():
            values = torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
            return torch.zeros(n * k).index_copy_(0, flat, values).view(n, k)

        torch.testing.assert_close(sampled(), dense(), rtol=1e-4, atol=1e-3)
        row = dict(threads=a.threads, block=b, n=n, k=k, m=m, density=round(float(mask.float().mean()), 4),
                   dense=round(best(dense), 4), sampled=round(best(sampled), 4))
        row["ratio"] = round(row["sampled"] / row["dense"], 3)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
