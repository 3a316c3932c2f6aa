"""Configurations the controller accepted but failed on later (found by fuzzing AGPEConfig):
floors and caps that do not fit the budget, checkpoints resumed under another config,
per-sample losses, saliency given to one side only, values that only look like floats."""

from __future__ import annotations

import fractions
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.controller.layer_budget import plan_counts
from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.ops.reference import expand_block_mask

from .helpers import TinyMLP, batches, make_run, train


# --- min_layer_share / max_layer_density: per-layer bounds rounded to whole blocks -------------------------

@pytest.mark.parametrize("share", [0.25, 0.5, 0.75, 1.0])
def test_floors_rounded_up_still_fit_the_budget(share):
    # three 4x4 grids at density 0.1: budget round(4.8) = 5 blocks; floors ceil(share * 1.6) may sum to 6
    grids = [(4, 4)] * 3
    counts = plan_counts([8, 8, 8], grids, [16] * 3, 0.1, True, "erk", [0.5, 0.3, 0.2], 0.3,
                         DEFAULT_BUCKETS, 1.0, share)
    assert sum(counts) == 5
    assert all(c >= 1 for c in counts)


def test_small_layers_at_one_block_each_fit_the_budget():
    counts = plan_counts([1, 81, 6], [(2, 1), (4, 32), (8, 1)], [8] * 3, 0.02, True, "erk", [0.3, 0.5, 0.2], 0.3,
                         DEFAULT_BUCKETS, 1.0, 0.5)
    assert sum(counts) == 3 and all(c >= 1 for c in counts)


def test_caps_rounded_down_still_hold_the_budget():
    # two 2-block layers under max_layer_density 0.9: floor(1.8) = 1 each, but the target needs 3 blocks
    counts = plan_counts([1, 1], [(1, 2), (2, 1)], [8, 8], 0.75, True, "erk", [0.6, 0.4], 0.3,
                         DEFAULT_BUCKETS, 0.9, 0.25)
    assert sum(counts) == 3 and all(1 <= c <= 2 for c in counts)


@pytest.mark.parametrize("policy", ["agpe", "snfs"])
def test_a_full_min_layer_share_trains_to_the_end(policy):
    config = AGPEConfig(target_sparsity=0.9, policy=policy, block_size=4, update_interval=5, end_step=60,
                        min_layer_share=1.0)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(70))  # raised "cannot split N blocks within bounds" before
    total = sum(s.grid[0] * s.grid[1] for s in sp.layers.values())
    assert sum(int(s.block_mask.sum()) for s in sp.layers.values()) == round(0.1 * total)


# --- values that are accepted must work to the end -----------------------------------------------------------

def test_real_numbers_of_other_types_become_floats(tmp_path):
    config = AGPEConfig(target_sparsity=np.float32(0.75), min_layer_share=fractions.Fraction(1, 2),
                        buckets=(np.float64(1.0), 0.5, fractions.Fraction(1, 4)), block_size=4,
                        update_interval=2, end_step=10, audit_path=str(tmp_path / "a.jsonl"))
    assert all(type(v) is float for v in (config.target_sparsity, config.min_layer_share, *config.buckets))
    json.dumps(config.to_dict())
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(4))  # the audit file is written: was "float32 is not JSON serializable"
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sum(r.get("step") in (2, 4) for r in records) == 2


