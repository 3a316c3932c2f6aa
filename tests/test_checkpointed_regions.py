"""Layers inside activation-checkpointed regions run the op (Note [Weights inside
higher-order ops] in passes/match_linears.py).

Each check compiles a model whose blocks run under ``torch.utils.checkpoint`` and a twin
without checkpointing (same weights, same masks, same input) and compares everything the
op produces: output, every gradient, the saliency sums, the inactive blocks' dense-gradient
scores and the row counters. Bodies the rewrite cannot take keep the ``masked_weight``
form and are checked against the dense-with-zeros oracle.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import agpe_compile
from agpe_compile.state import layer_states

from .models import MLP, aot_backend, eager_masked, grads, set_random_masks
from .tolerances import SCORE_TOLERANCE, assert_close


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


class _Net(nn.Module):
    """Two MLP blocks and a head; ``region`` says how the blocks run."""

    def __init__(self, region):
        super().__init__()
        self.block = MLP((64, 128, 64))
        self.block2 = MLP((64, 128, 64))
        self.head = nn.Linear(64, 32)
        self.region = region

    def forward(self, x):
        if self.region is None:
            h = self.block2(self.block(x))
        elif self.region == "nested":
            h = checkpoint(lambda v: self.block2(checkpoint(self.block, v, use_reentrant=False)), x,
                           use_reentrant=False)
        elif self.region == "selective":
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            h = checkpoint(self.block, x, use_reentrant=False, context_fn=context)
            h = checkpoint(self.block2, h, use_reentrant=False, context_fn=context)
        else:
            reentrant = self.region == "reentrant"
            h = checkpoint(self.block, x, use_reentrant=reentrant)
            h = checkpoint(self.block2, h, use_reentrant=reentrant)
        return self.head(F.relu(h))


def _prepared(region):
    torch.manual_seed(0)
    model = _Net(region)
    agpe_compile.prepare(model, options={"block_size": 16})
    return model


def _step(compiled, model, x, density, seed):
    set_random_masks(model, density, seed=seed)
    for state in layer_states(model).values():
        state.score_dense.fill_(True)
        state.saliency.zero_()
        state.dense_grad_sq.zero_()
        state.counters.zero_()
    x = x.clone().requires_grad_(True)
    out = compiled(x)
    out.square().mean().backward()
    scores = {name: (s.saliency.clone(), s.dense_grad_sq.clone(), s.counters.clone())
              for name, s in layer_states(model).items()}
    return out.detach(), grads(model), x.grad, scores


@pytest.mark.parametrize("inductor", [False, True], ids=["aot_eager", "inductor"])
@pytest.mark.parametrize("region", ["non_reentrant", "reentrant", "selective"])
def test_checkpointed_layers_run_the_op_like_their_uncheckpointed_twin(region, inductor):
    torch._dynamo.reset()
    model, twin = _prepared(region), _prepared(None)
    backend, twin_backend = agpe_compile.AgpeBackend({"inductor": inductor}), aot_backend()
    compiled, twin_compiled = torch.compile(model, backend=backend), torch.compile(twin, backend=twin_backend)
    for i, density in enumerate((1.0, 0.5, 0.1)):
        x = torch.randn(8, 64)
        got = _step(compiled, model, x, density, seed=i)
        want = _step(twin_compiled, twin, x, density, seed=i)
        assert_close(got[0], want[0], f"output at density {density}")
        assert got[1].keys() == want[1].keys()
        for name in want[1]:
            assert_close(got[1][name], want[1][name], f"grad of {name} at density {density}")
        assert_close(got[2], want[2], f"input grad at density {density}")
        for name, (saliency, dense_sq, counters) in want[3].items():
            rtol, atol = SCORE_TOLERANCE
            torch.testing.assert_close(got[3][name][0], saliency, rtol=rtol, atol=atol)
            torch.testing.assert_close(got[3][name][1], dense_sq, rtol=rtol, atol=atol)
            # rows counted once per backward: recomputing the forward does not count again
            assert torch.equal(got[3][name][2], counters), (name, got[3][name][2], counters)
            assert int(counters[0]) == 8
    assert backend.graph_count == 1, "mask edits inside checkpointed regions must not recompile"
    report = agpe_compile.explain(model, torch.randn(8, 64), options={"inductor": False})
    assert {r.name: r.lowering for r in report.layers} == dict.fromkeys(layer_states(model), "sparse_linear")
    assert report.golden().count("torch.ops.agpe.sparse_linear.default(") == 5


def test_nested_checkpoints_rewrite_the_outer_body_and_mask_the_inner_one():
    """``block`` runs in a body nested in another: its weights reach it through the outer
    body's call of the inner one, so they keep the masked_weight form; ``block2`` sits in
    the outer body itself and is rewritten."""
    torch._dynamo.reset()
    model = _prepared("nested")
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    for i, density in enumerate((1.0, 0.5, 0.1)):
        set_random_masks(model, density, seed=i)
        x = torch.randn(8, 64)
        out = compiled(x)
        out.square().mean().backward()
        got = grads(model)
        eager_masked(model, x).square().mean().backward()
        want = grads(model)
        for name in want:
            assert_close(got[name], want[name], f"grad of {name} at density {density}")
    lowering = {r.name: r.lowering for r in agpe_compile.explain(model, torch.randn(8, 64),
                                                                  options={"inductor": False}).layers}
    assert lowering["head"] == "sparse_linear"
    assert {lowering[n] for n in lowering if n.startswith("block.")} == {"masked_weight"}
    assert {lowering[n] for n in lowering if n.startswith("block2.")} == {"sparse_linear"}


class _ReadTwice(nn.Module):
    """A checkpointed body that reads one weight outside its linear site too."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)

    def body(self, x):
        return self.fc2(F.relu(self.fc(x))) + self.fc.weight.sum(dim=0)

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=False)


