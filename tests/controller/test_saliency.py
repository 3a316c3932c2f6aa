"""Saliency EMAs from the backward's buffers; NaN/inf never reach scores or masks."""

import logging

import pytest
import torch

from agpe_compile.controller import AGPEConfig, SaliencyEMA, Sparsifier
from agpe_compile.controller.saliency import next_ema

from .helpers import batches, make_run


def test_ema_golden_and_fresh_blocks():
    ema = SaliencyEMA(decay=0.5)
    ema.add_layer("fc", (1, 3))
    assert ema.update("fc", torch.tensor([[4.0, 2.0, 0.0]]), steps=2)       # first interval: mean
    assert ema.values["fc"].tolist() == [[2.0, 1.0, 0.0]]
    ema.mark_fresh("fc", torch.tensor([[False, False, True]]))               # block 2 regrown
    assert ema.update("fc", torch.tensor([[0.0, 4.0, 6.0]]), steps=2)
    # 0.5 * 2 + 0.5 * 0 = 1;  0.5 * 1 + 0.5 * 2 = 1.5;  fresh: 3
    assert ema.values["fc"].tolist() == [[1.0, 1.5, 3.0]]
    assert next_ema(torch.tensor([1.0]), torch.tensor([False]), torch.tensor([3.0]), 0.75).tolist() == [1.5]


def test_non_finite_interval_is_skipped_and_logged(caplog):
    ema = SaliencyEMA(decay=0.5)
    ema.add_layer("fc", (1, 2))
    ema.update("fc", torch.tensor([[2.0, 2.0]]), steps=1)
    with caplog.at_level(logging.WARNING):
        assert not ema.update("fc", torch.tensor([[float("inf"), 1.0]]), steps=1)
    assert ema.values["fc"].tolist() == [[2.0, 2.0]]
    assert "fc: saliency sum is not finite; interval skipped" in caplog.text


def test_nan_gradients_skip_scores_and_keep_masks_valid(caplog):
    """A batch with NaN inputs: the backward skips its scores (counters[1]), the controller
    logs it, EMAs stay finite and the update still produces exact, finite masks."""
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=4, end_step=40,
                        initial_density=0.5)
    model, opt, sp, cmodel, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        for i, (x, y) in enumerate(batches(8)):
            if i == 2:
                x = torch.full_like(x, float("nan"))
            loss = torch.nn.functional.cross_entropy(cmodel(x), y)
            loss.backward()
            if i != 2:  # a real loop would skip the step too (or a GradScaler would)
                opt.step()
            opt.zero_grad()
            sp.step(loss)
    assert "backward call(s) had non-finite scores; their scores were skipped" in caplog.text
    for name, state in sp.layers.items():
        assert int(state.counters[1]) == 1
        assert torch.isfinite(sp.saliency.values[name]).all()
    assert sp.global_density == 0.5  # exact budget after two updates (steps 4 and 8)
    assert sp.step_count == 8  # each step() call counts, the skipped optimizer step too


def _overflowing_run(config, overflowing, steps, zero_fc1=False, zero_fc2=False):
    """Steps in ``overflowing`` overflow: their backward skips the scores and, like a
    GradScaler, the loop skips the optimizer step. Returns the Sparsifier and the masks
    after each step."""
    model, opt, sp, cmodel, _ = make_run(config)
    if zero_fc1:  # a zero-initialised layer: its taylor scores are exactly 0 on finite calls too
        with torch.no_grad():
            model.fc1.weight.zero_()
    if zero_fc2:  # no gradient reaches fc1: its dense-gradient scores are exactly 0 on finite calls
        with torch.no_grad():
            model.fc2.weight.zero_()
    masks = []
    for i, (x, y) in enumerate(batches(steps), start=1):
        loss = torch.nn.functional.cross_entropy(cmodel(x), y)
        if i in overflowing:
            (loss * float("inf")).backward()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
        sp.step(None if i in overflowing else loss.detach())
        masks.append({name: state.block_mask.clone() for name, state in sp.layers.items()})
    return sp, masks


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_an_update_after_an_interval_without_one_finite_score_holds_the_masks(caplog):
    """Note [Intervals without a finite score]: a GradScaler that skips the first steps of an
    fp16 run (every call overflows) left all-zero sums, and the update pruned and regrew on them."""
    config = AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=4, end_step=12)
    with caplog.at_level(logging.WARNING):
        sp, masks = _overflowing_run(config, overflowing=range(1, 5), steps=8)
    assert "Sparsifier update at step 4 held: the scores it decides on were not finite for fc1, fc2, fc3" in caplog.text
    assert _same(masks[3], masks[2])  # held: nothing swapped on zero scores
    assert not _same(masks[7], masks[6])  # step 8 swaps on real scores
    assert "step 8 held" not in caplog.text