INT_FIELDS = {"block_size": 8, "update_interval": 10, "begin_step": 5, "end_step": 7500, "protect_grown": 1,
              "patience": 3, "cooldown": 2, "max_backoffs": 1, "seed": 7}


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint16])
def test_numpy_integers_are_accepted_for_int_fields_and_stored_as_int(kind):
    # AGPEConfig(end_step=np.int64(10_000) * 3 // 4) was "got np.int64(7500); expected an int >= 0"
    config = AGPEConfig(**{field: kind(value) for field, value in INT_FIELDS.items()}, version=kind(1))
    for field, value in {**INT_FIELDS, "version": 1}.items():
        assert type(getattr(config, field)) is int and getattr(config, field) == value, field
    json.dumps(config.to_dict())
    assert AGPEConfig(end_step=np.int64(10_000) * 3 // 4).end_step == 7500


@pytest.mark.parametrize("field", sorted(INT_FIELDS))
@pytest.mark.parametrize("value", [True, np.float64(3.0), 3.0, fractions.Fraction(3, 1), "3"])
def test_bools_and_non_integers_are_still_refused_for_int_fields(field, value):
    with pytest.raises(ValueError, match=rf"AGPEConfig\.{field} got .*; expected an int >= "):
        AGPEConfig(**{field: value})


def test_out_of_range_seed_and_empty_audit_path_are_refused_at_construction():
    AGPEConfig(seed=2**64 - 1)
    with pytest.raises(ValueError, match=r"AGPEConfig.seed got 18446744073709551616"):
        AGPEConfig(seed=2**64)
    with pytest.raises(ValueError, match=r"AGPEConfig.audit_path got ''"):
        AGPEConfig(audit_path="")


def test_an_audit_path_that_is_a_directory_is_refused(tmp_path):
    for path in (str(tmp_path), str(tmp_path / "not_yet") + "/"):  # on every rank alike: in the config
        with pytest.raises(ValueError, match="AGPEConfig.audit_path got .*expected a file path, not a directory"):
            AGPEConfig(target_sparsity=0.5, block_size=4, audit_path=path)
    config = AGPEConfig(target_sparsity=0.5, block_size=4, audit_path=str(tmp_path / "later"))
    (tmp_path / "later").mkdir()  # made a directory after the config: the Sparsifier says so
    with pytest.raises(ValueError, match="is a directory"):
        make_run(config)


@pytest.mark.parametrize("policy", ["set", "rigl", "snfs"])
def test_a_window_without_a_mask_update_is_refused_for_every_updating_policy(policy):
    with pytest.raises(ValueError, match=rf"AGPEConfig.end_step got 100.*policy '{policy}' changes masks only"):
        AGPEConfig(policy=policy, target_sparsity=0.9, update_interval=200, end_step=100)
    with pytest.raises(ValueError, match=r"AGPEConfig.end_step got 150"):
        AGPEConfig(policy=policy, target_sparsity=0.9, update_interval=100, begin_step=100, end_step=150)
    AGPEConfig(policy=policy, target_sparsity=0.0, update_interval=200, end_step=100)  # nothing to prune


def test_static_with_an_initial_density_it_would_never_leave_is_refused():
    with pytest.raises(ValueError, match=r"initial_density got 0.5; expected None or the final density 0.1"):
        AGPEConfig(policy="static", initial_density=0.5, target_sparsity=0.9)
    AGPEConfig(policy="static", initial_density=0.1, target_sparsity=0.9)


# --- Sparsifier.step(loss) ----------------------------------------------------------------------------------

def test_a_per_sample_loss_is_refused_at_the_first_step():
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(target_sparsity=0.5, block_size=4, update_interval=10,
                                                    end_step=100))
    x, y = next(batches(1))
    loss = F.cross_entropy(cmodel(x), y, reduction="none")
    loss.mean().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"Sparsifier.step\(loss\) expects the scalar loss.*shape \(32,\)"):
        sp.step(loss)
    with pytest.raises(TypeError, match="expects a scalar tensor or number, got str"):
        sp.step("0.5")


def test_scalar_losses_of_any_kind_are_taken():
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(target_sparsity=0.5, block_size=4, update_interval=3,
                                                    end_step=100))
    for loss in (torch.tensor([2.0]), np.float32(2.0), 2):
        x, y = next(batches(1))
        F.cross_entropy(cmodel(x), y).backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
    assert sp.step_count == 3


# --- resuming under another config ----------------------------------------------------------------------------

def _checkpoint(config):
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(30))
    return model.state_dict(), sp.state_dict()


def test_resuming_with_another_target_goes_on_from_the_nearest_rung(caplog):
    weights, state = _checkpoint(AGPEConfig(target_sparsity=0.9, block_size=4, update_interval=2, end_step=40))
    assert state["target_density"] < 0.5
    config = AGPEConfig(target_sparsity=0.5, block_size=4, update_interval=2, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    model.load_state_dict(weights)
    with caplog.at_level(logging.WARNING, logger="agpe_compile.controller.checkpoint"):
        sp.load_state_dict(state)
    assert "differs from the Sparsifier's config in target_sparsity" in caplog.text
    assert "goes on from density 0.5" in caplog.text
    # the losses of the same run go on (docs/checkpoint-format.md), the counts start afresh
    saved = state["schedule_state"]
    assert saved["ref_loss"] is not None and saved["holds"] + saved["backoffs"] > 0
    refit = sp.schedule_state
    assert (refit.smoothed_loss, refit.ref_loss, refit.judged) == (saved["smoothed_loss"], saved["ref_loss"],
                                                                   saved["judged"])
    assert (refit.holds, refit.backoffs, refit.cooldown_left, refit.backed_off, refit.event) == (0, 0, 0, False,
                                                                                                 "resume")
    train(cmodel, opt, sp, batches(20))  # raised IndexError (rung past the shorter ladder) before
    assert sp.target_density in sp.policy.schedule().ladder


def test_resuming_another_policys_checkpoint_with_agpe_trains_on(caplog):
    weights, state = _checkpoint(AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=2,
                                            end_step=40))
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(target_sparsity=0.5, block_size=4, update_interval=2,
                                                    end_step=40))
    model.load_state_dict(weights)
    with caplog.at_level(logging.WARNING, logger="agpe_compile.controller.checkpoint"):
        sp.load_state_dict(state)
    assert "none saved: another policy" in caplog.text
    train(cmodel, opt, sp, batches(10))  # raised AttributeError on None.smoothed_loss before


