"""Each policy on hand-worked 8-block layers: exact masks for given scores and fractions,
exact counts; then, through a compiled model, pruned blocks stay exactly zero in weights,
gradients and optimizer moments, and regrown blocks start from zero."""

import pytest
import torch
from torch import nn

from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.ops.reference import expand_block_mask

import agpe_compile
from agpe_compile.controller.init_layouts import random_block_mask
from agpe_compile.controller.layer_budget import without_growth

from .helpers import TinyMLP, batches, inactive_elements, make_run, train

T, F = True, False
MASK = [[T, T, F, F], [T, F, T, F]]          # 4 of 8 blocks active, grid 2 x 4, block 2
MAGNITUDE = [[1.0, 2, 0, 0], [3, 0, 4, 0]]   # per-element value of each active block
DENSE_GRAD = [[0.0, 0, 5, 1], [0, 7, 0, 3]]  # dense_grad_sq of the inactive blocks


def blocks(values, b=2):
    return torch.tensor(values).repeat_interleave(b, 0).repeat_interleave(b, 1)


def one_layer(policy, **overrides):
    """A bias-free 8 -> 4 linear layer (grid 2 x 4) set to MASK / MAGNITUDE, momentum 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # drop_fraction 0.5 at step 1 of a 10^9-step cosine is exactly 0.5: swap 2 of 4 blocks.
    values = dict(policy=policy, target_sparsity=0.5, block_size=2, update_interval=1, end_step=10**9,
                  drop_fraction=0.5, distribution="uniform", buckets=(1.0,))
    values.update(overrides)
    sp = Sparsifier(model, opt, AGPEConfig(**values))
    state = sp.layers["0"]
    with torch.no_grad():
        state.block_mask.copy_(torch.tensor(MASK))
        state.weight.copy_(blocks(MAGNITUDE))
    opt.state[state.weight]["momentum_buffer"] = torch.ones_like(state.weight)
    state.dense_grad_sq.copy_(torch.tensor(DENSE_GRAD))
    return sp, state, opt


def test_rigl_drops_smallest_magnitude_and_grows_largest_dense_gradient():
    sp, state, opt = one_layer("rigl")
    sp.step(torch.tensor(1.0))
    # drop (0,0) and (0,1) (magnitudes 1, 2); grow (1,1) and (0,2) (dense grads 7, 5)
    assert state.block_mask.tolist() == [[F, F, T, F], [T, T, T, F]]
    weight = state.weight.detach()
    assert torch.equal(weight, blocks([[0.0, 0, 0, 0], [3, 0, 4, 0]]))  # dropped zeroed, grown start at 0
    momentum = opt.state[state.weight]["momentum_buffer"]
    assert torch.equal(momentum, blocks([[0.0, 0, 0, 1], [1, 0, 1, 1]]))  # changed blocks reset


def test_set_drops_like_rigl_and_regrows_at_random_seeded():
    masks = []
    for _ in range(2):
        sp, state, _ = one_layer("set", seed=7)
        sp.step(torch.tensor(1.0))
        masks.append(state.block_mask.clone())
    mask = masks[0]
    assert torch.equal(masks[0], masks[1])
    assert int(mask.sum()) == 4
    assert not mask[0, 0] and not mask[0, 1]                  # dropped, never regrown at once
    assert mask[1, 0] and mask[1, 2]                          # kept
    grown = mask & ~torch.tensor(MASK)
    assert int(grown.sum()) == 2


def test_agpe_drops_by_saliency_not_magnitude():
    sp, state, _ = one_layer("agpe", initial_density=0.5)
    state.saliency.copy_(torch.tensor([[9.0, 1, 0, 0], [0.5, 0, 7, 0]]))
    sp.step(torch.tensor(1.0))
    # lowest saliency among active: (1,0) = 0.5 and (0,1) = 1 (magnitude would drop (0,0));
    # grow by dense gradient: (1,1) and (0,2).
    assert state.block_mask.tolist() == [[T, F, T, F], [F, T, T, F]]
    assert float(state.saliency.abs().sum()) == 0.0  # buffer consumed


def test_gmp_prunes_on_the_cubic_schedule_and_never_regrows():
    sp, state, _ = one_layer("gmp", end_step=4)
    with torch.no_grad():
        state.block_mask.fill_(True)
        state.weight.copy_(blocks([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
    counts = []
    for _ in range(4):
        sp.step(torch.tensor(1.0))
        counts.append(int(state.block_mask.sum()))
    # densities 1 - 0.5 * (1 - (1 - t/4)^3) = 0.7109, 0.5625, 0.5078, 0.5 -> round(8 d) = 6, 4, 4, 4
    assert counts == [6, 4, 4, 4]
    assert state.block_mask.tolist() == [[F, F, F, F], [T, T, T, T]]


def test_gmp_keeps_the_global_density_when_a_thawed_layer_is_below_its_share():
    # Note [Policies that never grow]: gmp cannot give a layer blocks back. A layer frozen
    # while the others were pruned harder comes back above its share and the others below;
    # the plan asked the others to grow, they stayed, and the global density ended at 0.195
    # for a target of 0.25 with no word. The blocks they cannot take now go to the thawed one.
    config = AGPEConfig(policy="gmp", target_sparsity=0.75, block_size=4, update_interval=10, end_step=200,
                        distribution="uniform")
    model, opt, sp, cmodel, _ = make_run(config)
    data = list(batches(220))
    train(cmodel, opt, sp, data[:60])
    model.fc2.weight.requires_grad_(False)
    train(cmodel, opt, sp, data[60:120])
    model.fc2.weight.requires_grad_(True)
    train(cmodel, opt, sp, data[120:])
    blocks_total = sum(s.block_mask.numel() for s in sp.layers.values())
    assert sum(int(s.block_mask.sum()) for s in sp.layers.values()) == round(0.25 * blocks_total)
    assert sp.densities()["fc2"] > 0.25  # it kept blocks the others could not take back


def test_gmp_over_sparser_adopted_masks_keeps_them_and_says_so(caplog):
    # Masks adopted at 0.25 uniform with ERK's split of the same target: ERK asks some layers
    # for more than 0.25, which gmp cannot give, so the others were cut below it (0.2246).
    import logging

    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    gen = torch.Generator().manual_seed(0)
    for state in agpe_compile.layer_states(model).values():
        state.block_mask.copy_(random_block_mask(state.grid, state.block_mask.numel() // 4, gen))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        sp = Sparsifier(model, opt, AGPEConfig(policy="gmp", target_sparsity=0.75, block_size=4, update_interval=10,
                                               end_step=100))
    assert "never regrows: it keeps these masks" in caplog.text
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    train(cmodel, opt, sp, batches(110))
    assert sp.global_density == pytest.approx(0.25)
    assert all(d == pytest.approx(0.25) for d in sp.densities().values())


def test_without_growth_moves_what_a_capped_layer_cannot_take():
    assert without_growth([30, 30], [10, 60]) == [10, 50]
    assert without_growth([5, 5], [10, 10]) == [5, 5]   # nothing to cap
    assert without_growth([30, 30], [10, 20]) == [10, 20]  # fewer blocks than the budget: all kept


@pytest.mark.parametrize("policy", ["static", "dense"])
def test_static_and_dense_never_change_masks(policy):
    sp, state, _ = one_layer(policy)
    before = state.block_mask.clone()
    for _ in range(5):
        sp.step(torch.tensor(1.0))
    assert torch.equal(state.block_mask, before)


def test_dense_policy_starts_with_every_block():
    model = nn.Sequential(nn.Linear(8, 4))
    sp = Sparsifier(model, None, AGPEConfig(policy="dense", target_sparsity=0.9, block_size=2))
    assert sp.global_density == 1.0


def test_snfs_moves_the_budget_to_the_layer_with_more_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(4, 8, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, AGPEConfig(policy="snfs", target_sparsity=0.5, block_size=2, update_interval=1,
                                           end_step=10**9, drop_fraction=0.5, distribution="uniform",
                                           buckets=(1.0,)))
    a, b = sp.layers["0"], sp.layers["1"]
    opt.state[a.weight]["momentum_buffer"] = torch.full_like(a.weight, 3.0)
    opt.state[b.weight]["momentum_buffer"] = torch.full_like(b.weight, 1.0)
    sp.step(torch.tensor(1.0))
    # shares 3:1 of rate 0.5 of 8 blocks: 0.5 * 4 + 0.5 * 8 * [0.75, 0.25] = [5, 3]
    assert [int(a.block_mask.sum()), int(b.block_mask.sum())] == [5, 3]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("policy", ["gmp", "rigl", "agpe"])
def test_pruned_blocks_stay_zero_in_weights_grads_and_moments(policy, optimizer):
    config = AGPEConfig(policy=policy, target_sparsity=0.75, block_size=4, update_interval=3, end_step=12,
                        cooldown=0, patience=1)
    model, opt, sp, cmodel, _ = make_run(config, optimizer)
    grown_checked = 0
    for step, (x, y) in enumerate(batches(14)):
        loss = torch.nn.functional.cross_entropy(cmodel(x), y)
        loss.backward()
        for state in sp.layers.values():  # gradients of inactive blocks are exactly zero
            assert not state.weight.grad[inactive_elements(state)].any()
        opt.step()
        opt.zero_grad()
        before = {n: s.block_mask.clone() for n, s in sp.layers.items()}
        sp.step(loss)
        for name, state in sp.layers.items():
            off = inactive_elements(state)
            assert not state.weight.detach()[off].any()
            moments = [v for v in opt.state[state.weight].values() if torch.is_tensor(v) and v.dim() == 2]
            assert moments and all(not m[off].any() for m in moments)
            grown = state.block_mask & ~before[name]
            if grown.any():
                on = expand_block_mask(grown, 4, torch.bool)
                assert not state.weight.detach()[on].any() and all(not m[on].any() for m in moments)
                grown_checked += 1
    assert sp.global_density == pytest.approx(0.25, abs=0.01)
    assert (grown_checked > 0) == (policy != "gmp")


def test_agpe_back_off_through_a_compiled_model():
    config = AGPEConfig(policy="agpe", target_sparsity=0.75, block_size=4, update_interval=2, end_step=100,
                        patience=1, cooldown=0, regret_threshold=1e-9)
    _, opt, sp, cmodel, _ = make_run(config)
    densities = []
    for x, y in batches(12):
        loss = torch.nn.functional.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        densities.append(sp.target_density)
    assert any(b > a for a, b in zip(densities, densities[1:]))  # the target density rose again


NEVER = 2 ** 30  # the age of a block that was never grown


def test_protect_grown_shields_a_grown_block_for_exactly_that_many_updates():
    # RigL swapping 1 of 4 active blocks per update (drop_fraction 0.25). A grown block
    # restarts from zero, so at the next update its magnitude is the lowest there is.
    def run(protect):
        sp, state, _ = one_layer("rigl", drop_fraction=0.25, protect_grown=protect)
        masks, ages = [], []
        # update 1 drops (0,0) (magnitude 1) and grows (1,1) (dense grad 7); before update 2
        # (1,1) has grown to 0.5; before update 3, (0,0) to 0 and (1,1) to 1.0.
        for weights, grad in (
            (None, None),
            ([[0.0, 2, 0, 0], [3, 0.5, 4, 0]], [[6.0, 0, 0, 0], [0, 0, 0, 0]]),
            ([[0.0, 2, 0, 0], [3, 1.0, 4, 0]], [[0.0, 0, 0, 5], [0, 0, 0, 0]]),
        ):
            if weights is not None:
                with torch.no_grad():
                    state.weight.copy_(blocks(weights) * blocks(state.block_mask.float().tolist()))
                state.dense_grad_sq.copy_(torch.tensor(grad))
            sp.step(torch.tensor(1.0))
            masks.append(state.block_mask.tolist())
            ages.append(sp.grown_age["0"].tolist())
        return masks, ages

    masks, _ = run(0)
    assert masks[0] == [[F, T, F, F], [T, T, T, F]]
    assert masks[1] == [[T, T, F, F], [T, F, T, F]]   # the just-grown (1,1) went straight back out
    assert masks[2] == [[F, T, F, T], [T, F, T, F]]   # ... and so did (0,0), grown at update 2
    masks, ages = run(1)
    assert masks[0] == [[F, T, F, F], [T, T, T, F]]
    assert ages[0] == [[NEVER] * 4, [NEVER, 0, NEVER, NEVER]]
    assert masks[1] == [[T, F, F, F], [T, T, T, F]]   # (1,1) shielded: (0,1), magnitude 2, went
    assert masks[2] == [[T, F, F, T], [T, F, T, F]]   # (0,0) shielded; (1,1)'s shield ran out
    assert ages[2] == [[1, NEVER, NEVER, 0], [NEVER, 2, NEVER, NEVER]]


def test_protect_grown_yields_by_score_when_a_layer_must_drop_more_than_its_unprotected_blocks():
    sp, state, _ = one_layer("rigl", protect_grown=5)   # drop_fraction 0.5: swap 2 of 4 blocks
    with torch.no_grad():
        state.weight.copy_(blocks([[5.0, 2, 0, 0], [3, 0, 1, 0]]))
    sp.grown_age["0"].zero_()
    sp.grown_age["0"][0, 1] = 2 ** 30                    # only (0,1) is unprotected
    sp.step(torch.tensor(1.0))
    # (0,1) goes first; the second drop is the protected block of lowest magnitude, (1,2),
    # not the lowest index; then the two largest dense gradients grow: (1,1) and (0,2).
    assert state.block_mask.tolist() == [[T, F, T, F], [T, T, F, F]]


def test_snfs_reads_the_momentum_of_the_optimizer_that_steps_now(caplog):
    # Found by an audit: after a replacement optimizer (a new learning-rate phase) SNFS kept
    # reading the first optimizer's frozen momentum.
    import logging

    import torch.nn.functional as F

    import agpe_compile

    from .helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    first = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = AGPEConfig(target_sparsity=0.5, policy="snfs", block_size=4, update_interval=2, end_step=100)
    sp = Sparsifier(model, first, config)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    opt = first
    for i, (x, y) in enumerate(batches(6)):
        if i == 3:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
    weight = model.fc1.weight
    assert sp._momentum(weight) is opt.state[weight]["momentum_buffer"]
    assert sp._momentum(weight) is not first.state[weight]["momentum_buffer"]

    torch._dynamo.reset()
    model = TinyMLP()
    opt = torch.optim.Rprop(model.parameters(), lr=1e-3)
    sp = Sparsifier(model, opt, config)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for x, y in batches(6):
            loss = F.cross_entropy(cmodel(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sp.step(loss)
    said = [r.getMessage() for r in caplog.records if "moves the layer budget by optimizer momentum" in r.getMessage()]
    assert len(said) == 1


def test_snfs_says_which_layers_have_no_momentum_when_only_some_lack_it(caplog):
    # Audit BM F3: one layer without momentum (its own optimizer is plain SGD) froze every
    # layer's budget without a word: the warning needed all of them to lack it
    import logging

    import torch.nn.functional as F

    import agpe_compile

    from .helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    adam = torch.optim.Adam(list(model.fc2.parameters()) + list(model.fc3.parameters()), lr=1e-2)
    sgd = torch.optim.SGD(model.fc1.parameters(), lr=0.05)
    sp = Sparsifier(model, adam, AGPEConfig(target_sparsity=0.5, policy="snfs", block_size=4, update_interval=2,
                                            end_step=100))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for x, y in batches(6):
            loss = F.cross_entropy(cmodel(x), y)
            loss.backward()
            for opt in (adam, sgd):
                opt.step()
                opt.zero_grad()
            sp.step(loss)
    said = [r.getMessage() for r in caplog.records if "moves the layer budget by optimizer momentum" in r.getMessage()]
    assert len(said) == 1 and "no optimizer keeps one for fc1 (" in said[0] and "every layer" in said[0]
