"""Block mask <-> layout: the worked example, round trips, capacity/padding, in-place updates."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agpe_compile.layout import (
    DEFAULT_BUCKETS,
    TENSOR_NAMES,
    BlockLayout,
    bucket_for,
    build_layout,
    capacity_for,
    update_layout_,
)

EXAMPLE_MASK = torch.tensor([[True, False, True], [False, True, True]])


@st.composite
def masks(draw, max_side=8):
    """Bool block masks of random shape; density drawn so that 0 and 1 come up often."""
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**16))
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density


def test_worked_example_of_the_note():
    # Note [Block layout] in layout.py walks through exactly this mask; keep them in sync.
    layout = build_layout(EXAMPLE_MASK, 16)
    assert (layout.bucket, layout.capacity, layout.shape) == (0.75, 5, (32, 48))
    assert layout.row_ptr.tolist() == [0, 2, 4]
    assert layout.col_idx.tolist() == [0, 2, 1, 2, 0]
    assert layout.slot_row.tolist() == [0, 0, 1, 1, 0]
    assert layout.col_ptr.tolist() == [0, 1, 2, 4]
    assert layout.row_idx.tolist() == [0, 1, 0, 1, 0]
    assert layout.block_slot.tolist() == [[0, -1, 1], [-1, 2, 3]]
    assert layout.live_count.dim() == 0 and int(layout.live_count) == 4
    assert [t.dtype for t in layout.tensors()] == [torch.int32] * len(TENSOR_NAMES)


def _check_invariants(layout: BlockLayout, mask: torch.Tensor) -> None:
    rows, cols = mask.shape
    live = int(mask.sum())
    assert layout.grid_shape == (rows, cols)
    assert layout.bucket == bucket_for(live / mask.numel())
    assert layout.capacity == capacity_for(live / mask.numel(), mask.numel())
    assert live <= layout.capacity == max(1, math.ceil(round(layout.bucket * mask.numel(), 6)))
    assert int(layout.live_count) == live
    # Pointers: per-row / per-column live counts, prefix-summed.
    assert layout.row_ptr.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    assert layout.col_ptr.tolist() == [0, *torch.cumsum(mask.sum(0), 0).tolist()]
    # Flat arrays: row-major (forward/dW) and column-major (dX) order, zero padding after.
    r, c = mask.nonzero(as_tuple=True)
    assert layout.slot_row[:live].tolist() == r.tolist() and layout.col_idx[:live].tolist() == c.tolist()
    tc, tr = mask.t().nonzero(as_tuple=True)
    assert layout.row_idx[:live].tolist() == tr.tolist()
    for flat in (layout.col_idx, layout.slot_row, layout.row_idx):
        assert flat.shape == (layout.capacity,) and not flat[live:].any()
    # block_slot numbers the live blocks in slot order and marks the rest -1.
    expected_slot = torch.full((rows, cols), -1, dtype=torch.int32)
    expected_slot[r, c] = torch.arange(live, dtype=torch.int32)
    assert torch.equal(layout.block_slot, expected_slot)


@settings(max_examples=60, deadline=None)
@given(mask=masks(), block_size=st.sampled_from([16, 32, 64, 128]))
def test_round_trip_and_invariants(mask, block_size):
    layout = build_layout(mask, block_size)
    assert torch.equal(layout.to_mask(), mask)
    assert layout.shape == (mask.shape[0] * block_size, mask.shape[1] * block_size)
    _check_invariants(layout, mask)


@settings(max_examples=40, deadline=None)
@given(first=masks(max_side=6), seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_update_in_place_within_capacity_else_refuse(first, seed, density):
    layout = build_layout(first, 32)
    tensors = layout.tensors()
    before = [t.clone() for t in tensors]
    second = torch.rand(first.shape, generator=torch.Generator().manual_seed(seed)) < density
    fits = int(second.sum()) <= layout.capacity
    assert update_layout_(layout, second) is fits
    # Identity and shapes never change: the tensors can be module buffers.
    assert all(a is b for a, b in zip(layout.tensors(), tensors))
    assert [t.shape for t in tensors] == [t.shape for t in before]
    if fits:
        assert torch.equal(layout.to_mask(), second)
        fresh = build_layout(second, 32)
        for name in ("row_ptr", "col_ptr", "block_slot", "live_count"):
            assert torch.equal(getattr(layout, name), getattr(fresh, name)), name
        live = int(second.sum())
        for name in ("col_idx", "slot_row", "row_idx"):
            assert torch.equal(getattr(layout, name)[:live], getattr(fresh, name)[:live]), name
            assert not getattr(layout, name)[live:].any(), name
    else:
        assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def test_sparser_mask_keeps_its_bucket_with_more_padding():
    layout = build_layout(torch.ones(4, 4, dtype=torch.bool), 16)
    sparse = torch.zeros(4, 4, dtype=torch.bool)
    sparse[1, 2] = True
    assert update_layout_(layout, sparse)
    assert (layout.capacity, layout.bucket, int(layout.live_count)) == (16, 1.0, 1)
    assert layout.col_idx.tolist() == [2] + [0] * 15


@pytest.mark.parametrize(
    "density, bucket",
    [(0.0, 0.05), (0.05, 0.05), (0.050001, 0.10), (0.3, 0.35), (0.35, 0.35), (0.5, 0.5),
     (0.75, 0.75), (0.76, 1.0), (1.0, 1.0), (1, 1.0)],
)
def test_bucket_for_edges(density, bucket):
    assert bucket_for(density) == bucket


def test_custom_buckets_are_sorted_and_used():
    assert bucket_for(0.2, buckets=(1.0, 0.1, 0.3)) == 0.3
    layout = build_layout(torch.tensor([[True, False, False, False]]), 16, buckets=(0.5, 1.0))
    assert (layout.bucket, layout.capacity) == (0.5, 2)


def test_capacity_rounding_and_floor():
    assert capacity_for(0.35, 100) == 35  # 0.35 * 100 is 35.000000000000004 in floats
    assert capacity_for(0.3, 3) == 2  # ceil(0.35 * 3 = 1.05)
    assert capacity_for(0.0, 4) == 1  # never an empty array
    assert capacity_for(1.0, 7) == 7
    for bucket in DEFAULT_BUCKETS:
        assert capacity_for(bucket, 1000) == round(bucket * 1000)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: bucket_for(1.5), ValueError, r"density in \[0, 1\], got 1\.5"),
        (lambda: bucket_for(-0.1), ValueError, r"density in \[0, 1\], got -0\.1"),
        (lambda: bucket_for(float("nan")), ValueError, r"density .* got nan"),
        (lambda: bucket_for("0.5"), TypeError, r"density .* got str"),
        (lambda: bucket_for(True), TypeError, r"density .* got bool"),
        (lambda: bucket_for(0.5, buckets=(0.5, 0.9)), ValueError, r"buckets to include 1\.0"),
        (lambda: bucket_for(0.5, buckets=()), ValueError, r"buckets to include 1\.0"),
        (lambda: bucket_for(0.5, buckets=(0.0, 1.0)), ValueError, r"buckets in \(0, 1\], got 0\.0"),
        (lambda: bucket_for(0.5, buckets=(1.5, 1.0)), ValueError, r"buckets in \(0, 1\], got 1\.5"),
        (lambda: capacity_for(0.5, 0), ValueError, r"positive int num_blocks, got 0"),
        (lambda: build_layout(torch.ones(2, 2), 16), TypeError, r"block_mask of dtype torch\.bool, got torch\.float32"),
        (lambda: build_layout([[True]], 16), TypeError, r"block_mask to be a torch\.Tensor, got list"),
        (lambda: build_layout(torch.ones(4, dtype=torch.bool), 16), ValueError, r"2-D block_mask .* got shape \(4,\)"),
        (lambda: build_layout(torch.ones(0, 3, dtype=torch.bool), 16), ValueError, r"non-empty .* \(0, 3\)"),
        (lambda: build_layout(EXAMPLE_MASK, 0), ValueError, r"positive block_size, got 0"),
        (lambda: build_layout(EXAMPLE_MASK, 32.0), TypeError, r"block_size to be an int, got float"),
        (lambda: update_layout_(build_layout(EXAMPLE_MASK, 16), torch.ones(3, 2, dtype=torch.bool)),
         ValueError, r"block_mask of shape \(2, 3\), got \(3, 2\)"),
        (lambda: update_layout_(EXAMPLE_MASK, EXAMPLE_MASK), TypeError, r"layout to be a BlockLayout, got Tensor"),
    ],
)
def test_validation_names_argument_value_and_accepted(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_from_tensors_rebuilds_and_checks_shapes():
    layout = build_layout(EXAMPLE_MASK, 16)
    again = BlockLayout.from_tensors(layout.tensors(), block_size=16, bucket=layout.bucket)
    assert (again.shape, again.capacity, again.grid_shape) == (layout.shape, 5, (2, 3))
    assert all(a is b for a, b in zip(again.tensors(), layout.tensors()))
    bad = layout.tensors()
    bad[1] = bad[1][:4]  # col_idx shorter than slot_row
    with pytest.raises(ValueError, match=r"slot_row of shape \(4,\), got \(5,\)"):
        BlockLayout.from_tensors(bad, block_size=16, bucket=0.75)
    with pytest.raises(ValueError, match=r"expected 7 tensors"):
        BlockLayout.from_tensors(bad[:3], block_size=16, bucket=0.75)
