"""Note [Layouts a target had before]: a schedule that comes back to a target puts the layers
back in the layout buckets they had there, so its graphs stop growing (helper audit BY)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from agpe_compile.controller import AGPEConfig
from agpe_compile.controller.layer_budget import bucket_range, plan_counts
from agpe_compile.layout import bucket_for

from .helpers import batches, make_run

# Back off at every loss spike, prune at every stall: the target goes up and down all run.
OSCILLATING = dict(policy="agpe", target_sparsity=0.9, block_size=4, update_interval=2, end_step=10**6,
                   max_backoffs=1000, patience=1, cooldown=0)


def _oscillate(cmodel, opt, sp, steps, start=0, period=12, seed=0):
    """Train ``steps`` steps, feeding the Sparsifier a loss tripled every other ``period`` steps;
    returns the (target, layout buckets) seen after each step."""
    seen = []
    for i, (x, y) in enumerate(batches(steps, seed=seed), start=start):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss * (3.0 if (i // period) % 2 else 1.0))
        seen.append((sp.target_density, tuple(s.layout_bucket for s in sp.layers.values())))
    return seen


def test_bucket_range_is_the_counts_of_one_bucket():
    buckets = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.10, 0.05)
    assert bucket_range(0.35, 100, buckets) == (26, 35)
    assert bucket_range(0.05, 100, buckets) == (1, 5)  # the lowest bucket: from one block
    assert bucket_range(1.0, 100, buckets, cap=0.9) == (76, 90)
    assert bucket_range(0.15, 4, buckets) == (1, 0)  # no count of a 4-block layer is in it: empty
    for bucket in buckets:  # every count of the range has that bucket, and no other count has
        lo, hi = bucket_range(bucket, 100, buckets)
        assert [c for c in range(1, 101) if bucket_for(c / 100, buckets) == bucket] == list(range(lo, hi + 1))


def test_a_target_that_comes_back_keeps_each_layer_in_its_remembered_bucket():
    grids, sizes = [(10, 10), (10, 10)], [4, 4]
    buckets = (1.0, 0.5, 0.25)
    # free, the budget goes to layer 2's saliency (as in test_drop_grow); held to the buckets
    # the layers had at the last visit (0.5 and 0.5: counts 26..50 each), it moves inside them
    assert plan_counts([30, 30], grids, sizes, 0.3, True, "uniform", [0.0, 1.0], 1.0, buckets, 1.0) == [1, 59]
    held = plan_counts([30, 30], grids, sizes, 0.3, True, "uniform", [0.0, 1.0], 1.0, buckets, 1.0,
                       remembered=[(26, 50), (26, 50)])
    assert held == [26, 34]
    # remembered buckets that cannot hold the budget (60 blocks in at most 2 x 25) are ignored
    assert plan_counts([30, 30], grids, sizes, 0.3, True, "uniform", [0.0, 1.0], 1.0, buckets, 1.0,
                       remembered=[(1, 25), (1, 25)]) == [1, 59]
    # while the target stays put, the current buckets rule as before
    assert plan_counts([30, 30], grids, sizes, 0.3, False, "uniform", [0.0, 1.0], 1.0, buckets, 1.0,
                       remembered=[(1, 25), (51, 100)]) == [26, 34]


def test_an_oscillating_schedule_compiles_no_graph_after_its_first_cycles():
    torch._dynamo.reset()
    model, opt, sp, cmodel, backend = make_run(AGPEConfig(**OSCILLATING))
    seen = _oscillate(cmodel, opt, sp, 400)
    per_target = {}
    for target, layouts in seen:
        per_target.setdefault(target, set()).add(layouts)
    assert len(per_target) >= 4, per_target  # the schedule really went up and down the ladder
    backoffs = sp.schedule_state.backoffs
    assert backoffs >= 10, backoffs
    # one layout combination per target, whatever the number of returns
    assert all(len(sets) == 1 for sets in per_target.values()), per_target
    graphs = backend.graph_count
    more = _oscillate(cmodel, opt, sp, 200, start=400, seed=1)
    assert sp.schedule_state.backoffs > backoffs  # it kept oscillating
    assert {t for t, _ in more} <= set(per_target)
    assert backend.graph_count == graphs  # and compiled nothing new
    assert len({layouts for _, layouts in seen + more}) <= len(per_target)


def test_the_audit_says_when_remembered_layouts_held_the_plan(tmp_path):
    import json

    torch._dynamo.reset()
    path = tmp_path / "audit.jsonl"
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING, audit_path=str(path)))
    _oscillate(cmodel, opt, sp, 200)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    intervals = [r for r in records if r.get("event") == "interval"]
    recalled = [r for r in intervals if r["recalled_layouts"]]
    assert recalled and all(r["updated"] for r in recalled)
    assert not any(r["recalled_layouts"] for r in intervals if not r["updated"])
    first = {}
    for r in intervals:  # the first arrival at a target recalls nothing
        if r["updated"]:
            first.setdefault(r["target_density"], r)
    assert not any(r["recalled_layouts"] for r in first.values() if r["step"] > 2)


def _resumed(save_at, total, strip=False):
    """Train ``save_at`` steps, save, load into a fresh run, go on to ``total``."""
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING))
    _oscillate(cmodel, opt, sp, save_at)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
             "sparsifier": sp.state_dict()}
    if strip:  # as format 4 saved it
        saved["sparsifier"] = {k: v for k, v in saved["sparsifier"].items() if k != "layout_sets"}
        saved["sparsifier"]["format_version"] = 4
    torch._dynamo.reset()
    model2, opt2, sp2, cmodel2, _ = make_run(AGPEConfig(**OSCILLATING), seed=1)
    sp2.load_state_dict(saved["sparsifier"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    return _continue(cmodel2, opt2, sp2, save_at, total), sp2


def _straight(save_at, total):
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING))
    _oscillate(cmodel, opt, sp, save_at)
    return _continue(cmodel, opt, sp, save_at, total)


def _continue(cmodel, opt, sp, save_at, total):
    seen = []
    data = list(batches(total))[save_at:]
    for i, (x, y) in enumerate(data, start=save_at):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss * (3.0 if (i // 12) % 2 else 1.0))
        seen.append((sp.target_density, {n: s.block_mask.clone() for n, s in sp.layers.items()}))
    return seen


def _same_run(a, b):
    return len(a) == len(b) and all(ta == tb and all(torch.equal(ma[n], mb[n]) for n in ma)
                                    for (ta, ma), (tb, mb) in zip(a, b))


def test_the_remembered_layouts_resume_with_the_checkpoint():
    straight = _straight(80, 160)
    resumed, sp = _resumed(80, 160)
    assert _same_run(straight, resumed)
    assert len(sp.layout_sets) >= 3
    # Without them (a format-4 checkpoint) the resumed run remembers only the current target's
    # layouts, and here it comes back to another target and plans it differently: the field matters.
    older, _ = _resumed(80, 160, strip=True)
    assert not _same_run(straight, older)


@pytest.fixture(scope="module")
def saved():
    """A Sparsifier's state after 60 oscillating steps (three targets remembered)."""
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING))
    _oscillate(cmodel, opt, sp, 60)
    assert len(sp.layout_sets) >= 3
    return sp.state_dict()


