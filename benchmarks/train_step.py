"""Training-step benchmark: dense torch.compile (Inductor) vs agpe at fixed densities.

One full step = forward, backward, optimizer step on a stack of GPT-style blocks (causal
SDPA). Every configuration is measured in the same process, so the ratios are side by
side. Also measured: first-compile time, the cost of a mask-update step of the
Sparsifier, and the number of compilations over a simulated 2,000-step schedule.

    python benchmarks/train_step.py                 # GPU: d_model 2048, 4 blocks, seq 1024, batch 8, bf16
    python benchmarks/train_step.py --small         # CPU-sized stack: about a minute on 2 CPU cores
                                                    # (51 s, 13th session), most of it the 2,000-step
                                                    # schedule simulation
    python benchmarks/train_step.py --out runs/train_step.json
    python benchmarks/train_step.py --densities 0.25 --optimizers graphed,graphed_block_sparse \
        --profile --out runs/ts.json    # profile_dense.txt, profile_agpe_d0.25.txt beside it

--profile needs --out (its tables go beside it) and profiles the LAST optimizer variant
timed at the LAST density (of the last --tma-settings setting); --optimizers needs at least
one dense variant (foreach, fused or graphed: the baseline), so name the one to profile last.

CI (tests/test_examples.py) runs the quick form, about a minute on 2 CPU cores:

    python benchmarks/train_step.py --small --warmup 0 --iters 1 --schedule-steps 80 --lowering aot_eager

The schedule simulation prints a progress line to stderr every 50 steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import signal
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

# the repository root too, as benchmarks/kernels.py does: the GPU machine has no installed
# agpe_compile, and a bare `python benchmarks/train_step.py` must find it (audit CW HIGH-3)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "examples"))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
import agpe_compile  # noqa: E402
from agpe_compile.zero_weights import install as install_zero_hooks  # noqa: E402
from agpe_compile.ops.reference import expand_block_mask  # noqa: E402
from agpe_compile.kernels.launch import _tma_setting  # noqa: E402
from gpt import Block  # noqa: E402

GPU_SIZE = dict(d_model=2048, n_layers=4, n_heads=16, seq=1024, batch=8, dtype="bfloat16", block=128)
SMALL_SIZE = dict(d_model=128, n_layers=2, n_heads=4, seq=64, batch=4, dtype="float32", block=32)
DENSITIES = (1.0, 0.5, 0.25, 0.1)


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (``--activation-checkpointing``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def make_stack(size: dict, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = [Block(size["d_model"], size["n_heads"]) for _ in range(size["n_layers"])]
    if size.get("checkpoint"):  # dense and agpe alike: both recompute each block's forward
        blocks = [Checkpointed(block) for block in blocks]
    return nn.Sequential(*blocks).to(device=device, dtype=getattr(torch, size["dtype"]))


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
    """Median seconds per call of fn over `iters` calls after `warmup` calls.

    On CUDA the function also records, in ``measure.host``, the median time the host spent
    issuing one call (before synchronising): when it is close to the device time, the step
    is bound by launch overhead, not by the GPU.
    """

    def measure(fn: Callable[[], None], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times: List[float] = []
        host: List[float] = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                host.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        host.sort()
        measure.host = host[len(host) // 2] if host else None
        return times[len(times) // 2]

    measure.host = None
    return measure


def device_time_us(averages, attr: str = "self_device_time_total") -> float:
    """Device time of a profile's events: the kernels' (and copies') own rows only. An
    operator row (aten::mm, device type CPU) also carries the time of the kernels it
    launched, so summing every row counts an eager step's kernels twice (the twenty-first
    session's dense profile read 38.5 ms for a 19.5 ms step)."""
    from torch.autograd import DeviceType

    return sum(getattr(e, attr) for e in averages if e.device_type != DeviceType.CPU)


def profile_step(step: Callable[[], None], path: str, log, rows: int = 25) -> Dict:
    """Kernel-level profile of 3 steps: the top kernels by device time into ``path``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    table = averages.table(sort_by=attr, row_limit=rows)
    with open(path, "w") as f:
        f.write(table)
    device_us = device_time_us(averages, attr) / 3
    log(table.splitlines()[0])
    for line in table.splitlines()[1:14]:
        log(line[:160])
    log(f"profile: {device_us / 1e3:.2f} ms of kernel time per step (written to {path})")
    return {"profile_kernel_ms_per_step": device_us / 1e3, "profile_table": path}


def make_optimizer(kind: str, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """``foreach`` / ``fused``: torch's AdamW; ``block_sparse``: agpe's BlockSparseAdamW
    (live blocks of agpe weights only; its other parameters through fused AdamW);
    ``graphed``: fused AdamW with ``capturable=True``, for the CUDA-graph step;
    ``graphed_block_sparse``: BlockSparseAdamW with ``fused=True, capturable=True``, graphed."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if kind == "foreach":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if kind == "fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    if kind == "block_sparse":
        return agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-4, **fused)
    if kind == "graphed":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
    if kind == "graphed_block_sparse":
        return agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
    raise ValueError(f"train_step: expected optimizer in {OPTIMIZERS}, got {kind!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step(compiled: Callable, model: nn.Module, x: torch.Tensor,
                  optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        compiled(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# handles of the zero-weight hooks of the step made last (make_step removes them)
_ZERO_HOOKS: List = []


def make_step(kind: str, compiled: Callable, model: nn.Module, x: torch.Tensor,
              device: torch.device) -> Callable[[], None]:
    """The timed step for optimizer ``kind``; ``graphed`` and ``graphed_block_sparse`` replay
    the whole step (forward, backward, capturable optimizer) as one CUDA graph through
    ``agpe_compile.GraphedStep``."""
    optimizer = make_optimizer(kind, model, device)
    promised = [s for s in agpe_compile.layer_states(model).values() if s.zero_inactive]
    # The hooks are global and act after ANY optimizer holding these weights: those of the
    # step timed before must go (as Sparsifier.close() removes its own), or each timed step
    # would re-zero every layer once per earlier variant (the twenty-fifth session's first
    # GPU run did: torch AdamW's "fused" column at d < 1 paid up to 13 passes per step).
    while _ZERO_HOOKS:
        _ZERO_HOOKS.pop().remove()
    if promised:  # what the Sparsifier installs with its promise (Note [Zero inactive weights])
        _ZERO_HOOKS.extend(install_zero_hooks(optimizer, promised))
    if kind not in GRAPHED:
        return training_step(compiled, model, x, optimizer)

    def step() -> torch.Tensor:
        loss = compiled(x).float().square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return agpe_compile.GraphedStep(step, model, optimizer)


# The results of the run in progress: written (marked incomplete) if a time limit stops it.
PARTIAL: Dict = {}


# Issue targets, as speed-ups over the best dense step (1/1.03: at most 3% slower).
SPEEDUP_TARGETS = {1.0: 1 / 1.03, 0.25: 2.0, 0.1: 3.0}


def best_by_density(rows: List[Dict]) -> Dict[float, Dict]:
    """The fastest measured agpe variant at each density."""
    best: Dict[float, Dict] = {}
    for row in rows:
        if not row.get("failed") and (row["density"] not in best or row["speedup"] > best[row["density"]]["speedup"]):
            best[row["density"]] = row
    return best


def _log(*args) -> None:
    print(*args, flush=True)


def run(size: dict, device: torch.device, warmup: int, iters: int, inductor: bool = True, log=_log,
        profile_dir: str = "", profile_rows: int = 25, zero_inactive: bool = True, densities: Sequence[float] = DENSITIES,
        optimizers: Sequence[str] = ("fused", "block_sparse"), mask_update: bool = True,
        tma_settings: Sequence[str] = ()) -> Dict:
    measure = timer(device)
    dtype = getattr(torch, size["dtype"])
    x = torch.randn(size["batch"], size["seq"], size["d_model"], device=device, dtype=dtype)
    results: Dict = {"size": size, "rows": []}
    PARTIAL["results"] = results  # what main writes if the run is cut off

    torch._dynamo.reset()
    dense = make_stack(size, device)
    compiled_dense = torch.compile(dense)
    t0 = time.perf_counter()
    training_step(compiled_dense, dense, x)()
    _sync(device)  # the first step's GPU work too, not only its compile and launches (audit BU)
    results["dense_first_step_s"] = time.perf_counter() - t0
    results["dense_step_s_by_optimizer"] = {}
    dense_host = {}  # host issue time of each dense variant (the baseline's is reported)
    for kind in [k for k in optimizers if k not in BLOCK_SPARSE]:  # dense: torch's optimizers only
        try:
            seconds = measure(make_step(kind, compiled_dense, dense, x, device), warmup, iters)
        except Exception:  # report it and time the other variants rather than nothing
            traceback.print_exc()
            log(f"dense torch.compile, AdamW {kind}: FAILED (traceback above)")
            continue
        results["dense_step_s_by_optimizer"][kind] = seconds
        dense_host[kind] = measure.host
        log(f"dense torch.compile, AdamW {kind}: {1e3 * seconds:.2f} ms/step")
    baseline = min(results["dense_step_s_by_optimizer"], key=results["dense_step_s_by_optimizer"].get)
    dense_time = results["dense_step_s_by_optimizer"][baseline]
    results["dense_step_s"] = dense_time
    results["dense_optimizer"] = baseline
    results["dense_host_issue_s"] = dense_host[baseline]
    log(f"dense baseline: AdamW {baseline}, {1e3 * dense_time:.2f} ms/step "
        f"(first step {results['dense_first_step_s']:.1f} s)")
    if profile_dir and device.type == "cuda":  # where the dense step's time goes, for comparison
        results["dense_profile"] = profile_step(
            training_step(compiled_dense, dense, x, make_optimizer(baseline, dense, device)),
            os.path.join(profile_dir, "profile_dense.txt"), log, rows=profile_rows)

    graph_count = 0
    env_tma = os.environ.get("AGPE_TMA")  # put back after the settings' runs
    # Note: each AGPE_TMA setting compiles its own graphs (the lowering key carries it), timed
    # against the same dense step in this process: one process compares them (audit BT/BU:
    # two processes on one machine differed more than the effect)
    # Under --tma-settings a setting (or one density of it) whose compile or first step fails
    # is marked FAILED and the others go on (audit CW: one failing setting made main() re-run
    # everything, the working settings too); if nothing at all was timed, the error goes up to
    # main(), which measures with opaque ops instead.
    setting_errors = []

    def failed(stage_densities, tma, label, error):
        traceback.print_exc()
        setting_errors.append(error)
        for density in stage_densities:
            for kind in optimizers:
                log(f"agpe d={density:<5} AdamW {kind:<12}{label} FAILED (traceback above)")
                results["rows"].append({"density": density, "optimizer": kind, "failed": True, "tma": tma,
                                        "error": repr(error)})

    for setting in tma_settings or (None,):
        if setting is not None:
            os.environ["AGPE_TMA"] = setting
        tma = _tma_setting()
        label = f" {tma:<10}" if tma_settings else ""
        try:
            torch._dynamo.reset()
            model = make_stack(size, device)
            states = agpe_compile.prepare(model, options={"block_size": size["block"]})
            for state in states.values():  # as under the Sparsifier: set_density zeroes inactive weights
                state.zero_inactive = zero_inactive
            backend = agpe_compile.AgpeBackend({"inductor": inductor})
            compiled = torch.compile(model, backend=backend)
            set_density(model, 1.0)
            t0 = time.perf_counter()
            training_step(compiled, model, x)()
            _sync(device)
        except Exception as error:
            if not tma_settings:
                raise
            failed(densities, tma, label, error)
            continue
        first_step = time.perf_counter() - t0
        results.setdefault("agpe_first_step_s", first_step)
        if tma_settings:  # each setting's own (agpe_first_step_s is the first one's)
            results.setdefault("agpe_first_step_s_by_tma", {})[tma] = first_step
        for density in densities:
            try:
                set_density(model, density)
                agpe_compile.rebucket(model)  # layouts at this density's bucket: one recompile each
                t0 = time.perf_counter()
                training_step(compiled, model, x)()
                _sync(device)
            except Exception as error:
                if not tma_settings:
                    raise
                failed([density], tma, label, error)
                continue
            first = time.perf_counter() - t0
            for kind in optimizers:
                try:
                    step = make_step(kind, compiled, model, x, device)
                    seconds = measure(step, warmup, iters)
                except Exception:
                    traceback.print_exc()
                    log(f"agpe d={density:<5} AdamW {kind:<12}{label} FAILED (traceback above)")
                    results["rows"].append({"density": density, "optimizer": kind, "failed": True, "tma": tma})
                    continue
                results["rows"].append({"density": density, "optimizer": kind, "tma": tma, "agpe_step_s": seconds,
                                        "ratio_vs_dense": seconds / dense_time, "speedup": dense_time / seconds,
                                        "first_step_after_rebucket_s": first, "host_issue_s": measure.host})
                host = f", host issue {1e3 * measure.host:.2f} ms" if measure.host is not None else ""
                log(f"agpe d={density:<5} AdamW {kind:<12}{label} {1e3 * seconds:9.2f} ms/step  "
                    f"{seconds / dense_time:6.3f}x dense time (first step after rebucket {first:.1f} s{host})")
            first = 0.0
        graph_count += backend.graph_count
    if tma_settings:
        if env_tma is None:
            os.environ.pop("AGPE_TMA", None)
        else:
            os.environ["AGPE_TMA"] = env_tma
    if setting_errors and not any("agpe_step_s" in row for row in results["rows"]):
        raise setting_errors[0]  # no setting timed anything: main() falls back to opaque ops
    if profile_dir and device.type == "cuda":
        results.update(profile_step(step, os.path.join(profile_dir, f"profile_agpe_d{densities[-1]}.txt"), log,
                                    rows=profile_rows))
    results["timings_done"] = True  # every density timed: a later failure keeps these rows
    results["agpe_compilations"] = graph_count
    if mask_update:
        results.update(mask_update_cost(size, device, x, inductor, log))
    return results


def mask_update_cost(size: dict, device: torch.device, x: torch.Tensor, inductor: bool, log,
                     interval: int = 4) -> Dict:
    """Mean time of a Sparsifier mask update (AGPE policy) vs a plain training step."""
    torch._dynamo.reset()
    model = make_stack(size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    config = agpe_compile.AGPEConfig(target_sparsity=0.75, policy="agpe", block_size=size["block"],
                                     update_interval=interval, end_step=1000)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, config)
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": inductor}))
    steps = 3 * interval
    profiler = cProfile.Profile()
    for i in range(steps):
        loss = compiled(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":  # the step's own GPU work is not the update's (audit BU)
            torch.cuda.synchronize()
        if i == steps - 1:  # the third update: where does a mask update spend its time?
            profiler.enable()
            sparsifier.step(loss)
            if device.type == "cuda":
                torch.cuda.synchronize()
            profiler.disable()
        else:
            sparsifier.step(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    updates = steps // interval
    per_update = sparsifier.update_seconds / updates
    log(f"mask update: {1e3 * per_update:.2f} ms each ({updates} updates, each after the step's GPU work "
        f"finished; the first one's one-time costs included); the last one by function:")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    for line in text.getvalue().splitlines():
        if line.strip() and not line.startswith(("   Ordered", "         ")):
            log("  " + line[:150])
    return {"mask_update_s": per_update}


SCHEDULE_PROGRESS_EVERY = 50  # steps between the schedule simulation's progress lines (stderr)


def schedule_compilations(steps: int, log) -> Dict:
    """Compilations over a ``steps``-step AGPE run (small stack).

    Each distinct set of layout buckets compiles once; returning to a set seen before (an
    AGPE back-off and re-prune) reuses its cached graph.
    """
    torch._dynamo.reset()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(SMALL_SIZE, dtype="float32", batch=2, seq=32)
    model = make_stack(size, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = schedule_config(steps, size["block"])
    sparsifier = agpe_compile.Sparsifier(model, optimizer, config)
    backend = agpe_compile.AgpeBackend({"inductor": False})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(size["batch"], size["seq"], size["d_model"], device=device)
    crossings = 0
    signatures = set()
    start = time.perf_counter()
    print(f"simulating a {steps}-step AGPE schedule (compilations counted)", file=sys.stderr, flush=True)
    for done in range(1, steps + 1):
        signatures.add(tuple(s.layout_bucket for s in sparsifier.layers.values()))
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsifier.step(loss)
        if sparsifier.step_count % config.update_interval == 0 and sparsifier.rebucketed:
            crossings += 1
        if done % SCHEDULE_PROGRESS_EVERY == 0 and done < steps:
            print(f"  schedule step {done}/{steps}: {backend.graph_count} compilations, density "
                  f"{sparsifier.global_density:.3f}, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    log(f"{steps}-step schedule: {backend.graph_count} compilations, {crossings} bucket-crossing events, "
        f"{len(signatures)} distinct bucket sets, final density {sparsifier.global_density:.3f}")
    return {"schedule_steps": steps, "schedule_compilations": backend.graph_count,
            "schedule_crossings": crossings, "schedule_bucket_sets": len(signatures),
            "schedule_final_density": sparsifier.global_density}


OPTIMIZERS = ("foreach", "fused", "block_sparse", "graphed", "graphed_block_sparse")
GRAPHED = ("graphed", "graphed_block_sparse")
BLOCK_SPARSE = ("block_sparse", "graphed_block_sparse")


def schedule_config(steps: int, block_size: int) -> "agpe_compile.AGPEConfig":
    """The simulated schedule's config: 40 updates, pruning over the first 3/4 of the steps."""
    return agpe_compile.AGPEConfig(target_sparsity=0.9, policy="agpe", block_size=block_size,
                                   update_interval=max(1, steps // 40), end_step=3 * steps // 4)


def check_args(parser: argparse.ArgumentParser, args, device: torch.device):
    """(densities, optimizers) from the flags; parser.error naming the flag, before any work."""
    for flag, value, least in (("--warmup", args.warmup, 0), ("--iters", args.iters, 1),
                               ("--schedule-steps", args.schedule_steps, 0), ("--profile-rows", args.profile_rows, 1)):
        if value is not None and value < least:
            parser.error(f"{flag}: expected an integer >= {least}, got {value}")
    if args.schedule_steps:  # refused here, not after every timing ran
        try:
            schedule_config(args.schedule_steps, SMALL_SIZE["block"])
        except ValueError as error:
            parser.error(f"--schedule-steps: {args.schedule_steps} steps make no valid schedule ({error}); "
                         f"expected 0 (no schedule) or at least 2")
    densities = []
    for item in args.densities.split(","):
        try:
            density = float(item)
        except ValueError:
            parser.error(f"--densities: expected comma-separated numbers in (0, 1], got {item.strip()!r}")
        if not 0 < density <= 1:
            parser.error(f"--densities: expected densities in (0, 1], got {density:g}")
        densities.append(density)
    text = args.optimizers or ("fused,block_sparse,graphed,graphed_block_sparse" if device.type == "cuda"
                               else "foreach,fused,block_sparse")
    optimizers = [k.strip() for k in text.split(",")]
    unknown = [k for k in optimizers if k not in OPTIMIZERS]
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; expected a comma-separated subset of {OPTIMIZERS}")
    if any(k in GRAPHED for k in optimizers) and device.type != "cuda":
        parser.error("--optimizers: graphed and graphed_block_sparse need CUDA (a CUDA-graph step)")
    if all(k in BLOCK_SPARSE for k in optimizers):
        dense = {"block_sparse": "fused", "graphed_block_sparse": "graphed"}
        wanted = list(dict.fromkeys(dense[k] for k in optimizers)) + optimizers
        parser.error(f"--optimizers: expected at least one of foreach, fused, graphed (the dense baseline "
                     f"uses the fastest of those); write e.g. --optimizers {','.join(wanted)} (the block-sparse "
                     f"variant LAST under --profile: it profiles the last variant timed)")
    if args.profile and not args.out:  # it used to profile nothing, silently (audit CW HIGH-2)
        parser.error("--profile: needs --out (the tables profile_dense.txt and profile_agpe_d<density>.txt "
                     "are written beside it)")
    if args.out:
        if os.path.isdir(args.out):
            parser.error(f"--out: {args.out!r} is a folder; expected a file name")
        folder = os.path.dirname(os.path.abspath(args.out))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            parser.error(f"--out: cannot create the folder {folder!r} ({error.strerror or error})")
        if not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"--out: cannot write into {folder!r}")
    return densities, optimizers


def main(argv=None) -> None:
    PARTIAL.clear()  # a second main() in one process starts with nothing measured
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized stack (default without CUDA)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor",
                        help="how agpe lowers (dense always uses Inductor); aot_eager only for quick smoke runs")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: profile 3 dense steps (the baseline optimizer) and 3 agpe steps of the LAST "
                             "optimizer variant timed at the LAST density; needs --out (the tables "
                             "profile_dense.txt and profile_agpe_d<density>.txt go beside it)")
    parser.add_argument("--profile-rows", type=int, default=25, help="kernels listed in each profile table")
    parser.add_argument("--masked-weights", action="store_true",
                        help="agpe layers without the Sparsifier's zero-weight promise: the dense path masks W "
                             "(the behaviour before Note [Zero inactive weights])")
    parser.add_argument("--opaque", action="store_true",
                        help="keep agpe's ops opaque to Inductor on CUDA (default: the triton_op lowering)")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)),
                        help="agpe densities to time (comma-separated)")
    parser.add_argument("--optimizers", default=None,
                        help="AdamW variants to time: foreach, fused (torch), block_sparse (agpe), graphed (fused, "
                             "capturable, whole step in a CUDA graph; CUDA only), graphed_block_sparse (agpe's, "
                             "capturable, graphed; CUDA only). Default: fused,block_sparse,graphed,"
                             "graphed_block_sparse on CUDA, foreach,fused,block_sparse on CPU. At least one "
                             "dense variant (foreach, fused, graphed) is needed: the baseline; with --profile "
                             "put the variant to profile last, e.g. graphed,graphed_block_sparse")
    parser.add_argument("--no-mask-update", action="store_true", help="skip timing the Sparsifier's mask update")
    parser.add_argument("--tma-settings", default="",
                        help="comma-separated AGPE_TMA values (off, auto, device, persistent) to time one after "
                             "the other in this process against the same dense step, each compiled anew "
                             "(default: the environment's setting only); a setting or density whose compile "
                             "fails is marked FAILED and the rest are timed")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="run every block (dense and agpe) under torch.utils.checkpoint")
    parser.add_argument("--schedule-steps", type=int, default=2000,
                        help="length of the simulated AGPE schedule whose compilations are counted")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    densities, optimizers = check_args(parser, args, device)
    small = args.small or device.type == "cpu"
    size = dict(SMALL_SIZE if small else GPU_SIZE, checkpoint=args.activation_checkpointing)
    warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    iters = args.iters if args.iters is not None else (3 if small else 10)
    # the module, not the op of the same name that agpe_compile.ops exports
    op_module = importlib.import_module("agpe_compile.ops.sparse_linear")

    tma_settings = [s.strip().lower() for s in args.tma_settings.split(",") if s.strip()]
    from agpe_compile.kernels.launch import _TMA_ENV_VALUES
    unknown = [s for s in tma_settings if s not in _TMA_ENV_VALUES]
    if unknown:
        parser.error(f"--tma-settings: unknown {unknown}; expected a comma-separated subset of {_TMA_ENV_VALUES}")
    run_args = dict(densities=densities, optimizers=optimizers, mask_update=not args.no_mask_update,
                    tma_settings=tma_settings)

    profile_dir = os.path.dirname(os.path.abspath(args.out)) if (args.profile and args.out) else ""

    op_module.INLINE_KERNELS = not args.opaque
    _tma_setting()  # a misspelt AGPE_TMA fails here, not after the whole run (audit BF)
    if args.out:  # `timeout` sends SIGTERM: keep what was measured
        signal.signal(signal.SIGTERM, lambda *_: _write_partial(args.out))
    try:
        results = run(size, device, warmup, iters, inductor=args.lowering == "inductor", profile_dir=profile_dir,
                      profile_rows=args.profile_rows, zero_inactive=not args.masked_weights, **run_args)
    except Exception as error:  # report, then measure the opaque lowering rather than nothing
        if args.opaque or device.type != "cuda":
            raise
        traceback.print_exc()
        measured = PARTIAL.get("results") or {}
        if measured.get("timings_done"):
            # every density was timed, so the inlined lowering works: keep the rows (a later
            # part failed: the profile, the mask update) rather than re-running everything
            # (audit BU; a failure while timing, e.g. a density's compile, still re-runs all
            # with opaque ops: re-audit BW)
            print("agpe: the run FAILED after every agpe step was timed (traceback above); keeping those",
                  flush=True)
            results = dict(measured, error=repr(error))
        else:
            print("agpe: the inlined (triton_op) lowering FAILED above; measuring with opaque ops instead", flush=True)
            op_module.INLINE_KERNELS = False
            # the first attempt's finished rows stay in the partial and final JSON (audit CW MEDIUM-6:
            # the rerun's run() replaces PARTIAL["results"], and a time limit may cut the rerun)
            PARTIAL["first_attempt"] = dict(measured, error=repr(error), inline_kernels=True)
            results = run(size, device, warmup, iters, inductor=args.lowering == "inductor", profile_dir=profile_dir,
                          profile_rows=args.profile_rows, zero_inactive=not args.masked_weights, **run_args)
            results["inline_failed"] = True
            results["first_attempt"] = PARTIAL["first_attempt"]
    results["lowering"] = args.lowering
    results["zero_inactive"] = not args.masked_weights
    results["inline_kernels"] = op_module.INLINE_KERNELS
    # the value the kernels read (default "off"); under --tma-settings the settings the rows ran
    # (each row's "tma"), not the environment's value put back after them (audit CW LOW-4)
    results["tma_setting"] = ",".join(tma_settings) if tma_settings else _tma_setting()
    if args.schedule_steps > 0:
        try:
            results.update(schedule_compilations(args.schedule_steps, _log))
        except (Exception, KeyboardInterrupt) as error:  # keep the timings (SIGTERM's exit writes its own)
            if args.out:
                PARTIAL["results"] = dict(results, schedule_error=repr(error))
                _write_partial(args.out, "the schedule simulation failed (below)", stop=False)
            raise
    results["machine"] = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    results["torch"] = torch.__version__
    results["date"] = datetime.date.today().isoformat()
    print(f"\n{results['machine']}, torch {results['torch']}, {results['date']}")
    print(f"dense baseline: torch.compile (Inductor) + AdamW {results['dense_optimizer']}")
    several = len({row.get("tma") for row in results["rows"]}) > 1  # --tma-settings: a column for it
    tma_head = f" {'AGPE_TMA':>10}" if several else ""
    print(f"{'density':>8} {'optimizer':>13}{tma_head} {'agpe/dense':>11} {'speedup':>8}")
    for row in results["rows"]:
        tma_cell = f" {row.get('tma') or '':>10}" if several else ""
        if row.get("failed"):
            print(f"{row['density']:>8} {row['optimizer']:>13}{tma_cell} {'FAILED':>11}")
            continue
        print(f"{row['density']:>8} {row['optimizer']:>13}{tma_cell} {row['ratio_vs_dense']:>11.3f} "
              f"{row['speedup']:>8.2f}")
    results["best"] = best_by_density(results["rows"])
    for density, row in results["best"].items():
        target = SPEEDUP_TARGETS.get(density)
        verdict = ""
        if target is not None and device.type == "cuda":
            ok = row["speedup"] >= target if target > 1 else row["ratio_vs_dense"] <= 1 / target
            verdict = f"  target {'>= %.1fx' % target if target > 1 else '<= %.2fx time' % (1 / target)}: " \
                      f"{'met' if ok else 'MISSED'}"
        with_tma = f" (AGPE_TMA={row['tma']})" if several else ""
        print(f"best at d={density}: {row['optimizer']}{with_tma}, {row['ratio_vs_dense']:.3f} of the best dense step's time "
              f"(speed-up {row['speedup']:.2f}x){verdict}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def _write_partial(path: str, why: str = "stopped by a time limit", stop: bool = True) -> None:
    results = dict(PARTIAL.get("results", {}), incomplete=True)
    if "first_attempt" in PARTIAL:  # the rows of the inlined attempt before the opaque rerun
        results["first_attempt"] = PARTIAL["first_attempt"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"train_step: {why}; partial results written to {path}", flush=True)
    if stop:
        raise SystemExit(124)


if __name__ == "__main__":
    main()
