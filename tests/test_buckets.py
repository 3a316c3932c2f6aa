"""Layouts follow the masks: in-place sync inside a bucket, one recompile per crossing."""

import pytest
import torch
from torch import nn

import agpe_compile
from agpe_compile.buckets import rebucket
from agpe_compile.state import layer_states

from .models import MLP, aot_backend, set_random_masks


def test_wrapper_syncs_layout_in_place_after_mask_edit():
    model = MLP((32, 32, 16))
    states = agpe_compile.prepare(model, options={"block_size": 8})
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(4, 32))
    state = states["layers.0"]
    buffer = state.block_layout
    state.block_mask[0, 0] = False
    compiled(torch.randn(4, 32))
    assert state.block_layout is buffer
    assert torch.equal(state.layout().to_mask(), state.block_mask)


def test_rebucket_moves_only_layers_that_left_their_bucket():
    model = MLP((32, 32, 16))
    states = agpe_compile.prepare(model, options={"block_size": 8})
    states["layers.0"].block_mask[:, 2:] = False  # 8 of 16 blocks: density 0.5
    assert rebucket(model) == ["layers.0"]
    assert states["layers.0"].layout_bucket == 0.5
    assert model.layers[0].weight_block_layout is states["layers.0"].block_layout
    assert rebucket(model) == []


def test_mask_above_bucket_capacity_without_rebucket_raises():
    model = MLP((32, 32, 16))
    states = agpe_compile.prepare(model, options={"block_size": 8})
    states["layers.0"].block_mask[:, 1:] = False
    rebucket(model)
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(4, 32))
    states["layers.0"].block_mask.fill_(True)
    with pytest.raises(RuntimeError, match="call agpe_compile.rebucket"):
        compiled(torch.randn(4, 32))


def test_layers_compiled_before_prepare_keep_full_capacity():
    model = MLP((32, 32, 16))
    compiled = torch.compile(model, backend=aot_backend(block_size=8))
    compiled(torch.randn(4, 32))
    state = layer_states(model)["layers.0"]
    state.block_mask[:, 1:] = False
    with torch.no_grad():
        model.layers[0].weight[:, 8:] = 0
    assert rebucket([state]) == []
    assert state.layout_bucket == 1.0
    x = torch.randn(4, 32)
    torch.testing.assert_close(compiled(x), model(x))
    assert torch.equal(state.layout().to_mask(), state.block_mask)


def test_two_thousand_steps_compile_once_per_bucket_crossing():
    """Masks change every 50 steps while density falls 1.0 -> 0.1: compilations = 1 + crossings."""
    torch.manual_seed(0)
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 4})  # 8x8 and 4x8 block grids
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 32)
    crossings = 0
    for step in range(2000):
        if step % 50 == 0 and step > 0:
            density = 1.0 - 0.9 * min(1.0, step / 1500)
            set_random_masks(model, density, seed=step)
            crossings += bool(rebucket(model))
        compiled(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert crossings >= 6  # 1.0 -> 0.75 -> 0.5 -> 0.35 -> 0.25 -> 0.15 -> 0.10
    assert backend.graph_count == 1 + crossings
    assert {s.layout_bucket for s in layer_states(model).values()} == {0.1}


def test_returning_to_a_previous_bucket_reuses_its_graph_with_the_new_layout():
    torch.manual_seed(0)
    model = MLP((32, 32, 16))
    states = agpe_compile.prepare(model, options={"block_size": 8})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 32)
    compiled(x)
    set_random_masks(model, 0.5)
    assert rebucket(model)
    torch.testing.assert_close(compiled(x), model(x))
    old_layout = states["layers.0"].block_layout
    set_random_masks(model, 1.0, seed=1)  # back to bucket 1.0: a new buffer of the old length
    assert rebucket(model)
    assert states["layers.0"].block_layout is not old_layout
    torch.testing.assert_close(compiled(x), model(x))
    assert backend.graph_count == 2


