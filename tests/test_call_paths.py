"""Layers compiled as frames of their own, and prepared layers run eagerly.

Note [One call path per module class] and Note [Eager runs of a prepared layer] in
agpe_compile/state.py: with masks set by hand (inactive weights left in place), every call
must compute W*M or say that it did not.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.state import layer_states

from .models import eager_masked, grads, set_random_masks


def _hand_masks(model, seed=0):
    """Random masks with the inactive weights LEFT in place (set_random_masks zeroes them)."""
    gen = torch.Generator().manual_seed(seed)
    for state in layer_states(model).values():
        state.block_mask.copy_(torch.rand(state.grid, generator=gen) < 0.5)
        state.block_mask[0, 0] = True


# torch 2.11 runs these layers' forwards eagerly (it compiles no frame of nn.Linear.forward):
# the best agpe can do there is say so (Note [Eager runs of a prepared layer]).
EAGER_LAYER_FRAMES = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)


def _check_calls(model, compiled, x, caplog, calls=3):
    if EAGER_LAYER_FRAMES:  # each layer is served by a graph (and counted) or said to run eagerly
        with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
            for _ in range(calls):
                compiled(x).square().sum().backward()
        said = " ".join(r.getMessage() for r in caplog.records if "ran outside a compiled graph" in r.getMessage())
        for name, state in layer_states(model).items():
            served = int(state.counters[0]) == calls * x.shape[0]
            assert served != (f"layer {name!r} ran outside" in said), (name, state.counters, said)
        return
    for i in range(calls):
        out = compiled(x)
        out.square().sum().backward()
        got = grads(model)
        want_out = eager_masked(model, x)
        want_out.square().sum().backward()
        want = grads(model)
        torch.testing.assert_close(out, want_out, msg=lambda m: f"call {i}: {m}")
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m: f"call {i}, grad of {name}: {m}")
    for name, state in layer_states(model).items():
        assert int(state.counters[0]) == calls * x.shape[0], (name, state.counters)  # every call through the op
        assert float(state.saliency.sum()) > 0, name


def _sequential():
    torch.manual_seed(0)  # the 10-class head is not divisible by 16: not an agpe layer
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_module_compile_of_a_sequential_with_a_dense_head_stays_masked_after_the_first_call(caplog):
    torch._dynamo.reset()
    model = _sequential()
    agpe_compile.prepare(model, options={"block_size": 16})
    _hand_masks(model)
    model.compile(backend="agpe", options={"block_size": 16, "inductor": False})
    _check_calls(model, model, torch.randn(16, 32), caplog)  # ran W (0.17 off) from call 1 on, unscored


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class _LoopWithPrint(nn.Module):
    """A print in the block loop: Dynamo compiles pieces of forward and the layers' frames."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(_Block(64) for _ in range(2))
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
            print("", end="")
        return self.head(x)


def test_a_graph_break_in_the_block_loop_next_to_an_excluded_layer_stays_masked(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _LoopWithPrint()
    options = {"block_size": 16, "exclude": ["head"], "inductor": False}
    agpe_compile.prepare(model, options=options)
    _hand_masks(model)
    _check_calls(model, torch.compile(model, backend="agpe", options=options), torch.randn(16, 32), caplog)


def test_strip_removes_every_hook_prepare_added():
    model = _sequential()
    agpe_compile.prepare(model, options={"block_size": 16})
    assert len(model[4]._forward_pre_hooks) == 1  # the dense head: the no-op call-path hook
    agpe_compile.prepare(model, options={"block_size": 16})
    assert len(model[4]._forward_pre_hooks) == 1  # idempotent
    agpe_compile.strip(model)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_an_eager_run_of_a_hand_masked_layer_warns_once(caplog):
    model = _sequential()
    agpe_compile.prepare(model, options={"block_size": 16})
    _hand_masks(model)
    x = torch.randn(4, 32)
    with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
        eager_masked(model, x)  # functional_call with W*M: computes the masked model, not warned
        eager_masked(model, x)
        model(x)  # marks the layers; the next eager run finds that no graph served them since
        assert "ran outside a compiled graph" not in caplog.text
        model(x)
        model(x)
    said = [r.getMessage() for r in caplog.records if "ran outside a compiled graph" in r.getMessage()]
    assert len(said) == 2 and "'0'" in said[0] and "'2'" in said[1]  # once per layer, not per call
    assert "inactive blocks hold nonzero weights" in said[0]


def test_a_compiled_call_between_eager_ones_clears_the_mark(caplog):
    torch._dynamo.reset()
    model = _sequential()
    agpe_compile.prepare(model, options={"block_size": 16})
    _hand_masks(model)
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"block_size": 16, "inductor": False}))
    x = torch.randn(4, 32)
    with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
        for _ in range(3):
            compiled(x)
    assert "ran outside a compiled graph" not in caplog.text


