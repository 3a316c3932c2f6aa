"""In-process A/B of Note [CPU sampled dW]: the same agpe training step (the main job's shapes:
3 x Linear(1000, 1000), batch 128, block 8, magnitude saliency, masks fixed at the given
density) with the sampled dW (as shipped) and without it (sampled_grad.worth_it patched to
False: the dense product masked in place), rounds in turn with a plain torch.compile control.

    OMP_NUM_THREADS=2 python benchmarks/results/2026-11-29-cpu-sampled-dw-session32/ab_step.py 0.1 2
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
from agpe_compile.ops import sampled_grad  # noqa: E402

density = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
shipped = sampled_grad.worth_it
steps = {kind: cpu_step._step_fn(kind, 1000, 3, 128, 8, density, "magnitude") for kind in ("plain", "agpe")}
times = {"plain": [], "agpe sampled dW": [], "agpe dense dW": []}
for _ in range(15):
    for name in times:
        sampled_grad.worth_it = (lambda *a: False) if name == "agpe dense dW" else shipped
        step = steps["plain" if name == "plain" else "agpe"]
        start = time.perf_counter()
        for _ in range(20):
            step()
        times[name].append((time.perf_counter() - start) / 20 * 1e3)
sampled_grad.worth_it = shipped
summary = {name: {"best_ms": min(t), "median_ms": statistics.median(t)} for name, t in times.items()}
print(f"density {density}, {threads} thread(s), torch {torch.__version__}, load average {os.getloadavg()}")
for name, s in summary.items():
    print(f"{name:<20} best {s['best_ms']:.3f} ms  median {s['median_ms']:.3f} ms")
print(json.dumps({"torch": torch.__version__, "density": density, "threads": threads, "rounds": times,
                  "summary": summary}))
