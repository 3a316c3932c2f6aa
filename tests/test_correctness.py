"""Compiled agpe model vs eager with the same masks: outputs, parameter and input grads.

Each model compiles once; the densities are set in place between checks (which also
shows that mask edits take effect without recompiling).
"""

import pytest
import torch
from torch import nn

import agpe_compile
from agpe_compile.state import layer_states

from .models import GPTBlock, MLP, aot_backend, eager_masked, grads, set_random_masks
from .tolerances import assert_close

DENSITIES = (1.0, 0.5, 0.1)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )
    return transformers.LlamaModel(cfg)


def _check(model, make_inputs, backend, densities=DENSITIES, grad_input=True):
    compiled = torch.compile(model, backend=backend)
    for i, density in enumerate(densities):
        set_random_masks(model, density, seed=i)
        inputs = make_inputs()
        x = inputs[0]
        if grad_input:
            x.requires_grad_(True)
        out = compiled(*inputs)
        out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        out.square().mean().backward()
        got_grads, got_x = grads(model), (x.grad.clone() if grad_input else None)
        if grad_input:
            x.grad = None
        ref = eager_masked(model, *inputs)
        ref = ref if isinstance(ref, torch.Tensor) else ref.last_hidden_state
        ref.square().mean().backward()
        want_grads = grads(model)
        assert_close(out, ref, f"output at density {density}")
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            assert_close(got_grads[name], want_grads[name], f"grad of {name} at density {density}")
        if grad_input:
            assert_close(got_x, x.grad, f"input grad at density {density}")
    assert backend.graph_count == 1, "changing masks in place must not recompile"


def test_mlp():
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    _check(model, lambda: (torch.randn(8, 64),), aot_backend())


def test_linear_directly_into_linear():
    # A rewritten site's output is the next site's input (nn.Sequential of Linears, a
    # low-rank pair): the rewrite must wire the new node, not the erased one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64), nn.Linear(64, 64, bias=False))
    agpe_compile.prepare(model, options={"block_size": 16})
    assert len(layer_states(model)) == 3
    _check(model, lambda: (torch.randn(8, 64),), aot_backend())


def test_transformer_encoder_layer():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    agpe_compile.prepare(model, options={"block_size": 16})
    assert set(layer_states(model)) == {"self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"}
    _check(model, lambda: (torch.randn(2, 8, 64),), aot_backend())


def test_gpt_block():
    torch.manual_seed(0)
    model = GPTBlock(64, 4)
    agpe_compile.prepare(model, options={"block_size": 16})
    _check(model, lambda: (torch.randn(2, 8, 64),), aot_backend())


def test_huggingface_llama_from_config():
    torch.manual_seed(0)
    model = _llama()
    agpe_compile.prepare(model, options={"block_size": 16})
    assert len(layer_states(model)) == 7
    _check(model, lambda: (torch.randint(0, 64, (2, 8)),), aot_backend(), grad_input=False)


def test_explain_of_a_training_model_shows_the_lowering_training_uses():
    # Hugging Face checkpoints its layers only with gradients on (training); explain ran under
    # no_grad and reported graphs without the checkpointed regions that training runs
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _llama()
    model.activation_checkpointing_enable()  # gradient_checkpointing_enable() before transformers 5.x
    model.train()
    agpe_compile.prepare(model, options={"block_size": 16})
    ids = torch.randint(0, 64, (2, 8))
    report = agpe_compile.explain(model, ids, options={"inductor": False})
    explained = {r.name: r.lowering for r in report.layers if r.rewritten}
    assert all(float(s.saliency.abs().sum()) == 0 for s in layer_states(model).values())  # no backward ran
    records = []
    backend = agpe_compile.AgpeBackend({"inductor": False}, on_graph=records.append)
    torch.compile(model, backend=backend)(ids).last_hidden_state.sum().backward()
    trained = {d.name: d.lowering for g in records for d in g.decisions if d.rewritten}
    assert explained == trained
    assert set(explained.values()) == {"sparse_linear"}  # inside the checkpointed bodies too
    assert "tag_activation_checkpoint" in report.golden()
    model.eval()  # eval: no checkpointing, and explain runs under no_grad
    report = agpe_compile.explain(model, ids, options={"inductor": False})
    assert {r.lowering for r in report.layers if r.rewritten} == {"sparse_linear"}
    assert "tag_activation_checkpoint" not in report.golden()


def test_masked_out_weight_gradients_are_exactly_zero():
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(8, 64)).sum().backward()
    for state in layer_states(model).values():
        grad_blocks = state.weight.grad.abs().reshape(state.grid[0], 16, state.grid[1], 16).sum((1, 3))
        assert torch.all(grad_blocks[~state.block_mask] == 0)
        assert torch.all(grad_blocks[state.block_mask] > 0)