@pytest.mark.parametrize("masked", ["att.in_proj_weight", "att.out_proj"])
def test_an_attention_projection_run_eagerly_warns_like_any_layer(masked, caplog):
    # Note [Projections called through their parent]: nn.MultiheadAttention reads
    # out_proj.weight without calling out_proj, whose own hook then never ran (audit CO).
    torch.manual_seed(0)
    model = nn.Sequential()
    model.att = nn.MultiheadAttention(32, 4, batch_first=True)
    agpe_compile.prepare(model, options={"block_size": 8})
    layer_states(model)[masked].block_mask.view(-1)[::2] = False
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(model.att, backend=agpe_compile.AgpeBackend({"block_size": 8, "inductor": False}))
    with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
        for _ in range(3):
            compiled(x, x, x, need_weights=False)
        assert "ran outside a compiled graph" not in caplog.text  # served by agpe's graph
        for _ in range(3):
            model.att(x, x, x, need_weights=False)
    said = [r.getMessage() for r in caplog.records if "ran outside a compiled graph" in r.getMessage()]
    assert len(said) == 1 and repr(masked) in said[0], said
    assert layer_states(model)[masked].ran_eagerly
    agpe_compile.strip(model)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_eager_runs_with_zero_inactive_weights_or_under_a_sparsifier_are_not_warned_about(caplog):
    model = _sequential()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)  # zeroes the inactive weights: the eager layer computes W*M
    with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
        model(torch.randn(4, 32))
        model(torch.randn(4, 32))
    assert "ran outside a compiled graph" not in caplog.text
    driven = _sequential()
    sparsifier = agpe_compile.Sparsifier(driven, torch.optim.SGD(driven.parameters(), lr=0.1),
                                         agpe_compile.AGPEConfig(block_size=16, exclude=("4",)))
    with caplog.at_level(logging.WARNING, logger="agpe_compile.state"):
        driven(torch.randn(4, 32))
        driven(torch.randn(4, 32))
    assert "ran outside a compiled graph" not in caplog.text
    assert sparsifier.layers


