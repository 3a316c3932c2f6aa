"""The backend as a user meets it: entry point, no-recompile, unprepared models, explain."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import agpe_compile
from agpe_compile.state import layer_states

from .models import MLP, BrokenMLP, TiedLM, aot_backend, eager_masked, set_random_masks


def test_entry_point_without_import_and_with_options():
    """backend="agpe" resolves through the installed entry point; no double registration."""
    script = textwrap.dedent("""
        import torch
        m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        out = torch.compile(m, backend="agpe", options={"inductor": False, "block_size": 16})(torch.randn(4, 32))
        out.sum().backward()
        assert "agpe_compile" in __import__("sys").modules
        print(sorted(k for k in m.state_dict() if "mask" in k))
        try:
            torch.compile(m, backend="agpe", options={"bogus": 1})(torch.randn(4, 32))
        except Exception as e:
            print(type(e).__name__, "bogus" in str(e))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    # compiled without prepare(): states exist but are not yet module buffers
    assert lines[0] == "[]"
    assert lines[1].endswith("True")


def test_mask_edits_across_ten_steps_never_recompile():
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(8, 64)).sum().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(10):
            set_random_masks(model, density=1.0 - 0.09 * step, seed=step)
            compiled(torch.randn(8, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert backend.graph_count == 1


def test_score_flag_toggles_without_recompile():
    torch.manual_seed(0)
    model = MLP()
    states = agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(8, 64)).sum().backward()
    state = states["layers.0"]
    assert float(state.dense_grad_sq.sum()) == 0.0
    with torch.compiler.set_stance("fail_on_recompile"):
        state.score_dense.fill_(True)
        compiled(torch.randn(8, 64)).sum().backward()
    inactive = ~state.block_mask
    assert torch.all(state.dense_grad_sq[inactive] > 0)
    assert torch.all(state.dense_grad_sq[state.block_mask] == 0)
    assert state.counters[0].item() == 16  # two backward calls of 8 rows


def test_unprepared_model_is_dense_then_adopted_by_prepare():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(8, 64)
    compiled = torch.compile(model, backend=aot_backend(block_size=16))
    expected = model(x)
    torch.testing.assert_close(compiled(x), expected)
    compiled(x).sum().backward()
    states = layer_states(model)
    assert set(states) == {"layers.0", "layers.1", "layers.2"}
    assert all(s.block_mask.all() and float(s.saliency.sum()) > 0 for s in states.values())
    assert not any("mask" in k for k in model.state_dict())
    adopted = agpe_compile.prepare(model)
    assert all(adopted[name] is states[name] for name in states)
    assert model.layers[0].weight_block_mask is states["layers.0"].block_mask
    # The controller's edits now reach the already-compiled code through the same tensors.
    states["layers.0"].block_mask.zero_()
    with torch.no_grad():
        model.layers[0].weight.zero_()
    out = compiled(x)
    torch.testing.assert_close(out, model(x))


def test_a_replaced_buffer_is_adopted_and_one_of_another_shape_refused():
    # Note [Replaced buffers]: the call wrapper adopts what the module holds now.
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(2, 64))
    new_mask = torch.zeros_like(model.layers[0].weight_block_mask)
    new_mask[0, 0] = True
    model.layers[0].weight_block_mask = new_mask
    x = torch.randn(2, 64)
    torch.testing.assert_close(compiled(x), eager_masked(model, x))
    assert agpe_compile.layer_state(model.layers[0]).block_mask is new_mask and backend.graph_count == 1
    model.layers[0].weight_block_mask = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"weight_block_mask was replaced by a tensor of shape \(1, 1\)"):
        compiled(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_to_another_dtype_after_prepare_and_compile(dtype):
    # Module._apply replaces the floating-point buffers (the fp32 saliency sums among them).
    torch._dynamo.reset()
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(2, 64)).sum().backward()
    model.to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    out = compiled(x)
    out.float().sum().backward()
    torch.testing.assert_close(out, eager_masked(model, x), rtol=2e-2, atol=2e-2)
    for state in agpe_compile.layer_states(model).values():
        assert state.saliency.dtype == torch.float32 and state.saliency is state.module.weight_saliency
        assert int(state.counters[0]) == 2 + 4


def test_block_size_conflict_with_prepared_layers():
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    with pytest.raises(Exception, match="prepared with block size 16"):
        torch.compile(model, backend=aot_backend(block_size=32))(torch.randn(2, 64))