def test_model_state_dict_of_another_bucket_loads_into_a_fresh_model():
    torch.manual_seed(0)
    sparse = MLP((32, 32, 16))
    agpe_compile.prepare(sparse, options={"block_size": 8})
    set_random_masks(sparse, 0.25)
    rebucket(sparse)
    saved = {k: v.clone() for k, v in sparse.state_dict().items()}
    fresh = MLP((32, 32, 16))
    states = agpe_compile.prepare(fresh, options={"block_size": 8})
    compiled = torch.compile(fresh, backend=aot_backend())
    x = torch.randn(4, 32)
    compiled(x)
    fresh.load_state_dict(saved)
    assert states["layers.0"].layout_bucket == 0.25
    assert fresh.layers[0].weight_block_layout is states["layers.0"].block_layout
    assert fresh.layers[0].weight_block_layout.shape == sparse.layers[0].weight_block_layout.shape
    torch.testing.assert_close(compiled(x), sparse(x))
    assert rebucket(fresh) == []


def test_many_crossings_with_evaluation_stay_compiled_and_masked():
    # Note [Recompile budget]: layers crossing buckets one at a time, each crossing compiled
    # for training and for no_grad evaluation, go far past Dynamo's default limit of 8
    # graphs per frame; the model must stay compiled (masked), never fall back to eager.
    from agpe_compile.ops.reference import expand_block_mask

    torch.manual_seed(0)
    model = MLP((32, 32, 32, 16))
    states = agpe_compile.prepare(model, options={"block_size": 4})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 32)
    for density in (0.75, 0.5, 0.3, 0.2, 0.1):  # buckets 0.75, 0.5, 0.35, 0.25, 0.1 for 64 and 32 blocks
        for name in states:  # one layer per crossing event
            set_random_masks(model, density, seed=len(name), only=name)
            assert rebucket(model) == [name]
            compiled(x).sum().backward()
            with torch.no_grad():
                compiled(x[:3])
    assert backend.graph_count > 16
    assert torch._dynamo.config.recompile_limit > backend.graph_count  # headroom kept ahead of the graphs
    assert not torch._dynamo.config.fail_on_recompile_limit_hit  # other compiled code keeps its fallback
    expected = x
    for i, layer in enumerate(model.layers):
        weight = layer.weight * expand_block_mask(states[f"layers.{i}"].block_mask, 4, torch.float32)
        expected = torch.nn.functional.linear(expected, weight, layer.bias)
        if i < len(model.layers) - 1:
            expected = torch.relu(expected)
    torch.testing.assert_close(compiled(x), expected)


def test_a_frame_recompiled_past_its_crossing_budget_is_refused():
    from agpe_compile.buckets import ensure_recompile_headroom, recompile_budget, user_recompile_limit

    budget = recompile_budget(2) + user_recompile_limit()
    ensure_recompile_headroom(budget, 2)  # still explained by crossings
    assert torch._dynamo.config.recompile_limit >= budget
    with pytest.raises(RuntimeError, match="TORCH_LOGS=recompiles"):
        ensure_recompile_headroom(budget + 1, 2)


def test_a_recompile_limit_the_user_raised_is_added_to_the_budget(monkeypatch):
    """24 static batch shapes x GMP's bucket states made ~170 graphs of one frame: plain
    torch.compile ran them under the user's recompile_limit=4096, agpe refused at 121."""
    import agpe_compile.buckets as buckets

    monkeypatch.setattr(buckets, "_limits_found", {})
    monkeypatch.setattr(buckets, "_limits_set", {})
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        buckets.ensure_recompile_headroom(1, 1)  # agpe raises the limit: that is not the user's limit
        assert torch._dynamo.config.recompile_limit == 1 + buckets.RECOMPILE_HEADROOM
        assert buckets.user_recompile_limit() == 8
        with pytest.raises(RuntimeError, match="raise torch._dynamo.config.recompile_limit"):
            buckets.ensure_recompile_headroom(buckets.recompile_budget(1) + 8 + 1, 1)
    with torch._dynamo.config.patch(recompile_limit=4096, accumulated_recompile_limit=4096):
        assert buckets.user_recompile_limit() == 4096
        buckets.ensure_recompile_headroom(170, 1)  # was: "compiled 170 times, more than ... (120)"
        buckets.ensure_recompile_headroom(buckets.recompile_budget(1) + 4096, 1)
        with pytest.raises(RuntimeError, match="recompile_limit=4096"):
            buckets.ensure_recompile_headroom(buckets.recompile_budget(1) + 4096 + 1, 1)


