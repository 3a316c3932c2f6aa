"""Every implementation path of the op against the dense reference, through the op itself.

The path is normally chosen from device, dtype and bucket (ops/paths.py); here it is
forced, so the gather path and the Triton kernels (under TRITON_INTERPRET=1 on CPU) are
exercised through the same custom op and autograd formula the compiled model calls.
"""

import pytest
import torch

from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.ops import paths
from agpe_compile.packed_layout import build_packed

from .tolerances import SCORE_TOLERANCE, TOLERANCES

MASK = torch.tensor([[True, False, True, False], [False, False, True, True], [True, True, False, False]])
B = 16


def run_op(x, w, bias, flag, mode):
    state = (torch.zeros(MASK.shape), torch.zeros(MASK.shape), torch.tensor(flag), torch.zeros(2, dtype=torch.int64))
    layout, _ = build_packed(MASK, B, DEFAULT_BUCKETS)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    y = torch.ops.agpe.sparse_linear(x, w, bias, MASK, *state, layout, B, mode)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, w.grad, bias.grad, state[0], state[1], state[3]


@pytest.mark.parametrize("path", ["gather", "triton"])
@pytest.mark.parametrize("mode", ["taylor", "gradient"])
@pytest.mark.parametrize("flag", [False, True])
def test_path_matches_reference(monkeypatch, path, mode, flag):
    if path == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4 * B)
    w = torch.randn(3 * B, 4 * B) * torch.repeat_interleave(torch.repeat_interleave(MASK, B, 0), B, 1)
    bias = torch.randn(3 * B)
    expected = run_op(x, w, bias, flag, mode)
    chosen = []
    monkeypatch.setattr(paths, "choose", lambda *a: chosen.append(path) or path)
    actual = run_op(x, w, bias, flag, mode)
    assert chosen, "the forced path was never used"
    names = ("y", "dx", "dw", "db", "saliency", "dense_grad_sq", "counters")
    for name, a, e in zip(names, actual, expected):
        if name == "counters":
            assert torch.equal(a, e)
        else:
            tol = TOLERANCES[torch.float32] if name in ("y", "dx", "dw", "db") else SCORE_TOLERANCE
            torch.testing.assert_close(a, e, rtol=tol[0], atol=tol[1], msg=lambda m: f"{path} {name}: {m}")
    if flag:
        assert torch.all(actual[5][~MASK] > 0)


def test_cpu_choice_follows_cost_model():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :2] = True  # density 0.125 -> bucket 0.15
    layout = paths.layout_of(build_packed(mask, 128, DEFAULT_BUCKETS)[0], mask, 128)
    big = torch.empty(1024, 16 * 128)
    assert paths.choose(big, torch.empty(16 * 128, 16 * 128), layout) == "gather"
    dense_layout = paths.layout_of(build_packed(torch.ones(16, 16, dtype=torch.bool), 128, DEFAULT_BUCKETS)[0],
                                   mask, 128)
    assert paths.choose(big, torch.empty(16 * 128, 16 * 128), dense_layout) == "dense"


def test_float64_on_the_cpu_takes_the_dense_path_where_gather_would_win():
    # the gathered path takes fp32/fp16/bf16 only: a float64 layer stays on the dense path
    # (found by an audit: it raised once a layer got sparse enough for the cost model)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :2] = True
    layout = paths.layout_of(build_packed(mask, 128, DEFAULT_BUCKETS)[0], mask, 128)
    big = torch.empty(1024, 16 * 128, dtype=torch.float64)
    assert paths.choose(big, torch.empty(16 * 128, 16 * 128, dtype=torch.float64), layout) == "dense"
    assert paths.choose(big.float(), torch.empty(16 * 128, 16 * 128), layout) == "gather"
    x = torch.randn(64, 512, dtype=torch.float64)
    w = torch.randn(512, 512, dtype=torch.float64, requires_grad=True)
    small = torch.zeros(4, 4, dtype=torch.bool)
    small[0, 0] = True
    packed, _ = build_packed(small, 128, DEFAULT_BUCKETS)
    y = torch.ops.agpe.sparse_linear(x, w, None, small, torch.zeros(4, 4), torch.zeros(4, 4), torch.tensor(False),
                                     torch.zeros(2, dtype=torch.int64), packed, 128, "taylor")
    torch.testing.assert_close(y, x[:, :128] @ w[:128, :128].T @ torch.eye(128, 512, dtype=torch.float64))


def test_reasons_the_kernels_cannot_run_are_named():
    x32 = torch.empty(2, 64)
    assert "block size 16" in paths._no_triton_reason(x32, torch.empty(64, 64), 16)
    assert "float64" in paths._no_triton_reason(x32.double(), torch.empty(64, 64).double(), 32)
    assert "float16" in paths._no_triton_reason(x32, torch.empty(64, 64).half(), 32)


def test_activations_past_int32_indexing_take_the_dense_path():
    # The kernels index with int32: 2**31 elements in x or y must not reach them (meta
    # tensors: the rule looks at shapes only, nothing is allocated).
    weight = torch.empty(4096, 2048, device="meta", dtype=torch.bfloat16)
    fits = torch.empty(8, 1024, 2048, device="meta", dtype=torch.bfloat16)
    too_many_outputs = torch.empty(64, 8192, 2048, device="meta", dtype=torch.bfloat16)  # y: 2**31 elements
    assert "2**31" in paths._no_triton_reason(too_many_outputs, weight, 128)
    assert "2**31" not in (paths._no_triton_reason(fits, weight, 128) or "")
