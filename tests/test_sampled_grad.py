"""ops/sampled_grad.py (Note [CPU sampled dW]) against ops/reference.py, the oracle, and the
conditions under which the dense path takes it."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from agpe_compile.ops import bsr_path, dense_path, reference, sampled_grad

from .tolerances import TOLERANCES


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # The crossover depends on the thread count (max_density); the suite runs one thread
    # per worker, a developer's shell may not.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)


def _case(block, density, rows=5, cols=7, lead=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    w = torch.randn(rows * block, cols * block, generator=gen)
    x = torch.randn(*lead, cols * block, generator=gen)
    dy = torch.randn(*lead, rows * block, generator=gen)
    return x, w, dy, mask


real_max_density = sampled_grad.max_density


def _small_shapes_allowed(rows, weight_numel, threads, block_size):
    """The envelope widened to this file's small shapes (the other conditions are under
    test), for the measured block sizes and thread counts only."""
    return real_max_density(128, 4 * 10 ** 6, threads, block_size) and 0.16


def _close(actual, expected):
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("block", [8, 16, 32])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
def test_the_sampled_dw_matches_the_reference(block, density):
    x, w, dy, mask = _case(block, density)
    dw = sampled_grad.grad_weight(dy, x, mask, block)
    assert dw.shape == w.shape and dw.is_contiguous()
    _close(dw, reference.backward(dy, x, w, mask, block, False, True)[1])
    assert (dw.view(5, block, 7, block).permute(0, 2, 1, 3)[~mask] == 0).all()  # exact zeros outside


def test_strided_inputs_and_a_mask_edited_between_calls():
    x, w, dy, mask = _case(8, 0.2)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    dy_t = dy.transpose(0, 1).contiguous().transpose(0, 1)
    for _ in range(2):
        _close(sampled_grad.grad_weight(dy_t, x_t, mask, 8), reference.backward(dy, x, w, mask, 8, False, True)[1])
        mask.data[mask.nonzero()[0].unbind()] = False  # a write the version counter does not see
        mask.data[4, 6] = True


def test_the_dense_path_takes_it_below_the_crossover(monkeypatch):
    monkeypatch.setattr(sampled_grad, "max_density", _small_shapes_allowed)
    calls = []
    real = sampled_grad.grad_weight
    monkeypatch.setattr(sampled_grad, "grad_weight", lambda *a: calls.append(1) or real(*a))

    def run(x, w, dy, mask, block, scoring=False, mode="taylor"):
        calls.clear()
        grad_weight, scores, dense_sq = dense_path.grad_weight_and_scores(
            dy, x, w, mask, block, torch.tensor(scoring), mode)
        dw, dense = reference.backward(dy, x, w, mask, block, False, True)[1:]
        _close(grad_weight, dw)
        _close(scores, reference.block_scores(w, dw, block, mode) * mask)
        _close(dense_sq, reference.inactive_dense_grad_sq(dense, mask, block) if scoring else torch.zeros_like(scores))
        return bool(calls)

    x, w, dy, mask = _case(8, 0.1, rows=10, cols=10)
    for mode in ("taylor", "gradient", "magnitude", "movement"):
        assert run(x, w, dy, mask, 8, mode=mode)
    assert run(x, w, dy, mask, 8, scoring=True)  # the inactive blocks' norms from the dense product, dW not
    scored, plain = (dense_path.grad_weight_and_scores(dy, x, w, mask, 8, torch.tensor(flag), "taylor")[0]
                     for flag in (True, False))
    assert torch.equal(scored, plain)  # dW's bits never depend on the scoring flag
    assert not run(x, w, dy, torch.ones_like(mask), 8)  # every block live
    dense_mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) < 0.9
    assert not run(x, w, dy, dense_mask, 8)  # far above the crossover
    x4, w4, dy4, mask4 = _case(4, 0.1, rows=10, cols=10)
    assert not run(x4, w4, dy4, mask4, 4)  # blocks under 8: not measured


def test_callers_it_cannot_serve_get_the_dense_product(monkeypatch):
    monkeypatch.setattr(sampled_grad, "max_density", _small_shapes_allowed)
    x, w, dy, mask = _case(8, 0.1, rows=10, cols=10)
    assert sampled_grad.worth_it(dy, x, mask, 8)
    assert not sampled_grad.worth_it(dy.bfloat16(), x.bfloat16(), mask, 8)
    assert not sampled_grad.worth_it(dy.double(), x.double(), mask, 8)
    assert not sampled_grad.worth_it(dy[:0], x[:0], mask, 8)  # no rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sampled_grad.worth_it(dy, x, mask, 8)
    assert not sampled_grad.worth_it(dy, x.clone().requires_grad_(), mask, 8)  # an autograd caller
    with torch.no_grad():
        assert sampled_grad.worth_it(dy, x.clone().requires_grad_(), mask, 8)

    class Observer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Observer():
        assert not sampled_grad.worth_it(dy, x, mask, 8)
    with FakeTensorMode() as mode:
        assert not sampled_grad.worth_it(mode.from_tensor(dy), mode.from_tensor(x), mode.from_tensor(mask), 8)
    seen = []

    def inside_a_transform(t):
        seen.append(sampled_grad.worth_it(dy, t, mask, 8))
        return t.sum()

    torch.func.grad(inside_a_transform)(x)
    assert seen == [False]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # not measured
    assert not sampled_grad.worth_it(dy, x, mask, 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert sampled_grad.worth_it(dy, x, mask, 8)
    monkeypatch.setattr(bsr_path, "ENABLED", False)  # AGPE_CPU_BSR=0 keeps every dense product
    assert not sampled_grad.worth_it(dy, x, mask, 8)  # (re-audit CT: this had become vacuous)


def _pattern_by_expansion(mask, block):
    """The pattern as the whole element mask's CSR form: the oracle for _pattern's build
    from the live blocks' coordinates."""
    elements = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return elements.to(torch.float32).to_sparse_csr(), elements.reshape(-1).nonzero().squeeze(1)


