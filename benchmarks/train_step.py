"""Training-step benchmark: dense torch.compile (Inductor) vs agpe at fixed densities.

One full step = forward, backward, optimizer step on a stack of GPT-style blocks (causal
SDPA). Every configuration is measured in the same process, so the ratios are side by
side. Also measured: first-compile time, the cost of a mask-update step of the
Sparsifier, and the number of compilations over a simulated 2,000-step schedule.

    python benchmarks/train_step.py                 # GPU: d_model 2048, 4 blocks, seq 1024, batch 8, bf16
    python benchmarks/train_step.py --small         # CPU smoke size (CI runs this)
    python benchmarks/train_step.py --out runs/train_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import agpe_compile  # noqa: E402
from agpe_compile.ops.reference import expand_block_mask  # noqa: E402
from gpt import Block  # noqa: E402

GPU_SIZE = dict(d_model=2048, n_layers=4, n_heads=16, seq=1024, batch=8, dtype="bfloat16", block=128)
SMALL_SIZE = dict(d_model=128, n_layers=2, n_heads=4, seq=64, batch=4, dtype="float32", block=32)
DENSITIES = (1.0, 0.5, 0.25, 0.1)


def make_stack(size: dict, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    stack = nn.Sequential(*[Block(size["d_model"], size["n_heads"]) for _ in range(size["n_layers"])])
    return stack.to(device=device, dtype=getattr(torch, size["dtype"]))


def set_density(model: nn.Module, density: float, seed: int = 0) -> None:
    """Exactly round(density * blocks) random active blocks per layer; inactive weights zeroed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for state in agpe_compile.layer_states(model).values():
            total = state.block_mask.numel()
            flat = torch.zeros(total, dtype=torch.bool)
            flat[torch.randperm(total, generator=gen)[: max(1, round(density * total))]] = True
            state.block_mask.copy_(flat.view(state.grid).to(state.block_mask.device))
            state.weight.mul_(expand_block_mask(state.block_mask, state.block_size, state.weight.dtype))


def timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    """Median seconds per call of fn over `iters` calls after `warmup` calls."""

    def measure(fn: Callable[[], None], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times: List[float] = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    return measure


def training_step(compiled: Callable, model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        compiled(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(size: dict, device: torch.device, warmup: int, iters: int, log=print) -> Dict:
    measure = timer(device)
    dtype = getattr(torch, size["dtype"])
    x = torch.randn(size["batch"], size["seq"], size["d_model"], device=device, dtype=dtype)
    results: Dict = {"size": size, "rows": []}

    torch._dynamo.reset()
    dense = make_stack(size, device)
    dense_step = training_step(torch.compile(dense), dense, x)
    t0 = time.perf_counter()
    dense_step()
    results["dense_first_step_s"] = time.perf_counter() - t0
    dense_time = measure(dense_step, warmup, iters)
    results["dense_step_s"] = dense_time
    log(f"dense torch.compile: {1e3 * dense_time:.2f} ms/step (first step {results['dense_first_step_s']:.1f} s)")

    torch._dynamo.reset()
    model = make_stack(size, device)
    agpe_compile.prepare(model, options={"block_size": size["block"]})
    backend = agpe_compile.AgpeBackend()
    step = training_step(torch.compile(model, backend=backend), model, x)
    set_density(model, 1.0)
    t0 = time.perf_counter()
    step()
    results["agpe_first_step_s"] = time.perf_counter() - t0
    for density in DENSITIES:
        set_density(model, density)
        seconds = measure(step, warmup, iters)
        results["rows"].append({"density": density, "agpe_step_s": seconds, "ratio_vs_dense": seconds / dense_time,
                                "speedup": dense_time / seconds})
        log(f"agpe d={density:<5} {1e3 * seconds:9.2f} ms/step  {seconds / dense_time:6.3f}x dense time")
    results["agpe_compilations"] = backend.graph_count
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized stack (default without CUDA)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    size = SMALL_SIZE if small else GPU_SIZE
    warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    iters = args.iters if args.iters is not None else (3 if small else 10)
    results = run(size, device, warmup, iters)
    results["machine"] = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    results["torch"] = torch.__version__
    results["date"] = datetime.date.today().isoformat()
    print(f"\n{results['machine']}, torch {results['torch']}, {results['date']}")
    print(f"{'density':>8} {'agpe/dense':>11} {'speedup':>8}")
    for row in results["rows"]:
        print(f"{row['density']:>8} {row['ratio_vs_dense']:>11.3f} {row['speedup']:>8.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
