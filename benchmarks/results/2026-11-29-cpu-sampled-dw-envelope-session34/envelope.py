"""Where the CPU sampled dW beats the dense dW it replaces, beyond the shapes the thirty-second
session measured (audit CR, finding M1). Interleaved A/B of dense_path.grad_weight_and_scores
with the sampled dW as the code picks it (forced on) against the dense dW (forced off): one
call of each in turn per round, 11 rounds (the first dropped), best and median per side.

    OMP_NUM_THREADS=T python envelope.py T [SHAPES] [ROWS] > envelope_tT.txt

SHAPES: "n,k;n,k;..." (default: the list below), ROWS: "r,r,..." (default 32,128,512,2048,8192).
A block size is skipped where it does not divide both sides.
"""
import statistics
import sys
import time

import torch

from agpe_compile.ops import dense_path, sampled_grad

threads = int(sys.argv[1])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
flag = torch.tensor(False)


def timed(fn):
    s = time.perf_counter()
    fn()
    return (time.perf_counter() - s) * 1e3


shapes = [(128, 128), (256, 256), (384, 384), (384, 1536), (1536, 384), (512, 512), (784, 784),
          (1000, 784), (1000, 1000), (2048, 2048)]
if len(sys.argv) > 2:
    shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[2].split(";")]
row_counts = (32, 128, 512, 2048, 8192) if len(sys.argv) <= 3 else tuple(int(v) for v in sys.argv[3].split(","))
for n, k in shapes:
    for rows in row_counts:
        if n * k * rows > 2048 * 2048 * 2048:
            continue
        for b in (8, 16, 32):
            if n % b or k % b or (b == 32 and n * k < 1000 * 784):
                continue
            for d in (0.1, 0.16):
                r, c = n // b, k // b
                mask = torch.zeros(r * c, dtype=torch.bool)
                mask[torch.randperm(r * c, generator=g)[:max(1, int(d * r * c))]] = True
                mask = mask.view(r, c)
                w, x, dy = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
                call = lambda: dense_path.grad_weight_and_scores(dy, x, w, mask, b, flag, "magnitude")
                on_, off_ = [], []
                for i in range(11):
                    sampled_grad.worth_it = lambda *a: True
                    a = timed(call)
                    sampled_grad.worth_it = lambda *a: False
                    o = timed(call)
                    if i:
                        on_.append(a)
                        off_.append(o)
                print(f"{n} {k} rows {rows} b {b} d {d}: sampled {min(on_):.3f}/{statistics.median(on_):.3f} "
                      f"dense {min(off_):.3f}/{statistics.median(off_):.3f} ratio_best {min(on_) / min(off_):.3f} "
                      f"ratio_median {statistics.median(on_) / statistics.median(off_):.3f}", flush=True)
