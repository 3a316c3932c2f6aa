"""Rewritten layers under torch.autocast: bf16 compute, fp32 master weights and buffers."""

import pytest
import torch

import agpe_compile

from .models import MLP, aot_backend, eager_masked, grads, set_random_masks


def _model():
    torch.manual_seed(0)
    model = MLP((64, 128, 64, 32))
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.5)
    return model


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_autocast_casts_operands_not_buffers(lowering):
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(8, 64)
    backend = aot_backend() if lowering == "aot_eager" else agpe_compile.AgpeBackend({})
    compiled = torch.compile(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    got = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_y = eager_masked(model, x)
    want_y.float().square().mean().backward()
    want = grads(model)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2e-2, atol=2e-2)
    for name in want:
        assert got[name].dtype == torch.float32  # fp32 master weights keep fp32 gradients
        torch.testing.assert_close(got[name], want[name], rtol=5e-2, atol=5e-3, msg=lambda m: f"{name}: {m}")
    for state in agpe_compile.layer_states(model).values():
        assert state.saliency.dtype == torch.float32 and state.saliency.sum() > 0  # scores reached the buffer


def test_autocast_on_the_op_directly():
    from agpe_compile.layout import DEFAULT_BUCKETS
    from agpe_compile.packed_layout import build_packed

    mask = torch.tensor([[True, False], [True, True]])
    layout, _ = build_packed(mask, 16, DEFAULT_BUCKETS)
    sal, dgs = torch.zeros(2, 2), torch.zeros(2, 2)
    x = torch.randn(4, 32)
    w = torch.randn(32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.agpe.sparse_linear(x, w, None, mask, sal, dgs, torch.tensor(False),
                                         torch.zeros(2, dtype=torch.int64), layout, 16, "taylor")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and sal.dtype == torch.float32 and sal[mask].gt(0).all()
    assert sal[~mask].eq(0).all()


def test_autocast_leaves_float64_operands_alone():
    # torch's autocast does not cast float64 ops; neither does agpe's (found by an audit)
    from agpe_compile.layout import DEFAULT_BUCKETS
    from agpe_compile.packed_layout import build_packed

    mask = torch.tensor([[True, False], [True, True]])
    layout, _ = build_packed(mask, 16, DEFAULT_BUCKETS)
    x = torch.randn(4, 32, dtype=torch.float64)
    w = torch.randn(32, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.agpe.sparse_linear(x, w, None, mask, torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor(False),
                                         torch.zeros(2, dtype=torch.int64), layout, 16, "taylor")
        plain = torch.nn.functional.linear(x, w)
    assert y.dtype == plain.dtype == torch.float64
    em = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    torch.testing.assert_close(y, x @ (w * em).T)


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_autocast_under_a_sparsifier(lowering):
    # The Sparsifier marks its layers zero_inactive, so the rewritten calls pass the op's
    # last argument; the autocast kernel must take it and pass it on.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((64, 128, 64, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(
        target_sparsity=0.5, policy="static", block_size=16))
    assert all(state.zero_inactive for state in sparsifier.layers.values())
    backend = aot_backend() if lowering == "aot_eager" else agpe_compile.AgpeBackend({})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_y = eager_masked(model, x)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2e-2, atol=2e-2)
    for state in sparsifier.layers.values():
        assert state.weight.grad.dtype == torch.float32 and state.saliency.sum() > 0
