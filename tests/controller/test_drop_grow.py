"""Drop/grow on hand-worked 8-block masks: exact masks, exact counts, ties, NaN; layer budgets."""

import pytest
import torch

from agpe_compile.controller import drop_and_grow
from agpe_compile.controller.layer_budget import bucket_bounds, plan_counts, swap_counts

T, F = True, False


def test_note_example():
    mask = torch.tensor([[T, T, T, F, F, F]])
    result = drop_and_grow(mask, torch.tensor([[3.0, 1, 2, 0, 0, 0]]), torch.tensor([[0.0, 0, 0, 5, 9, 7]]), 1, 1)
    assert result.mask.tolist() == [[T, F, T, F, T, F]]
    assert result.dropped.tolist() == [[F, T, F, F, F, F]]
    assert result.grown.tolist() == [[F, F, F, F, T, F]]


def test_exact_counts_and_scores_of_the_other_kind_are_ignored():
    # 2 x 4 grid, 5 active. Drop 2 by lowest drop score among ACTIVE blocks (the inactive
    # block at [1, 3] has the lowest score of all but is not a candidate); grow 3 by
    # highest grow score among blocks inactive BEFORE the update (block [0, 1], just
    # dropped, has the best grow score but is not a candidate).
    mask = torch.tensor([[T, T, F, T], [F, T, T, F]])
    drop = torch.tensor([[5.0, 0.5, 9, 4], [9, 7, 1, -1]])
    grow = torch.tensor([[0.0, 99, 3, 0], [2, 0, 0, 1]])
    result = drop_and_grow(mask, drop, grow, 2, 3)
    assert result.dropped.tolist() == [[F, T, F, F], [F, F, T, F]]
    assert result.grown.tolist() == [[F, F, T, F], [T, F, F, T]]
    assert result.mask.tolist() == [[T, F, T, T], [T, T, F, T]]
    assert int(result.mask.sum()) == 5 - 2 + 3


def test_ties_go_to_the_lower_index():
    mask = torch.tensor([T, T, T, T, F, F, F, F])
    result = drop_and_grow(mask, torch.zeros(8), torch.zeros(8), 2, 2)
    assert result.mask.tolist() == [F, F, T, T, T, T, F, F]


def test_non_finite_scores_never_decide():
    mask = torch.tensor([T, T, T, F, F, F])
    nan = float("nan")
    # A NaN drop score keeps the block; a NaN grow score comes last.
    result = drop_and_grow(mask, torch.tensor([nan, 2.0, 3.0, 0, 0, 0]), torch.tensor([0, 0, 0, nan, 1.0, -5.0]), 1, 2)
    assert result.mask.tolist() == [T, F, T, F, T, T]


def test_nan_scores_count_as_infinite_and_real_infinities_stay_infinite():
    # Note [Drop and grow]: a NaN grow score counts as -inf, ties to the lower index (audit AY
    # F7: nan_to_num also made a real -inf finite, ranking NaN below it); NaN drop = +inf.
    nan, inf = float("nan"), float("inf")
    mask = torch.tensor([True, False, False, False, False])
    grown = drop_and_grow(mask, torch.zeros(5), torch.tensor([0, nan, nan, -inf, 2.0]), 0, 2).grown
    assert grown.nonzero().reshape(-1).tolist() == [1, 4]
    mask = torch.tensor([True, True, True, False])
    dropped = drop_and_grow(mask, torch.tensor([inf, nan, 5.0, 0]), torch.zeros(4), 2, 0).dropped
    assert dropped.nonzero().reshape(-1).tolist() == [0, 2]  # 5, then inf before the NaN (tie: lower index)


def test_bad_counts_raise():
    mask = torch.tensor([T, F])
    with pytest.raises(ValueError, match=r"expected n_drop in \[0, 1\] and n_grow in \[0, 1\], got 2 and 0"):
        drop_and_grow(mask, torch.zeros(2), torch.zeros(2), 2, 0)
    with pytest.raises(ValueError, match="expected a bool mask"):
        drop_and_grow(mask.int(), torch.zeros(2), torch.zeros(2), 0, 0)


def test_swap_counts_golden():
    assert swap_counts(10, 8, 100, 0.3) == (4, 2)     # shrink by 2, swap round(0.3 * 8) = 2
    assert swap_counts(8, 10, 100, 0.3) == (2, 4)     # grow by 2, swap 2
    assert swap_counts(10, 10, 12, 0.5) == (2, 2)     # only 2 inactive blocks to swap into
    assert swap_counts(10, 4, 100, 0.0) == (6, 0)     # GMP: pure pruning


