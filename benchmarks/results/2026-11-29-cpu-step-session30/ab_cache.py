"""In-process A/B of Note [Mask-derived tensors]: the same agpe training step with the
mask-derived tensors cached (as shipped) and rebuilt on every call (dense_path's
``derived`` replaced by a pass-through, i.e. the code before the cache), rounds in turn.

    OMP_NUM_THREADS=2 python benchmarks/results/2026-11-29-cpu-step-session30/ab_cache.py
"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import cpu_step  # noqa: E402
from agpe_compile.ops import dense_path, mask_cache  # noqa: E402

torch.set_num_threads(2)
steps = {kind: cpu_step._step_fn(kind, 1000, 3, 128, 8, 0.1, "magnitude") for kind in ("plain", "agpe")}
cached = mask_cache.derived


def uncached(*args):  # (block_mask, [block_size,] key, build)
    build = args[-1]
    return build()


times = {"plain": [], "agpe cached": [], "agpe rebuilt": []}
for _ in range(15):
    for name in times:
        dense_path.derived = uncached if name == "agpe rebuilt" else cached
        step = steps["plain" if name == "plain" else "agpe"]
        start = time.perf_counter()
        for _ in range(20):
            step()
        times[name].append((time.perf_counter() - start) / 20 * 1e3)
dense_path.derived = cached
summary = {name: {"best_ms": min(t), "median_ms": statistics.median(t)} for name, t in times.items()}
for name, s in summary.items():
    print(f"{name:<14} best {s['best_ms']:.3f} ms  median {s['median_ms']:.3f} ms")
print(json.dumps({"torch": torch.__version__, "rounds": times, "summary": summary}))
