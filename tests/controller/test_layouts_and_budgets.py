"""Initial layouts (uniform, ERK, random masks) and budget splitting, worked by hand."""

import pytest
import torch

from agpe_compile.controller import (apportion, block_counts, erk_densities, random_block_mask, redistribute,
                                     uniform_densities)


def test_erk_golden():
    # Note [ERK densities]: raw (4+4)/16 = 0.5 and (2+4)/8 = 0.75; eps * (8 + 6) = 12.
    assert erk_densities([(4, 4), (2, 4)], 0.5) == pytest.approx([3 / 7, 9 / 14])


def test_erk_caps_a_layer_at_one_and_resolves_the_rest():
    # At 0.9 the small layer would get 9/7 * 0.75 > 1: it is capped, the big one takes 13.6 / 16.
    assert erk_densities([(4, 4), (2, 4)], 0.9) == pytest.approx([0.85, 1.0])
    assert erk_densities([(4, 4), (2, 4)], 0.5, cap=0.6) == pytest.approx([(12 - 4.8) / 16, 0.6])


def test_erk_keeps_the_global_density():
    shapes = [(1000, 784), (1000, 1000), (1000, 1000)]
    densities = erk_densities(shapes, 0.1)
    weights = sum(d * n * k for d, (n, k) in zip(densities, shapes))
    assert weights == pytest.approx(0.1 * sum(n * k for n, k in shapes))
    assert densities[0] > densities[1]  # the layer with the smaller fan-in is denser


def test_uniform():
    assert uniform_densities([(4, 4), (2, 4)], 0.3) == [0.3, 0.3]


def test_block_counts_hit_the_global_budget_exactly():
    # 3/7 * 16 = 6.86 and 9/14 * 8 = 5.14 -> 7 + 5 = 12 = 0.5 * 24.
    assert block_counts([3 / 7, 9 / 14], [(4, 4), (2, 4)], 0.5) == [7, 5]
    # Every layer keeps at least one block even at extreme sparsity.
    assert block_counts([0.001, 0.001], [(4, 4), (4, 4)], 0.001) == [1, 1]


def test_random_block_mask_exact_count_and_seeded():
    a = random_block_mask((5, 7), 11, torch.Generator().manual_seed(3))
    b = random_block_mask((5, 7), 11, torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and a.shape == (5, 7) and int(a.sum()) == 11
    assert torch.equal(a, b)


def test_apportion_golden_and_bounds():
    assert apportion([2.5, 2.5, 5.0], 10, [0, 0, 0], [10, 10, 4]) == [3, 3, 4]
    assert apportion([1.0, 1.0, 1.0], 10, [0, 0, 0], [10, 10, 10]) == [4, 3, 3]   # remainder to lower index
    assert apportion([0.0, 0.0], 3, [1, 1], [5, 5]) == [2, 1]
    with pytest.raises(ValueError, match="cannot split 30 blocks"):
        apportion([1.0], 30, [0], [10])


def test_redistribute_golden():
    # Module docstring: keep half of [6, 2], hand 4 blocks out 1:3.
    assert redistribute([6, 2], 8, [1.0, 3.0], 0.5, [1, 1], [8, 8]) == [4, 4]
    # rate 0 or no signal: just rescale to the new budget.
    assert redistribute([6, 2], 4, [1.0, 3.0], 0.0, [1, 1], [8, 8]) == [3, 1]
    assert redistribute([6, 2], 8, [0.0, float("nan")], 0.5, [1, 1], [8, 8]) == [6, 2]
