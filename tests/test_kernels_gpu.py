"""Block-sparse kernels on a real GPU at real sizes, vs the dense-with-zeros formulas.

As in test_kernels.py, inactive weight blocks hold NaN (a kernel that reads one fails) and
score buffers start non-zero (a kernel must add, not overwrite).
"""

import pytest
import torch

from agpe_compile.kernels import (
    block_sparse_forward,
    block_sparse_grad_input,
    block_sparse_grad_weight,
    inactive_grad_sq_,
)
from agpe_compile.layout import BlockLayout, build_layout, update_layout_

from .tolerances import TOLERANCES as OUTPUT_TOLERANCES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The project's table (outputs per dtype vs a float64 oracle from the same rounded inputs;
# outputs here are O(1)) plus two entries of its own.
TOLERANCES = {
    **{dtype: dict(rtol=rtol, atol=atol) for dtype, (rtol, atol) in OUTPUT_TOLERANCES.items()},
    # fp32 under "high": tf32 operands keep 10 mantissa bits (2**-11 relative per product).
    "tf32": dict(rtol=1e-2, atol=1e-2),
    # Score buffers: fp32 block sums of |W*G| / G^2 from the fp32 accumulator, 4096-16384 terms.
    "scores": dict(rtol=1e-3, atol=1e-2),
}
PREFILL = 7.0
M, N, K = 1024, 2048, 2048


def _problem(m, n, k, block_size, density, dtype, seed=0, batch=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows, cols = n // block_size, k // block_size
    mask = torch.rand(rows, cols, generator=g, device="cuda") < density
    expanded = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    weight = torch.randn(n, k, generator=g, device="cuda") / k**0.5
    weight = torch.where(expanded, weight, float("nan")).to(dtype)
    lead = (m,) if batch is None else (batch, m // batch)
    x = torch.randn(*lead, k, generator=g, device="cuda").to(dtype)
    grad_out = (torch.randn(*lead, n, generator=g, device="cuda") / m**0.5).to(dtype)
    bias = torch.randn(n, generator=g, device="cuda").to(dtype)
    return x, weight, grad_out, bias, mask, expanded


def _oracle(x, weight, grad_out, bias, mask, expanded, block_size):
    w = torch.where(expanded, weight.double(), 0.0)
    x2, dy2 = x.double().reshape(-1, x.shape[-1]), grad_out.double().reshape(-1, grad_out.shape[-1])
    dense = dy2.T @ x2
    rows, cols = mask.shape

    def block_sum(t):
        return t.reshape(rows, block_size, cols, block_size).sum(dim=(1, 3))

    y = (x2 @ w.T + bias.double()).reshape(*x.shape[:-1], -1)
    dw = dense * expanded
    return y, (dy2 @ w).reshape(x.shape), dw, block_sum((w * dw).abs()), block_sum(dense.square()) * ~mask


def _check_all(layout, x, weight, grad_out, bias, mask, expanded, block_size, tolerance,
               scores_tolerance=TOLERANCES["scores"]):
    y, dx, dw, taylor, dense_sq = _oracle(x, weight, grad_out, bias, mask, expanded, block_size)
    torch.testing.assert_close(block_sparse_forward(x, weight, layout, bias).double(), y, **tolerance)
    torch.testing.assert_close(block_sparse_grad_input(grad_out, weight, layout).double(), dx, **tolerance)
    saliency = torch.full(mask.shape, PREFILL, device="cuda")
    grad_weight = block_sparse_grad_weight(grad_out, x, layout, weight=weight, saliency=saliency,
                                           saliency_mode="taylor")
    torch.testing.assert_close(grad_weight.double(), dw, **tolerance)
    torch.testing.assert_close(saliency.double(), taylor + PREFILL, **scores_tolerance)
    buffer = torch.full(mask.shape, PREFILL, device="cuda")
    inactive_grad_sq_(grad_out, x, layout, buffer)
    torch.testing.assert_close(buffer.double(), dense_sq + PREFILL, **scores_tolerance)


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_dense_at_size(dtype, block_size):
    problem = _problem(M, N, K, block_size, 0.3, dtype, seed=block_size)
    layout = build_layout(problem[4], block_size)
    _check_all(layout, *problem, block_size, TOLERANCES[dtype])


def test_tf32_when_allowed():
    problem = _problem(M, N, K, 128, 0.3, torch.float32, seed=1)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_all(build_layout(problem[4], 128), *problem, 128, TOLERANCES["tf32"], TOLERANCES["tf32"])
    finally:
        torch.set_float32_matmul_precision(previous)


def test_batched_input_with_partial_tile():
    # 3-D input, M = 1000 rows: the last M tile is partial in every kernel.
    problem = _problem(1000, N, K, 128, 0.25, torch.bfloat16, seed=2, batch=4)
    _check_all(build_layout(problem[4], 128), *problem, 128, TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_and_full_masks(density):
    problem = _problem(512, 1024, 1024, 64, density, torch.bfloat16, seed=3)
    _check_all(build_layout(problem[4], 64), *problem, 64, TOLERANCES[torch.bfloat16])


def test_same_compiled_kernels_serve_every_mask_of_a_bucket():
    # A dense layout rewritten in place to sparser masks: padded slots are skipped and no
    # kernel is compiled again (grids and specialisations depend on the bucket only).
    from agpe_compile.kernels import forward, grad_input, grad_scores, grad_weight

    kernels = [forward.forward_kernel, grad_input.grad_input_kernel, grad_weight.grad_weight_kernel,
               grad_scores.grad_scores_kernel]
    first = _problem(M, N, K, 128, 1.0, torch.bfloat16, seed=4)
    layout = build_layout(first[4], 128)
    _check_all(layout, *first, 128, TOLERANCES[torch.bfloat16])
    compiled = [_compiled_variants(kernel) for kernel in kernels]
    for seed, density in ((5, 0.5), (6, 0.1)):
        problem = _problem(M, N, K, 128, density, torch.bfloat16, seed=seed)
        assert update_layout_(layout, problem[4])
        _check_all(layout, *problem, 128, TOLERANCES[torch.bfloat16])
    assert [_compiled_variants(kernel) for kernel in kernels] == compiled


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version keeps its kernel cache elsewhere")
    return sum(len(entry[0]) for entry in caches.values())


def test_launchers_inside_a_compiled_triton_op():
    # The wiring the custom op uses: layout tensors as op arguments, launchers in a
    # triton_op body, torch.compile inlining the kernels (wrap_triton path).
    @torch.library.triton_op("agpe_kernels_test::sparse_forward", mutates_args=())
    def sparse_forward(x: torch.Tensor, weight: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                       slot_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor,
                       block_slot: torch.Tensor, live_count: torch.Tensor) -> torch.Tensor:
        layout = BlockLayout.from_tensors([row_ptr, col_idx, slot_row, col_ptr, row_idx, block_slot, live_count],
                                          block_size=128, bucket=0.5)
        return block_sparse_forward(x, weight, layout)

    x, weight, _, _, mask, expanded = _problem(M, N, K, 128, 0.4, torch.bfloat16, seed=7)
    layout = build_layout(mask, 128)
    compiled = torch.compile(lambda *args: sparse_forward(*args), fullgraph=True)
    expected = x.double() @ torch.where(expanded, weight.double(), 0.0).T
    torch.testing.assert_close(compiled(x, weight, *layout.tensors()).double(), expected,
                               **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(8, 1024, 8192), (4096, 6144), (1000, 2047)])
def test_bias_grad_at_size(shape, dtype):
    from agpe_compile.kernels import bias_grad

    torch.manual_seed(0)
    grad_out = torch.randn(*shape, device="cuda").to(dtype)
    rows = grad_out.numel() // shape[-1]
    expected = grad_out.reshape(-1, shape[-1]).double().sum(0)
    rtol, atol = OUTPUT_TOLERANCES[dtype]
    torch.testing.assert_close(bias_grad(grad_out).double(), expected.to(dtype).double(),
                               rtol=rtol, atol=atol * rows ** 0.5)


def test_op_bias_gradient_compiled_matches_eager_sum():
    # Through the op's backward under Inductor: agpe::bias_grad is the column-sum kernel.
    import agpe_compile

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).cuda()
    reference = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    agpe_compile.prepare(layer, {"block_size": 128})
    compiled = torch.compile(layer, backend="agpe")
    x = torch.randn(4, 256, 512, device="cuda")
    compiled(x).square().mean().backward()
    w1, b1, w2, b2 = reference
    torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2) \
        .square().mean().backward()
    torch.testing.assert_close(layer[0].bias.grad, b1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer[2].bias.grad, b2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["host", "device"])