def test_a_body_that_reads_the_weight_another_way_masks_that_layer_and_rewrites_the_other():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _ReadTwice()
    agpe_compile.prepare(model, options={"block_size": 16})
    compiled = torch.compile(model, backend=aot_backend())
    for i, density in enumerate((1.0, 0.5, 0.1)):
        set_random_masks(model, density, seed=i)
        x = torch.randn(8, 64)
        out = compiled(x)
        out.square().mean().backward()
        got = grads(model)
        want_out = eager_masked(model, x)
        want_out.square().mean().backward()
        want = grads(model)
        assert_close(out, want_out, f"output at density {density}")
        for name in want:
            assert_close(got[name], want[name], f"grad of {name} at density {density}")
    lowering = {r.name: r.lowering for r in agpe_compile.explain(model, torch.randn(8, 64),
                                                                  options={"inductor": False}).layers}
    assert lowering == {"fc": "masked_weight", "fc2": "sparse_linear"}


class _TinyNet(nn.Module):
    """helpers.TinyMLP's layers, the first two under torch.utils.checkpoint or not."""

    def __init__(self, checkpointed):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.checkpointed = checkpointed

    def body(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x):
        h = checkpoint(self.body, x, use_reentrant=False) if self.checkpointed else self.body(x)
        return self.fc3(h)


@pytest.mark.parametrize("policy", ["agpe", "rigl"])
def test_a_checkpointed_run_prunes_regrows_and_recompiles_like_the_straight_one(policy):
    """Mask updates, regrowth from the dense gradient and bucket crossings (new layout
    capacities, one recompile each) reach the layers inside the checkpointed body as they
    reach the straight model's: the same losses, masks, FLOPs and compile count."""
    from agpe_compile.controller import AGPEConfig, Sparsifier

    from .controller.helpers import batches, train

    runs = []
    for checkpointed in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _TinyNet(checkpointed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        backend = aot_backend()
        config = AGPEConfig(target_sparsity=0.75, policy=policy, block_size=4, update_interval=5, end_step=60,
                            buckets=(1.0, 0.5, 0.25), exclude=("fc3",))
        sparsifier = Sparsifier(model, opt, config, recompile_counter=lambda: backend.graph_count)
        losses = train(torch.compile(model, backend=backend), opt, sparsifier, batches(80))
        masks = {name: s.block_mask.clone() for name, s in layer_states(model).items()}
        runs.append((losses, masks, sparsifier.flops, backend.graph_count, sparsifier.global_density))
    (losses, masks, flops, graphs, density), (want_losses, want_masks, want_flops, want_graphs, want_density) = runs
    assert losses == pytest.approx(want_losses, rel=1e-4, abs=1e-5)
    assert masks.keys() == want_masks.keys()
    assert all(torch.equal(masks[name], want_masks[name]) for name in masks)
    assert density == want_density and density < 0.5
    assert {n: f.rows for n, f in flops.layers.items()} == {n: f.rows for n, f in want_flops.layers.items()}
    assert flops.sparse == want_flops.sparse and flops.ratio < 0.8
    assert graphs == want_graphs
    assert graphs > 1 if policy == "agpe" else graphs == 1  # agpe crosses buckets; rigl starts at its density
