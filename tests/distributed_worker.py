"""One rank of a data-parallel agpe run (gloo, CPU), for tests/test_distributed.py.

    python -m tests.distributed_worker RANK WORLD PORT OUT {explicit|zerocode} POLICY [--edit-mask] [--split] [--outside] [--data-parallel-off]
        [--rank1-interval N] [--audit PATH] [--resume-at STEP] [--rank1-overflow-step N]

``--outside``: ``torch.compile(DDP(model))``; else ``DDP(torch.compile(model))``. ``--cuda``: both
ranks on the one GPU, lowered with Inductor (the Triton kernels).

Each rank trains the same seeded MLP on its own data shard under DistributedDataParallel and
saves its masks, weights, saliency EMA and losses to OUT (torch.save), or the error message
of a RuntimeError under "error".
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import agpe_compile
from agpe_compile.state import layer_states

STEPS = 30
CONFIG = dict(target_sparsity=0.75, block_size=16, update_interval=5, end_step=25)


class MLP(nn.Module):
    def __init__(self, width: int = 64, inputs: int = 32, outputs: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, outputs)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def resume_check(rank: int, out: str, at: int) -> None:
    """Train STEPS steps saving at step ``at`` (rank 0's shared checkpoint, each rank's own
    rank state), then resume twice from it, with and without the rank state (Note [Ranks'
    own state]); saves every run's masks and weights."""
    def build():
        torch.manual_seed(0)
        model = MLP()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(policy="agpe", **CONFIG))
        backend = agpe_compile.AgpeBackend({"inductor": False})
        return model, optimizer, sparsifier, DDP(torch.compile(model, backend=backend))

    teacher = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))

    def train(model, optimizer, sparsifier, run, gen, steps, save_at=None):
        saved = None
        for step in steps:
            x = torch.randn(16, 32, generator=gen)
            loss = F.mse_loss(run(x), x @ teacher)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sparsifier.step(loss)
            if step == save_at:
                shared = [copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "sparsifier": sparsifier.state_dict()}) if rank == 0 else None]
                dist.broadcast_object_list(shared, src=0)  # what every rank reads from rank 0's file
                saved = dict(shared[0], rank_state=sparsifier.rank_state_dict(), data=gen.get_state())
        states = layer_states(model)
        return {"masks": {n: s.block_mask.clone() for n, s in states.items()},
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "ema": {n: v.clone() for n, v in sparsifier.saliency.values.items()},
                "buffers": {f"{n}.{key}": getattr(s, key).clone() for n, s in states.items()
                            for key in ("saliency", "dense_grad_sq", "counters")}}, saved

    straight, saved = train(*build(), torch.Generator().manual_seed(100 + rank), range(1, STEPS + 1), save_at=at)
    result = {"straight": straight}
    pristine = copy.deepcopy(saved)  # Optimizer.load_state_dict adopts the tensors it is given: one copy per resume
    for with_rank_state in (True, False):
        torch._dynamo.reset()
        saved = copy.deepcopy(pristine)
        model, optimizer, sparsifier, run = build()
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        sparsifier.load_state_dict(saved["sparsifier"])
        if with_rank_state:
            sparsifier.load_rank_state_dict(saved["rank_state"])
        gen = torch.Generator()
        gen.set_state(saved["data"])
        result["with" if with_rank_state else "without"] = train(model, optimizer, sparsifier, run, gen,
                                                                 range(at + 1, STEPS + 1))[0]
    try:
        sparsifier.load_rank_state_dict(dict(saved["rank_state"], rank=1 - rank))
    except ValueError as error:
        result["other_rank"] = str(error)
    torch.save(result, out)


def main(argv) -> None:
    rank, world, port, out, mode, policy = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5]
    edit_mask, split, cuda = "--edit-mask" in argv, "--split" in argv, "--cuda" in argv
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if "--resume-at" in argv:
        resume_check(rank, out, int(argv[argv.index("--resume-at") + 1]))
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    torch.manual_seed(0)  # the same initial model on every rank
    config = dict(CONFIG)
    if "--data-parallel-off" in argv:
        config["data_parallel"] = "off"
    if "--rank1-interval" in argv and rank == 1:  # a config that differs between the ranks
        config["update_interval"] = int(argv[argv.index("--rank1-interval") + 1])
    if "--audit" in argv:  # the same path on every rank
        config["audit_path"] = argv[argv.index("--audit") + 1]
    if cuda:  # both ranks on one GPU (gloo), Inductor + the Triton kernels at block 32
        device = torch.device("cuda")
        config["block_size"] = 32
        model = MLP(width=128, inputs=64, outputs=64).to(device)
    else:
        device = torch.device("cpu")
        model = MLP(width=512 if split else 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sparsifier = None
    lowering = {"inductor": cuda}
    if mode == "explicit":
        try:
            sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(policy=policy, **config))
        except RuntimeError as error:
            torch.save({"error": str(error), "at": "creation"}, out)
            sys.stdout.flush()
            os._exit(0)
        backend = agpe_compile.AgpeBackend(lowering)
    else:
        agpe_compile.prepare(model, {"block_size": config["block_size"]})
        backend = agpe_compile.AgpeBackend({**lowering, "policy": policy, **config})
    # --split: larger than one gradient bucket, so DDPOptimizer splits the graph (fake example inputs)
    ddp_options = {"bucket_cap_mb": 1} if split else {}
    if "--outside" in argv:
        run = torch.compile(DDP(model, **ddp_options), backend=backend)
    else:
        run = DDP(torch.compile(model, backend=backend), **ddp_options)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    teacher = torch.randn(model.fc1.in_features, model.out.out_features, generator=torch.Generator().manual_seed(7))
    losses, result = [], {}
    try:
        for step in range(1, STEPS + 1):
            x = torch.randn(16, model.fc1.in_features, generator=gen)
            loss = F.mse_loss(run(x.to(device)), (x @ teacher).to(device))
            overflow = "--rank1-overflow-step" in argv and step == int(argv[argv.index("--rank1-overflow-step") + 1])
            (loss * float("inf") if overflow and rank == 1 else loss).backward()
            if not overflow:  # the averaged gradients overflowed on every rank: a GradScaler skips the step
                optimizer.step()
            optimizer.zero_grad()
            if sparsifier is not None:
                sparsifier.step(loss)
            losses.append(float(loss.detach()))
            if edit_mask and rank == 1 and step == 7:
                with torch.no_grad():
                    agpe_compile.layer_state(model.fc2).block_mask[0, 0] ^= True
    except RuntimeError as error:
        result["error"] = str(error)
    states = layer_states(model)
    result.update(
        losses=losses,
        masks={n: s.block_mask.cpu() for n, s in states.items()},
        block_sizes={n: s.block_size for n, s in states.items()},
        rows={n: int(s.counters[0]) for n, s in states.items()},
        weights={n: p.detach().cpu() for n, p in model.named_parameters()},
        ema=({n: v.clone() for n, v in sparsifier.saliency.values.items()} if sparsifier is not None else {}),
        ddp_ignored=list(getattr(model, "_ddp_params_and_buffers_to_ignore", [])),
    )
    torch.save(result, out)
    dist.barrier()
    # Not destroy_process_group(): with gloo it hung now and then on the rank that hosts the
    # store once the other rank had exited. Every rank has saved its result by the barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
