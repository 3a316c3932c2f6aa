"""Per-call times behind Note [Row-broadcast masks] and Note [Gathering live blocks]
(agpe_compile/ops/dense_path.py): 1000 x 1000 fp32 weight, block 8, one thread, best of
rounds (us per call).

    OMP_NUM_THREADS=1 python benchmarks/results/2026-11-29-cpu-step-session31/elementwise_time.py
"""
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agpe_compile.ops import dense_path, mask_cache  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
n = k = 1000
b = 8
r, c = n // b, k // b


def best(fn, calls=200, rounds=7):
    for _ in range(5):
        fn()
    t = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        t = min(t, (time.perf_counter() - start) / calls * 1e6)
    return t


print(f"torch {torch.__version__}, {platform.machine()}, 1 thread, load average {os.getloadavg()}")
mask = torch.rand(r, c) < 0.5
w = torch.randn(n, k)
four_d = mask.view(r, 1, c, 1)
row = dense_path.row_mask(mask, b, torch.float32)
keep = row_int = dense_path.row_mask(mask, b, torch.int32).neg()
drop4 = torch.logical_not(four_d)
print(f"W *= M over an [R, b, C, b] view (the reference's broadcast): {best(lambda: w.view(r, b, c, b).mul_(four_d)):.0f}")
print(f"W *= M with the [R, 1, K] row-broadcast mask:                  {best(lambda: w.view(r, b, k).mul_(row)):.0f}")
print(f"masked_fill_ of inactive blocks over the [R, b, C, b] view:     {best(lambda: w.view(r, b, c, b).masked_fill_(drop4, 0)):.0f}")
print(f"AND of W's int32 view with the row-broadcast mask:              "
      f"{best(lambda: w.view(torch.int32).view(r, b, k).bitwise_and_(keep)):.0f}")
mask_cache.clear()
print(f"building the row-broadcast mask (uncached):                     "
      f"{best(lambda: mask.to(torch.float32).view(r, c, 1).expand(r, c, b).reshape(r, 1, k).clone()):.0f}")
for density in (0.1, 0.25):
    m = torch.rand(r, c) < density
    wd = torch.randn(n, k)
    rows, cols = m.nonzero(as_tuple=True)
    old = best(lambda: wd.reshape(r, b, c, b)[rows, :, cols, :].abs_().float().sum(dim=(1, 2)))
    new = best(lambda: dense_path.live_block_scores(wd, wd, m, b, "magnitude"))
    print(f"magnitude scores of the live blocks at density {density}: advanced indexing {old:.0f}, "
          f"live_block_scores (index_select of row runs, with index_put_) {new:.0f}")