def test_raising_dynamos_default_limit_is_logged_and_raising_the_users_is_a_warning(monkeypatch, caplog):
    """Every agpe run raises the default recompile_limit at its first compile: that was a
    WARNING on every healthy run (two audits called it noise)."""
    import logging

    import agpe_compile.buckets as buckets

    for name, value in (("_limits_found", {}), ("_limits_set", {}), ("_warned_raise", False)):
        monkeypatch.setattr(buckets, name, value)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        monkeypatch.setattr(buckets, "_set_by_user", lambda name: False)  # Dynamo's defaults
        with caplog.at_level(logging.INFO, logger="agpe_compile"):
            buckets.ensure_recompile_headroom(1, 1)
        assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    caplog.clear()
    monkeypatch.undo()
    for name, value in (("_limits_found", {}), ("_limits_set", {}), ("_warned_raise", False)):
        monkeypatch.setattr(buckets, name, value)
    with torch._dynamo.config.patch(recompile_limit=4, accumulated_recompile_limit=4):  # the user's own
        assert buckets._set_by_user("recompile_limit")
        with caplog.at_level(logging.INFO, logger="agpe_compile"):
            buckets.ensure_recompile_headroom(1, 1)
            buckets.ensure_recompile_headroom(20, 1)  # raising agpe's own value again: logged only
        levels = [r.levelno for r in caplog.records]
        assert levels.count(logging.WARNING) == 1 and "recompile_limit 4 -> 17" in caplog.records[0].getMessage()


@pytest.fixture
def fresh_limits(monkeypatch):
    """Dynamo's limits as a fresh process has them (agpe found none set, raised none), and
    Dynamo's frame ids from 0."""
    import agpe_compile.buckets as buckets

    for name, value in (("_limits_found", {}), ("_limits_set", {}), ("_warned_raise", False),
                        ("_bucket_set_compiles", {}), ("_last_frame_compile", {})):
        monkeypatch.setattr(buckets, name, value, raising=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield
    torch._dynamo.reset()


def _new_batch_size_every_call(compiled, calls, start=1):
    for rows in range(start, start + calls):
        compiled(torch.randn(rows, 32)).sum().backward()


def _train_and_eval(compiled, rows=(8, 3)):
    """Four graphs under dynamic=False: training and no_grad evaluation, each with a last smaller batch."""
    for n in rows:
        compiled(torch.randn(n, 32)).sum().backward()
        with torch.no_grad():
            compiled(torch.randn(n, 32))


def test_recompiles_that_are_not_crossings_stop_at_dynamos_limit(fresh_limits):
    """Note [Recompiles within a bucket set]: a new batch size on every call under
    dynamic=False recompiles every time. Plain torch.compile stops at recompile_limit (8);
    agpe ran ~180 compiles of a 2-layer MLP before its crossing budget refused. It now refuses
    the 9th compile with the same layouts, naming Dynamo's reason."""
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 8})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    _new_batch_size_every_call(compiled, 8)
    assert backend.graph_count == 8
    for rows in (9, 10):  # a refused compile is not counted: the next refusal says the same
        with pytest.raises(Exception, match="refusing compile 9 of .* with the same density buckets") as info:
            _new_batch_size_every_call(compiled, 1, start=rows)
    message = str(info.value)
    assert "recompile_limit=8" in message and "dynamic=False" in message and "torch._dynamo.reset()" in message
    assert "size mismatch" in message  # Dynamo's own reason, when it gives one
    # the default's own shape recompiles are named too (helper audit CO)
    assert "dimension of size 0 or 1" in message and "no_grad evaluation" in message and "dynamic=True" in message


def test_recompiles_within_a_bucket_set_follow_the_users_limit_and_crossings_start_afresh(fresh_limits):
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 8})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    torch._dynamo.config.recompile_limit = 12  # the user allows 12 static shapes
    _new_batch_size_every_call(compiled, 12)
    set_random_masks(model, 0.25)
    assert rebucket(model)  # a crossing: a new bucket set, with its own 12
    _new_batch_size_every_call(compiled, 12)
    assert backend.graph_count == 24
    with pytest.raises(Exception, match="refusing compile 13 of .* same density buckets.*recompile_limit=12"):
        _new_batch_size_every_call(compiled, 1, start=13)


