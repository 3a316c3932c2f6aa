"""A model state dict loaded alone under a live Sparsifier (Note [Counters a model load rewrites])."""

import copy
import gc
import io
import logging

import pytest
import torch
import torch.nn.functional as F

from agpe_compile.controller import AGPEConfig
from agpe_compile.controller.model_loads import _AfterLoad, _BeforeLoad

from .helpers import batches, make_run, train

ROWS = 32  # rows per batch (helpers.batches)


def _recording(sp):
    """Record every accountant.add(name, rows, active, scored_rows) call."""
    calls = []
    add = sp.accountant.add

    def record(name, rows, active, scored_rows=0):
        calls.append((name, rows, active, scored_rows))
        add(name, rows, active, scored_rows)

    sp.accountant.add = record
    return calls


def _rollback_run(read_before_load: bool):
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    initial = copy.deepcopy(model.state_dict())
    train(cmodel, opt, sp, batches(14))  # intervals at 4, 8, 12: two steps not yet accounted
    if read_before_load:
        sp.flops
    model.load_state_dict(initial)  # counters back to 0, masks back to the initial ones
    train(cmodel, opt, sp, batches(8, seed=1))
    return sp.flops


def test_rows_before_a_rollback_of_the_model_alone_are_counted_once_at_their_masks():
    # re-audits BI, BJ, BK: the rows since the last snapshot were lost (or counted from zero)
    read, unread = _rollback_run(True), _rollback_run(False)
    for name, layer in unread.layers.items():
        assert layer.rows == 22 * ROWS, name
    assert unread.layers == read.layers  # whether or not flops was read before the load


def test_a_model_state_of_a_longer_run_adds_no_rows_that_did_not_run():
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    other, other_opt, other_sp, other_c, _ = make_run(config)
    train(other_c, other_opt, other_sp, batches(20))
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(6))
    model.load_state_dict(other.state_dict())  # counters jump from 6 to 20 batches
    train(cmodel, opt, sp, batches(4, seed=1))
    for name, layer in sp.flops.layers.items():
        assert layer.rows == 10 * ROWS, name


def test_scored_rows_before_a_load_are_counted():
    # RigL scores the dense gradient on the step before each update: a backward of that step
    # before the load and one after are both scored
    config = AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=4, end_step=40,
                        initial_density=0.5)
    model, opt, sp, cmodel, _ = make_run(config)
    initial = copy.deepcopy(model.state_dict())
    train(cmodel, opt, sp, batches(7))
    assert sp._flag_on
    calls = _recording(sp)
    (x, y), (x2, y2) = batches(2, seed=3)
    F.cross_entropy(cmodel(x), y).backward()  # scored, then the model rolls back
    model.load_state_dict(initial)
    F.cross_entropy(cmodel(x2), y2).backward()  # scored
    opt.step()
    opt.zero_grad()
    sp.step()  # step 8: the update
    for name in sp.layers:  # steps 5-7 and the two backward passes; the two scored
        assert sum(c[1] for c in calls if c[0] == name) == 5 * ROWS, name
        assert sum(c[3] for c in calls if c[0] == name) == 2 * ROWS, name


def test_calls_skipped_before_a_load_are_still_reported(caplog):
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=4, end_step=40,
                        initial_density=0.5)
    model, opt, sp, cmodel, _ = make_run(config)
    initial = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for i, (x, y) in enumerate(batches(8)):
            if i == 4:
                x = torch.full_like(x, float("nan"))  # step 5: its scores are skipped
            loss = F.cross_entropy(cmodel(x), y)
            loss.backward()
            if i != 4:
                opt.step()
            opt.zero_grad()
            sp.step(loss)
            if i == 5:
                model.load_state_dict(initial)  # counters[1] back to 0
    assert "1 backward call(s) had non-finite scores" in caplog.text


def _load_hooks(module):
    pre = [h for h in module._load_state_dict_pre_hooks.values() if isinstance(getattr(h, "hook", h), _BeforeLoad)]
    post = [h for h in module._load_state_dict_post_hooks.values() if isinstance(h, _AfterLoad)]
    return pre, post


def test_load_hooks_go_with_close_and_a_dropped_sparsifier_and_not_with_a_copy():
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    assert all(len(hooks) == 1 for hooks in _load_hooks(model.fc1))
    copy.deepcopy(sp).close()  # the copy's handles must not remove the original's hooks
    assert all(len(hooks) == 1 for hooks in _load_hooks(model.fc1))
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a pickled module carries inert hooks
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.load_state_dict(model.state_dict())
    sp.close()
    assert _load_hooks(model.fc1) == ([], [])
    model, opt, sp, cmodel, _ = make_run(config)
    del sp
    gc.collect()
    assert _load_hooks(model.fc1) == ([], [])