def test_a_format_4_checkpoint_remembers_the_current_targets_layouts(saved):
    state = copy.deepcopy(saved)
    sets = {target: buckets for target, buckets in state["layout_sets"]}
    old = dict({k: v for k, v in state.items() if k != "layout_sets"}, format_version=4)
    *_, fresh, _, _ = make_run(AGPEConfig(**OSCILLATING))
    fresh.load_state_dict(old)
    assert fresh.layout_sets == {state["target_density"]: sets[state["target_density"]]}
    fresh.load_state_dict(state)
    assert fresh.layout_sets == sets


@pytest.mark.parametrize("damage", ["not a list", "not a pair", "unknown layer", "bucket above 1", "target a str"])
def test_malformed_layout_sets_are_refused_before_anything_changes(saved, damage):
    state = copy.deepcopy(saved)
    target, buckets = state["layout_sets"][0]
    state["layout_sets"] = {
        "not a list": {target: buckets},
        "not a pair": [[target]],
        "unknown layer": [[target, dict(buckets, fc9=0.5)]],
        "bucket above 1": [[target, dict(buckets, fc1=1.5)]],
        "target a str": [["0.5", buckets]],
    }[damage]
    *_, fresh, _, _ = make_run(AGPEConfig(**OSCILLATING))
    step, sets = fresh.step_count, dict(fresh.layout_sets)
    with pytest.raises(ValueError, match="malformed or incomplete .*layout_sets.*nothing was loaded"):
        fresh.load_state_dict(state)
    assert fresh.step_count == step and fresh.layout_sets == sets