def test_inactive_weights_are_never_read():
    """Garbage in inactive blocks must not reach the output: the op reads active blocks only."""
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    x = torch.randn(8, 64)
    compiled = torch.compile(model, backend=aot_backend())
    clean = compiled(x).detach()
    with torch.no_grad():
        for state in layer_states(model).values():
            inactive = ~agpe_compile.ops.reference.expand_block_mask(state.block_mask, 16, torch.bool)
            state.weight[inactive] = 1e3
    assert_close(compiled(x).detach(), clean, "output with garbage in inactive blocks")


def test_batch_size_change_does_not_recompile_every_call():
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    for batch in (8, 5, 12, 3, 17, 9):
        x = torch.randn(batch, 64)
        assert_close(compiled(x), eager_masked(model, x), f"batch {batch}")
    assert backend.graph_count <= 2  # static first shape, then one dynamic-batch graph


def test_eval_no_grad_inference():
    torch.manual_seed(0)
    model = GPTBlock(64, 4)
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    model.eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        out = torch.compile(model, backend=aot_backend())(x)
        assert_close(out, eager_masked(model, x), "eval output")
    assert not out.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("make_model", [MLP, lambda: GPTBlock(64, 4)], ids=["mlp", "gpt_block"])
def test_through_inductor(make_model):
    """End to end with the default lowering (compile_fx): numerics and saliency updates."""
    torch.manual_seed(0)
    model = make_model()
    agpe_compile.prepare(model, options={"block_size": 16})
    shape = (8, 64) if make_model is MLP else (2, 8, 64)
    backend = agpe_compile.AgpeBackend({"inductor": True})
    _check(model, lambda: (torch.randn(*shape),), backend, densities=(0.5, 0.1))
    assert all(float(s.saliency.sum()) > 0 for s in layer_states(model).values())


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_non_contiguous_input_like_batch_first_attention_output(lowering):
    # The op's fake backward must give the strides the real one returns (contiguous), or
    # the compiled backward mis-views the input gradient of a transposed input.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.fc = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.pre(x).view(5, 2, 32).transpose(0, 1))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model()
    agpe_compile.prepare(model, options={"block_size": 8, "exclude": ["pre"]})
    backend = aot_backend() if lowering == "aot_eager" else agpe_compile.AgpeBackend({"block_size": 8})
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph would hide the fake
        _check(model, lambda: (torch.randn(10, 32),), backend)


def test_two_instances_of_one_class_use_their_own_masks():
    # Dynamo reuses one cached graph for both instances (parameters are graph inputs); each
    # call must still read the masks and buffers of the instance it is called on
    # (Note [Graphs shared by instances] in backend.py).
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    for model, seed in ((a, 1), (b, 2)):
        agpe_compile.prepare(model, options={"block_size": 16})
        set_random_masks(model, 0.5, seed=seed)
    backend = aot_backend()
    x = torch.randn(8, 64)
    outs = {name: torch.compile(model, backend=backend)(x) for name, model in (("a", a), ("b", b))}
    assert backend.graph_count == 1  # the graph is shared
    for name, model in (("a", a), ("b", b)):
        assert_close(outs[name], eager_masked(model, x), f"output of {name}")
        outs[name].sum().backward()
        for state in layer_states(model).values():
            assert int(state.counters[0]) == 8  # each instance's own buffers saw its rows
            blocks = state.weight.grad.abs().reshape(state.grid[0], 16, state.grid[1], 16).sum((1, 3))
            assert torch.all(blocks[~state.block_mask] == 0)


def test_a_shared_graph_compiled_under_the_zero_weight_promise_serves_an_instance_without_it():
    # The first instance keeps its inactive weights at zero (a Sparsifier): its graph skips
    # masking. An instance without that promise (nonzero weights in its inactive blocks) was
    # refused; the call wrapper now hands the graph its W * M (Note [A promise outlives its
    # Sparsifier]), and its own weights stay as they are.
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    sparsifier = agpe_compile.Sparsifier(a, torch.optim.SGD(a.parameters(), lr=0.1), agpe_compile.AGPEConfig(
        block_size=16, target_sparsity=0.0, policy="static"))
    agpe_compile.prepare(b, options={"block_size": 16})
    set_random_masks(b, 0.5, seed=3)
    weights = {name: p.detach().clone() for name, p in b.named_parameters()}
    backend = aot_backend()
    torch.compile(a, backend=backend)(torch.randn(8, 64))
    x = torch.randn(8, 64)
    out = torch.compile(b, backend=backend)(x)
    assert backend.graph_count == 1  # the graph is shared
    assert_close(out, eager_masked(b, x), "output of the instance without the promise")
    out.sum().backward()
    for name, p in b.named_parameters():
        assert torch.equal(p.detach(), weights[name])  # nothing written into its weights
    for state in layer_states(b).values():
        blocks = state.weight.grad.abs().reshape(state.grid[0], 16, state.grid[1], 16).sum((1, 3))
        assert torch.all(blocks[~state.block_mask] == 0)
    assert all(state.zero_inactive for state in sparsifier.layers.values())


