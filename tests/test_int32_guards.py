"""The Triton kernels index with int32 offsets (helper audit BO): what an operand reaches in
memory, not its numel, decides; a weight of 2**31 or more elements runs the dense path.
Shapes only: meta tensors allocate nothing."""

import pytest
import torch

from agpe_compile import kernels
from agpe_compile.kernels.checks import check_int32_reach
from agpe_compile.layout import build_layout
from agpe_compile.ops import paths


def _meta(shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_extent_is_what_the_strides_reach():
    assert kernels.extent(torch.empty(3, 4)) == 12
    wide = torch.empty(5, 12)
    assert kernels.extent(wide[:, :4]) == 4 * 12 + 4  # a slice of a fused projection's output
    assert kernels.extent(torch.empty(0, 4)) == 0
    assert kernels.extent(torch.empty(4, 1).expand(4, 6)) == 4


def test_a_strided_input_reaching_past_2_31_runs_the_dense_path():
    qkv = _meta((65536, 3 * 12288))
    x = qkv[:, :12288]  # numel 8.1e8, reaches 2.4e9
    assert x.numel() < 2**31 <= kernels.extent(x)
    weight = _meta((4096, 12288))
    assert "2**31" in paths._no_triton_reason(x, weight, 128)
    assert paths._no_triton_reason(x.contiguous(), weight, 128) is None


def test_a_weight_of_2_31_elements_runs_the_dense_path():
    x = _meta((8, 32768))
    assert "2**31" in paths._no_triton_reason(x, _meta((65536, 32768)), 128)
    assert paths._no_triton_reason(x, _meta((65536 - 128, 32768)), 128) is None


def test_the_launchers_refuse_what_int32_offsets_cannot_reach():
    small = build_layout(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="strides"):
        check_int32_reach(small, [_meta((2**26 + 1, 64))[:, :32]])
    big = build_layout(torch.ones(512, 256, dtype=torch.bool), 128)  # a [65536, 32768] weight
    with pytest.raises(ValueError, match="weight of < 2\\*\\*31"):
        check_int32_reach(big, [])
    with pytest.raises(ValueError, match="an output of < 2\\*\\*31"):
        check_int32_reach(small, [], output_rows=2**26, output_features=32)
    check_int32_reach(small, [_meta((64, 32))], output_rows=64, output_features=32)  # fine


def test_a_strided_output_gradient_is_made_contiguous_for_the_kernels(monkeypatch):
    # re-audit BP F4: the path is chosen from x and W; a dY slice reaching past 2**31 elements
    # would have reached the kernels (which refuse it) instead of a contiguous copy
    import importlib

    from agpe_compile.packed_layout import build_packed

    sparse_linear = importlib.import_module("agpe_compile.ops.sparse_linear")  # the module, not the op

    seen = []
    monkeypatch.setattr(paths, "choose", lambda x, weight, layout: "triton")
    monkeypatch.setattr(paths, "grad_input", lambda grad_out, *args: seen.append(kernels.extent(grad_out)) or
                        torch.zeros(grad_out.shape[0], 32))
    mask = torch.ones(2, 2, dtype=torch.bool)
    layout, _ = build_packed(mask, 16, (1.0,))
    stride = 2**31 // 3 + 64
    wide = torch.empty(3 * stride + 32, dtype=torch.float16)  # a wider gradient's storage (never written)
    grad_out = wide.as_strided((4, 32), (stride, 1))
    assert kernels.extent(grad_out) >= 2**31
    sparse_linear._backward_impl(grad_out, torch.zeros(4, 32, dtype=torch.float16),
                                 torch.zeros(32, 32, dtype=torch.float16), mask, torch.zeros(2, 2),
                                 torch.zeros(2, 2), torch.tensor(False), torch.zeros(2, dtype=torch.int64), layout,
                                 16, "taylor", True, False)
    assert seen == [4 * 32]