def test_counts_restart_after_dynamo_reset_and_explain_does_not_count(fresh_limits):
    """torch._dynamo.reset() reuses frame ids from 0: the counts of the frame compiled
    before it must not carry over. explain() compiles the frame once per call."""
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 8})
    compiled = torch.compile(model, backend=aot_backend(), dynamic=False)
    _new_batch_size_every_call(compiled, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_backend(), dynamic=False)
    _new_batch_size_every_call(compiled, 6)  # 12 compiles of frame id 0 in all, 6 since the reset
    for _ in range(10):
        agpe_compile.explain(model, torch.randn(6, 32))
    _new_batch_size_every_call(compiled, 2, start=7)  # compiles 7 and 8 of this bucket set


def test_counts_restart_after_a_reset_even_when_a_baseline_compiled_the_frame_more_often(fresh_limits):
    """Re-audit: agpe compiled a frame 5 times, then torch._dynamo.reset(), then a dense
    baseline of the same class compiled it 6 times (frame compile numbers 0-5): agpe's next
    compile (number 6) did not look like a restart, and its 4th was refused as the 9th."""
    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 8})
    _new_batch_size_every_call(torch.compile(model, backend=aot_backend(), dynamic=False), 5)
    torch._dynamo.reset()
    _new_batch_size_every_call(torch.compile(MLP((32, 32, 16)), backend="aot_eager", dynamic=False), 6, start=10)
    fresh = MLP((32, 32, 16))
    agpe_compile.prepare(fresh, options={"block_size": 8})
    _new_batch_size_every_call(torch.compile(fresh, backend=aot_backend(), dynamic=False), 8)


@pytest.mark.parametrize("first", ["explain", "another backend"])
def test_counts_restart_after_a_reset_whose_first_compile_is_not_agpe_training(fresh_limits, first):
    """Found by an audit: a loop of trials that reset Dynamo and first explain() the model,
    or first compile a dense baseline of the same class with another backend, was refused
    at its second trial ("compiled 9 times") though each trial compiles 4 graphs."""
    for trial in range(4):
        torch._dynamo.reset()
        model = MLP((32, 32, 16))
        agpe_compile.prepare(model, options={"block_size": 8})
        if first == "explain":
            agpe_compile.explain(model, torch.randn(8, 32))
        else:
            _train_and_eval(torch.compile(MLP((32, 32, 16)), backend="aot_eager", dynamic=False))
        _train_and_eval(torch.compile(model, backend=aot_backend(), dynamic=False))


def _compile_accepts(name):
    import inspect

    return name in inspect.signature(torch.compile).parameters


@pytest.mark.skipif(not _compile_accepts("isolate_recompiles"), reason="torch.compile has no isolate_recompiles")
def test_isolated_compiles_of_many_instances_are_counted_per_region(fresh_limits):
    """torch.compile(..., isolate_recompiles=True) (torch 2.13) gives each compiled model its
    own cache and limit: 12 instances of one class, each trained and evaluated, were refused
    at the 5th (an audit's finding); plain torch.compile runs all 12."""
    for _ in range(12):
        model = MLP((32, 32, 16))
        agpe_compile.prepare(model, options={"block_size": 8})
        compiled = torch.compile(model, backend=aot_backend(), isolate_recompiles=True)
        compiled(torch.randn(8, 32)).sum().backward()
        with torch.no_grad():
            compiled(torch.randn(8, 32))


@pytest.mark.skipif(not _compile_accepts("recompile_limit"), reason="torch.compile has no recompile_limit")
def test_a_per_call_recompile_limit_below_the_crossing_budget_is_refused(fresh_limits):
    """torch.compile(..., recompile_limit=N) (torch 2.13) puts Dynamo's limit back to N at each
    compile, undoing agpe's headroom: at the N+1-th compile Dynamo ran the frame eagerly and
    the layers unmasked, with no error (an audit's finding)."""
    from agpe_compile.buckets import recompile_budget

    model = MLP((32, 32, 16))
    agpe_compile.prepare(model, options={"block_size": 8})
    with pytest.raises(Exception, match=r"recompile_limit=2\) sets Dynamo's limit.*unmasked"):
        torch.compile(model, backend=aot_backend(), recompile_limit=2)(torch.randn(8, 32))
    enough = recompile_budget(2) + 2
    compiled = torch.compile(model, backend=aot_backend(), recompile_limit=enough, dynamic=False)
    for density in (0.5, 0.25):
        set_random_masks(model, density)
        assert rebucket(model)
        _train_and_eval(compiled)
