"""Models whose weights FSDP or tensor parallelism shards are refused, naming what was found
(Note [Sharded weights] in agpe_compile/sharding.py; helper audit BX: before, FSDP2 in
zero-code mode silently pruned transient copies, FSDP1 trained dense, others failed with
unrelated messages). One gloo rank in this process; the audit's 2-rank runs behaved alike."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile import sharding

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _config():
    return agpe_compile.AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=16, update_interval=2, end_step=10)


def test_fsdp2_is_refused_by_prepare_the_sparsifier_and_at_the_first_step(one_rank):
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(MLP())
    with pytest.raises(ValueError, match="agpe.prepare: the model holds a module sharded by FSDP2 fully_shard"):
        agpe_compile.prepare(model)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="agpe: Sparsifier: .*FSDP2 fully_shard.*DistributedDataParallel"):
        agpe_compile.Sparsifier(model, opt, _config())
    # a Sparsifier made before fully_shard: its first step names FSDP, not parametrize
    model = MLP()
    opt = torch.optim.AdamW(model.parameters())
    sp = agpe_compile.Sparsifier(model, opt, _config())
    fully_shard(model)
    with pytest.raises(ValueError, match=r"lost their weights: the model holds a module sharded by FSDP2"):
        sp.step(torch.tensor(1.0))


def test_fsdp2_in_zero_code_mode_is_refused_at_the_first_optimizer_step(one_rank):
    # the compiled forward sees FSDP2's transient unsharded copies (plain tensors): before,
    # agpe pruned those and the model's real weights kept their pruned blocks
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = fully_shard(MLP())
    backend = agpe_compile.AgpeBackend({"inductor": False, "policy": "rigl", "target_sparsity": 0.75,
                                        "block_size": 16, "update_interval": 2, "end_step": 10})
    run = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters())
    run(torch.randn(4, 32)).square().mean().backward()
    with pytest.raises(ValueError, match="zero-code mode: an optimizer steps parameters of the compiled layers. shapes that are a DTensor"):
        opt.step()
    torch._dynamo.reset()


def test_fsdp1_is_refused_by_the_sparsifier(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (False, True):
        model = FSDP(MLP(), use_orig_params=orig, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="FSDP FullyShardedDataParallel"):
            agpe_compile.Sparsifier(model, torch.optim.AdamW(model.parameters()), _config())


def test_a_flattened_weight_is_named_not_unpacked():
    # FSDP1 with use_orig_params=True wrapped after the Sparsifier: the weight became a 1-D view
    # ("not enough values to unpack" in the step hook before)
    with pytest.raises(RuntimeError, match=r"fc1's weight is now \(2048,\).*1-D shards"):
        sharding.refuse_reshaped("fc1", torch.zeros(2048))
    sharding.refuse_reshaped("fc1", torch.zeros(4, 4))  # a whole weight passes


def test_ddp_and_plain_models_pass():
    assert sharding.module_reason(MLP()) is None
    assert sharding.tensor_reason(torch.zeros(2, 2)) is None
    assert sharding.classes_reason([nn.Linear, "not a class"]) is None


def test_zero_code_mode_leaves_another_models_sharded_optimizer_alone(one_rank):
    # the refusal above looks for sharded parameters of the compiled layers' shapes: an
    # unrelated FSDP2 model's optimizer stepping in the same process is not this model's
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = MLP()
    backend = agpe_compile.AgpeBackend({"inductor": False, "policy": "rigl", "target_sparsity": 0.75,
                                        "block_size": 16, "update_interval": 2, "end_step": 10})
    run = torch.compile(model, backend=backend)
    other = fully_shard(nn.Linear(8, 8))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    run(torch.randn(4, 32)).square().mean().backward()
    other(torch.randn(2, 8)).sum().backward()
    other_opt.step()  # no refusal
    torch._dynamo.reset()


def test_a_dtensor_that_is_not_a_linear_weight_is_not_refused(one_rank):
    # re-audit BZ: any DTensor parameter or input was refused, also an embedding that tensor
    # parallelism splits while the linear layers stay whole
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = MLP()
    model.emb = nn.Embedding(10, 32)
    model.emb.weight = nn.Parameter(distribute_tensor(model.emb.weight.detach(), mesh, [Replicate()]))
    assert agpe_compile.state.sharded_reason(model) is None
    assert set(agpe_compile.prepare(model, {"block_size": 16})) == {"fc1", "fc2"}
    other = MLP()
    other.fc1.weight = nn.Parameter(distribute_tensor(other.fc1.weight.detach(), mesh, [Replicate()]))
    with pytest.raises(ValueError, match="the weight of its linear layer fc1 is a DTensor"):
        agpe_compile.prepare(other, {"block_size": 16})
    with pytest.raises(RuntimeError, match="layer fc2's mask became a DTensor"):
        sharding.refuse_sharded_state("fc2", torch.zeros(2, 2), distribute_tensor(torch.ones(2, 2), mesh, [Replicate()]))


_ZERO_CODE = {"inductor": False, "policy": "rigl", "target_sparsity": 0.75, "block_size": 16, "update_interval": 2,
              "end_step": 10}


def test_fsdp1_with_orig_params_is_refused_by_the_backend(one_rank):
    # Dynamo skips FSDP1's own forward, so the graph holds no FSDP class, and its linear
    # weights are plain views of the FlatParameter: before, zero-code mode trained dense
    # behind the generic "weight is not a parameter" warning
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch._dynamo.reset()
    model = FSDP(MLP(), use_orig_params=True, device_id=torch.device("cpu"))
    run = torch.compile(model, backend=agpe_compile.AgpeBackend(_ZERO_CODE))
    with pytest.raises(Exception, match="agpe backend: the weight .*fc1.* is a view of an FSDP FlatParameter"):
        run(torch.randn(4, 32))
    torch._dynamo.reset()


def test_fsdp2_sharding_each_layer_in_zero_code_mode_is_named(one_rank, monkeypatch, caplog):
    # fully_shard per layer: Dynamo skips the sharded layers' forwards, so no graph holds a
    # linear layer and zero-code mode trained dense with the generic warning
    from torch.distributed.fsdp import fully_shard
    from agpe_compile.controller import zero_code

    monkeypatch.setattr(zero_code, "_CONTROLLERS_MADE", 0)
    monkeypatch.setattr(zero_code, "_WATCH", [])
    torch._dynamo.reset()
    model = MLP()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    run = torch.compile(model, backend=agpe_compile.AgpeBackend(_ZERO_CODE))
    opt = torch.optim.AdamW(model.parameters())
    run(torch.randn(4, 32)).square().mean().backward()
    import logging

    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        opt.step()
    said = [r.getMessage() for r in caplog.records if "no compiled graph had a linear layer" in r.getMessage()]
    assert len(said) == 1 and "parameters that are a DTensor" in said[0] and "FSDP2 wraps" in said[0]
    assert "DistributedDataParallel" in said[0]
    torch._dynamo.reset()