def _straight_rows(config, data):
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, data)
    return {n: layer.rows for n, layer in sp.flops.layers.items()}


def test_a_resume_counts_the_same_rows_in_either_load_order_and_format():
    # re-audit BN F1: a format-3 checkpoint (no layer buffers) loaded Sparsifier first lost the
    # rows between the last snapshot and the save
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    data = list(batches(16))
    straight = _straight_rows(config, data)
    for version in (4, 3):
        for sparsifier_first in (True, False):
            torch._dynamo.reset()
            model, opt, sp, cmodel, _ = make_run(config)
            train(cmodel, opt, sp, data[:10])  # interval at 8: steps 9 and 10 not yet accounted
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
            if version == 3:
                saved["sp"].pop("layer_buffers")
                saved["sp"]["format_version"] = 3
            torch._dynamo.reset()
            model, opt, sp, cmodel, _ = make_run(config)
            if sparsifier_first:
                sp.load_state_dict(saved["sp"])
                model.load_state_dict(saved["model"])
            else:
                model.load_state_dict(saved["model"])
                sp.load_state_dict(saved["sp"])
            opt.load_state_dict(saved["opt"])
            train(cmodel, opt, sp, data[10:])
            assert {n: layer.rows for n, layer in sp.flops.layers.items()} == straight, (version, sparsifier_first)


def test_a_rollback_to_the_current_step_does_not_count_the_thrown_away_batch(caplog):
    # re-audit BN F2: Sparsifier first, the discarded (here NaN) batch's rows and skipped call counted
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    data = list(batches(16))
    straight = _straight_rows(config, data)
    for sparsifier_first in (True, False):
        torch._dynamo.reset()
        model, opt, sp, cmodel, _ = make_run(config)
        train(cmodel, opt, sp, data[:10])
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
        x, y = next(batches(1, seed=7))
        F.cross_entropy(cmodel(torch.full_like(x, float("nan"))), y).backward()  # diverged: thrown away
        opt.zero_grad()
        if sparsifier_first:
            sp.load_state_dict(saved["sp"])
            model.load_state_dict(saved["model"])
        else:
            model.load_state_dict(saved["model"])
            sp.load_state_dict(saved["sp"])
        opt.load_state_dict(saved["opt"])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agpe_compile"):
            train(cmodel, opt, sp, data[10:])
        assert {n: layer.rows for n, layer in sp.flops.layers.items()} == straight, sparsifier_first
        assert "non-finite scores" not in caplog.text, sparsifier_first


def test_a_load_that_raised_leaves_no_stale_snapshot_for_the_next_one():
    # re-audit BN F3: the next load without counters used the failed load's pre-load counters
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(6))

    def refuse(module, *args):
        raise ValueError("checkpoint incompatible")

    handle = model.fc3.register_load_state_dict_pre_hook(refuse)
    with pytest.raises(ValueError, match="incompatible"):
        model.load_state_dict(model.state_dict())
    handle.remove()
    train(cmodel, opt, sp, batches(4, seed=1))
    model.load_state_dict({"fc3.bias": model.fc3.bias.detach().clone()}, strict=False)  # no counters in it
    assert all(layer.rows == 10 * ROWS for layer in sp.flops.layers.values())


def test_another_checkpoints_model_after_a_whole_resume_is_an_accounting_point():
    # re-audit BP F1: the mark the Sparsifier's load left skipped this load too: phantom rows
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    data = list(batches(16))
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, data[:10])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    other, other_opt, other_sp, other_c, _ = make_run(config)
    train(other_c, other_opt, other_sp, batches(20, seed=5))
    model, opt, sp, cmodel, _ = make_run(config)
    model.load_state_dict(saved["model"])
    sp.load_state_dict(saved["sp"])
    opt.load_state_dict(saved["opt"])
    model.load_state_dict(other.state_dict())  # a longer run's weights, loaded alone
    train(cmodel, opt, sp, data[10:14])
    assert all(layer.rows == 14 * ROWS for layer in sp.flops.layers.values())


