"""In-process A/B of Note [Gathering live blocks] and the host finite check of
``accumulate_scores``: the same agpe training step (the main job's shapes: 3 x
Linear(1000, 1000), batch 128, block 8, density 0.1, magnitude saliency) with the shipped
functions and with the code before them (advanced indexing of an [R, b, C, b] view;
``isfinite(t).all()``), rounds in turn with a plain torch.compile control.

    OMP_NUM_THREADS=2 python benchmarks/results/2026-11-29-cpu-step-session31/ab_gather.py
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
import importlib  # noqa: E402

from agpe_compile.ops import dense_path  # noqa: E402

sparse_linear = importlib.import_module("agpe_compile.ops.sparse_linear")

torch.set_num_threads(2)
steps = {kind: cpu_step._step_fn(kind, 1000, 3, 128, 8, 0.1, "magnitude") for kind in ("plain", "agpe")}
shipped = (dense_path.live_block_scores, sparse_linear._all_finite)


def old_live_block_scores(weight, grad_weight, block_mask, block_size, mode):  # before session 31
    rows, cols = dense_path.derived(block_mask, block_size, "live_blocks", lambda: block_mask.nonzero(as_tuple=True))
    r, c = block_mask.shape
    b = block_size
    scores = torch.zeros(r, c, dtype=torch.float32, device=weight.device)

    def blocks(t):
        return t.reshape(r, b, c, b)[rows, :, cols, :]

    assert mode == "magnitude"
    values = blocks(weight).abs_()
    scores.index_put_((rows, cols), values.float().sum(dim=(1, 2)))
    return scores


def old_all_finite(t):
    return bool(torch.isfinite(t).all())


times = {"plain": [], "agpe shipped": [], "agpe before": []}
for _ in range(15):
    for name in times:
        before = name == "agpe before"
        dense_path.live_block_scores = old_live_block_scores if before else shipped[0]
        sparse_linear._all_finite = old_all_finite if before else shipped[1]
        step = steps["plain" if name == "plain" else "agpe"]
        start = time.perf_counter()
        for _ in range(20):
            step()
        times[name].append((time.perf_counter() - start) / 20 * 1e3)
dense_path.live_block_scores, sparse_linear._all_finite = shipped
summary = {name: {"best_ms": min(t), "median_ms": statistics.median(t)} for name, t in times.items()}
for name, s in summary.items():
    print(f"{name:<14} best {s['best_ms']:.3f} ms  median {s['median_ms']:.3f} ms")
print(json.dumps({"torch": torch.__version__, "rounds": times, "summary": summary}))