def test_prepare_refuses_a_block_size_clash_before_touching_any_layer():
    model = MLP()
    first = sorted(agpe_compile.prepare(model, options={"block_size": 16, "exclude": ["layers.0"]}))
    with pytest.raises(ValueError, match="prepared with block size 16"):
        agpe_compile.prepare(model, options={"block_size": 8})
    assert sorted(layer_states(model)) == first  # layers.0 was not prepared at block 8 on the way
    assert sorted(agpe_compile.prepare(model, options={"block_size": 16})) == sorted(layer_states(model))


def test_state_dict_round_trip_keeps_buffer_identity():
    model = MLP()
    states = agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    other = MLP()
    other_states = agpe_compile.prepare(other, options={"block_size": 16})
    mask_before = other_states["layers.0"].block_mask
    other.load_state_dict(saved)
    assert other.layers[0].weight_block_mask is mask_before
    assert torch.equal(mask_before, states["layers.0"].block_mask)


def test_prepare_rejects_non_module_and_skips_tied():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        agpe_compile.prepare("model")
    model = TiedLM(64, 32)
    states = agpe_compile.prepare(model, options={"block_size": 16})
    assert set(states) == {"fc"}
    torch._dynamo.reset()
    rows = {layer.name: layer for layer in agpe_compile.explain(model, torch.randint(0, 64, (2, 5))).layers}
    # listed under the embedding's name (Dynamo's), with the linear that uses it
    assert "weight tied/shared with an embedding, as the weight of linear 'head'" in rows["embed"].reason


def test_explain_report():
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    report = agpe_compile.explain(model, torch.randn(4, 32), options={"exclude": ["layers.1"]})
    assert [(r.name, r.rewritten, r.reason) for r in report.layers] == [
        ("layers.0", True, None),
        ("layers.1", False, "excluded by pattern 'layers.1'"),
    ]
    assert report.layers[0].density == 0.5 and report.layers[0].lowering == "sparse_linear"
    text = str(report)
    assert "torch.ops.agpe.sparse_linear.default" in text
    assert "layers.1  16x32" in text and "no: excluded by pattern 'layers.1'" in text
    assert report.graph_breaks == []


def test_explain_lists_graph_breaks():
    report = agpe_compile.explain(BrokenMLP((32, 32, 16)), torch.randn(4, 32), options={"block_size": 16})
    assert len(report.graphs) == 2
    assert len(report.graph_breaks) == 1 and "graph_break" in report.graph_breaks[0]
    assert [r.graph for r in report.layers] == [0, 1]
    assert "1 graph break(s)" in str(report)


def test_layers_met_at_compile_take_the_prepared_block_size():
    # prepare(model, {"block_size": 8}) then torch.compile without options: a weight the
    # backend meets for the first time (a raw parameter in a matmul) uses the prepared
    # layers' block size, and a skipped layer's reason names that block size, not 32.
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.w = torch.nn.Parameter(torch.randn(16, 16))
            self.head = torch.nn.Linear(16, 12)

        def forward(self, x):
            return self.head(self.fc(x) @ self.w.t())

    torch._dynamo.reset()
    model = Model()
    agpe_compile.prepare(model, {"block_size": 8})
    report = agpe_compile.explain(model, torch.randn(2, 16), options={"inductor": False})
    assert agpe_compile.layer_state(model, "w").block_size == 8
    assert "not divisible by block size 8" in str(report) and "block size 32" not in str(report)


