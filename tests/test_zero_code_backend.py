"""Zero-code mode through the backend: AGPE options in torch.compile, no other change."""

import copy
import gc
import importlib
import weakref

import pytest
import torch

import agpe_compile
from agpe_compile.controller import make_zero_code_controller
from agpe_compile.state import layer_states

from .models import MLP


def test_zero_code_mode_prunes_during_plain_training_loop():
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    options = {"inductor": False, "block_size": 8, "target_sparsity": 0.75, "policy": "rigl",
               "update_interval": 5, "end_step": 40}
    backend = agpe_compile.AgpeBackend(options)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    states = layer_states(model)
    assert len(backend.controllers) == 1
    total = sum(s.block_mask.numel() for s in states.values())
    active = sum(int(s.block_mask.sum()) for s in states.values())
    assert active / total == pytest.approx(0.25, abs=0.05)
    with torch.no_grad():  # eval calls do not tick the controller
        calls = backend.controllers[0].calls
        compiled(x)
        assert backend.controllers[0].calls == calls
    # masked-out blocks never reach the output, even if stale momentum moved their weights
    reference = torch.func.functional_call(model, {
        name: p * agpe_compile.ops.reference.expand_block_mask(states[name.rsplit(".", 1)[0]].block_mask, 8, p.dtype)
        if name.endswith("weight") else p for name, p in model.named_parameters()}, (x,))
    torch.testing.assert_close(compiled(x), reference)


def test_zero_code_on_a_model_with_nothing_to_prune_says_it_trains_dense(caplog):
    # Hugging Face GPT-2's Conv1D computes x @ W (+ b) with W stored [in, out]: not a linear
    # agpe rewrites. Zero-code mode used to train such a model dense without a word.
    class Conv1DLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(32, 64))
            self.bias = torch.nn.Parameter(torch.zeros(64))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    import logging

    torch._dynamo.reset()
    model = Conv1DLike()
    compiled = torch.compile(model, backend="agpe", options={"target_sparsity": 0.5, "block_size": 16,
                                                             "inductor": False})
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        compiled(torch.randn(4, 32)).sum().backward()
    messages = [r.getMessage() for r in caplog.records if "zero-code mode: no layer of this graph" in r.getMessage()]
    assert len(messages) == 1 and "trains dense" in messages[0] and "addmm" in messages[0]
    assert "agpe_compile.linear_from_conv1d(model)" in messages[0]
    assert layer_states(model) == {}