@pytest.mark.parametrize("block", [1, 2, 8, 16])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("grid", [(1, 1), (5, 7), (12, 3), (1, 9)])
def test_the_pattern_is_the_live_elements_csr_form(block, density, grid):
    mask = torch.rand(grid, generator=torch.Generator().manual_seed(block + grid[0])) < density
    mask[0, -1] |= density == 0.9  # a row with its last block live next to an empty one
    pattern, positions = sampled_grad._pattern(mask, block)
    expected, expected_positions = _pattern_by_expansion(mask, block)
    assert pattern.shape == expected.shape and pattern.dtype == torch.float32
    for got, want in ((pattern.crow_indices(), expected.crow_indices()), (pattern.col_indices(), expected.col_indices()),
                      (pattern.values(), expected.values()), (positions, expected_positions)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("block", [8, 32])
def test_a_default_device_context_does_not_move_the_sampled_dw_off_the_cpu(block):
    # audit CR: the pattern's factories and the CSR tensor took the context's device
    x, w, dy, mask = _case(block, 0.3, seed=3)
    with torch.device("meta"):
        dw = sampled_grad.grad_weight(dy, x, mask, block)
    assert dw.device.type == "cpu"
    _close(dw, reference.backward(dy, x, w, mask, block, False, True)[1])


@pytest.mark.parametrize("rows, numel, threads, block, bound", [
    (128, 784_000, 1, 8, 0.16),  # the main job's first layer at one thread
    (128, 1_000_000, 2, 8, 0.105),  # ... and at two
    (128, 1024 * 1024, 2, 32, 0.105),
    (8192, 128 * 128, 1, 8, 0.0),  # audit CR: 1.9x slower there
    (4096, 256 * 256, 1, 8, 0.0),
    (512, 256 * 256, 1, 16, 0.105),
    (512, 256 * 256, 2, 16, 0.0),  # two threads: the dense product threads, the sampled one barely
    (32, 1_000_000, 1, 8, 0.105),  # few rows: 0.16 lost
    (16, 1_000_000, 1, 8, 0.0),  # fewer rows than measured
    (8192, 784_000, 1, 8, 0.105),
    (16384, 4_000_000, 1, 8, 0.0),  # more rows than measured
    (8192, 1_000_000, 2, 8, 0.0),
    (512, 10 ** 6, 3, 8, 0.0),  # three threads: not measured
    (512, 256 * 256, 1, 32, 0.0),  # blocks of 32 were measured from 1024 x 1024 only
    (512, 1024 * 1024, 1, 32, 0.16),
    (512, 10 ** 6, 1, 4, 0.0),  # blocks of 4 and 64: not measured
    (512, 10 ** 6, 1, 64, 0.0),
])
def test_the_envelope_takes_only_the_measured_wins(rows, numel, threads, block, bound):
    assert sampled_grad.max_density(rows, numel, threads, block) == bound


def test_a_small_weight_with_many_rows_keeps_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 16, generator=gen) < 0.1
    x, dy = torch.randn(8192, 128, generator=gen), torch.randn(8192, 128, generator=gen)
    assert not sampled_grad.worth_it(dy, x, mask, 8)
    big = torch.rand(125, 98, generator=gen) < 0.1  # 1000 x 784 in blocks of 8
    assert sampled_grad.worth_it(torch.randn(128, 1000, generator=gen), torch.randn(128, 784, generator=gen), big, 8)