class _BreakRouter(torch.nn.Module):
    """A graph break between a prepared layer and a router weight used through F.linear."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 64)
        self.router = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.head = torch.nn.Linear(64, 12)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        torch._dynamo.graph_break()
        return self.head(torch.nn.functional.linear(h, self.router))


def test_a_graph_after_a_break_takes_the_prepared_block_size_too(caplog):
    # Audit AZ F3: the graph after the break holds no prepared layer; it fell back to block
    # 32 for the router it meets first, so the README's "one compiled forward, then the
    # Sparsifier" failed on a block-size clash, and explain named the wrong block size.
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 64)
            self.router = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
            self.head = torch.nn.Linear(64, 12)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            torch._dynamo.graph_break()
            return self.head(torch.nn.functional.linear(h, self.router))

    torch._dynamo.reset()
    model = Model()
    agpe_compile.prepare(model, {"block_size": 8})
    report = agpe_compile.explain(model, torch.randn(3, 16), options={"inductor": False})
    assert "not divisible by block size 8" in str(report) and "block size 32" not in str(report)
    torch._dynamo.reset()
    model = Model()
    agpe_compile.prepare(model, {"block_size": 8})
    with torch.no_grad():
        torch.compile(model, backend="agpe", options={"inductor": False})(torch.randn(3, 16))
    assert {n: s.block_size for n, s in agpe_compile.layer_states(model).items()} == {"fc": 8, "router": 8}
    sparsifier = agpe_compile.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), agpe_compile.AGPEConfig(
        target_sparsity=0.5, block_size=8, exclude=["head"]))
    assert sorted(sparsifier.layers) == ["fc", "router"]
    sparsifier.close()
    agpe_compile.strip(model)
    assert not any(hasattr(p, "_agpe_prepared_block_size") for p in model.parameters())
    # a deep copy keeps it (re-audit BA F2: Parameter.__deepcopy__ dropped the attribute)
    import copy

    torch._dynamo.reset()
    original = Model()
    agpe_compile.prepare(original, {"block_size": 8})
    model = copy.deepcopy(original)
    with torch.no_grad():
        torch.compile(model, backend="agpe", options={"inductor": False})(torch.randn(3, 16))
    assert {n: s.block_size for n, s in agpe_compile.layer_states(model).items()} == {"fc": 8, "router": 8}
    # load_state_dict(assign=True) puts a new router in place: it takes the mark, the old one is freed
    # (re-audit BB F1: the module's record held the old parameter)
    import gc
    import weakref

    original = Model()
    agpe_compile.prepare(original, {"block_size": 8})
    old = weakref.ref(original.router)
    original.load_state_dict({k: v.clone() for k, v in original.state_dict().items()}, assign=True)
    gc.collect()
    assert old() is None and original.router._agpe_prepared_block_size == 8
    # a parameter assigned while the old one is still referenced (re-audit BH F5): a copy and
    # a pickle carry the module's parameter now, with the mark, never the replaced one
    import io

    original = _BreakRouter()
    agpe_compile.prepare(original, {"block_size": 8})
    kept = original.router  # (an optimizer made before the change holds it)
    original.router = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    buffer = io.BytesIO()
    torch.save(original, buffer)
    for copied in (copy.deepcopy(original), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        (record,) = [r for name, r in copied._agpe_prepared_block_sizes.items() if name == "router"]
        assert record.param_ref() is copied.router and copied.router._agpe_prepared_block_size == 8
        assert not any(p.shape == kept.shape and torch.equal(p, kept) for p in copied.parameters())
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(copied, backend="agpe", options={"inductor": False})(torch.randn(3, 16))
        assert {n: s.block_size for n, s in agpe_compile.layer_states(copied).items()} == {"fc": 8, "router": 8}
    # and so does a loaded one whose parameter is reassigned then (re-audit BI)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    loaded.router = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    copied = copy.deepcopy(loaded)
    assert copied._agpe_prepared_block_sizes["router"].param_ref() is copied.router
    assert copied.router._agpe_prepared_block_size == 8


def test_deepcopy_and_torch_save_keep_the_masks(tmp_path):
    # Note [Copying prepared models]: the copy has its own states over its own buffers.
    import copy

    torch._dynamo.reset()
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    torch.save(model, tmp_path / "model.pt")
    copies = {"deepcopy": copy.deepcopy(model), "torch.load": torch.load(tmp_path / "model.pt", weights_only=False)}
    x = torch.randn(4, 64)
    for how, clone in copies.items():
        states, originals = agpe_compile.layer_states(clone), agpe_compile.layer_states(model)
        assert sorted(states) == sorted(originals), how
        for name, state in states.items():
            assert torch.equal(state.block_mask, originals[name].block_mask), how
            assert state.block_mask is not originals[name].block_mask, how
            assert agpe_compile.state.state_of(state.weight) is state, how
            assert state.block_mask is state.module.weight_block_mask and state.module is not originals[name].module
        assert sorted(agpe_compile.prepare(clone, {"block_size": 16})) == sorted(states)  # adopts, no error
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(clone, backend=aot_backend())(x), eager_masked(model, x))
        state = next(iter(states.values()))
        state.block_mask.zero_()  # the copy's masks are its own
        assert originals[state.name].block_mask.any()


def test_a_model_saves_and_copies_while_a_compiled_call_waits_for_its_backward(tmp_path):
    # LayerState keeps weak references to the calls waiting for their backward (Note [Mistakes
    # the Sparsifier names]); weak references cannot be pickled, and a copy must not share them
    import copy

    torch._dynamo.reset()
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    out = torch.compile(model, backend=aot_backend())(torch.randn(4, 64))  # its graph waits for a backward
    assert any(s.backward_tokens for s in agpe_compile.layer_states(model).values())
    torch.save(model, tmp_path / "model.pt")
    for clone in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert all(not s.backward_tokens for s in agpe_compile.layer_states(clone).values())
    out.sum().backward()
    # a pickle written before LayerState had this field (re-audit CD) loads and trains
    state = next(iter(agpe_compile.layer_states(model).values()))
    old = state.__getstate__()
    del old["backward_tokens"], old["capacity_layouts"]
    revived = agpe_compile.state.LayerState.__new__(agpe_compile.state.LayerState)
    revived.__setstate__(old)
    assert revived.backward_tokens == [] and revived.capacity_layouts == []
    torch._dynamo.reset()


def test_compile_modes_reach_inductor_and_bad_ones_are_named():
    # Note [Compile modes]: torch.compile hands mode= to the backend.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    x = torch.randn(4, 64)
    out = torch.compile(model, backend="agpe", mode="reduce-overhead")(x)
    torch.testing.assert_close(out, eager_masked(model, x))
    with pytest.raises(ValueError, match="mode got 'fastest'; expected one of"):
        agpe_compile.AgpeBackend(mode="fastest")
    with pytest.raises(ValueError, match="needs the Inductor lowering"):
        agpe_compile.AgpeBackend({"inductor": False}, mode="max-autotune")


def test_mode_among_the_options_and_clear_errors_for_the_other_spellings():
    # torch.compile refuses mode= together with options=; the mode may sit among the options.
    torch._dynamo.reset()
    model = MLP()
    x = torch.randn(4, 64)
    out = torch.compile(model, backend="agpe", options={"mode": "max-autotune-no-cudagraphs", "block_size": 16})(x)
    torch.testing.assert_close(out, eager_masked(model, x))
    assert agpe_compile.AgpeBackend({"mode": "max-autotune", "block_size": 16}).mode == "max-autotune"
    with pytest.raises(ValueError, match="needs the Inductor lowering"):
        agpe_compile.AgpeBackend({"mode": "max-autotune", "inductor": False})
    with pytest.raises(ValueError, match="give one"):
        agpe_compile.AgpeBackend({"mode": "max-autotune"}, mode="default")
    with pytest.raises(TypeError, match="options must be a dict of option names to values.*got str"):
        agpe_compile.AgpeBackend("inductor=False")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="passed \\['mode'\\] to an AgpeBackend instance; give them to the instance"):
        torch.compile(MLP(), backend=agpe_compile.AgpeBackend({"inductor": False}), mode="max-autotune")(x)


def test_explain_takes_keyword_inputs_and_a_block_size_clash_says_who_prepared():
    class KeywordsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, *, input_ids, scale=1.0):
            return self.fc(input_ids) * scale

    torch._dynamo.reset()
    model = KeywordsOnly()
    report = agpe_compile.explain(model, input_ids=torch.randn(2, 32), scale=2.0)
    assert [layer.name for layer in report.layers if layer.rewritten] == ["fc"]
    with pytest.raises(ValueError, match="by a torch.compile\\(backend='agpe'\\) or agpe_compile.explain call"):
        agpe_compile.prepare(model, options={"block_size": 8})
    agpe_compile.strip(model)  # the way to start over
    assert sorted(agpe_compile.prepare(model, options={"block_size": 8})) == ["fc"]
    assert agpe_compile.layer_state(model.fc).block_size == 8


def test_a_weight_shared_by_two_linears_is_one_layer():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1 = torch.nn.Linear(16, 16)
            self.lin2 = torch.nn.Linear(16, 16, bias=False)
            self.lin2.weight = self.lin1.weight

        def forward(self, x):
            return self.lin2(torch.tanh(self.lin1(x)))

    model = Shared()
    assert sorted(agpe_compile.prepare(model, {"block_size": 8})) == ["lin1"]
    assert sorted(agpe_compile.layer_states(model)) == ["lin1"]


@pytest.mark.parametrize("excluded", ["a", "b"])
@pytest.mark.parametrize("compiled_first", [False, True])
def test_a_shared_weight_one_of_whose_names_is_excluded_stays_dense(excluded, compiled_first, caplog):
    # b.weight = a.weight with exclude=["a"]: pruning the weight as b's would prune a too (it
    # was, while prepare logged "a stays dense"), and exclude=["b"] was overridden the same
    # way. The weight stays dense for both, with a warning naming the clash.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)
            self.b.weight = self.a.weight
            self.head = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)) + self.b(x))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Shared()
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 8}))
    x = torch.randn(4, 16)
    if compiled_first:  # the compile gives the weight a state before the Sparsifier's prepare
        cmodel(x).sum().backward()
        model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, block_size=8, update_interval=2, end_step=2,
                                               policy="gmp", distribution="uniform", exclude=[excluded]))
    assert "a, b share one weight" in caplog.text and f"leave {excluded} dense" in caplog.text
    for _ in range(2):
        loss = cmodel(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
    assert sorted(sp.densities()) == ["head"] and sp.densities()["head"] == pytest.approx(0.5)
    assert bool((model.a.weight != 0).all())
    report = agpe_compile.explain(model, x)
    (row,) = [layer for layer in report.layers if layer.name in ("a", "b")]
    assert not row.rewritten and "weight shared by a, b" in row.reason


def test_an_inference_mode_eval_after_a_dtype_change_or_a_rebucket_does_not_break_training():
    # PyTorch Lightning's sanity check evaluates under inference_mode before training. The
    # running sums cast back to fp32 after model.to(bf16), and layouts re-bucketed, during such
    # an eval must be ordinary tensors, or every later backward fails ("Inference tensors
    # cannot be saved for backward").
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, block_size=16, update_interval=2, end_step=10,
                                           policy="gmp"))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(8, 64)

    def train(steps, inputs):
        for _ in range(steps):
            loss = cmodel(inputs).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sp.step(loss)

    train(2, x)
    model.to(torch.bfloat16)
    with torch.inference_mode():
        cmodel(x.bfloat16())
    states = layer_states(model)
    assert all(s.saliency.dtype == torch.float32 and not s.saliency.is_inference() for s in states.values())
    train(6, x.bfloat16())
    assert sp.global_density < 1.0
    for state in states.values():
        state.block_mask.fill_(True)
    with torch.inference_mode():
        agpe_compile.rebucket(model)
    assert not any(s.block_layout.is_inference() for s in states.values())
    loss = cmodel(x.bfloat16()).float().pow(2).mean()
    loss.backward()


@pytest.mark.parametrize("inductor", [False, True], ids=["aot_eager", "inductor"])
def test_a_layer_whose_module_the_graph_never_calls_is_compiled_at_full_capacity_and_says_so(caplog, inductor):
    # Note [Layouts a graph cannot see change]: a weight used without calling its module gives
    # Dynamo no hook to guard on the layout's length, so the graph never recompiles for that
    # layer: it is compiled at full capacity, and every mask runs in it.
    import logging

    import torch.nn.functional as F

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Functional()
    agpe_compile.prepare(model, options={"block_size": 16})  # a 4 x 4 grid
    state = agpe_compile.layer_state(model.proj)

    def set_mask(live):  # inactive weights stay non-zero: an unmasked run would show
        mask = torch.zeros(16, dtype=torch.bool)
        mask[torch.randperm(16, generator=torch.Generator().manual_seed(live))[:live]] = True
        state.block_mask.copy_(mask.view(4, 4))
        agpe_compile.rebucket(model)

    set_mask(8)  # bucket 0.5 when compiled
    backend = agpe_compile.AgpeBackend({"inductor": inductor})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 64)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        torch.testing.assert_close(compiled(x), eager_masked(model, x))
        for live in (3, 2, 5, 12, 16):  # other buckets, sparser and denser than at compile time
            set_mask(live)
            out = compiled(x)
            torch.testing.assert_close(out, eager_masked(model, x))
            out.sum().backward()
    warnings = [r.getMessage() for r in caplog.records if "without calling its module" in r.getMessage()]
    assert len(warnings) == 1 and "'proj'" in warnings[0] and "compiled at full capacity" in warnings[0]
    assert backend.graph_count == 1 and int(state.counters[0]) > 0


def test_compiled_capacity_layouts_are_rebuilt_without_the_call_wrapper():
    # A CUDA graph replay (GraphedStep) skips the call wrapper, which rebuilds the layout it
    # hands a graph compiled at a fixed capacity. The layer state tracks that layout, and
    # sync_capacity_layouts (called by GraphedStep before a replay) brings it up to date.
    import gc

    import torch.nn.functional as F

    from agpe_compile.packed_layout import capacity_of, unpack

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Functional()
    agpe_compile.prepare(model, options={"block_size": 16})
    state = agpe_compile.layer_state(model.proj)

    def set_mask(live):
        mask = torch.zeros(16, dtype=torch.bool)
        mask[torch.randperm(16, generator=torch.Generator().manual_seed(live))[:live]] = True
        state.block_mask.copy_(mask.view(4, 4))
        agpe_compile.rebucket(model)
        return mask.view(4, 4)

    set_mask(8)
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(4, 64)
    compiled(x)
    set_mask(4)  # another bucket: the wrapper hands the graph a full-capacity layout
    compiled(x)
    tracked = [entry[0]() for entry in state.capacity_layouts]
    assert len(tracked) == 1 and capacity_of(tracked[0], state.grid) == 16
    layout = tracked[0]
    for live in (2, 5, 12):  # no compiled call in between: only the sync can update it
        mask = set_mask(live)
        assert not torch.equal(unpack(layout, state.grid, 16).to_mask(), mask)
        state.sync_capacity_layouts()
        assert torch.equal(unpack(layout, state.grid, 16).to_mask(), mask)
        assert [entry[0]() for entry in state.capacity_layouts] == [layout]  # same tensor, same address
    torch.testing.assert_close(compiled(x), eager_masked(model, x))
    # weakly held: the graph's wrapper owns it, and a copy starts with none
    import copy
    assert copy.deepcopy(model).proj.weight is not None
    assert agpe_compile.layer_state(copy.deepcopy(model).proj).capacity_layouts == []
    del compiled, layout, tracked
    torch._dynamo.reset()
    gc.collect()
    state.sync_capacity_layouts()
    assert state.capacity_layouts == []


def test_hookless_layers_of_mha_and_of_a_second_instance_follow_any_bucket(caplog):
    # nn.MultiheadAttention uses out_proj.weight without calling out_proj: its layout is never
    # read by the graph (masked_weight, dense W*M), so any mask runs, whatever graph Dynamo
    # reuses. Two instances sharing a graph whose layer has no hook: each keeps the capacity.
    import logging

    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(64, 4, batch_first=True)
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0])

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Attn()
    agpe_compile.prepare(model, options={"block_size": 8})
    states = layer_states(model)
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(2, 5, 64)

    def set_live(state, live):
        mask = torch.zeros(state.block_mask.numel(), dtype=torch.bool)
        mask[:live] = True
        state.block_mask.copy_(mask.view(state.grid))

    for fc, out_proj in [(64, 64), (32, 16), (64, 32), (32, 32)]:  # regrowth past a reused graph's capacity
        set_live(states["fc"], fc)
        set_live(states["att.out_proj"], out_proj)
        agpe_compile.rebucket(model)
        torch.testing.assert_close(compiled(x), eager_masked(model, x))

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

    torch._dynamo.reset()
    a, b = Functional(), Functional()
    for m in (a, b):
        agpe_compile.prepare(m, options={"block_size": 8})
    backend = agpe_compile.AgpeBackend({"inductor": False})
    ca, cb = torch.compile(a, backend=backend), torch.compile(b, backend=backend)
    x = torch.randn(4, 64)
    ca(x), cb(x)
    set_live(agpe_compile.layer_state(b.proj), 30)
    agpe_compile.rebucket(b)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        torch.testing.assert_close(cb(x), eager_masked(b, x))
        torch.testing.assert_close(ca(x), eager_masked(a, x))
    assert backend.graph_count == 1
    assert sum("keeps running at the capacity it was compiled with" in r.getMessage() for r in caplog.records) == 1


def test_rebucket_after_a_hand_edit_keeps_the_zero_weight_promise():
    # Under a Sparsifier the dense path skips masking W (inactive weights are zero); a mask
    # edited by hand and then rebucketed must have its new inactive blocks zeroed too.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, opt, AGPEConfig(block_size=16, target_sparsity=0.5, policy="static"))  # noqa: F841 (alive)
    state = agpe_compile.layer_state(model.layers[0])
    assert state.zero_inactive
    live = state.block_mask.nonzero()[0].tolist()
    state.block_mask[live[0], live[1]] = False
    agpe_compile.rebucket(model)
    inactive = ~torch.repeat_interleave(torch.repeat_interleave(state.block_mask, 16, 0), 16, 1)
    assert not model.layers[0].weight[inactive].any()


class _BlockWithBreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 32)
        self.fc2 = torch.nn.Linear(32, 32)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _BlocksWithBreak(torch.nn.Module):
    # a graph break inside the loop: Dynamo compiles each block's forward as a frame of its
    # own, named "fc1"/"fc2", and the three blocks share that graph
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_BlockWithBreak() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


@pytest.mark.parametrize("first", ["explain", "compile"])
def test_layers_made_by_a_graph_before_prepare_get_their_model_paths(first):
    # Found by an audit: states made by a block's own frame were named "fc1"/"fc2" for every
    # block, so a Sparsifier created afterwards saw 2 layers of 6 and pruned only one block.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BlocksWithBreak()
    x = torch.randn(4, 32)
    if first == "explain":
        agpe_compile.explain(model, x, options={"block_size": 8})
    else:
        torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 8}))(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.75, policy="static", block_size=8,
                                           distribution="uniform"))
    names = [f"blocks.{i}.{fc}" for i in range(3) for fc in ("fc1", "fc2")]
    assert sorted(sp.layers) == names
    assert sorted(agpe_compile.layer_states(model)) == names
    assert all(abs(d - 0.25) < 1e-6 for d in sp.densities().values())
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    torch.testing.assert_close(compiled(x), eager_masked(model, x))
    sp.close()
    agpe_compile.strip(model)


def test_a_pattern_that_matches_no_layer_is_named_once(caplog):
    # exclude=["layer.1"] for "layers.1": the layer meant to stay dense was pruned, silently.
    import logging

    model = MLP()
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        agpe_compile.prepare(model, {"block_size": 16, "exclude": ["layer.1", "layers.1"]})
        agpe_compile.prepare(model, {"block_size": 16, "exclude": ["layer.1", "layers.1"]})
    said = [r.getMessage() for r in caplog.records if "match no layer of this model" in r.getMessage()]
    assert len(said) == 1 and "['layer.1']" in said[0] and "layers.0" in said[0]


def test_a_pattern_naming_a_weight_used_through_f_linear_is_not_called_unmatched(caplog):
    # The backend rewrites any 2-D weight a graph uses as a linear weight; a pattern naming
    # one was called a typo, and deleting it would prune the layer meant to stay dense.
    import logging

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(32, 32)
            self.proj_w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return torch.nn.functional.linear(self.fc1(x), self.proj_w)

    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        agpe_compile.prepare(Raw(), {"block_size": 16, "exclude": ["proj_w"]})
    assert "match no" not in caplog.text


def test_a_block_size_clash_at_prepare_names_the_layer_by_its_path():
    model = MLP()
    agpe_compile.prepare(model.layers[0], {"block_size": 16})  # named 'weight' on its own
    with pytest.raises(ValueError, match="layer 'weight' \\('layers.0' here\\) was prepared with block size 16"):
        agpe_compile.prepare(model, {"block_size": 8})


def test_an_excluded_block_stays_dense_when_the_model_was_compiled_before_the_sparsifier():
    # Found by an audit: the exclusion was checked against the graph's frame-local name.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BlocksWithBreak()
    torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 8}))(torch.randn(4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.75, policy="static", block_size=8,
                                           distribution="uniform", exclude=("blocks.1.*",)))
    assert sorted(sp.layers) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.2.fc1", "blocks.2.fc2"]
    assert bool(agpe_compile.layer_state(model.blocks[1].fc1).block_mask.all())


def test_submodules_prepared_first_take_their_paths_in_the_whole_model():
    # Found by an audit: prepare(encoder) and prepare(decoder), each with a "proj", gave two
    # layers named "proj": one was dropped from the Sparsifier and compiling raised a
    # SyntaxError (duplicate graph argument).
    from agpe_compile.controller import AGPEConfig, Sparsifier

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x):
            return torch.relu(self.proj(x))

    class EncDec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Half(), Half()

        def forward(self, x):
            return self.decoder(self.encoder(x))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EncDec()
    for half in (model.encoder, model.decoder):
        agpe_compile.prepare(half, options={"block_size": 8})
    x = torch.randn(4, 32)
    set_random_masks(model, 0.5, seed=3)
    agpe_compile.rebucket(model)
    compiled = torch.compile(model, backend=aot_backend())  # two layers still named "proj"
    torch.testing.assert_close(compiled(x), eager_masked(model, x))
    sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig(target_sparsity=0.5, block_size=8))
    assert sorted(sp.layers) == ["decoder.proj", "encoder.proj"]
    assert sorted(agpe_compile.layer_states(model)) == ["decoder.proj", "encoder.proj"]


def test_layer_names_survive_wrappers_and_clashes():
    # A layer prepared under the model keeps its name when a Sparsifier is given the compiled
    # wrapper (its checkpoint must load into the plain model); layers of one name driven by
    # two submodule Sparsifiers are both listed by layer_states (found by audits).
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    agpe_compile.prepare(model, options={"block_size": 8})
    sp = Sparsifier(torch.compile(model), torch.optim.SGD(model.parameters(), lr=0.1),
                    AGPEConfig(target_sparsity=0.5, block_size=8))
    assert sorted(sp.layers) == ["0", "2"]
    saved = sp.state_dict()
    sp.close()
    again = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig(target_sparsity=0.5, block_size=8))
    again.load_state_dict(saved)

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

    pair = torch.nn.ModuleDict({"encoder": Half(), "decoder": Half()})
    for half in pair.values():
        Sparsifier(half, torch.optim.SGD(half.parameters(), lr=0.1), AGPEConfig(target_sparsity=0.5, block_size=8))
    assert sorted(agpe_compile.layer_states(pair)) == ["decoder.proj", "encoder.proj"]


def test_a_sparsifier_given_the_compiled_wrapper_names_layers_like_the_model():
    # Without prepare first, the names had torch.compile's "_orig_mod." prefix, and the
    # checkpoint did not load into a Sparsifier over the plain model.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    compiled = torch.compile(model, backend=aot_backend())
    sp = Sparsifier(compiled, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig(target_sparsity=0.5, block_size=8))
    assert sorted(sp.layers) == ["0", "2"] and sorted(agpe_compile.layer_states(model)) == ["0", "2"]
    torch.testing.assert_close(compiled(torch.ones(2, 32)), eager_masked(model, torch.ones(2, 32)))
    saved = sp.state_dict()
    sp.close()
    Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
               AGPEConfig(target_sparsity=0.5, block_size=8)).load_state_dict(saved)


def test_patterns_match_the_same_names_through_the_compiled_wrapper():
    # exclude="head" must name the head whether the Sparsifier gets the model or its wrapper
    from agpe_compile.controller import AGPEConfig, Sparsifier

    torch._dynamo.reset()
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(32, 32))
    model.add_module("head", torch.nn.Linear(32, 10))  # 10 rows: not divisible by 8
    sp = Sparsifier(torch.compile(model, backend=aot_backend()), torch.optim.SGD(model.parameters(), lr=0.1),
                    AGPEConfig(target_sparsity=0.5, block_size=8, exclude=("head",)))
    assert sorted(sp.layers) == ["body"]


def test_explain_of_the_compiled_wrapper_names_layers_as_the_module_does():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    compiled = torch.compile(model, backend="agpe", options={"inductor": False})
    names = [r.name for r in agpe_compile.explain(compiled, torch.randn(2, 64)).layers]
    assert names == ["0", "2"]  # were "__self__.0", "__self__.2"


def test_explain_of_a_model_compiled_in_place_traces_it():
    torch._dynamo.reset()
    class TwoLayers(nn.Module):  # (an nn.Sequential compiled in place happened to trace before the fix)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = TwoLayers()
    agpe_compile.prepare(model, options={"block_size": 16})  # as the Sparsifier does (AGPETrainer too)
    model.compile(backend="agpe", options={"inductor": False})
    x = torch.randn(2, 64)
    model(x)  # its own compiled code exists and is cached
    report = agpe_compile.explain(model, x)
    assert [r.name for r in report.layers] == ["a", "b"] and len(report.graphs) == 1  # were 0 graphs, no layers
    assert model._compiled_call_impl is not None  # still compiled in place afterwards
    torch.testing.assert_close(model(x), model._call_impl(x))


def test_layers_left_dense_for_their_shape_are_warned_about_once(caplog, monkeypatch):
    import agpe_compile.backend as backend_module

    monkeypatch.setattr(backend_module, "_said", set())  # once-per-process messages: fresh for this test
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        torch.compile(model, backend="agpe", options={"block_size": 33, "inductor": False})(torch.randn(2, 64))
    assert caplog.text.count("stay dense (not pruned)") == 1 and "not divisible by block size 33" in caplog.text
    caplog.clear()  # prepare warned already: compiling does not say it again
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        agpe_compile.prepare(model, options={"block_size": 8})
        torch.compile(model, backend="agpe", options={"inductor": False})(torch.randn(2, 64))
    assert caplog.text.count("stay dense") == 1
    caplog.clear()  # zero-code mode with nothing prunable: its own warning only
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 10))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        torch.compile(model, backend="agpe", options={"target_sparsity": 0.5, "inductor": False})(torch.randn(2, 40))
    assert "no layer of this graph can be pruned" in caplog.text and "stay dense (not pruned)" not in caplog.text


_GLOBAL_MODELS = {}


@pytest.mark.parametrize("reach", ["global", "dict"])
def test_zero_code_names_hold_when_the_compiled_function_reaches_the_model_as_a_global(reach):
    # A model reached as a global or through a dict: its layers keep their module paths (a
    # twentieth-session attempt at reading them from nn_module_stack kept the G['...'] root,
    # and with include patterns no layer was pruned).
    from agpe_compile.state import layer_states

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.a = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 16)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(self.a(x))

    torch.manual_seed(0)
    model = Model()
    _GLOBAL_MODELS.clear()
    _GLOBAL_MODELS["m"] = model
    globals()["_GLOBAL_MODEL"] = model

    @torch.compile(backend="agpe", options={"inductor": False, "block_size": 8, "target_sparsity": 0.5,
                                            "policy": "gmp", "update_interval": 2, "end_step": 4,
                                            "include": ["blocks.*", "head"]})
    def run(x):
        return (_GLOBAL_MODEL if reach == "global" else _GLOBAL_MODELS["m"])(x)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        run(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert sorted(layer_states(model)) == ["blocks.0.fc", "blocks.1.fc", "head"]
    assert bool((model.a.weight != 0).all())