def test_zero_code_on_a_model_without_any_linear_layer_says_it_at_the_first_optimizer_step(caplog, monkeypatch):
    """Note [Nothing to prune in zero-code mode]: a conv net's graphs hold no linear weight,
    so no graph can say it; the first optimizer step does, once."""
    import logging

    from agpe_compile.controller import zero_code

    monkeypatch.setattr(zero_code, "_CONTROLLERS_MADE", 0)
    monkeypatch.setattr(zero_code, "_WATCH", [])
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="agpe", options={"target_sparsity": 0.5, "inductor": False})
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for _ in range(3):
            compiled(torch.randn(2, 3, 8, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    said = [r.getMessage() for r in caplog.records if "no compiled graph had a linear layer" in r.getMessage()]
    assert len(said) == 1 and "trains dense" in said[0]
    caplog.clear()  # a model with layers to prune: its controller exists by the first step, nothing said
    monkeypatch.setattr(zero_code, "_WATCH", [])
    torch._dynamo.reset()
    mlp = MLP()
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    compiled = torch.compile(mlp, backend="agpe", options={"target_sparsity": 0.5, "block_size": 16,
                                                           "inductor": False})
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        compiled(torch.randn(4, 64)).sum().backward()
        opt.step()
    assert "no compiled graph had a linear layer" not in caplog.text


def test_zero_code_bad_option_names_the_field():
    with pytest.raises(ValueError, match="target_sparsity"):
        agpe_compile.AgpeBackend({"target_sparsity": 1.5})
    with pytest.raises(ValueError, match="snfs"):
        agpe_compile.AgpeBackend({"target_sparsity": 0.5, "policy": "snfs"})


ZC_OPTIONS = {"block_size": 8, "target_sparsity": 0.75, "policy": "rigl", "update_interval": 5, "end_step": 40}


def _train(compiled, model, optimizer, steps, micro_batches=1, after_step=None):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(micro_batches):
            x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 16, generator=gen)
            (torch.nn.functional.mse_loss(compiled(x), y) / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()


def _zero_code_run(steps, micro_batches=1, prepare=True, options=ZC_OPTIONS):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    if prepare:
        agpe_compile.prepare(model, {"block_size": 8})
    backend = agpe_compile.AgpeBackend({"inductor": False, **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(torch.compile(model, backend=backend), model, optimizer, steps, micro_batches)
    return model, optimizer, backend


def _explicit_run(steps, micro_batches=1, options=ZC_OPTIONS):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {k: v for k, v in options.items()}
    sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(**config))
    backend = agpe_compile.AgpeBackend({"inductor": False, "block_size": 8})
    _train(torch.compile(model, backend=backend), model, optimizer, steps, micro_batches,
           after_step=lambda: sparsifier.step(None))
    return model, optimizer, backend, sparsifier


def test_zero_code_follows_the_optimizer_and_matches_explicit_mode_bit_for_bit():
    # Prepared before torch.compile: the controller binds the SGD optimizer at its first
    # step, re-buckets between steps (kernels sized to the sparse layout) and resets the
    # momentum of changed blocks, exactly like an explicit Sparsifier stepped with loss=None.
    model, optimizer, backend = _zero_code_run(23)
    (controller,) = backend.controllers
    assert controller.follows_optimizer and controller.optimizer is optimizer
    assert controller.sparsifier.step_count == 23
    ref_model, ref_optimizer, ref_backend, _ = _explicit_run(23)
    states, ref_states = layer_states(model), layer_states(ref_model)
    for name, state in states.items():
        assert torch.equal(state.block_mask, ref_states[name].block_mask), name
        assert state.layout_bucket == ref_states[name].layout_bucket < 1.0, name
        assert torch.equal(state.block_layout, ref_states[name].block_layout), name
    for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, ref_p), name
        assert torch.equal(optimizer.state[p]["momentum_buffer"], ref_optimizer.state[ref_p]["momentum_buffer"]), name
    # The first graph is traced before the initial sparse layout exists (full capacity);
    # moving it to its bucket after step 1 costs the one extra compile.
    assert backend.graph_count == ref_backend.graph_count + 1


def test_zero_code_through_the_backend_string_keeps_one_controller_across_recompiles():
    # torch.compile(backend="agpe", options=...) builds a new backend object per compiled
    # graph; the recompiles at bucket crossings must reuse the controller already driving
    # the layers (found through their states), not start another one on the same masks.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    compiled = torch.compile(model, backend="agpe", options={"inductor": False, **ZC_OPTIONS})
    _train(compiled, model, optimizer, 23)
    states = layer_states(model)
    controllers = {id(state.controller_ref()) for state in states.values()}
    assert len(controllers) == 1
    (controller,) = {state.controller_ref() for state in states.values()}
    assert controller.sparsifier.step_count == 23
    ref_model, _, _, _ = _explicit_run(23)
    ref_states = layer_states(ref_model)
    assert any(state.layout_bucket < 1.0 for state in states.values())  # it did recompile at crossings
    for name, state in states.items():
        assert torch.equal(state.block_mask, ref_states[name].block_mask), name
    for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, ref_p), name


def test_zero_code_refuses_a_second_set_of_options_on_the_same_layers():
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    first = torch.compile(model, backend="agpe", options={"inductor": False, **ZC_OPTIONS})
    first(torch.randn(4, 32))
    # a second compile of the same model while the first one (and its controller) lives
    other = torch.compile(model, backend="agpe", options={"inductor": False, **dict(ZC_OPTIONS, target_sparsity=0.5)})
    with pytest.raises(Exception, match="already driven by a zero-code controller with other options"):
        other(torch.randn(4, 32))


def test_zero_code_counts_optimizer_steps_under_gradient_accumulation():
    model, optimizer, backend = _zero_code_run(12, micro_batches=3)
    (controller,) = backend.controllers
    assert controller.calls == 36 and controller.sparsifier.step_count == 12
    # the momentum of every inactive block is exactly zero (reset when it was dropped)
    for state in layer_states(model).values():
        momentum = optimizer.state[state.weight]["momentum_buffer"]
        inactive = ~agpe_compile.ops.reference.expand_block_mask(state.block_mask, 8, torch.float32).bool()
        assert momentum[inactive].abs().max() == 0


@pytest.mark.parametrize("micro_batches,interval", [(3, 5), (5, 5), (1, 1)])
def test_zero_code_under_gradient_accumulation_matches_explicit_mode_bit_for_bit(micro_batches, interval):
    # As many micro-batches as update_interval: the ticks before the first optimizer step
    # reached the step before an update and turned dense-gradient scoring on for the last
    # micro-batch; those scores of the initial weights reached rigl's first regrowth (2 blocks
    # of 2 layers differed from the explicit Sparsifier's)
    # (update_interval 1: the explicit Sparsifier scores step 1's dense gradients for the first
    # regrowth, and so must zero-code mode; a first fix dropped them)
    options = dict(ZC_OPTIONS, update_interval=interval, end_step=8 * interval)
    if interval > 1:
        model, _, _ = _zero_code_run(1, micro_batches=micro_batches, options=options)
        for name, state in layer_states(model).items():  # the explicit Sparsifier scores none of step 1
            assert not state.dense_grad_sq.any() and not state.score_dense, name
    for steps in (2, 12):
        model, optimizer, _ = _zero_code_run(steps, micro_batches=micro_batches, options=options)
        ref_model, ref_optimizer, _, _ = _explicit_run(steps, micro_batches=micro_batches, options=options)
        ref_states = layer_states(ref_model)
        for name, state in layer_states(model).items():
            assert torch.equal(state.block_mask, ref_states[name].block_mask), (steps, name)
        for (name, p), ref_p in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(p, ref_p), (steps, name)


def test_zero_code_ignores_an_optimizer_without_its_weights():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    backend = agpe_compile.AgpeBackend({"inductor": False, **ZC_OPTIONS})
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(4, 32)).sum().backward()
    other = torch.nn.Parameter(torch.zeros(3))
    other.grad = torch.ones(3)
    torch.optim.SGD([other], lr=0.1).step()
    assert not backend.controllers[0].follows_optimizer


