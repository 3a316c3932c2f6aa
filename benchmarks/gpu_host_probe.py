"""Where an agpe training step spends host time, and where it synchronizes (a lent GPU).

The ninth session measured the non-graphed agpe step issuing for 10-15 ms on the host
against 0.5-1.2 ms for dense torch.compile (benchmarks/train_step.py, "host issue"), and the
GPU test of host syncs found one synchronization in a plain Sparsifier.step(). This script
prints the Python stack of every synchronizing CUDA call (torch.cuda.set_sync_debug_mode)
in a plain Sparsifier step and in one agpe training step, and a cProfile of the host side
of non-graphed agpe steps next to dense ones, and of the eager op alone.

    PYTHONPATH=. python benchmarks/gpu_host_probe.py [--d-model 1024] [--steps 10]
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import os
import pstats
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the repository root too (as benchmarks/kernels.py): the GPU machine has no installed
# agpe_compile (audit CW HIGH-3)
if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import agpe_compile  # noqa: E402
from train_step import make_stack, make_step, set_density  # noqa: E402


class SyncStacks:
    """Collects the Python stack of each synchronizing CUDA call made inside the block."""

    def __init__(self, label: str):
        self.label = label
        self.stacks = collections.Counter()

    def __enter__(self):
        self._show = warnings.showwarning
        self._filters = warnings.filters[:]
        warnings.simplefilter("always")

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
                self.stacks["".join(traceback.format_list(frames[-9:]))] += 1
            else:
                self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        warnings.filters[:] = self._filters
        total = sum(self.stacks.values())
        print(f"== {self.label}: {total} synchronizing call(s) at {len(self.stacks)} place(s)")
        for stack, count in self.stacks.most_common():
            print(f"-- {count}x\n{stack}")
        return False


def plain_sparsifier_steps() -> None:
    """The scenario of tests/controller/test_host_sync.py, plain (non-update) steps only."""
    from tests.controller.helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = agpe_compile.AGPEConfig(target_sparsity=0.75, policy="rigl", update_interval=2, end_step=40,
                                     block_size=4)
    sp = agpe_compile.Sparsifier(model, opt, config)
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False, "block_size": 4})
    for step in range(8):
        x = torch.randn(32, 16, device="cuda")
        loss = cmodel(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 2:
            with SyncStacks(f"plain Sparsifier.step() at step {step + 1}"):
                sp.step(loss)
        else:
            sp.step(loss)


def host_profile(d_model: int, steps: int, density: float) -> None:
    size = dict(d_model=d_model, n_layers=4, n_heads=max(1, d_model // 128), seq=1024, batch=8,
                dtype="bfloat16", block=128)
    device = torch.device("cuda")
    x = torch.randn(size["batch"], size["seq"], d_model, device=device, dtype=torch.bfloat16)

    def profile(label: str, step) -> None:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with SyncStacks(f"{label}: one training step"):
            step()
        torch.cuda.synchronize()
        issue = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            issue.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        issue.sort()
        print(f"== {label}: host issue {1e3 * issue[len(issue) // 2]:.2f} ms per step (median of {steps})")
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        torch.cuda.synchronize()
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(32)
            print(f"-- {label}: cProfile of {steps} steps by {key}")
            print("\n".join(line[:190] for line in text.getvalue().splitlines() if line.strip()))

    torch._dynamo.reset()
    dense = make_stack(size, device)
    compiled_dense = torch.compile(dense)
    profile("dense fused", make_step("fused", compiled_dense, dense, x, device))
    del dense, compiled_dense

    torch._dynamo.reset()
    model = make_stack(size, device)
    states = agpe_compile.prepare(model, options={"block_size": size["block"]})
    for state in states.values():
        state.zero_inactive = True
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": True}))
    set_density(model, density)
    agpe_compile.rebucket(model)
    for kind in ("fused", "block_sparse"):
        profile(f"agpe d={density} {kind}", make_step(kind, compiled, model, x, device))


def eager_op_profile(steps: int, density: float, device: str = "cuda", shape=(8192, 4096, 4096),
                     block: int = 128) -> None:
    """The eager op's host time: ``benchmarks/kernels.py``'s "op" column (one forward +
    backward of ``torch.ops.agpe.sparse_linear`` through autograd) took 1.4-2.0 ms per call
    on the H200 in the twenty-first session whatever the shape, several times its kernels'
    time on the 8192 x 4096 x 4096 shape. Host issue time and a cProfile of that call."""
    from kernels import expanded, op_fwd_bwd, random_mask

    m, k, n = shape
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # a CPU smoke test
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    mask = random_mask(n // block, k // block, density, device)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 * expanded(mask, block)
    step = op_fwd_bwd(x, weight, mask, block, dy)
    for _ in range(3):
        step()
    sync()
    issue, total = [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        issue.append(time.perf_counter() - t0)
        sync()
        total.append(time.perf_counter() - t0)
    issue.sort()
    total.sort()
    label = f"eager op {m}x{k}x{n} d={density}"
    print(f"== {label}: host issue {1e3 * issue[len(issue) // 2]:.3f} ms, issue + finish "
          f"{1e3 * total[len(total) // 2]:.3f} ms per forward + backward (medians of {steps})")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    sync()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(32)
        print(f"-- {label}: cProfile of {steps} calls by {key}")
        print("\n".join(line[:190] for line in text.getvalue().splitlines() if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps: expected at least 1, got {args.steps}")
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density: expected a value in (0, 1], got {args.density}")
    if args.d_model < 128 or args.d_model % 128:
        parser.error(f"--d-model: expected a positive multiple of 128 (the block size), got {args.d_model}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_host_probe: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    plain_sparsifier_steps()
    eager_op_profile(args.steps, 0.25)
    host_profile(args.d_model, args.steps, args.density)


if __name__ == "__main__":
    main()
