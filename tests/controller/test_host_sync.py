"""Mask updates read device state once and decide on the host (Note [Host-side updates]).

On a GPU every host read of a device tensor (``int(t)``, ``bool(t)``, ``nonzero``) waits
for the device. The CPU cannot time that, but it can check the structure: during an
update no host read may touch a tensor that lives with the model (layer buffers,
weights, optimizer moments, the loss sum), only the snapshot's copies.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.controller.host_sync import to_device, to_host

from .helpers import batches, make_run, train

HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero")


class ResidentReads(TorchDispatchMode):
    """Counts host reads (and all ops) whose inputs share storage with ``resident``."""

    def __init__(self, resident):
        super().__init__()
        self.keep = list(resident)  # alive, so no other tensor can reuse their addresses
        self.storages = {t.untyped_storage().data_ptr() for t in self.keep}
        self.reads = collections.Counter()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages for t in flat):
            self.ops += 1
            if str(func).startswith(HOST_READS):
                self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _resident(sparsifier, optimizer):
    tensors = []
    for state in sparsifier.layers.values():
        tensors += state.tensors() + [state.weight]
    for per_param in optimizer.state.values():
        tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    tensors += list(sparsifier._scored_from.values())
    if sparsifier._loss_sum is not None:
        tensors.append(sparsifier._loss_sum)
    return tensors


@pytest.mark.parametrize("policy", ["agpe", "rigl", "set", "snfs", "gmp"])
def test_mask_updates_never_read_model_tensors_on_the_host(policy):
    config = AGPEConfig(target_sparsity=0.75, policy=policy, update_interval=2, end_step=40, block_size=4)
    model, opt, sp, cmodel, _ = make_run(config, optimizer="adam")
    data = batches(12)
    updates = 0
    for step, (x, y) in enumerate(data):
        loss = torch.nn.functional.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 2:
            sp.step(loss)
            continue
        before = {n: s.block_mask.clone() for n, s in sp.layers.items()}
        with ResidentReads(_resident(sp, opt)) as mode:
            sp.step(loss)
        assert not mode.reads, f"update at step {step + 1} read model tensors on the host: {dict(mode.reads)}"
        updates += any(not torch.equal(before[n], s.block_mask) for n, s in sp.layers.items())
    assert updates >= 3  # the updates really changed masks
    # the written layouts match the masks, so the next call rebuilds nothing
    for state in sp.layers.values():
        assert state.layout_mask_version == state.block_mask._version
        layout = state.layout()
        assert torch.equal(layout.block_slot >= 0, state.block_mask)
        assert int(layout.live_count) == int(state.block_mask.sum())
    train(cmodel, opt, sp, batches(2, seed=1))  # and training goes on


def test_to_host_and_to_device_round_trip_every_controller_dtype():
    tensors = [torch.tensor([[True, False]]), torch.tensor([3, 2**40], dtype=torch.int64),
               torch.tensor([1.5, -0.25], dtype=torch.float32), torch.tensor([7], dtype=torch.int32)]
    host = to_host(tensors)
    for a, b in zip(tensors, host):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()  # copies, never aliases
    targets = [torch.zeros_like(t) for t in tensors]
    to_device(list(zip(targets, tensors)))
    for a, b in zip(tensors, targets):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="matching shapes"):
        to_device([(torch.zeros(2), torch.zeros(3))])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_mask_update_synchronizes_a_bounded_number_of_times():
    """At most one snapshot per interval, plus one transfer for magnitude scores (RigL
    drops by magnitude) and one per layer that changes layout bucket; before, ~18 per layer."""
    import warnings

    from agpe_compile.packed_layout import unpack

    from .helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = AGPEConfig(target_sparsity=0.75, policy="rigl", update_interval=2, end_step=40, block_size=4)
    sp = Sparsifier(model, opt, config)
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False, "block_size": 4})
    gen = torch.Generator().manual_seed(0)
    worst = 0
    # The first switch into "warn" mode itself reports one synchronizing call (seen on an
    # H200 with torch 2.11, benchmarks/gpu_host_probe.py); switch once before counting.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.set_sync_debug_mode("default")
    for step in range(12):
        x = torch.randn(32, 16, generator=gen).cuda()
        loss = cmodel(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sp.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        if (step + 1) % 2 == 0:
            worst = max(worst, syncs - len(sp.rebucketed))
        else:
            assert syncs == 0, f"a plain step (step {step + 1}) synchronized {syncs} times"
    assert worst <= 2, worst
    for state in sp.layers.values():  # the layouts written from the host match the masks
        mask = state.block_mask.cpu()
        layout = unpack(state.block_layout.cpu(), state.grid, state.block_size)
        assert state.layout_mask_version == state.block_mask._version
        assert torch.equal(layout.block_slot >= 0, mask)
        assert int(layout.live_count) == int(mask.sum())
        assert torch.equal(layout.row_ptr[1:] - layout.row_ptr[:-1], mask.sum(1).to(layout.row_ptr.dtype))



def test_the_packed_transfer_round_trips_mixed_dtypes_in_any_order():
    # What a GPU snapshot does around its one .cpu(): pack by dtype, unpack in the caller's order.
    from agpe_compile.controller.host_sync import pack_flat, unpack_flat

    tensors = [torch.tensor([[True, False], [False, True]]), torch.tensor([1.5, -2.0]), torch.tensor([3, 2**52]),
               torch.tensor([False]), torch.tensor([[0.25]]), torch.zeros(0, 3), torch.tensor(9, dtype=torch.int32)]
    flat, order = pack_flat(tensors)
    assert flat.dtype == torch.float64 and flat.numel() == sum(t.numel() for t in tensors)
    back = unpack_flat(flat.clone(), tensors, order)
    for a, b in zip(tensors, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    with pytest.raises(OverflowError):
        big = [torch.tensor([2**53 + 1])]
        unpack_flat(pack_flat(big)[0], big, [0])