def test_tick_fallback_keeps_prepared_layouts_and_raises_when_a_mask_outgrows_them():
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    states = list(agpe_compile.prepare(model, {"block_size": 8}).values())
    # Built during a compile (between_steps=False): the initial 25% layout fits the full
    # capacity of the prepared layout, so it is kept (no re-bucketing inside a call).
    tick = make_zero_code_controller(states, ZC_OPTIONS, follow_optimizer=False)
    assert [s.layout_bucket for s in states] == [1.0, 1.0]
    state = states[0]
    with torch.no_grad():
        state.block_mask.zero_()
        state.block_mask[0, 0] = True
    assert agpe_compile.rebucket(states) == [s.name for s in states]  # between steps: every layer moves
    small = state.layout_bucket
    with torch.no_grad():
        state.block_mask[0, 1] = True  # still fits that capacity: kept, no re-bucketing in a call
    assert agpe_compile.rebucket(states, between_steps=False) == [] and state.layout_bucket == small
    with torch.no_grad():
        state.block_mask.fill_(True)
    with pytest.raises(RuntimeError, match="inside a compiled call, where the layout cannot change"):
        agpe_compile.rebucket(states, between_steps=False)
    assert state.layout_bucket == small


def _manual_ticks(model, optimizer, controller, batches):
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 8}))
    for x, y in batches:
        controller()
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_zero_code_state_dict_resumes_following_the_optimizer_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 32, generator=gen), torch.randn(16, 16, generator=gen)) for _ in range(23)]

    def fresh():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP((32, 64, 16))
        states = list(agpe_compile.prepare(model, {"block_size": 8}).values())
        return model, states, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, states, optimizer = fresh()
    straight = make_zero_code_controller(states, ZC_OPTIONS)
    _manual_ticks(model, optimizer, straight, data)
    want = ({n: s.block_mask.clone() for n, s in layer_states(model).items()},
            [p.detach().clone() for p in model.parameters()], straight.sparsifier.step_count)
    del straight
    gc.collect()  # its optimizer hook goes with it

    model, states, optimizer = fresh()
    first = make_zero_code_controller(states, ZC_OPTIONS)
    _manual_ticks(model, optimizer, first, data[:12])
    saved = copy.deepcopy({"controller": first.state_dict(), "model": model.state_dict(),
                           "optimizer": optimizer.state_dict()})
    assert saved["controller"]["follows_optimizer"]
    del first
    gc.collect()
    resumed = make_zero_code_controller(states, ZC_OPTIONS)  # as in a new process: then load, in this order
    resumed.load_state_dict(saved["controller"])
    # saved again before its first optimizer step, it still follows one (a re-audit found it
    # saved follows_optimizer=False there, and a resume from that counted calls instead)
    assert resumed.follows_optimizer and resumed.state_dict()["follows_optimizer"]
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _manual_ticks(model, optimizer, resumed, data[12:])
    assert resumed.follows_optimizer and resumed.sparsifier.step_count == want[2] == 23
    for name, state in layer_states(model).items():
        assert torch.equal(state.block_mask, want[0][name]), name
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want[1]))


