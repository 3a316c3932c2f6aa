"""ops/bsr_path.py (Note [CPU block-sparse products]) against ops/reference.py, the oracle,
and the conditions under which the dense path takes it."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from agpe_compile.ops import bsr_path, dense_path, reference

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
    bias = torch.randn(rows * block, generator=gen)
    return x, w, dy, bias, mask


def _close(actual, expected):
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("block", bsr_path.BLOCK_SIZES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_match_the_reference(block, density, with_bias):
    x, w, dy, bias, mask = _case(block, density)
    bias = bias if with_bias else None
    y = bsr_path.forward(x, w, bias, mask, block)
    dx = bsr_path.grad_input(dy, w, mask, block)
    assert y.shape == (3, 4, w.shape[0]) and y.is_contiguous()
    assert dx.shape == x.shape and dx.is_contiguous()
    _close(y, reference.forward(x, w, bias, mask, block))
    _close(dx, reference.backward(dy, x, w, mask, block, True, False)[0])


def test_non_contiguous_inputs_and_a_mask_edited_between_calls():
    x, w, dy, bias, mask = _case(8, 0.2)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    dy_t = dy.transpose(0, 1).contiguous().transpose(0, 1)
    for _ in range(2):
        _close(bsr_path.forward(x_t, w, bias, mask, 8), reference.forward(x, w, bias, mask, 8))
        _close(bsr_path.grad_input(dy_t, w, mask, 8), reference.backward(dy, x, w, mask, 8, True, False)[0])
        mask.data[mask.nonzero()[0].unbind()] = False  # a write the version counter does not see
        mask.data[4, 6] = True


def test_inactive_blocks_are_never_read():
    # Like the kernels and the gathered path: a NaN stored in an inactive block stays out.
    x, w, dy, bias, mask = _case(8, 0.2)
    mask[0, 0] = False
    w[:8, :8] = float("nan")
    assert torch.isfinite(bsr_path.forward(x, w, bias, mask, 8)).all()
    assert torch.isfinite(bsr_path.grad_input(dy, w, mask, 8)).all()


def test_the_dense_path_takes_it_only_where_it_is_faster_and_readable(monkeypatch):
    calls = []
    real_forward, real_grad_input = bsr_path.forward, bsr_path.grad_input
    monkeypatch.setattr(bsr_path, "forward", lambda *a: calls.append("forward") or real_forward(*a))
    monkeypatch.setattr(bsr_path, "grad_input", lambda *a: calls.append("grad_input") or real_grad_input(*a))

    def taken(x, w, dy, mask, block):
        calls.clear()
        y = dense_path.forward(x, w, None, mask, block, unmasked=False)
        dx = dense_path.grad_input(dy, w, mask, block, unmasked=False)
        _close(y, reference.forward(x, w, None, mask, block))
        _close(dx, reference.backward(dy, x, w, mask, block, True, False)[0])
        return calls == ["forward", "grad_input"]

    x, w, dy, _, mask = _case(8, 0.05, rows=10, cols=10)
    assert bsr_path.worth_it(x, w, mask, 8) and taken(x, w, dy, mask, 8)
    assert not taken(x, w, dy, torch.ones_like(mask), 8)  # every block live: the dense products
    dense_mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) < 0.9
    assert not taken(x, w, dy, dense_mask, 8)  # far above the crossover
    x4, w4, dy4, _, mask4 = _case(4, 0.05, rows=10, cols=10)
    assert not taken(x4, w4, dy4, mask4, 4)  # a block size not measured
    half = (x.bfloat16(), w.bfloat16(), dy.bfloat16())
    assert not bsr_path.worth_it(half[0], half[1], mask, 8)  # MKL has no 16-bit BSR product
    assert not bsr_path.worth_it(x.double(), w.double(), mask, 8)
    assert not bsr_path.worth_it(x, w.t().contiguous().t(), mask, 8)  # a column-major weight

    class Observer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Observer():
        assert not bsr_path.worth_it(x, w, mask, 8)
    with FakeTensorMode() as mode:
        fx, fw, fmask = (mode.from_tensor(t) for t in (x, w, mask))
        assert not bsr_path.worth_it(fx, fw, fmask, 8)
    assert not bsr_path.worth_it(x[:0], w, mask, 8)  # no rows


def test_the_crossover_falls_with_rows_and_threads(monkeypatch):
    for numel in (1000 * 1000, 2048 * 2048):
        for threads in (1, 2, 3, 16):
            crossovers = [bsr_path.max_density(rows, numel, threads) for rows in (1, 32, 128, 512, 2048, 10**6)]
            assert all(0.0 <= c <= 0.125 for c in crossovers)
            assert crossovers == sorted(crossovers, reverse=True), crossovers
        assert bsr_path.max_density(128, numel, 1) >= bsr_path.max_density(128, numel, 2)
        assert bsr_path.max_density(128, numel, 3) == 0.0  # not measured: the dense products
    x, w, dy, _, mask = _case(8, 0.05, rows=10, cols=10)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not bsr_path.worth_it(x, w, mask, 8)
    monkeypatch.setattr(bsr_path, "ENABLED", False)  # AGPE_CPU_BSR=0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not bsr_path.worth_it(x, w, mask, 8)


def test_a_compiled_sparse_layer_trains_like_the_reference(monkeypatch):
    # The main job's case end to end: block 8, density 0.1, the op's in-place eager lowering.
    import agpe_compile
    from agpe_compile import AGPEConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsifier = agpe_compile.Sparsifier(model, optimizer, AGPEConfig(
            block_size=8, target_sparsity=0.9, initial_density=0.1, exclude=("2",),
            update_interval=10**6, end_step=2 * 10**6))
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(32, 64)
    layer = model[0]
    mask = sparsifier.layers["0"].block_mask
    with torch.no_grad():  # (as the op's implementation runs: below autograd)
        assert bsr_path.worth_it(x, layer.weight, mask, 8)
    calls = []
    for name in ("forward", "grad_input"):
        real = getattr(bsr_path, name)
        monkeypatch.setattr(bsr_path, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for _ in range(3):
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
        h = reference.forward(x, w, b, mask, 8).relu()
        expected = model[2](h).square().mean()
        expected.backward()
        loss = compiled(x).square().mean()
        loss.backward()
        _close(loss.detach(), expected.detach())
        _close(layer.weight.grad, w.grad * reference.expand_block_mask(mask, 8, torch.float32))
        optimizer.step()
        optimizer.zero_grad()
        model[2].zero_grad()
        sparsifier.step(loss)
    assert calls.count("forward") == 3 and calls.count("grad_input") == 0  # (the first layer needs no dX)


def test_callers_the_products_cannot_serve_get_the_dense_ones():
    # Helper audit CQ: each of these reached the BSR products and failed or differed.
    x, w, dy, bias, mask = _case(8, 0.05, rows=10, cols=10)
    assert bsr_path.worth_it(x, w, mask, 8, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward run inside autocast
        assert not bsr_path.worth_it(dy, w, mask, 8)
        dx = dense_path.grad_input(dy, w, mask, 8, unmasked=False)  # raised: no bf16 BSR product in MKL
    torch.testing.assert_close(dx.float(), reference.backward(dy, x, w, mask, 8, True, False)[0], rtol=0.05, atol=0.3)
    # an autograd caller keeps a differentiable result
    xg = x.clone().requires_grad_()
    y = dense_path.forward(xg, w, bias, mask, 8, unmasked=False)
    assert y.grad_fn is not None
    with torch.no_grad():
        assert bsr_path.worth_it(xg, w, mask, 8, bias)
    # inside a torch.func transform (dY and W plain tensors)
    grad = torch.func.grad(lambda t: dense_path.grad_input(t, w, mask, 8, unmasked=False).sum())(dy)  # raised
    _close(grad, torch.ones_like(x) @ reference.masked_weight(w, mask, 8).t())
    # a sparse-layout input, a bias of another dtype
    assert not bsr_path.worth_it(x.reshape(-1, x.shape[-1]).to_sparse(), w, mask, 8)
    assert not bsr_path.worth_it(x, w, mask, 8, bias.double())
    assert not bsr_path.worth_it(x, w, mask, 8, bias.bfloat16())


def test_a_backward_under_autocast_trains_through_a_compiled_sparse_layer():
    import agpe_compile
    from agpe_compile import AGPEConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agpe_compile.Sparsifier(model, optimizer, AGPEConfig(
            block_size=8, target_sparsity=0.9, initial_density=0.1, exclude=("0", "3"),
            update_interval=10**6, end_step=2 * 10**6))
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    loss = compiled(torch.randn(32, 16)).square().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.backward()  # the layer's dX under autocast: raised NotImplementedError (audit CQ)
    assert model[1].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_no_warning_of_the_sparse_format_reaches_the_user_in_a_fresh_process():
    import subprocess
    import sys

    code = ("import torch\n"
            "with torch.device('meta'):\n"  # re-audit CT: the import's warm-up products took that device
            "    import agpe_compile\n"
            "from agpe_compile.ops import bsr_path, sampled_grad\n"
            "m = torch.rand(5, 7) < 0.3; m[0, 0] = True\n"
            "w, x, dy = torch.randn(40, 56), torch.randn(3, 56), torch.randn(3, 40)\n"
            "for _ in range(2):\n"
            "    bsr_path.forward(x, w, None, m, 8); bsr_path.grad_input(dy, w, m, 8)\n"
            "    sampled_grad.grad_weight(dy, x, m, 8)\n"  # the CSR format's warning, too
            "import warnings; print(len([f for f in warnings.filters if 'Sparse' in str(f[1])]))\n")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"  # and no filter of agpe's left behind


@pytest.mark.parametrize("block", bsr_path.BLOCK_SIZES)
def test_a_default_device_context_does_not_move_the_products_off_the_cpu(block):
    # audit CR: the BSR tensor took the context's device (meta here, cuda on a GPU machine)
    x, w, dy, bias, mask = _case(block, 0.3, seed=3)
    with torch.device("meta"):
        y = bsr_path.forward(x, w, bias, mask, block)
        dx = bsr_path.grad_input(dy, w, mask, block)
    assert y.device.type == dx.device.type == "cpu"
    _close(y, reference.forward(x, w, bias, mask, block))
    _close(dx, reference.backward(dy, x, w, mask, block, True, False)[0])