def test_bucket_bounds_keep_a_layer_in_its_bucket():
    buckets = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.10, 0.05)
    assert bucket_bounds(30, 100, buckets, 1.0) == (26, 35)    # 0.30 is in bucket 0.35: (0.25, 0.35]
    assert bucket_bounds(10, 100, buckets, 1.0) == (6, 10)     # exactly on a bucket value
    assert bucket_bounds(30, 100, buckets, 0.32) == (26, 32)   # capped by max_layer_density


def test_plan_counts_redistributes_inside_buckets_until_the_target_moves():
    grids, sizes = [(10, 10), (10, 10)], [4, 4]
    buckets = (1.0, 0.5, 0.25)
    # Both layers at 0.30 (bucket 0.5: counts 26..50); layer 2 has all the saliency.
    kept = plan_counts([30, 30], grids, sizes, 0.3, False, "uniform", [0.0, 1.0], 1.0, buckets, 1.0)
    assert kept == [26, 34]  # layer 1 can give only down to its bucket floor
    moved = plan_counts([30, 30], grids, sizes, 0.3, True, "uniform", [0.0, 1.0], 1.0, buckets, 1.0)
    assert moved == [1, 59]  # a moving target lets layers change bucket (all at the same update)


def test_plan_counts_floor_keeps_a_share_of_the_target_in_every_layer():
    grids, sizes = [(10, 10), (10, 10)], [4, 4]
    buckets = (1.0, 0.5, 0.25)
    # Same as above, with min_layer_share 0.5: layer 1 keeps >= 0.5 * 0.3 * 100 = 15 blocks.
    moved = plan_counts([30, 30], grids, sizes, 0.3, True, "uniform", [0.0, 1.0], 1.0, buckets, 1.0, floor=0.5)
    assert moved == [15, 45]


def test_plan_counts_without_scores_follows_the_distribution():
    counts = plan_counts([64, 64], [(8, 8), (4, 16)], [1, 1], 0.5, True, "uniform", None, 0.0, (1.0,), 1.0)
    assert counts == [32, 32]


def test_protected_blocks_go_after_every_unprotected_one_then_by_score():
    mask = torch.tensor([True, True, True, True, False, False])
    drop = torch.tensor([1.0, 2.0, 3.0, 0.5, 0, 0])
    protected = torch.tensor([True, False, False, True, False, False])
    result = drop_and_grow(mask, drop, torch.zeros(6), 3, 0, protected=protected)
    # unprotected 1 and 2 first (scores 2, 3), then protected by score: 3 (0.5) before 0 (1.0)
    assert result.dropped.tolist() == [False, True, True, True, False, False]
    assert drop_and_grow(mask, drop, torch.zeros(6), 1, 0, protected=protected).dropped.tolist() == [
        False, True, False, False, False, False]


def _pick_by_sorting(candidates, score, count, lowest):
    """The first ``count`` of a stable sort: the definition _pick's shortcut must match."""
    index = torch.nonzero(candidates).reshape(-1)
    return index[torch.sort(score[index], descending=not lowest, stable=True).indices[:count]]


@pytest.mark.parametrize("seed", range(40))
def test_picking_without_a_full_sort_picks_what_a_stable_sort_picks(seed):
    from agpe_compile.controller.drop_grow import _nan_as, _pick
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    candidates = torch.rand(n, generator=gen) < float(torch.rand(1, generator=gen))
    # few distinct values: many ties, across the cut too; infinities and NaN (as the caller maps them)
    levels = torch.tensor([-float("inf"), -1.0, 0.0, 0.5, 2.0, float("inf"), float("nan")])
    score = levels[torch.randint(0, 7 if seed % 2 else 4, (n,), generator=gen)]
    if seed % 3 == 0:
        score = torch.randn(n, generator=gen)
    available = int(candidates.sum())
    for lowest, nan in ((True, float("inf")), (False, -float("inf"))):
        mapped = _nan_as(score, nan)
        for count in {0, 1, available // 3, available // 2, max(available - 1, 0), available}:
            got = _pick(candidates, mapped, count, lowest)
            want = _pick_by_sorting(candidates, mapped, count, lowest)
            assert sorted(got.tolist()) == sorted(want.tolist()), (lowest, count)