class _SymbolCountingBackend(agpe_compile.AgpeBackend):
    """Records how many symbolic sizes the shape env holds after each graph is lowered."""

    symbols: list

    def _lower(self, result, example_inputs, full_layouts=None):
        from torch._guards import TracingContext

        compiled = super()._lower(result, example_inputs, full_layouts)
        shape_env = TracingContext.try_get().fake_mode.shape_env
        values = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
        self.symbols.append(len(values))
        return compiled


def _unprepared_zero_code_run(steps=4):
    torch.manual_seed(0)
    model = MLP((64, 128, 32))
    backend = _SymbolCountingBackend({"block_size": 16, "target_sparsity": 0.5, "policy": "rigl",
                                      "update_interval": 2})
    backend.symbols = []
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    masks = {name: s.block_mask.clone() for name, s in layer_states(model).items()}
    return torch.stack(losses), masks, backend.symbols


def test_zero_code_unprepared_with_the_traced_op_body(monkeypatch):
    """Regression (found on an H200): on CUDA the op's body is traced, and the layer tensors
    that zero-code mode creates during compilation were fakeified with sourceless symbolic
    sizes, so guards on them failed in Dynamo's guard creation (IndexError in
    produce_guards). Tracing the body on the CPU reproduces the symbols; the backend now
    fakeifies those tensors statically (Note [Static extra inputs] in backend.py), so no
    symbol is created at all, and the traced run matches the host-op run."""
    op_module = importlib.import_module("agpe_compile.ops.sparse_linear")  # the package exports the op

    host_losses, host_masks, host_symbols = _unprepared_zero_code_run()
    torch._dynamo.reset()
    monkeypatch.setattr(op_module, "TRACED_DEVICES", ("cuda", "cpu"))
    # the traced body must not read tensor contents: take the shape-only dense reference path
    monkeypatch.setattr(agpe_compile.kernels, "choose_cpu_path", lambda *args: "dense")
    traced_losses, traced_masks, traced_symbols = _unprepared_zero_code_run()
    assert host_symbols == [0] and traced_symbols == [0]
    torch.testing.assert_close(traced_losses, host_losses)
    assert traced_masks.keys() == host_masks.keys()
    for name in host_masks:
        assert torch.equal(traced_masks[name], host_masks[name]), name


@pytest.mark.parametrize("hand_written", [True, False], ids=["tick_fallback", "follows_sgd"])
def test_zero_code_with_two_compiled_calls_before_one_backward(hand_written):
    # D(real) + D(fake) in zero-code mode (found by an audit): a tick between the two calls'
    # forward and backward edited weights and flags their graphs had saved. Calls made while
    # an earlier graph waits for its backward now belong to the same training step.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
    options = {"target_sparsity": 0.75, "block_size": 8, "update_interval": 2, "end_step": 50, "policy": "rigl"}
    backend = agpe_compile.AgpeBackend(options)
    cmodel = torch.compile(model, backend=backend)
    opt = None if hand_written else torch.optim.SGD(model.parameters(), lr=0.01)
    a, b = torch.randn(4, 32), torch.randn(4, 32)
    for _ in range(9):
        (cmodel(a).sum() + cmodel(b).pow(2).sum()).backward()
        with torch.no_grad():
            if hand_written:
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
            else:
                opt.step()
                opt.zero_grad()
    (controller,) = backend.controllers
    # the fallback processes step k - 1 at step k's first call: 8 of the 9 steps
    assert controller.sparsifier.step_count == (8 if hand_written else 9)
    assert controller.calls == 18
    assert controller.sparsifier.global_density < 1.0


def test_explain_with_zero_code_options_drives_nothing_and_warns_nothing(caplog):
    import logging

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()  # training mode: explain runs with grad enabled, as a training step would
    with caplog.at_level(logging.WARNING, logger="agpe_compile.backend"):
        report = agpe_compile.explain(model, torch.randn(4, 64),
                                      options={"block_size": 16, "target_sparsity": 0.5, "inductor": False})
    assert report.layers and all(r.rewritten for r in report.layers)
    assert "no layer of this graph can be pruned" not in caplog.text
    states = layer_states(model)
    assert all(s.controller_ref is None for s in states.values())  # no controller made or ticked
    assert all(float(s.saliency.abs().sum()) == 0 and int(s.counters[0]) == 0 for s in states.values())


ZERO_CODE_GMP = {"inductor": False, "block_size": 8, "target_sparsity": 0.75, "policy": "gmp",
                 "update_interval": 5, "end_step": 40}