def test_an_instance_the_shared_graph_cannot_serve_is_refused():
    # Another saliency mode: the graph would score the instance's blocks another way.
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    sparsifiers = [agpe_compile.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), agpe_compile.AGPEConfig(
        block_size=16, target_sparsity=0.0, policy="static", saliency=saliency))
        for model, saliency in ((a, "taylor"), (b, "magnitude"))]  # kept alive: they drive the layers
    backend = aot_backend()
    torch.compile(a, backend=backend)(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="reused for another instance of the same class.*saliency mode"):
        torch.compile(b, backend=backend)(torch.randn(8, 64))
    assert len(sparsifiers) == 2


def test_a_graph_that_left_a_layer_dense_refuses_an_instance_where_it_is_prepared():
    # Audit AZ F1: the first instance, unprepared, compiled its 16-wide layers dense (the
    # default block size 32 does not divide them); a second instance prepared at block 8
    # reused that graph and ran its hand-set masks dense, unmasked and unscored.
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = MLP((16, 16, 16)), MLP((16, 16, 16))
    backend = aot_backend()
    x = torch.randn(3, 16)
    torch.compile(a, backend=backend)(x)
    agpe_compile.prepare(b, options={"block_size": 8})
    with pytest.raises(RuntimeError, match=r"reusing a graph compiled for another instance .* left layer "
                                           r"'.*' dense \(shape 16x16 not divisible by block size 32\)"):
        torch.compile(b, backend=backend)(x)
    torch.compile(a, backend=backend)(x)  # the instance it was compiled for still runs
    torch._dynamo.reset()  # the fix the message names
    assert_close(torch.compile(b, backend=backend)(x), eager_masked(b, x), "after reset")


def test_unprepared_instances_share_a_graph_that_left_a_weight_dense_alike():
    # Re-audit BA F1: a weight left dense by one graph (a computed form) and rewritten by
    # the next (which gives it a state) is in the same situation in every unprepared
    # instance: none is refused.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = torch.nn.functional.linear(x, self.fc.weight * 0.5)
            torch._dynamo.graph_break()
            return self.fc(y)

    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = agpe_compile.AgpeBackend({"inductor": False, "block_size": 8})
    a, b = Net(), Net()
    x = torch.randn(2, 16)
    for _ in range(2):
        for model in (a, b):
            torch.compile(model, backend=backend)(x)


class _Checkpointed(nn.Module):
    """A block under torch.utils.checkpoint (Note [Weights inside higher-order ops]): its layers run the op."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.block = MLP((64, 128, 64))
        self.head = nn.Linear(64, 32)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)
        return self.head(h)


def _masked_copy_reference(model, x):
    """Output and masked weight gradients of a copy whose weights are W*M in place (the
    reentrant checkpoint recomputes with the module's own parameters, so functional_call
    cannot stand in for W*M there)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for state in layer_states(ref).values():
            state.weight.mul_(agpe_compile.ops.reference.expand_block_mask(state.block_mask, 16, state.weight.dtype))
    out = ref(x)
    out.square().mean().backward()
    want = grads(ref)
    for name, state in layer_states(ref).items():  # d(W*M)/dW = G*M
        key = f"{name}.weight"
        want[key] = want[key] * agpe_compile.ops.reference.expand_block_mask(state.block_mask, 16, torch.float32)
    return out.detach(), want


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_layers_inside_activation_checkpointing_are_masked_and_scored(use_reentrant):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant)
    agpe_compile.prepare(model, options={"block_size": 16})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    for i, density in enumerate(DENSITIES):
        set_random_masks(model, density, seed=i)
        x = torch.randn(8, 64, requires_grad=True)  # the reentrant variant only backpropagates then
        out = compiled(x)
        out.square().mean().backward()
        got = grads(model)
        want_out, want = _masked_copy_reference(model, x)
        assert_close(out, want_out, f"output at density {density}")
        for name in want:
            assert_close(got[name], want[name], f"grad of {name} at density {density}")
    assert backend.graph_count == 1
    states = layer_states(model)
    assert all(state.saliency.sum() > 0 for state in states.values())  # the recomputed backward scored them
    report = agpe_compile.explain(model, torch.randn(8, 64), options={"inductor": False})
    lowering = {r.name: r.lowering for r in report.layers}
    assert lowering["head"] == "sparse_linear"
    assert {lowering[n] for n in states if n.startswith("block.")} == {"sparse_linear"}