class _Functional(nn.Module):
    """Weights used without calling their modules: no hook, so no recompile at a crossing."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.a.weight, self.a.bias)), self.b.weight, self.b.bias)


def test_layers_that_cross_a_bucket_unseen_are_named_in_one_warning(caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Functional()
    agpe_compile.prepare(model, options={"block_size": 16})
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"block_size": 16, "inductor": False}))
    x = torch.randn(4, 32)
    compiled(x)
    set_random_masks(model, 0.25)
    agpe_compile.rebucket(model)
    with caplog.at_level(logging.WARNING, logger="agpe_compile.backend"):
        out = compiled(x)
        compiled(x)
    torch.testing.assert_close(out, eager_masked(model, x))  # at the compiled capacity: still exact
    said = [r.getMessage() for r in caplog.records if "changed layout bucket" in r.getMessage()]
    assert len(said) == 1 and "2 layer(s)" in said[0] and "a (1 blocks now" in said[0] and "; b (" in said[0]
    assert "a graph break inside a loop over the layers" in said[0]


def _inactive_max(model):
    worst = 0.0
    for state in layer_states(model).values():
        b = state.block_size
        dead = (~state.block_mask).repeat_interleave(b, 0).repeat_interleave(b, 1)
        if dead.any():
            worst = max(worst, float(state.weight.detach()[dead].abs().max()))
    return worst


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))


@pytest.mark.parametrize("nested", [False, True], ids=["also_compiled_with_aot_eager", "step_compiled_around"])
def test_prepared_layers_compiled_by_another_backend_keep_inactive_weights_at_zero_and_are_named(nested, caplog):
    # Note [Prepared layers under other backends]: a graph for another backend computes the
    # dense layer from the raw weight and never passes agpe's call wrapper. The layers were not
    # marked, so their inactive blocks drifted from zero (0.03 after a few AdamW steps; block 32
    # at density 0.1 leaves the CPU's dense path), and a step compiled with the default backend
    # around a model compiled with agpe in place trained dense without a word.
    from agpe_compile import other_backends
    from agpe_compile.controller import AGPEConfig, Sparsifier

    other_backends._said.clear()  # said once per backend and process
    torch._dynamo.reset()
    model = _mlp()
    x = torch.randn(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9, block_size=32, update_interval=2, end_step=4))
    if nested:
        model.compile(backend="agpe")
        step = torch.compile(lambda inputs: model(inputs).square().mean(), backend="aot_eager")
        calls = [step] * 8
    else:
        agpe, other = torch.compile(model, backend="agpe"), torch.compile(model, backend="aot_eager")
        calls = [other if i in (5, 6) else agpe for i in range(8)]
    worst = []
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for f in calls:
            loss = f(x).square().mean() if not nested else f(x)
            loss.backward()
            opt.step()
            worst.append(_inactive_max(model))
            opt.zero_grad()
            sp.step(loss.detach())
    assert max(worst) == 0.0
    said = [r.getMessage() for r in caplog.records if "not agpe's" in r.getMessage()]
    assert len(said) == 1 and "'aot_eager' backend" in said[0] and "backend='agpe'" in said[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager_masked(model, x))  # what eager calls and export compute


def test_graphs_of_agpe_do_not_mark_their_layers(caplog):
    # The check reads the compiling backend at trace time: agpe's own graphs (the string
    # backend and an AgpeBackend instance) never take the other-backend path.
    for backend in ("agpe", agpe_compile.AgpeBackend({"inductor": False})):
        torch._dynamo.reset()
        model = _mlp()
        agpe_compile.prepare(model, {"block_size": 32})
        with caplog.at_level(logging.WARNING, logger="agpe_compile"):
            torch.compile(model, backend=backend)(torch.randn(4, 64)).sum().backward()
        assert not any(state.ran_eagerly for state in layer_states(model).values())
        assert "not agpe's" not in caplog.text


def test_a_strict_export_of_a_prepared_model_is_not_taken_for_another_backend(caplog, recwarn):
    # torch.export (strict) traces with Dynamo and its own compiler function: it computes with
    # the raw weights (zero in inactive blocks under a Sparsifier; design.md), so neither the
    # other-backend warning nor a traced side effect (which Dynamo warns about) belongs there.
    from agpe_compile import other_backends

    other_backends._said.clear()
    model = _mlp()
    agpe_compile.prepare(model, {"block_size": 32})
    x = torch.randn(4, 64)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        exported = torch.export.export(model, (x,), strict=True)
    torch.testing.assert_close(exported.module()(x), model(x))
    assert "not agpe's" not in caplog.text
    assert not [w for w in recwarn if "side effects" in str(w.message)]


def test_a_checkpointed_region_compiled_by_another_backend_keeps_fullgraph_and_zero_inactive_weights(caplog):
    # Inside a higher-order op's body (torch.utils.checkpoint) Dynamo refuses a traced attribute
    # write: the mark made the region a graph break, and fullgraph=True an error. The layer is
    # marked at trace time there instead, and re-zeroed after every step.
    from agpe_compile import other_backends
    from agpe_compile.controller import AGPEConfig, Sparsifier

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 128)
            self.b = nn.Linear(128, 64)

        def forward(self, x):
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False)
            return self.b(h)

    other_backends._said.clear()
    other_backends.TRACED_ELSEWHERE.clear()
    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9, block_size=32, update_interval=2, end_step=4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(16, 64)
    worst = []
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for _ in range(8):
            loss = compiled(x).square().mean()
            loss.backward()
            opt.step()
            worst.append(_inactive_max(model))
            opt.zero_grad()
            sp.step(loss.detach())
    assert max(worst) == 0.0
    assert layer_states(model)["a"].traced_elsewhere and not layer_states(model)["b"].traced_elsewhere
    assert "activation-checkpointed region" in caplog.text
