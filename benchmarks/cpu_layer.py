"""One layer's forward + backward on the CPU: the agpe op against plain ``F.linear``.

Times ``torch.ops.agpe.sparse_linear`` (taylor scoring, as in training) with autograd
against ``F.linear`` with autograd on the same shapes, eagerly, at several densities, with
and without the zero-weight promise (Note [Zero inactive weights]); best of 7 repeats of
30 calls. This is the overhead a CPU user pays per layer (Note [Dense path passes] in
agpe_compile/ops/dense_path.py).

    python benchmarks/cpu_layer.py                      # 128 x 1000 @ 1000 x 1000, block 8
    python benchmarks/cpu_layer.py --rows 512 --features 2048 --block 32 --out runs/cpu_layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import List

import torch
from torch import nn

import agpe_compile
from agpe_compile.config import MAX_BLOCK_SIZE
from agpe_compile.ops.reference import expand_block_mask


def best_ms(fn, calls: int = 30, repeats: int = 7) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def parse_densities(parser: argparse.ArgumentParser, text: str) -> List[float]:
    """--densities as floats in (0, 1]; parser.error naming the flag otherwise."""
    densities = []
    for item in text.split(","):
        try:
            density = float(item)
        except ValueError:
            parser.error(f"--densities: expected comma-separated numbers in (0, 1], got {item.strip()!r} in {text!r}")
        if not 0 < density <= 1:  # (not also refuses nan)
            parser.error(f"--densities: expected densities in (0, 1] (the share of active blocks), got {density:g}")
        if density in densities:  # one row per density: the second would silently replace the first
            parser.error(f"--densities: {density:g} given more than once")
        densities.append(density)
    return densities


def check_out_file(parser: argparse.ArgumentParser, path: str) -> None:
    """--out must name a file in a writable folder (created, as kernels.py and train_step.py
    do): checked before measuring."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"--out: {path!r} is a folder; expected a file name (e.g. {os.path.join(path, 'cpu_layer.json')})")
    parent = folder
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):  # a file where a folder of the path should be
        parser.error(f"--out: {parent!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: cannot create the folder {folder!r} ({error.strerror or error})")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"--out: cannot write {path!r}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="rows of the input (>= 1)")
    parser.add_argument("--features", type=int, default=1000, help="in = out features (>= 1)")
    parser.add_argument("--block", type=int, default=8, help="block size: a positive divisor of --features")
    parser.add_argument("--densities", default="1.0,0.5,0.1", help="comma-separated densities in (0, 1]")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    densities = parse_densities(parser, args.densities)
    for flag, value in (("--rows", args.rows), ("--features", args.features), ("--block", args.block)):
        if value < 1:
            parser.error(f"{flag}: expected an integer >= 1, got {value}")
    if args.block > MAX_BLOCK_SIZE:
        parser.error(f"--block: expected at most {MAX_BLOCK_SIZE}, got {args.block}")
    if args.features % args.block:
        parser.error(f"--block: expected a divisor of --features={args.features} (the layer is split into "
                     f"block x block tiles), got {args.block}")
    if args.out:
        check_out_file(parser, args.out)
    torch.manual_seed(0)
    m, f, b = args.rows, args.features, args.block
    x = torch.randn(m, f, requires_grad=True)
    grad = torch.randn(m, f)
    plain_layer = nn.Linear(f, f)

    def plain():
        torch.nn.functional.linear(x, plain_layer.weight, plain_layer.bias).backward(grad)

    rows = {"plain F.linear": best_ms(plain)}
    for density in densities:
        layer = nn.Linear(f, f)
        agpe_compile.prepare(layer, {"block_size": b})
        state = agpe_compile.layer_state(layer)
        if density < 1.0:
            blocks = state.block_mask.numel()  # exactly round(d * blocks) live: the row's label is the density
            live = torch.zeros(blocks, dtype=torch.bool)
            live[torch.randperm(blocks)[:max(1, round(density * blocks))]] = True
            state.block_mask.copy_(live.view(state.grid))
            agpe_compile.rebucket(layer)
            state.sync_layout()
            with torch.no_grad():  # the promise holds: inactive weights are zero
                layer.weight.mul_(expand_block_mask(state.block_mask, b, layer.weight.dtype))
        for promise in (False, True):
            def op():
                torch.ops.agpe.sparse_linear(
                    x, layer.weight, layer.bias, state.block_mask, state.saliency, state.dense_grad_sq,
                    state.score_dense, state.counters, state.block_layout, b, "taylor", promise).backward(grad)
            rows[f"agpe d={density:g}{' zero promise' if promise else ''}"] = best_ms(op)
    base = rows["plain F.linear"]
    print(f"{m} x {f} @ {f} x {f}, block {b}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':28} {'ms':>7} {'vs plain':>9}")
    for name, ms in rows.items():
        print(f"{name:28} {ms:7.2f} {ms / base:8.2f}x")
    result = {"rows": m, "features": f, "block": b, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "ms": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