def _masks_over(steps, monkeypatch=None):
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING))
    if monkeypatch is not None:  # the plan without the rule
        monkeypatch.setattr(type(sp), "_remembered_layouts", lambda self, views: None)
    return _continue(cmodel, opt, sp, 0, steps), sp


@pytest.mark.shipped_layout_buckets
def test_block_sizes_with_one_layout_bucket_plan_as_without_the_rule(monkeypatch):
    # Note [Buckets no path tells apart]: as shipped, blocks under 32 have the one layout
    # bucket 1.0, so remembered layouts hold nothing (the main job's block-8 MLP plans as before)
    with_rule, sp = _masks_over(120)
    assert set(sp.layout_sets[sp.target_density].values()) == {1.0}
    without, _ = _masks_over(120, monkeypatch)
    assert _same_run(with_rule, without)
    assert len({t for t, _ in with_rule}) >= 4  # (it did go up and down the ladder)


def test_with_every_bucket_a_layout_the_rule_changes_the_plan(monkeypatch):
    # (the suite's default: blocks of 4 take every bucket) the comparison above can fail
    with_rule, _ = _masks_over(120)
    without, _ = _masks_over(120, monkeypatch)
    assert not _same_run(with_rule, without)


def test_a_plan_the_remembered_buckets_cannot_hold_is_not_called_recalled(monkeypatch, tmp_path):
    # helper audit CK: the audit said "recalled" whenever a memo existed, also when the plan
    # had to ignore it
    import json

    torch._dynamo.reset()
    path = tmp_path / "audit.jsonl"
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(**OSCILLATING, audit_path=str(path)))
    monkeypatch.setattr(type(sp), "_remembered_layouts",
                        lambda self, views: [(1, 1)] * len(views) if self.layout_sets else None)
    _oscillate(cmodel, opt, sp, 120)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    moved = [r for r in records if r.get("event") == "interval" and r["updated"] and r["step"] > 2
             and r["schedule"].split(":")[0] in ("prune", "backoff")]
    assert moved and not any(r["recalled_layouts"] for r in records if r.get("event") == "interval")


def test_policies_that_split_by_the_distribution_remember_nothing():
    # helper audit CK: GMP's target moves at every update, so each added an entry to the
    # checkpoint that no plan reads
    torch._dynamo.reset()
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(policy="gmp", target_sparsity=0.9, block_size=4,
                                                    update_interval=2, end_step=60))
    _continue(cmodel, opt, sp, 0, 40)
    assert sp.target_density < 0.9 and sp.layout_sets == {} and sp.state_dict()["layout_sets"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_targets_and_buckets_load_as_the_values_they_stand_for(saved, dtype):
    # helper audit CK: float32 0.05 (0.0500000007) was read as bucket 0.1, and a float32
    # target matched no rung of the schedule (re-audit CL: float16 too)
    state = copy.deepcopy(saved)
    state["layout_sets"] = [[torch.tensor(target, dtype=dtype), {n: torch.tensor(b, dtype=dtype)
                                                                 for n, b in buckets.items()}]
                            for target, buckets in saved["layout_sets"]]
    assert any(float(b) != b0 for (_, bs), (_, bs0) in zip(state["layout_sets"], saved["layout_sets"])
               for b, b0 in zip(bs.values(), bs0.values()))  # (the float32 copies do differ)
    *_, fresh, _, _ = make_run(AGPEConfig(**OSCILLATING))
    fresh.load_state_dict(state)
    assert fresh.layout_sets == {target: buckets for target, buckets in saved["layout_sets"]}
