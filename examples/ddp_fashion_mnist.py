"""Data-parallel AGPE training: the Fashion-MNIST MLP on several processes (DDP).

Run on the CPU with two processes (gloo)::

    python -m torch.distributed.run --nproc_per_node 2 examples/ddp_fashion_mnist.py --epochs 1

(on GPUs: ``--backend nccl``, one process per GPU). Each rank trains on its own half of
the training set; the Sparsifier averages the ranks' block scores and loss at every mask
update, so all ranks prune and regrow the same blocks (Note [Data-parallel masks] in
agpe_compile/distributed.py). At the end every rank fingerprints its masks and weights,
rank 0 checks that they are the same on all ranks, evaluates on the test set and prints a
summary. Data: Debian's dataset-fashion-mnist, as in examples/fashion_mnist.py.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agpe_compile  # noqa: E402
from fashion_mnist import MLP, evaluate, load_fashion_mnist  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over each rank's shard (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (default 64)")
    parser.add_argument("--sparsity", type=float, default=0.9,
                        help="target fraction of weight blocks pruned, in [0, 1) (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=8,
                        help="side of the square weight blocks; must divide 784 and the hidden width 1000 "
                             "(default %(default)s)")
    parser.add_argument("--update-interval", type=int, default=20,
                        help="training steps between mask updates (>= 1; default %(default)s)")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                        help="torch.distributed backend: gloo on the CPU, nccl with one GPU per process "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights (the same on every rank), each rank's data order (seed + rank) "
                             "and the layouts (>= 0; default %(default)s)")
    args = parser.parse_args(argv)
    for flag, value, ok, expected in (
            ("--epochs", args.epochs, math.isfinite(args.epochs) and args.epochs > 0, "a finite number > 0"),
            ("--max-steps", args.max_steps, args.max_steps is None or args.max_steps >= 1, "an integer >= 1"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
            ("--sparsity", args.sparsity, 0 <= args.sparsity < 1, "a number in [0, 1)"),
            ("--block-size", args.block_size, args.block_size >= 1, "an integer >= 1"),
            ("--update-interval", args.update_interval, args.update_interval >= 1, "an integer >= 1"),
            ("--seed", args.seed, args.seed >= 0, "an integer >= 0")):
        if not ok:
            parser.error(f"{flag}: expected {expected}, got {value}")
    return args


def fingerprint(model) -> str:
    """A digest of every parameter and agpe mask of this rank."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith(("weight", "bias", "block_mask")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("error: start it with several processes, e.g.\n"
                 "    python -m torch.distributed.run --nproc_per_node 2 examples/ddp_fashion_mnist.py")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    shard = torch.arange(rank, len(x_train), world)  # each rank its own samples
    x_train, y_train = x_train[shard].to(device), y_train[shard].to(device)

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = MLP((1000, 1000, 1000)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps_per_epoch = len(x_train) // args.batch_size
    total = max(1, int(args.epochs * steps_per_epoch))
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    try:  # every rank refuses the same flags: one line each, no traceback
        config = agpe_compile.AGPEConfig(target_sparsity=args.sparsity, block_size=args.block_size,
                                         exclude=("head",), update_interval=args.update_interval,
                                         end_step=max(1, int(0.75 * total)), saliency="magnitude", seed=args.seed)
        sparsifier = agpe_compile.Sparsifier(model, optimizer, config)  # before DDP and torch.compile
    except ValueError as error:
        dist.destroy_process_group()
        sys.exit(f"error: {error} ({total} training steps; from --epochs/--max-steps/--batch-size, "
                 f"--update-interval, --block-size)")
    lowering = {"inductor": device.type == "cuda", "saliency": "magnitude"}
    ddp = DDP(torch.compile(model, backend="agpe", options=lowering))

    gen = torch.Generator().manual_seed(args.seed + rank)
    start = time.perf_counter()
    for step in range(1, total + 1):
        batch = torch.randint(0, len(x_train), (args.batch_size,), generator=gen).to(device)
        loss = F.cross_entropy(ddp(x_train[batch]), y_train[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step(loss)
        if rank == 0 and (step % 50 == 0 or step == total):
            print(f"step {step}/{total}  loss {float(loss.detach()):.3f}  density {sparsifier.global_density:.3f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)

    prints = [None] * world
    dist.all_gather_object(prints, fingerprint(model))
    if rank == 0:
        same = len(set(prints)) == 1
        accuracy = evaluate(ddp.module, x_test.to(device), y_test.to(device))  # the compiled model: masked
        print(f"{world} ranks, {total} steps of batch {args.batch_size} each; masks and weights identical across "
              f"ranks: {'yes' if same else 'NO ' + str(prints)}")
        print(f"test accuracy {accuracy:.2f}% at density {sparsifier.global_density:.3f} "
              f"(training FLOPs of the agpe layers on this rank vs dense: {sparsifier.flops.ratio:.3f})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
