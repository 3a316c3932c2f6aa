"""Training-FLOP accounting against hand counts (Note [Training FLOPs])."""

import torch

from agpe_compile.controller import AGPEConfig, FlopAccountant, step_flops

from .helpers import batches, make_run, train


def test_step_flops_golden():
    # Note example: 6 * 8 rows * 1 block * 4 + 2 * 8 * 3 blocks * 4
    assert step_flops(rows=8, active=1, blocks=4, block_size=2, scored_rows=8) == 384
    assert step_flops(rows=8, active=4, blocks=4, block_size=2) == 6 * 8 * 16


def test_accountant_accumulates_per_layer():
    acc = FlopAccountant({"a": ((4, 4), 2), "b": ((2, 4), 2)})
    acc.add("a", rows=8, active=1, scored_rows=8)
    acc.add("a", rows=2, active=4)
    acc.add("b", rows=8, active=2)
    report = acc.report()
    assert report.layers["a"].sparse == 384 + 6 * 2 * 4 * 4 and report.layers["a"].rows == 10
    assert report.layers["b"].sparse == 6 * 8 * 2 * 4 and report.layers["b"].dense == 6 * 8 * 8
    assert report.sparse == 384 + 192 + 384 and report.dense == 6 * 10 * 16 + 6 * 8 * 8


def test_compiled_training_matches_hand_count():
    """RigL at density 0.25 on TinyMLP: 10 steps of 32 rows, one update (step 5) with
    dense-gradient scoring on that step only, masks fixed in size."""
    config = AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=5, end_step=5)
    _, opt, sp, cmodel, _ = make_run(config)
    active = {n: int(s.block_mask.sum()) for n, s in sp.layers.items()}
    train(cmodel, opt, sp, batches(10))
    report = sp.flops
    for name, state in sp.layers.items():
        blocks = state.block_mask.numel()
        n, k = state.weight_shape
        expected = 6 * 320 * active[name] * 16 + 2 * 32 * (blocks - active[name]) * 16
        assert report.layers[name].sparse == expected, name
        assert report.layers[name].dense == 6 * 320 * n * k
        assert report.layers[name].rows == 320
        assert int(state.block_mask.sum()) == active[name]
    assert sum(active.values()) == 28  # 0.25 of 112 blocks, split by ERK
    assert 0.25 < report.ratio < 0.30  # 0.25 plus one step of scoring the inactive blocks


def test_flops_follow_a_density_change():
    """GMP from dense: FLOPs before an update are counted at the old density, after at the new."""
    config = AGPEConfig(policy="gmp", target_sparsity=0.5, block_size=4, update_interval=4, begin_step=0,
                        end_step=4, distribution="uniform")
    _, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(4))
    half = {n: int(s.block_mask.sum()) for n, s in sp.layers.items()}
    train(cmodel, opt, sp, batches(2))
    for name, state in sp.layers.items():
        blocks = state.block_mask.numel()
        assert half[name] * 2 == blocks
        assert sp.flops.layers[name].sparse == 6 * 128 * blocks * 16 + 6 * 64 * half[name] * 16
    assert torch.equal(torch.tensor(sp.global_density), torch.tensor(0.5))


def test_scoring_on_every_step_counts_each_step_once():
    # update_interval 1 keeps dense-gradient scoring on: the scored rows were counted from the
    # step scoring turned on, again at every interval (rigl's sparse count exceeded dense)
    config = AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=1, end_step=40)
    _, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(1))
    one = {name: (layer.sparse, layer.dense) for name, layer in sp.flops.layers.items()}
    train(cmodel, opt, sp, batches(5, seed=1))
    for name, layer in sp.flops.layers.items():  # 32 rows and the same number of live blocks every step
        assert (layer.sparse, layer.dense) == (6 * one[name][0], 6 * one[name][1]), name
        assert layer.sparse < layer.dense, name
