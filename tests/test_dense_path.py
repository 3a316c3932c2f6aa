"""ops/dense_path.py (the dense path with fewer passes) against ops/reference.py, the oracle."""

import pytest
import torch

from agpe_compile.ops import dense_path, reference

from .tolerances import SCORE_TOLERANCE, TOLERANCES

B = 4
MODES = ("taylor", "gradient", "magnitude", "movement")


def _case(density, dtype, seed=0, rows=6, cols=5):
    gen = torch.Generator().manual_seed(seed)
    if density == 1.0:
        mask = torch.ones(rows, cols, dtype=torch.bool)
    else:
        mask = torch.rand(rows, cols, generator=gen) < density
        mask[0, 0] = True
    x = torch.randn(3, 7, cols * B, generator=gen).to(dtype)
    w = torch.randn(rows * B, cols * B, generator=gen).to(dtype)
    dy = torch.randn(3, 7, rows * B, generator=gen).to(dtype)
    return x, w, dy, mask


def _reference(x, w, dy, mask, mode, flag):
    dx, dw, dense = reference.backward(dy, x, w, mask, B, True, True)
    scores = reference.block_scores(w, dw, B, mode) * mask
    dense_sq = reference.inactive_dense_grad_sq(dense, mask, B) * float(flag)
    return reference.forward(x, w, None, mask, B), dx, dw, scores, dense_sq


