"""Run by test_checkpoint.py in fresh processes: train, save, resume (CPU, fp32).

    python -m tests.controller.checkpoint_worker straight OUT   # N steps, save, M more
    python -m tests.controller.checkpoint_worker resume OUT     # load the save, M more
"""

import sys

import torch
import torch.nn.functional as F

from agpe_compile.controller import AGPEConfig

from .helpers import batches, make_run

N, M = 11, 13  # the save lands mid-interval, right before a dense-scoring update step
POLICIES = ("agpe", "set")


def config(policy: str) -> AGPEConfig:
    # protect_grown: the regrowth ages must survive the resume too.
    return AGPEConfig(policy=policy, target_sparsity=0.75, block_size=4, update_interval=4, end_step=20,
                      patience=1, cooldown=0, protect_grown=1 if policy == "agpe" else 0)


def steps(cmodel, opt, sp, data):
    losses = []
    for x, y in data:
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        losses.append(loss.item())
    return losses


def main(mode: str, out: str) -> None:
    results = {}
    for policy in POLICIES:
        torch._dynamo.reset()
        model, opt, sp, cmodel, _ = make_run(config(policy))
        data = list(batches(N + M))
        if mode == "straight":
            steps(cmodel, opt, sp, data[:N])
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict()},
                       f"{out}.{policy}.ckpt")
        else:
            saved = torch.load(f"{out}.{policy}.ckpt", weights_only=False)
            sp.load_state_dict(saved["sparsifier"])  # first: it sizes the layout buffers
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        losses = steps(cmodel, opt, sp, data[N:])
        results[policy] = {"losses": losses, "masks": {n: s.block_mask.clone() for n, s in sp.layers.items()},
                           "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                           "flops": sp.flops.sparse, "step": sp.step_count}
    torch.save(results, f"{out}.{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