def test_the_window_last_update_and_score_blind_policies_are_not_held(caplog):
    # the last update before end_step decides on the earlier scores (the target is reached);
    # gmp never reads the scores: it is never held
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=4, end_step=8)
    with caplog.at_level(logging.WARNING):
        sp, _ = _overflowing_run(config, overflowing=range(5, 9), steps=8)
    assert "update at step 8 not held" in caplog.text and "last update of the end_step window" in caplog.text
    assert sp.global_density == pytest.approx(0.5, abs=0.02)
    caplog.clear()
    config = AGPEConfig(policy="gmp", target_sparsity=0.5, block_size=4, update_interval=4, end_step=12)
    with caplog.at_level(logging.WARNING):
        _, masks = _overflowing_run(config, overflowing=range(1, 5), steps=4)
    assert "held" not in caplog.text and not _same(masks[3], masks[2])


def test_rigl_holds_when_the_update_step_overflowed_and_at_the_window_end(caplog):
    # rigl regrows by the update step's dense gradient alone: one overflowing update step left
    # all-zero regrowth scores, and it regrew blocks in raster order; its density never moves,
    # so the window's last update is held too
    config = AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=4, end_step=8)
    with caplog.at_level(logging.WARNING):
        _, masks = _overflowing_run(config, overflowing={4, 8}, steps=8)
    assert "update at step 4 held" in caplog.text and "update at step 8 held" in caplog.text
    assert _same(masks[3], masks[2]) and _same(masks[7], masks[6])


def test_the_window_last_update_regrows_nothing_on_overflowed_regrowth_scores(caplog):
    # not held (the target is not reached yet), it pruned to the target and regrew blocks in
    # raster order on the all-zero scores of its overflowing update step (re-audit AF)
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=4, end_step=11,
                        initial_density=0.75, drop_fraction=0.3)
    with caplog.at_level(logging.WARNING):
        sp, masks = _overflowing_run(config, overflowing={8}, steps=8)
    assert "update at step 8 not held" in caplog.text
    assert "regrows no block in the layers whose regrowth scores overflowed" in caplog.text
    assert all(not (masks[7][n] & ~masks[6][n]).any() for n in masks[7])  # pruned only
    assert sp.global_density == 0.5  # the target is still reached


def test_a_layer_without_regrowth_scores_passes_its_share_to_the_others():
    from agpe_compile.controller.layer_budget import plan_counts

    args = ([4, 4], [(2, 4), (2, 4)], [4, 4], 0.5, True, "uniform", [1.0, 3.0], 1.0, (1.0, 0.5, 0.25), 1.0)
    assert plan_counts(*args) == [2, 6]  # the budget moves towards the second layer's scores
    assert plan_counts(*args, no_growth=[False, True]) == [4, 4]  # it has no scores to regrow by
    assert plan_counts(*args, no_growth=[True, False]) == [2, 6]
    # tiny layers under max_layer_density: the plan raises their rounded-down caps to hold the
    # budget, and the layers that take a blind layer's share may go there too (20 of 21 before)
    from agpe_compile.layout import DEFAULT_BUCKETS

    tiny = ([2, 3, 3, 2, 2, 2, 2, 2, 2, 2], [(1, 3)] * 10, [16] * 10, 0.7, True, "erk", [50.0] + [1.0] * 9, 0.5,
            DEFAULT_BUCKETS, 0.75)
    assert sum(plan_counts(*tiny)) == sum(plan_counts(*tiny, no_growth=[True] + [False] * 9)) == 21
    # ... but max_layer_density holds for layers it does not round down (re-audit AK: 100 of 100 at cap 0.8)
    capped = ([10, 75, 75], [(10, 10)] * 3, [16] * 3, 0.8, True, "uniform", [50.0, 1.0, 1.0], 0.5,
              DEFAULT_BUCKETS, 0.8)
    assert plan_counts(*capped, no_growth=[True, False, False]) == [10, 80, 80]


def test_an_overflow_before_the_update_step_does_not_hold_rigl(caplog):
    # regrowth reads the update step alone: skips counted over the whole interval held every
    # layer when an earlier step overflowed and fc1's update-step gradient was legitimately 0
    config = AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=2, end_step=8)
    with caplog.at_level(logging.WARNING):
        _, masks = _overflowing_run(config, overflowing={1}, steps=2, zero_fc2=True)
    assert "held" not in caplog.text
    assert not _same(masks[1], masks[0])