def test_tma_candidates_at_size(mode):
    from agpe_compile.kernels import block_sparse_forward, block_sparse_grad_input

    x, weight, grad_out, bias, mask, _ = _problem(M, N, K, 128, 0.4, torch.bfloat16, seed=3)
    layout = build_layout(mask, 128)
    torch.testing.assert_close(block_sparse_forward(x, weight, layout, bias, tma=mode),
                               block_sparse_forward(x, weight, layout, bias), **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(block_sparse_grad_input(grad_out, weight, layout, tma=mode),
                               block_sparse_grad_input(grad_out, weight, layout), **TOLERANCES[torch.bfloat16])


def test_tma_device_candidate_inside_a_compiled_triton_op():
    # Device-built descriptors are what a compiled step could use: does Inductor launch the
    # kernel (it needs Triton's scratch allocator) and get the same result?
    from agpe_compile.kernels import block_sparse_forward

    @torch.library.triton_op("agpe_kernels_test::tma_forward", mutates_args=())
    def tma_forward(x: torch.Tensor, weight: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    slot_row: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor,
                    block_slot: torch.Tensor, live_count: torch.Tensor) -> torch.Tensor:
        layout = BlockLayout.from_tensors([row_ptr, col_idx, slot_row, col_ptr, row_idx, block_slot, live_count],
                                          block_size=128, bucket=0.5)
        return block_sparse_forward(x, weight, layout, tma="device")

    x, weight, _, _, mask, _ = _problem(M, N, K, 128, 0.4, torch.bfloat16, seed=8)
    layout = build_layout(mask, 128)
    compiled = torch.compile(lambda *args: tma_forward(*args), fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, *layout.tensors()), block_sparse_forward(x, weight, layout),
                               **TOLERANCES[torch.bfloat16])
