"""The reference op: opcheck, autograd vs dense-with-zeros, saliency buffers by hand."""

import pytest
import torch

from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.ops import reference
from agpe_compile.packed_layout import build_packed

from .tolerances import assert_close


def _state(grid):
    return (torch.zeros(grid), torch.zeros(grid), torch.tensor(False), torch.zeros(2, dtype=torch.int64))


def _args(x, w, b, mask, block_size=16, mode="taylor", flag=False):
    sal, dgs, score, counters = _state(tuple(mask.shape))
    score.fill_(flag)
    layout, _ = build_packed(mask, block_size, DEFAULT_BUCKETS)
    return (x, w, b, mask, sal, dgs, score, counters, layout, block_size, mode)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(6, 64), (2, 3, 64)])
def test_opcheck_sparse_linear(with_bias, x_shape):
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    b = torch.randn(32, requires_grad=True) if with_bias else None
    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    torch.library.opcheck(torch.ops.agpe.sparse_linear.default, _args(x, w, b, mask))


def test_opcheck_backward_and_masked_weight():
    torch.manual_seed(0)
    mask = torch.tensor([[True, False], [False, True]])
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(5, 32)
    sal, dgs, score, counters = _state((2, 2))
    layout, _ = build_packed(mask, 16, DEFAULT_BUCKETS)
    torch.library.opcheck(torch.ops.agpe.sparse_linear_backward.default,
                          (torch.randn(5, 32), x, w.detach(), mask, sal, dgs, score, counters, layout, 16, "taylor",
                           True, True))
    torch.library.opcheck(torch.ops.agpe.masked_weight.default, (w, mask, sal, dgs, score, counters, 16, "gradient"))


def test_matches_dense_with_zeros_autograd():
    torch.manual_seed(0)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    w = torch.randn(32, 48, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    x = torch.randn(4, 7, 48, requires_grad=True)
    y = torch.ops.agpe.sparse_linear(*_args(x, w, b, mask))
    y.square().sum().backward()
    got = (y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    wm = w * reference.expand_block_mask(mask, 16, w.dtype)
    y_ref = torch.nn.functional.linear(x, wm, b)
    y_ref.square().sum().backward()
    for actual, expected, what in zip(got, (y_ref.detach(), x.grad, w.grad, b.grad), ("y", "dx", "dw", "db")):
        assert_close(actual, expected, what)


def test_saliency_note_example():
    """Note [Saliency buffers]: b=1, W=[[2,0]], M=[[1,0]], X=[[1,3]], dY=[[1]]."""
    w = torch.tensor([[2.0, 0.0]], requires_grad=True)
    x = torch.tensor([[1.0, 3.0]])
    mask = torch.tensor([[True, False]])
    args = _args(x, w, None, mask, block_size=1, flag=True)
    torch.ops.agpe.sparse_linear(*args).sum().backward()
    sal, dgs, _, counters = args[4:8]
    assert sal.tolist() == [[2.0, 0.0]]
    assert dgs.tolist() == [[0.0, 9.0]]
    assert counters.tolist() == [1, 0]
    assert w.grad.tolist() == [[1.0, 0.0]]


def test_dense_grad_scores_only_when_flag_set():
    w = torch.tensor([[2.0, 0.0]], requires_grad=True)
    x = torch.tensor([[1.0, 3.0]])
    args = _args(x, w, None, torch.tensor([[True, False]]), block_size=1, flag=False)
    torch.ops.agpe.sparse_linear(*args).sum().backward()
    assert args[5].tolist() == [[0.0, 0.0]]
    assert args[4].tolist() == [[2.0, 0.0]]


@pytest.mark.parametrize("mode,expected", [("taylor", 2.0), ("gradient", 1.0), ("magnitude", 2.0), ("movement", -2.0)])
def test_saliency_modes(mode, expected):
    w = torch.tensor([[2.0, 0.0]], requires_grad=True)
    args = _args(torch.tensor([[1.0, 3.0]]), w, None, torch.tensor([[True, False]]), block_size=1, mode=mode)
    torch.ops.agpe.sparse_linear(*args).sum().backward()
    assert args[4].tolist() == [[expected, 0.0]]


def test_non_finite_gradient_is_skipped_and_counted():
    w = torch.tensor([[2.0, 1.0]], requires_grad=True)
    args = _args(torch.tensor([[float("inf"), 3.0]]), w, None, torch.tensor([[True, True]]), block_size=1)
    torch.ops.agpe.sparse_linear(*args).sum().backward()
    assert args[4].tolist() == [[0.0, 0.0]]
    assert args[7].tolist() == [1, 1]


def test_masked_weight_matches_sparse_linear_scores():
    torch.manual_seed(0)
    mask = torch.tensor([[True, False], [True, True]])
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(6, 32)
    a = _args(x, w, None, mask, flag=True)
    torch.ops.agpe.sparse_linear(*a).sum().backward()
    g1 = w.grad.clone()
    w.grad = None
    sal, dgs, score, counters = _state((2, 2))
    score.fill_(True)
    wm = torch.ops.agpe.masked_weight(w, mask, sal, dgs, score, counters, 16, "taylor")
    torch.nn.functional.linear(x, wm).sum().backward()
    assert_close(w.grad, g1, "dw")
    assert_close(sal, a[4], "saliency")
    assert_close(dgs, a[5], "dense grad scores")


@pytest.mark.parametrize(
    "w_shape,mask_shape,message",
    [((32, 48), (2, 2), r"block mask of shape \(2, 3\)"), ((30, 48), (2, 3), "block mask of shape")],
)
def test_bad_inputs_name_what_was_expected(w_shape, mask_shape, message):
    x = torch.randn(2, w_shape[1])
    args = _args(x, torch.randn(*w_shape), None, torch.ones(mask_shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        torch.ops.agpe.sparse_linear(*args)


def test_wrong_input_width():
    args = _args(torch.randn(2, 40), torch.randn(32, 48), None, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected input with last dim 48"):
        torch.ops.agpe.sparse_linear(*args)


def test_host_implementation_runs_directly_only_outside_tracing():
    # Real CPU tensors skip the opaque host op's dispatch; anything traced (fake tensors,
    # dispatch modes such as make_fx's) still meets the opaque op.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    import importlib

    op_module = importlib.import_module("agpe_compile.ops.sparse_linear")  # the package re-exports the op

    x = torch.randn(2, 4)
    assert op_module._run_directly(x)
    with FakeTensorMode() as mode:
        assert not op_module._run_directly(mode.from_tensor(x))

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not op_module._run_directly(x)
    from torch.fx.experimental.proxy_tensor import make_fx

    args = _args(torch.randn(3, 32), torch.randn(32, 32), None, torch.tensor([[True, False], [False, True]]))
    for tracing_mode in ("real", "fake"):
        graph = make_fx(lambda *t: torch.ops.agpe.sparse_linear(*t, *args[-2:]), tracing_mode=tracing_mode)(*args[:-2])
        targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
        assert any(t.startswith("agpe.") for t in targets), (tracing_mode, targets)
        assert "aten.linear.default" not in targets and "aten.mm.default" not in targets, targets