class _CyclicAdamW(torch.optim.AdamW):
    """Holds a bound method of itself: freed only by the cycle collector."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clear = self.zero_grad


def _switching_run(switch: str):
    """60 zero-code steps; at step 20 the optimizer is kept ("keep"), replaced and freed
    ("replace") or replaced while the old one stays referenced ("replace_alive")."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    backend = agpe_compile.AgpeBackend(ZERO_CODE_GMP)
    compiled = torch.compile(model, backend=backend)
    optimizer = (_CyclicAdamW if switch == "replace_cyclic" else torch.optim.AdamW)(model.parameters(), lr=1e-3)
    kept, old = [], None
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    for step in range(60):
        if step == 20 and switch != "keep":
            old = weakref.ref(optimizer)
            if switch == "replace_alive":
                kept.append(optimizer)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if switch != "replace_cyclic":
                gc.collect()
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    states = layer_states(model).values()
    density = sum(int(s.block_mask.sum()) for s in states) / sum(s.block_mask.numel() for s in states)
    controller = backend.controllers[0]
    return controller, density, old, optimizer


def test_zero_code_does_not_keep_a_dropped_optimizer_alive():
    # Note [Zero-code holds the optimizer weakly]: compiled graphs (kept by Dynamo until a
    # reset) hold their controller; it held the optimizer, its weights and its moments
    controller, _, _, optimizer = _switching_run("keep")
    assert controller.optimizer is optimizer and controller.sparsifier.optimizer is optimizer
    ref = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert ref() is None
    assert controller.optimizer is None and controller.follows_optimizer  # the next one takes over
    torch._dynamo.reset()


@pytest.mark.parametrize("switch", ["replace", "replace_cyclic"])
def test_zero_code_follows_an_optimizer_that_replaces_a_freed_one(switch):
    # a new learning-rate phase with a fresh optimizer: pruning used to stop at the switch
    # (only the first optimizer's steps counted) and the old one stayed alive; one in a
    # reference cycle is collected at the new one's first step (a re-audit, AW)
    kept_controller, kept_density, _, _ = _switching_run("keep")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # only agpe's own collection may free the cyclic one
    try:
        controller, density, old, optimizer = _switching_run(switch)
    finally:
        if gc_was_enabled:
            gc.enable()
    assert controller.sparsifier.step_count == kept_controller.sparsifier.step_count == 60
    assert density == pytest.approx(kept_density) and kept_density == pytest.approx(0.25, abs=0.05)
    assert controller.optimizer is optimizer and controller.sparsifier.optimizer is optimizer
    assert old() is None
    torch._dynamo.reset()


def test_zero_code_says_when_a_replaced_optimizer_is_kept_alive(caplog):
    # the old optimizer stays referenced: it is still the one followed, and pruning pauses
    # with a warning saying how to hand over (taking over from a live optimizer counted
    # steps twice with optimizers that step the layers together, a re-audit found)
    with caplog.at_level("WARNING", logger="agpe_compile"):
        controller, _, old, optimizer = _switching_run("replace_alive")
    assert controller.sparsifier.step_count == 20 and controller.optimizer is old()
    assert "has not stepped during the last 10 steps of another AdamW" in caplog.text
    assert "pruning is paused" in caplog.text and caplog.text.count("pruning is paused") == 1
    torch._dynamo.reset()


def test_zero_code_counts_each_step_once_with_two_optimizers_over_the_layers():
    # one optimizer per layer group (both hold linear weights), their order swapped halfway:
    # only the followed one counts (a re-audit found double counts when the other could take over)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    backend = agpe_compile.AgpeBackend(ZERO_CODE_GMP)
    compiled = torch.compile(model, backend=backend)
    first, second = (torch.optim.SGD(layer.parameters(), lr=0.01) for layer in model.layers)
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    for step in range(30):
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        for opt in ((first, second) if step < 15 else (second, first)):
            opt.step()
            opt.zero_grad()
    (controller,) = backend.controllers
    assert controller.sparsifier.step_count == 30 and controller.optimizer is first
    assert second in controller.sparsifier._other_optimizers  # its moments of changed blocks are reset too
    torch._dynamo.reset()


def test_a_first_optimizer_step_past_the_first_update_says_what_follows_and_the_remedy(caplog):
    # helper audit CB: the warning named neither the drift of pruned weights nor what to do
    import logging

    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        _, _, backend = _zero_code_run(2, micro_batches=6)  # 6 calls before the first step, update_interval 5
    said = [r.getMessage() for r in caplog.records if "keeps counting compiled calls" in r.getMessage()]
    assert len(said) == 1 and "came after 6 calls" in said[0]
    assert "pruned weights drift from zero" in said[0] and "under torch.no_grad()" in said[0]
    assert backend.controllers[0].calls == 12
