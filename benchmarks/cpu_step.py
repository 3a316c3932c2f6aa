"""Host time of a small model's compiled training step on the CPU: plain torch.compile
against agpe, both with the aot_eager lowering, in one process.

A small MLP's step is almost all host time (Python, dispatch, the AOTAutograd runtime),
so this measures what agpe adds per step and layer outside the matmuls: the call wrapper,
the op's dispatch, the Sparsifier's step and hooks. "agpe, functional" compiles with
AGPE_EAGER_IN_PLACE=0, i.e. the backward op inside AOTAutograd's functional wrapper, as
before Note [Host ops in place] (agpe_compile/eager_lowering.py). Rows are timed in turn
and each figure is the best of ``--repeats`` rounds of ``--steps`` steps.

    python benchmarks/cpu_step.py                   # 3 layers of width 32, batch 8
    python benchmarks/cpu_step.py --width 256 --layers 4 --out runs/cpu_step.json
    python benchmarks/cpu_step.py --width 1000 --batch 128 --block 8 --threads 2 --density 0.1 --saliency magnitude

``--density D`` starts the agpe layers at density D (``AGPEConfig.initial_density``) and
keeps their masks fixed while timed (the main job's layers spend most of its steps at
0.1); the default, 1.0, times every block live. The mask updates themselves are not in
these figures (the first update is after the last timed step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable, Dict

import torch
from torch import nn

import agpe_compile
from agpe_compile import AGPEConfig


def _mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*modules[:-1])


def _step_fn(kind: str, width: int, layers: int, batch: int, block: int, density: float = 1.0,
             saliency: str = "taylor") -> Callable[[], None]:
    model = _mlp(width, layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sparsifier = None
    if kind == "plain":
        compiled = torch.compile(model, backend="aot_eager")
    else:
        os.environ["AGPE_EAGER_IN_PLACE"] = "0" if kind == "agpe_functional" else "1"
        # Masks never change while timed: the first update is after the last timed step.
        sparse = density < 1.0
        sparsifier = agpe_compile.Sparsifier(model, optimizer, AGPEConfig(
            block_size=block, target_sparsity=1.0 - density if sparse else 0.5, saliency=saliency,
            initial_density=density if sparse else None, update_interval=10**6, end_step=2 * 10**6))
        compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if sparsifier is not None:
            sparsifier.step(loss)

    for _ in range(10):  # compile and warm up
        step()
    os.environ.pop("AGPE_EAGER_IN_PLACE", None)
    step.density = sparsifier.global_density if sparsifier is not None else 1.0  # what was timed
    return step


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--density", type=float, default=1.0,
                        help="density of the agpe layers' masks while timed, in (0, 1] (default 1.0)")
    parser.add_argument("--saliency", default="taylor", choices=("taylor", "gradient", "magnitude", "movement"),
                        help="AGPEConfig.saliency of the agpe rows (default taylor)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for flag in ("width", "layers", "batch", "block", "steps", "repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density: expected a number in (0, 1], got {args.density}")
    if args.width % args.block:
        parser.error(f"--block: expected a divisor of --width {args.width}, got {args.block}")
    torch.set_num_threads(args.threads)
    kinds = ("plain", "agpe", "agpe_functional")
    steps = {kind: _step_fn(kind, args.width, args.layers, args.batch, args.block, args.density, args.saliency)
             for kind in kinds}
    best = {kind: float("inf") for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:  # in turn, so drift on the machine touches every row alike
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[kind]()
            best[kind] = min(best[kind], (time.perf_counter() - start) / args.steps * 1e3)
    print(f"{args.layers} x Linear({args.width}, {args.width}), batch {args.batch}, block {args.block}, "
          f"agpe density {args.density}, saliency {args.saliency}, "
          f"{args.threads} thread(s), best of {args.repeats} x {args.steps} steps (torch {torch.__version__})")
    print(f"{'step':<18}{'ms':>8}{'/ plain':>9}")
    for kind in kinds:
        print(f"{kind:<18}{best[kind]:>8.3f}{best[kind] / best['plain']:>9.2f}")
    densities = {kind: steps[kind].density for kind in kinds}
    print("densities while timed: " + ", ".join(f"{kind} {d:.3f}" for kind, d in densities.items()))
    result = {"settings": vars(args), "torch": torch.__version__, "machine": platform.machine(),
              "processor": platform.processor(), "ms_per_step": best, "density": densities}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