def test_an_agpe_checkpoint_resumed_by_rigl_keeps_no_schedule_state():
    weights, state = _checkpoint(AGPEConfig(target_sparsity=0.5, block_size=4, update_interval=2, end_step=40))
    assert state["schedule_state"] is not None
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4,
                                                    update_interval=2, end_step=40))
    model.load_state_dict(weights)
    sp.load_state_dict(state)
    assert sp.schedule_state is None and sp.state_dict()["schedule_state"] is None


def test_a_changed_audit_path_keeps_the_schedule_state_as_saved(tmp_path):
    config = AGPEConfig(target_sparsity=0.9, block_size=4, update_interval=2, end_step=40)
    weights, state = _checkpoint(config)
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**{**config.to_dict(), "audit_path": str(tmp_path / "b.jsonl")}))
    model.load_state_dict(weights)
    sp.load_state_dict(state)
    assert sp.state_dict()["schedule_state"] == state["schedule_state"]


# --- non-finite weights in blocks an update drops ------------------------------------------------------------

def test_an_update_clears_nan_in_the_blocks_it_drops():
    # set, not rigl: the NaN weights make step 2's scores non-finite, and rigl (which regrows by
    # that step's dense gradient) holds such an update (Note [Intervals without a finite score])
    config = AGPEConfig(policy="set", target_sparsity=0.75, block_size=4, update_interval=2, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(1))
    before = {n: s.block_mask.clone() for n, s in sp.layers.items()}
    with torch.no_grad():
        for state in sp.layers.values():
            state.weight.fill_(float("nan"))  # live blocks: the ones the update drops keep their values
    train(cmodel, opt, sp, batches(1))  # step 2: an update
    assert any(bool((before[n] & ~s.block_mask).any()) for n, s in sp.layers.items())
    for state in sp.layers.values():
        inactive = ~expand_block_mask(state.block_mask, state.block_size, torch.bool)
        assert inactive.any()
        assert bool((state.weight.detach()[inactive] == 0).all())  # NaN * 0 was NaN


# --- saliency: the backend takes the Sparsifier's -------------------------------------------------------------

def test_the_backend_computes_the_sparsifiers_saliency_when_the_option_is_left_out():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, saliency="magnitude", block_size=4,
                                           update_interval=4, end_step=40))
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False})
    train(cmodel, opt, sp, batches(8))  # raised "compiled with saliency 'taylor'" at the first update before
    assert all(s.saliency_mode == "magnitude" for s in sp.layers.values())


def test_a_saliency_option_that_contradicts_the_sparsifier_fails_at_compile():
    torch.manual_seed(0)
    model = TinyMLP()
    sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),  # noqa: F841 (the layers' driver)
                    AGPEConfig(target_sparsity=0.5, saliency="magnitude", block_size=4))
    with pytest.raises(ValueError, match=r"option 'saliency' is 'gradient', but layer 'fc1' is driven by a "
                                         r"Sparsifier with AGPEConfig.saliency='magnitude'"):
        agpe_compile.AgpeBackend({"inductor": False, "saliency": "gradient"})._saliency_of(
            agpe_compile.layer_state(model.fc1))
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False, "saliency": "gradient"})
    with pytest.raises(Exception, match="option 'saliency' is 'gradient'"):
        cmodel(torch.randn(2, 16))


def test_two_models_of_one_class_under_sparsifiers_of_different_saliency_are_told_apart():
    runs = []
    for saliency in ("magnitude", "taylor"):
        torch.manual_seed(0)
        model = TinyMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, saliency=saliency, block_size=4,
                                               update_interval=4, end_step=40))
        runs.append((model, opt, sp, torch.compile(model, backend="agpe", options={"inductor": False})))
    model, opt, sp, cmodel = runs[0]
    train(cmodel, opt, sp, batches(4))
    model, opt, sp, cmodel = runs[1]  # Dynamo reuses the first model's graph (it computes magnitude)
    with pytest.raises(RuntimeError, match="another instance of the same class, whose layer differs in saliency mode"):
        train(cmodel, opt, sp, batches(1))  # failed only at the first update, blaming the compile order