def test_a_zero_layer_with_one_overflowing_step_is_not_taken_for_blind(caplog):
    # one of two calls overflowed and the layer scores 0 on the other (W = 0): that is a score
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=2, end_step=8, patience=1)
    with caplog.at_level(logging.WARNING):
        sp, masks = _overflowing_run(config, overflowing={1}, steps=2, zero_fc1=True)
    assert "held" not in caplog.text
    assert int(sp.layers["fc1"].counters[1]) == 1


def test_an_interval_without_a_finite_loss_holds_the_schedule(caplog):
    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=100, patience=1)
    _, opt, sp, _, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        for _ in range(6):  # three intervals, every loss NaN: before, patience 1 pruned at each
            opt.step()  # one training step = one optimizer step (no gradients here: nothing moves)
            sp.step(torch.tensor(float("nan")))
    assert ("training loss was not finite on any of the last interval's 2 steps: not used as feedback (policy "
            "'agpe' holds its target unless its end_step deadline prunes)") in caplog.text
    assert sp.schedule_state.smoothed_loss is None
    assert sp.schedule_state.event == "hold:nonfinite" and sp.target_density == 1.0


def test_an_interval_loss_is_the_mean_of_its_finite_steps(caplog, tmp_path):
    # One NaN step used to discard the whole interval's mean (99 good losses of 100).
    import json

    config = AGPEConfig(policy="agpe", block_size=4, update_interval=4, end_step=100, audit_path=str(tmp_path / "a.jsonl"))
    _, opt, sp, _, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        for value in (1.0, float("inf"), 2.0, 3.0):
            opt.step()
            sp.step(torch.tensor(value))
    assert "not finite on 1 of the last interval's 4 steps; the interval's loss is the mean of the other 3" in caplog.text
    assert sp.schedule_state.smoothed_loss == 2.0
    record = [json.loads(line) for line in open(tmp_path / "a.jsonl")][-1]
    assert record["loss"] == 2.0


@pytest.mark.parametrize("bad", [torch.tensor(True), torch.tensor(1.0 + 2.0j), torch.empty((), device="meta")],
                         ids=["bool", "complex", "meta"])
def test_step_refuses_losses_that_are_not_real_numbers(bad):
    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=100)
    _, _, sp, _, _ = make_run(config)
    with pytest.raises(TypeError, match="expects a real scalar loss"):
        sp.step(bad)
    assert sp.step_count == 0


def test_step_refuses_a_numpy_bool_like_a_python_bool():
    import numpy as np

    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=100)
    _, _, sp, _, _ = make_run(config)
    with pytest.raises(TypeError, match="expects a scalar tensor or number"):
        sp.step(np.bool_(True))


def test_a_policy_that_ignores_the_loss_does_not_claim_to_hold(caplog):
    # The warning said "the adaptive schedule holds" while gmp went on pruning.
    config = AGPEConfig(policy="gmp", block_size=4, update_interval=2, end_step=100)
    _, opt, sp, _, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            opt.step()
            sp.step(torch.tensor(float("nan")))
    assert "not used as feedback (policy 'gmp' does not use the loss)" in caplog.text
    assert "holds" not in caplog.text


def test_movement_saliency_gives_no_regret_signal():
    # Movement scores can be negative: the dropped-over-active ratio came out at -3.95, -78.
    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=20, saliency="movement")
    model, opt, sp, cmodel, _ = make_run(config)
    signals = []
    for x, y in batches(20):
        loss = torch.nn.functional.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        signals.append(sp.pruned_saliency)
    assert sp.global_density < 1.0 and signals == [None] * 20


def test_saliency_mode_mismatch_between_a_graph_compiled_before_the_sparsifier_and_config_raises():
    import pytest
    import torch.nn.functional as F

    import agpe_compile
    from .helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 4}))
    (x, y), = list(batches(1))
    F.cross_entropy(cmodel(x), y).backward()  # compiled before any Sparsifier: the default, "taylor"
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=2, end_step=20,
                        saliency="gradient")
    sp = Sparsifier(model, opt, config)
    assert {s.saliency_mode for s in sp.layers.values()} == {"taylor"}
    with pytest.raises(ValueError, match=r"compiled with saliency 'taylor' but AGPEConfig.saliency is 'gradient': "
                                         r"its graph was compiled before this Sparsifier"):
        for _ in range(config.update_interval):
            F.cross_entropy(cmodel(x), y).backward()
            opt.step()
            sp.step(torch.tensor(1.0))