def test_reading_flops_between_the_sparsifiers_load_and_the_models_changes_nothing():
    # re-audit BP F2: the read cleared the mark and took the stale counters as the snapshot
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    data = list(batches(16))
    straight = _straight_rows(config, data)
    for version in (4, 3):
        torch._dynamo.reset()
        model, opt, sp, cmodel, _ = make_run(config)
        train(cmodel, opt, sp, data[:10])
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
        if version == 4:  # a rollback at the same step, after a thrown-away batch
            x, y = next(batches(1, seed=7))
            F.cross_entropy(cmodel(x), y).backward()
            opt.zero_grad()
        else:  # a resume in a new run from a checkpoint without layer buffers (its counters behind)
            saved["sp"].pop("layer_buffers")
            saved["sp"]["format_version"] = 3
            torch._dynamo.reset()
            model, opt, sp, cmodel, _ = make_run(config)
        sp.load_state_dict(saved["sp"])
        sp.flops
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train(cmodel, opt, sp, data[10:])
        assert {n: layer.rows for n, layer in sp.flops.layers.items()} == straight, version


def test_a_sparsifier_state_is_not_saved_while_a_format_3_resume_waits_for_the_model():
    # re-audit BQ F3: the save wrote the fresh model's counters and zero sums as the checkpoint's
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(10))
    saved = copy.deepcopy({"model": model.state_dict(), "sp": sp.state_dict()})
    saved["sp"].pop("layer_buffers")
    saved["sp"]["format_version"] = 3
    model, opt, sp, cmodel, _ = make_run(config)
    sp.load_state_dict(saved["sp"])
    with pytest.raises(RuntimeError, match="Load the model's state_dict .* first"):
        sp.state_dict()
    model.load_state_dict(saved["model"])
    assert sp.state_dict()["layer_buffers"]["fc1"]["counters"].tolist() == saved["model"][
        "fc1.weight_saliency_counters"].tolist()


def test_a_flops_read_right_after_a_whole_resume_counts_the_checkpoints_last_rows():
    # re-audit BQ F1: model then Sparsifier, then flops: the rows between the last interval and
    # the save were left out until the first step
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(10))
    expected = {n: layer.rows for n, layer in sp.flops.layers.items()}
    saved = copy.deepcopy({"model": model.state_dict(), "sp": sp.state_dict()})
    model, opt, sp, cmodel, _ = make_run(config)
    model.load_state_dict(saved["model"])
    sp.load_state_dict(saved["sp"])
    assert {n: layer.rows for n, layer in sp.flops.layers.items()} == expected == {n: 10 * ROWS for n in expected}


@pytest.mark.parametrize("case", ["same-step rollback", "earlier-step rollback", "warm-up batches"])
@pytest.mark.parametrize("read_between", [False, True])
def test_a_format_3_state_loaded_first_counts_no_rows_of_counters_it_does_not_know(case, read_between):
    # re-audit BR: a checkpoint without layer buffers, loaded before the model, into layers whose
    # counters are at or past its snapshot: the rows behind them (thrown away, rolled back, or
    # warm-up batches of a fresh model) were counted at the model's load
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    data = list(batches(16))
    straight = _straight_rows(config, data)
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, data[:10])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    saved["sp"].pop("layer_buffers")
    saved["sp"]["format_version"] = 3
    if case == "same-step rollback":
        x, y = next(batches(1, seed=7))
        F.cross_entropy(cmodel(x), y).backward()
        opt.zero_grad()
    elif case == "earlier-step rollback":
        train(cmodel, opt, sp, batches(3, seed=7))
    else:
        torch._dynamo.reset()
        model, opt, sp, cmodel, _ = make_run(config)
        for x, y in batches(12, seed=3):
            F.cross_entropy(cmodel(x), y).backward()
            opt.zero_grad()
    sp.load_state_dict(saved["sp"])
    if read_between:
        sp.flops
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(cmodel, opt, sp, data[10:])
    assert {n: layer.rows for n, layer in sp.flops.layers.items()} == straight


def test_another_runs_model_after_a_format_3_rollback_is_an_accounting_point():
    # re-audit BS F1: any counters at or past the snapshot were taken for the checkpoint's own,
    # so a longer run's model (its counters past the live ones) added rows that never ran here
    config = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=4, end_step=40)
    other, other_opt, other_sp, other_c, _ = make_run(config)
    train(other_c, other_opt, other_sp, batches(20, seed=5))
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(10))
    saved = copy.deepcopy(sp.state_dict())
    saved.pop("layer_buffers")
    saved["format_version"] = 3
    train(cmodel, opt, sp, batches(2, seed=1))
    sp.load_state_dict(saved)  # back to step 10's controller state, then another run's weights
    model.load_state_dict(other.state_dict())
    train(cmodel, opt, sp, batches(4, seed=2))
    assert all(layer.rows == 16 * ROWS for layer in sp.flops.layers.values())