def _close(name, actual, expected):
    tol = SCORE_TOLERANCE if name in ("scores", "dense_sq") else TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("density", [1.0, 0.7, 0.15])  # every block live; many live; few live (gathered scores)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(density, mode, flag, dtype):
    x, w, dy, mask = _case(density, dtype)
    expected = _reference(x, w, dy, mask, mode, flag)
    y = dense_path.forward(x, w, None, mask, B, unmasked=False)
    dx = dense_path.grad_input(dy, w, mask, B, unmasked=False)
    dw, scores, dense_sq = dense_path.grad_weight_and_scores(dy, x, w, mask, B, torch.tensor(flag), mode)
    for name, a, e in zip(("y", "dx", "dw", "scores", "dense_sq"), (y, dx, dw, scores, dense_sq), expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        _close(name, a, e)
    assert torch.all(dw.view(mask.shape[0], B, mask.shape[1], B)[~mask[:, None, :, None].expand(-1, B, -1, B)] == 0)
    if flag and density < 1:
        assert torch.all(dense_sq[~mask] > 0) and torch.all(dense_sq[mask] == 0)


def test_unmasked_uses_the_weight_as_is():
    # With the zero promise (or every block live) W is not masked: a nonzero inactive weight shows.
    x, w, dy, mask = _case(0.5, torch.float32)
    torch.testing.assert_close(dense_path.forward(x, w, None, mask, B, unmasked=True), torch.nn.functional.linear(x, w))
    zeroed = reference.masked_weight(w, mask, B)
    torch.testing.assert_close(dense_path.forward(x, zeroed, None, mask, B, unmasked=True),
                               reference.forward(x, w, None, mask, B))


def test_non_contiguous_weight_and_gradient():
    x, w, dy, mask = _case(0.15, torch.float32)
    w_t = w.t().contiguous().t()  # same values, column-major
    expected = _reference(x, w, dy, mask, "taylor", False)
    dw, scores, _ = dense_path.grad_weight_and_scores(dy, x, w_t, mask, B, torch.tensor(False), "taylor")
    _close("dw", dw, expected[2])
    _close("scores", scores, expected[3])
    assert dense_path.zero_weight_blocks_(w_t.clone().t().contiguous().t(), mask, B) is None
    assert torch.equal(dense_path.zero_weight_blocks_(w.clone(), mask, B), reference.masked_weight(w, mask, B))


def test_block_sum_matches_reference():
    values = torch.randn(12, 20)
    torch.testing.assert_close(dense_path.block_sum(values, 4), reference.block_sum(values, 4))


def test_non_finite_scores_propagate_like_the_reference():
    # accumulate_scores (ops/sparse_linear.py) skips a call whose scores are not finite:
    # the fast path must not hide an inf that the reference would see.
    x, w, dy, mask = _case(0.15, torch.float32)
    dy = dy.clone()
    dy[0, 0, 0] = float("inf")
    _, scores, _ = dense_path.grad_weight_and_scores(dy, x, w, mask, B, torch.tensor(False), "taylor")
    expected = _reference(x, w, dy, mask, "taylor", False)[3]
    assert torch.isfinite(scores).all() == torch.isfinite(expected).all()


def test_traced_inputs_take_shape_only_decisions():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, dy, mask = _case(0.15, torch.float32)
    with FakeTensorMode() as mode:
        fx, fw, fdy, fmask, flag = (mode.from_tensor(t) for t in (x, w, dy, mask, torch.tensor(True)))
        assert not dense_path.host_readable(fmask)
        dw, scores, dense_sq = dense_path.grad_weight_and_scores(fdy, fx, fw, fmask, B, flag, "taylor")  # no data read
        assert dw.shape == w.shape and scores.shape == mask.shape and dense_sq.shape == mask.shape


def test_few_live_blocks_are_scored_by_gathering_them(monkeypatch):
    calls = []
    real = dense_path.live_block_scores
    monkeypatch.setattr(dense_path, "live_block_scores", lambda *a: calls.append(a[-1]) or real(*a))
    for density, gathered in ((0.15, True), (0.7, False), (1.0, False)):
        calls.clear()
        x, w, dy, mask = _case(density, torch.float32)
        dense_path.grad_weight_and_scores(dy, x, w, mask, B, torch.tensor(False), "gradient")
        assert bool(calls) == gathered, density


@pytest.mark.parametrize("block", [1, 2, 8, 16])
@pytest.mark.parametrize("mode", MODES)
def test_gathered_scores_are_the_full_pass_on_live_blocks(block, mode):
    # Note [Gathering live blocks]: the run indices of a rectangular grid, every block size
    # (8 and up: kept per mask contents), a column-major weight, and a hand-edited mask.
    gen = torch.Generator().manual_seed(block)
    mask = torch.rand(5, 7, generator=gen) < 0.3
    w = torch.randn(5 * block, 7 * block, generator=gen)
    dw = torch.randn(5 * block, 7 * block, generator=gen)
    for weight in (w, w.t().contiguous().t()):
        for _ in range(2):
            expected = dense_path.block_scores(weight, dw, block, mode) * mask
            torch.testing.assert_close(dense_path.live_block_scores(weight, dw, mask, block, mode), expected,
                                       rtol=1e-6, atol=1e-6)
            mask[mask.nonzero()[0].unbind()] = False  # one block fewer: the runs follow the contents
            mask[4, 6] = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_broadcast_masking_is_the_reference_to_the_bit(dtype):
    # Note [Row-broadcast masks]: the same products as the reference, NaN and inf included.
    x, w, dy, mask = _case(0.5, dtype, seed=3)
    w[0, :] = float("nan")
    w[B, :] = float("inf")
    expected = reference.masked_weight(w, mask, B)
    assert torch.equal(dense_path.masked_weight(w, mask, B).isnan(), expected.isnan())
    torch.testing.assert_close(dense_path.masked_weight(w, mask, B), expected, rtol=0, atol=0, equal_nan=True)
    # the gradient's masking pass writes zeros into inactive blocks (NaN and inf there too:
    # the kernels never compute those blocks, audit BO) and keeps the live ones to the bit
    values = w.clone()
    assert dense_path._mask_in_place(values, mask, B) is values
    live = mask[:, None, :, None].expand(-1, B, -1, B).reshape(w.shape)
    torch.testing.assert_close(values[live], expected[live], rtol=0, atol=0, equal_nan=True)
    assert torch.all(values[~live] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zeroing_clears_non_finite_inactive_blocks_and_keeps_live_bits(dtype):
    _, w, _, mask = _case(0.4, dtype, seed=4)
    w[:, :] = w.abs().neg()  # negative weights: a sign bit left behind would show as -0.0
    w[0:B, :] = float("nan")
    w[B:2 * B, :] = float("-inf")
    before = w.clone()
    assert dense_path.zero_weight_blocks_(w, mask, B) is w
    live = reference.expand_block_mask(mask, B, torch.bool)
    assert torch.all(w[~live] == 0) and not torch.any(torch.signbit(w[~live]))
    assert torch.equal(w[live].view(torch.uint8), before[live].view(torch.uint8))  # live bits untouched


def test_zeroing_with_every_block_live_writes_nothing():
    _, w, _, mask = _case(1.0, torch.float32)
    w[0, 0] = float("nan")  # would be kept anyway; shows that nothing was rewritten
    version = w._version
    assert dense_path.zero_weight_blocks_(w, mask, B) is w
    assert w._version == version and torch.isnan(w[0, 0])


@pytest.mark.parametrize("grid", [(3, 1), (1, 3), (1, 1)])
def test_masking_and_zeroing_one_block_wide_grids(grid):
    # A single block column makes the row mask a view of the block mask (no copy).
    mask = torch.tensor([True, False, True][: grid[0] * grid[1]]).view(grid)
    w = torch.randn(grid[0] * B, grid[1] * B)
    expected = reference.masked_weight(w, mask, B)
    torch.testing.assert_close(dense_path.masked_weight(w, mask, B), expected, rtol=0, atol=0)
    dense_path.zero_weight_blocks_(w, mask, B)
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    assert mask.tolist() == torch.tensor([True, False, True][: grid[0] * grid[1]]).view(grid).tolist()


@pytest.mark.parametrize("host", [True, False])  # the CPU branch; the shape-only one (traced, other devices)
@pytest.mark.parametrize("contiguous", [True, False])
def test_a_gradient_that_overflows_on_inactive_blocks_only_is_zero_there(host, contiguous, monkeypatch):
    # helper audit BO: fp16 inf * 0 left NaN in W.grad's inactive blocks (and NaN scores: the
    # call's saliency skipped) where the kernels and the gathered path give 0
    if not host:
        monkeypatch.setattr(dense_path, "host_readable", lambda t: False)
    if not contiguous:  # the masking pass's out-of-place branch
        monkeypatch.setattr(dense_path, "zero_weight_blocks_", lambda *args: None)
    mask = torch.tensor([[True, False], [True, False]])  # block column 1 inactive
    w = torch.randn(2 * B, 2 * B).half()
    x = torch.zeros(2, 2 * B, dtype=torch.float16)
    x[:, :B], x[:, B:] = 1.0, 60000.0  # the large features feed the inactive blocks only
    dy = torch.ones(2, 2 * B, dtype=torch.float16)
    dense = dy.t() @ x
    assert torch.isinf(dense[:, B:]).all() and torch.isfinite(dense[:, :B]).all()
    dw, scores, dense_sq = dense_path.grad_weight_and_scores(dy, x, w, mask, B, torch.tensor(False), "gradient")
    assert torch.all(dw[:, B:] == 0) and torch.equal(dw[:, :B], dense[:, :B])
    assert torch.isfinite(scores).all() and torch.isfinite(dense_sq).all() and not dense_sq.any()


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf"), "overflow"])
def test_accumulated_scores_skip_exactly_the_non_finite_calls(bad):
    # accumulate_scores' host form checks a sum first: a sum that overflows from finite
    # scores is still accumulated, a NaN or an infinity anywhere is skipped, like the
    # traced form (torch.where on isfinite) computes.
    from torch.utils._python_dispatch import TorchDispatchMode

    from agpe_compile.ops.sparse_linear import accumulate_scores

    class Traced(TorchDispatchMode):  # any dispatch mode sends the call to the traced form
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    scores = torch.rand(4, 5)
    if bad == "overflow":
        scores[0, :2] = 3e38  # each finite, their sum is not
    elif bad is not None:
        scores[2, 3] = bad
    for which in ("scores", "dense_sq"):
        results = []
        for traced in (False, True):
            saliency, dense_grad_sq, counters = torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(2, dtype=torch.int64)
            args = (scores, torch.zeros(4, 5)) if which == "scores" else (torch.zeros(4, 5), scores)
            if traced:
                with Traced():
                    accumulate_scores(*args, saliency, dense_grad_sq, counters, 7)
            else:
                accumulate_scores(*args, saliency, dense_grad_sq, counters, 7)
            results.append((saliency, dense_grad_sq, counters))
        skipped = bad not in (None, "overflow")
        for saliency, dense_grad_sq, counters in results:
            assert counters.tolist() == [7, int(skipped)], (which, bad)
            added = saliency if which == "scores" else dense_grad_sq
            assert torch.equal(added, torch.zeros(4, 5) if skipped else scores), (which, bad)
