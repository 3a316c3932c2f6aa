"""Block-sparse kernels vs the dense-with-zeros formulas, on CPU.

The Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by conftest.py
without a GPU) on small shapes; the pure-torch gather path runs the same checks.
Inactive weight blocks are filled with NaN, so any kernel that reads one fails the
comparison, and score buffers start non-zero, so a kernel that overwrites instead of
adding (or touches an entry it must not) fails too.
"""

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agpe_compile.kernels import (
    SALIENCY_MODES,
    block_sparse_forward,
    block_sparse_grad_input,
    block_sparse_grad_weight,
    choose_cpu_path,
    gather_forward,
    gather_grad_input,
    gather_grad_weight,
    inactive_grad_sq_,
    mask_and_score_,
)
from agpe_compile.layout import build_layout, update_layout_

from .tolerances import TOLERANCES as OUTPUT_TOLERANCES

# The project's table (outputs, per dtype, vs a float64 oracle from the same rounded
# inputs; the kernels accumulate in fp32 and round once) plus the score buffers.
TOLERANCES = {
    **{dtype: dict(rtol=rtol, atol=atol) for dtype, (rtol, atol) in OUTPUT_TOLERANCES.items()},
    # Score buffers are float32 sums taken from the fp32 accumulator (never the rounded dW),
    # in every dtype; atol covers cancellation in "movement" (sums of signed terms ~1e3).
    "scores": dict(rtol=1e-4, atol=2e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREFILL = 7.0  # score buffers are running sums: kernels must add to this, not overwrite it

TRITON = SimpleNamespace(name="triton", forward=block_sparse_forward, grad_input=block_sparse_grad_input,
                         grad_weight=block_sparse_grad_weight)
GATHER = SimpleNamespace(name="gather", forward=gather_forward, grad_input=gather_grad_input,
                         grad_weight=gather_grad_weight)


@pytest.fixture(params=[TRITON, GATHER], ids=lambda p: p.name)
def path(request):
    if request.param is TRITON:
        pytest.importorskip("triton")
    return request.param


@pytest.fixture
def triton_kernels():
    pytest.importorskip("triton")


@dataclasses.dataclass
class Problem:
    x: torch.Tensor  # [..., K]
    weight: torch.Tensor  # [N, K], NaN in inactive blocks
    grad_out: torch.Tensor  # [..., N]
    bias: torch.Tensor
    mask: torch.Tensor  # [R, C] bool
    block_size: int

    def expanded(self) -> torch.Tensor:
        b = self.block_size
        return self.mask.repeat_interleave(b, 0).repeat_interleave(b, 1)

    def oracle(self, mode=None):
        """The formulas of the contract, in float64: y, dX, dW, saliency, inactive dense grad sq."""
        em = self.expanded()
        w = torch.where(em, self.weight.double(), 0.0)
        x2 = self.x.double().reshape(-1, self.x.shape[-1])
        dy2 = self.grad_out.double().reshape(-1, self.grad_out.shape[-1])
        y = (x2 @ w.T + self.bias.double()).reshape(*self.x.shape[:-1], -1)
        dx = (dy2 @ w).reshape(self.x.shape)
        dense = dy2.T @ x2
        dw = dense * em
        scores = {"taylor": (w * dw).abs(), "gradient": dw.abs(), "magnitude": w.abs(),
                  "movement": -(w * dw), None: torch.zeros_like(w)}[mode]
        return y, dx, dw, self.block_sum(scores), self.block_sum(dense.square()) * ~self.mask

    def block_sum(self, t):
        (rows, cols), b = self.mask.shape, self.block_size
        return t.reshape(rows, b, cols, b).sum(dim=(1, 3))


def make_problem(m, rows, cols, block_size, density, dtype, *, seed=0, batch=None) -> Problem:
    g = torch.Generator().manual_seed(seed)
    n, k = rows * block_size, cols * block_size
    mask = torch.rand(rows, cols, generator=g) < density
    em = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    weight = torch.where(em, torch.randn(n, k, generator=g), float("nan")).to(dtype)
    lead = (m,) if batch is None else (batch, m // batch)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    grad_out = torch.randn(*lead, n, generator=g).to(dtype)
    return Problem(x, weight, grad_out, torch.randn(n, generator=g).to(dtype), mask, block_size)


def assert_matches(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOLERANCES[dtype])


def assert_scores(actual, expected):
    torch.testing.assert_close(actual, (expected + PREFILL).float(), **TOLERANCES["scores"])


# name -> (m, rows, cols, block size, density, batch, bias). m=40 leaves a partial M tile.
CASES = {
    "mixed": (40, 3, 4, 16, 0.5, None, True),
    "empty": (16, 2, 3, 16, 0.0, None, True),
    "full": (24, 2, 2, 32, 1.0, None, False),
    "batched": (48, 4, 3, 16, 0.4, 2, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_all_paths_match_dense_formulas(path, case, dtype):
    m, rows, cols, b, density, batch, with_bias = CASES[case]
    p = make_problem(m, rows, cols, b, density, dtype, seed=len(case), batch=batch)
    assert density in (0.0, 1.0) or 0 < int(p.mask.sum()) < p.mask.numel()  # both kinds of block
    layout = build_layout(p.mask, b)
    y, dx, dw, taylor, _ = p.oracle("taylor")
    bias = p.bias if with_bias else None
    if not with_bias:
        y = y - p.bias.double()
    assert_matches(path.forward(p.x, p.weight, layout, bias), y, dtype)
    assert_matches(path.grad_input(p.grad_out, p.weight, layout), dx, dtype)
    saliency = torch.full(p.mask.shape, PREFILL)
    grad_weight = path.grad_weight(p.grad_out, p.x, layout, weight=p.weight, saliency=saliency,
                                   saliency_mode="taylor")
    assert_matches(grad_weight, dw, dtype)
    assert_scores(saliency, taylor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", SALIENCY_MODES)
def test_saliency_modes_add_to_running_sums(path, mode, dtype):
    p = make_problem(32, 3, 3, 16, 0.5, dtype, seed=3)
    saliency = torch.full(p.mask.shape, PREFILL)
    weight = None if mode == "gradient" else p.weight
    grad_weight = path.grad_weight(p.grad_out, p.x, build_layout(p.mask, 16), weight=weight,
                                   saliency=saliency, saliency_mode=mode)
    _, _, dw, scores, _ = p.oracle(mode)
    assert_matches(grad_weight, dw, dtype)
    assert_scores(saliency, scores)
    assert (saliency[~p.mask] == PREFILL).all()


@pytest.mark.parametrize("m, split", [(200, 3), (300, 4), (130, 16)])
@pytest.mark.parametrize("mode", ["taylor", "movement"])
def test_grad_weight_split_k_matches_unsplit(triton_kernels, m, split, mode):
    # Split-K (few live blocks, long M): partial sums in an fp32 workspace, reduced in a
    # fixed order by the finish kernel; padded slots must stay untouched there too.
    p = make_problem(m, 3, 4, 16, 0.4, torch.float32, seed=12)
    layout = build_layout(torch.ones(3, 4, dtype=torch.bool), 16)
    assert update_layout_(layout, p.mask)  # a full-capacity layout: padded slots exist
    saliency = torch.full(p.mask.shape, PREFILL)
    grad_weight = block_sparse_grad_weight(p.grad_out, p.x, layout, weight=p.weight, saliency=saliency,
                                           saliency_mode=mode, split=split)
    _, _, dw, scores, _ = p.oracle(mode)
    assert_matches(grad_weight, dw, torch.float32)
    assert_scores(saliency, scores)
    with pytest.raises(ValueError, match=r"split to be a positive int, got 0"):
        block_sparse_grad_weight(p.grad_out, p.x, layout, split=0)


def test_grad_weight_without_saliency(path):
    p = make_problem(20, 2, 3, 16, 0.5, torch.float32, seed=4)
    assert_matches(path.grad_weight(p.grad_out, p.x, build_layout(p.mask, 16)), p.oracle()[2], torch.float32)


def test_padded_slots_are_skipped(path):
    # A dense layout updated in place to a sparse mask: 15 padded slots point at block
    # (0, 0), which is inactive here, so a kernel that runs a padded slot writes there.
    p = make_problem(32, 4, 4, 16, 0.0, torch.float32, seed=5)
    p.mask[1, 2] = True
    p.weight[16:32, 32:48] = torch.randn(16, 16)
    layout = build_layout(torch.ones(4, 4, dtype=torch.bool), 16)
    assert update_layout_(layout, p.mask) and layout.capacity == 16
    y, dx, dw, scores, _ = p.oracle("gradient")
    assert_matches(path.forward(p.x, p.weight, layout, p.bias), y, torch.float32)
    assert_matches(path.grad_input(p.grad_out, p.weight, layout), dx, torch.float32)
    saliency = torch.full(p.mask.shape, PREFILL)
    grad_weight = path.grad_weight(p.grad_out, p.x, layout, saliency=saliency, saliency_mode="gradient")
    assert_matches(grad_weight, dw, torch.float32)
    assert_scores(saliency, scores)


def test_strided_inputs(path):
    # Transposed 2-D views (column-major storage) take the stride path, not a copy.
    p = make_problem(24, 2, 3, 16, 0.6, torch.float32, seed=6)
    x, grad_out = p.x.T.contiguous().T, p.grad_out.T.contiguous().T
    assert not x.is_contiguous()
    layout = build_layout(p.mask, 16)
    y, dx, dw, _, _ = p.oracle()
    assert_matches(path.forward(x, p.weight, layout, p.bias), y, torch.float32)
    assert_matches(path.grad_input(grad_out, p.weight, layout), dx, torch.float32)
    assert_matches(path.grad_weight(grad_out, x, layout), dw, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inactive_grad_sq_adds_dense_norms_of_inactive_blocks(triton_kernels, dtype):
    p = make_problem(40, 3, 4, 16, 0.5, dtype, seed=7, batch=2)
    buffer = torch.full(p.mask.shape, PREFILL)
    inactive_grad_sq_(p.grad_out, p.x, build_layout(p.mask, 16), buffer)
    assert_scores(buffer, p.oracle()[4])
    assert (buffer[p.mask] == PREFILL).all()


@pytest.mark.parametrize("flag, adds", [(torch.tensor(True), True), (torch.tensor(False), False),
                                        (torch.tensor(1, dtype=torch.int32), True), (torch.tensor(0), False)])
def test_inactive_grad_sq_enabled_flag(triton_kernels, flag, adds):
    p = make_problem(16, 2, 2, 16, 0.5, torch.float32, seed=8)
    buffer = torch.full(p.mask.shape, PREFILL)
    inactive_grad_sq_(p.grad_out, p.x, build_layout(p.mask, 16), buffer, enabled=flag)
    assert_scores(buffer, p.oracle()[4] if adds else torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [*SALIENCY_MODES, None])
@pytest.mark.parametrize("flag", [None, torch.tensor(True), torch.tensor(False)], ids=["noflag", "on", "off"])
def test_mask_and_score_masks_the_dense_gradient_in_one_pass(triton_kernels, mode, dtype, flag):
    # The CUDA dense path: cuBLAS gives the dense dW, this kernel masks it in place, adds the
    # live blocks' saliency and (while the flag is on) the inactive blocks' dense norms.
    p = make_problem(40, 3, 4, 16, 0.5, dtype, seed=11)
    weight = torch.where(p.expanded(), p.weight, torch.randn(p.weight.shape).to(dtype))  # no NaN: W is read
    p = dataclasses.replace(p, weight=weight)
    layout = build_layout(p.mask, 16)
    dense = (p.grad_out.double().reshape(-1, 48).T @ p.x.double().reshape(-1, 64)).to(dtype)
    grad = dense.clone()
    saliency = torch.full(p.mask.shape, PREFILL) if mode else None
    dense_sq = torch.full(p.mask.shape, PREFILL)
    out = mask_and_score_(grad, p.weight, layout, saliency=saliency, saliency_mode=mode, dense_grad_sq=dense_sq,
                          enabled=flag)
    assert out is grad
    em = p.expanded()
    assert torch.equal(grad, torch.where(em, dense, torch.zeros((), dtype=dtype)))  # bit-exact, in place
    w = torch.where(em, p.weight.double(), 0.0)
    g = grad.double()
    if mode:
        scores = {"taylor": (w * g).abs(), "gradient": g.abs(), "magnitude": w.abs(), "movement": -(w * g)}[mode]
        assert_scores(saliency, p.block_sum(scores))
    adds = flag is None or bool(flag)
    expected_sq = p.block_sum(dense.double().square()) * ~p.mask if adds else torch.zeros(3, 4, dtype=torch.float64)
    assert_scores(dense_sq, expected_sq)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), rows=st.integers(1, 4), cols=st.integers(1, 4), block_size=st.sampled_from([16, 32]),
       density=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_random_shapes_triton(m, rows, cols, block_size, density, dtype, seed):
    pytest.importorskip("triton")
    p = make_problem(m, rows, cols, block_size, density, dtype, seed=seed)
    layout = build_layout(p.mask, block_size)
    y, dx, dw, scores, dense_sq = p.oracle("movement")
    assert_matches(block_sparse_forward(p.x, p.weight, layout, p.bias), y, dtype)
    assert_matches(block_sparse_grad_input(p.grad_out, p.weight, layout), dx, dtype)
    saliency, buffer = torch.full(p.mask.shape, PREFILL), torch.full(p.mask.shape, PREFILL)
    grad_weight = block_sparse_grad_weight(p.grad_out, p.x, layout, weight=p.weight, saliency=saliency,
                                           saliency_mode="movement")
    assert_matches(grad_weight, dw, dtype)
    assert_scores(saliency, scores)
    inactive_grad_sq_(p.grad_out, p.x, layout, buffer)
    assert_scores(buffer, dense_sq)


def _bad_calls():
    p = make_problem(16, 2, 2, 16, 0.5, torch.float32)
    layout = build_layout(p.mask, 16)
    half = p.x.half()
    return {
        "x features": (lambda f: f.forward(p.x[:, :16], p.weight, layout), ValueError, r"x of shape \[\.\.\., 32\]"),
        "mixed dtypes": (lambda f: f.forward(half, p.weight, layout), ValueError, r"float16 .* got torch\.float32"),
        "weight shape": (lambda f: f.grad_input(p.grad_out, p.weight[:16], layout), ValueError,
                         r"weight of shape \(32, 32\) .* got \(16, 32\)"),
        "bias shape": (lambda f: f.forward(p.x, p.weight, layout, p.bias[:3]), ValueError, r"bias \(32,\)"),
        "int input": (lambda f: f.forward(p.x.long(), p.weight, layout), TypeError, r"x dtype in .* got torch\.int64"),
        "rows": (lambda f: f.grad_weight(p.grad_out[:8], p.x, layout), ValueError,
                 r"same number of rows, got 8 and 16"),
        "layout": (lambda f: f.forward(p.x, p.weight, p.mask), TypeError, r"BlockLayout, got Tensor"),
        "mode": (lambda f: f.grad_weight(p.grad_out, p.x, layout, saliency=torch.zeros(2, 2), saliency_mode="l1"),
                 ValueError, r"saliency_mode in .* got 'l1'"),
        "no mode": (lambda f: f.grad_weight(p.grad_out, p.x, layout, saliency=torch.zeros(2, 2)), ValueError,
                    r"saliency_mode with a saliency buffer"),
        "no weight": (lambda f: f.grad_weight(p.grad_out, p.x, layout, saliency=torch.zeros(2, 2),
                                              saliency_mode="taylor"),
                      ValueError, r"weight for saliency_mode 'taylor'"),
        "scores dtype": (lambda f: f.grad_weight(p.grad_out, p.x, layout, weight=p.weight, saliency_mode="taylor",
                                                 saliency=torch.zeros(2, 2, dtype=torch.float64)),
                         ValueError, r"saliency \(2, 2\) torch\.float32 .* got \(2, 2\) torch\.float64"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_are_rejected(path, case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call(path)


def test_inactive_grad_sq_rejects_bad_buffers(triton_kernels):
    p = make_problem(16, 2, 2, 16, 0.5, torch.float32)
    layout = build_layout(p.mask, 16)
    with pytest.raises(ValueError, match=r"dense_grad_sq \(2, 2\) torch\.float32 .* got \(2, 3\)"):
        inactive_grad_sq_(p.grad_out, p.x, layout, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"contiguous dense_grad_sq"):
        inactive_grad_sq_(p.grad_out, p.x, layout, torch.zeros(2, 2).T)
    with pytest.raises(ValueError, match=r"enabled to be a 0-d tensor"):
        inactive_grad_sq_(p.grad_out, p.x, layout, torch.zeros(2, 2), enabled=torch.ones(1))


def test_choose_cpu_path_follows_the_measured_crossover():
    big = (1024, 1024, 1024)
    assert choose_cpu_path(*big, 0.05, 128) == "gather"
    assert choose_cpu_path(*big, 0.25, 128) == "gather"
    assert choose_cpu_path(*big, 0.5, 128) == "dense"
    assert choose_cpu_path(*big, 0.25, 32) == "dense"  # small blocks lose earlier
    # measured 2026-11-28: gather 0.71x and 0.62x of the dense path's time (the first table ran dense)
    assert choose_cpu_path(256, 1024, 1024, 0.25, 64) == "gather"
    assert choose_cpu_path(256, 512, 512, 0.15234375, 32) == "gather"
    assert choose_cpu_path(16, 256, 256, 0.05, 128) == "dense"  # fixed overhead dominates
    assert choose_cpu_path(*big, 0.05, 16) == "dense"  # below the measured block sizes
    for block_size in (32, 64, 128):  # once dense wins, denser layers stay dense
        paths = [choose_cpu_path(*big, d / 100, block_size) for d in range(0, 101, 5)]
        assert paths == sorted(paths, key=["gather", "dense"].index)
    with pytest.raises(ValueError, match=r"positive int m, got 0"):
        choose_cpu_path(0, 8, 8, 0.5, 32)


# Tracing on fake CUDA tensors needs no GPU, but the kernels must be real Triton functions
# (not interpreted): such probes run in a subprocess through _run_python.
FAKE_CUDA_HEADER = (
    "import torch\n"
    "from torch._subclasses.fake_tensor import FakeTensorMode\n"
    "from torch.fx.experimental.proxy_tensor import make_fx\n"
)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_traced_kernels_get_no_views_and_no_aliased_outputs(triton_kernels):
    # Note [Kernel operands]: a [B, S, K] activation or gradient reaches every kernel as the
    # tensor itself (no reshape node in front of a kernel, which Inductor copies once per
    # kernel), and no kernel gets one tensor both as an output it writes and as another
    # argument (which makes Inductor clone the output first). Every launcher, the bias
    # gradient included, traced on fake CUDA tensors.
    code = FAKE_CUDA_HEADER + (
        "from agpe_compile.layout import BlockLayout, build_layout\n"
        "from agpe_compile.kernels import (bias_grad, block_sparse_forward, block_sparse_grad_input,\n"
        "                                  block_sparse_grad_weight, inactive_grad_sq_)\n"
        "def step(x, w, dy, sal, sq, flag, *tensors):\n"
        "    x, dy = x * 2, dy * 2  # results not yet stored, as inside a compiled step\n"
        "    layout = BlockLayout.from_tensors(tensors, block_size=64, bucket=0.75)\n"
        "    y = block_sparse_forward(x, w, layout)\n"
        "    dx = block_sparse_grad_input(dy, w, layout)\n"
        "    dw = block_sparse_grad_weight(dy, x, layout, weight=w, saliency=sal, saliency_mode='taylor', split=1)\n"
        "    dw2 = block_sparse_grad_weight(dy, x, layout, saliency_mode=None)\n"
        "    inactive_grad_sq_(dy, x, layout, sq, enabled=flag)\n"
        "    return y, dx, dw, dw2, bias_grad(dy)\n"
        "layout = build_layout(torch.tensor([[True, False], [True, True]]), 64)\n"
        "with FakeTensorMode():\n"
        "    def e(*shape, dtype=torch.bfloat16):\n"
        "        return torch.empty(shape, dtype=dtype, device='cuda')\n"
        "    args = [e(3, 100, 128), e(128, 128), e(3, 100, 128), e(2, 2, dtype=torch.float32),\n"
        "            e(2, 2, dtype=torch.float32), e(dtype=torch.bool)]\n"
        "    args += [e(*t.shape, dtype=t.dtype) for t in layout.tensors()]\n"
        "    graph = make_fx(step, tracing_mode='fake')(*args)\n"
        "for node in graph.graph.nodes:\n"
        "    if 'triton_kernel_wrapper_mutation' not in str(node.target):\n"
        "        continue\n"
        "    kwargs = node.kwargs['kwargs']\n"
        "    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.fx.Node)}\n"
        "    print('KERNEL', {k: (v.name, str(v.target)) for k, v in tensors.items()})\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    import ast

    kernels = [ast.literal_eval(line[len("KERNEL "):]) for line in result.stdout.splitlines()
               if line.startswith("KERNEL")]
    assert len(kernels) == 6, result.stdout  # forward, dX, 2 x dW (no split-K here), scores, column sum
    # What kernels write: the buffers a launcher allocates (outputs, workspaces) and the
    # score buffers (arg3_1: saliency, arg4_1: dense_grad_sq). Each goes to a kernel once.
    for args in kernels:
        for name, (node, target) in args.items():
            assert "view" not in target and "reshape" not in target, (name, target, args)
            if target.startswith(("aten.empty", "aten.zeros")) or node in ("arg3_1", "arg4_1"):
                others = [other for other, (n, _) in args.items() if n == node and other != name]
                assert not others, (name, others, args)


def test_split_partials_past_m_add_nothing(triton_kernels):
    # A split that does not divide M leaves partials whose rows start past M (what a symbolic,
    # dynamic-batch M can give at run time): they add zeros, in dW and in the bias gradient.
    from agpe_compile.kernels import bias_grad

    p = make_problem(70, 3, 4, 32, 0.5, torch.float32)  # interpreter tiles of 64 rows
    layout = build_layout(p.mask, 32)
    _, _, dw, _, _ = p.oracle()
    for split in (2, 3, 5):
        got = block_sparse_grad_weight(p.grad_out, p.x, layout, split=split)
        torch.testing.assert_close(got.double(), dw, **TOLERANCES[torch.float32])
    for split in (1, 3, 4):
        torch.testing.assert_close(bias_grad(p.grad_out, split=split).double(), p.grad_out.double().sum(0),
                                   **TOLERANCES[torch.float32])


def test_launchers_trace_with_a_symbolic_row_count(triton_kernels):
    # torch.compile recompiles with a symbolic M once the batch size changes; the split-K
    # factors of dW and of the bias gradient must stay plain ints (launch.size_hint). One
    # live block of four: few programs, so both launchers pick a split above 1.
    code = FAKE_CUDA_HEADER + (
        "from torch.fx.experimental.symbolic_shapes import ShapeEnv, DimDynamic\n"
        "from torch._dynamo.source import ConstantSource\n"
        "from agpe_compile.layout import BlockLayout, build_layout\n"
        "from agpe_compile.kernels import (bias_grad, block_sparse_forward, block_sparse_grad_input,\n"
        "                                  block_sparse_grad_weight, inactive_grad_sq_)\n"
        "layout = build_layout(torch.tensor([[True, False], [False, False]]), 64)\n"
        "env = ShapeEnv()\n"
        "m = env.create_symintnode(env.create_symbol(1000, ConstantSource('m'), dynamic_dim=DimDynamic.DYNAMIC),\n"
        "                          hint=1000)\n"
        "with FakeTensorMode(shape_env=env):\n"
        "    def e(*shape, dtype=torch.bfloat16):\n"
        "        return torch.empty(shape, dtype=dtype, device='cuda')\n"
        "    x, dy, w = e(3, m, 128), e(3, m, 128), e(128, 128)\n"
        "    lay = BlockLayout.from_tensors([e(*t.shape, dtype=t.dtype) for t in layout.tensors()], block_size=64,\n"
        "                                   bucket=layout.bucket)\n"
        "    block_sparse_forward(x, w, lay)\n"
        "    block_sparse_grad_input(dy, w, lay)\n"
        "    dw = block_sparse_grad_weight(dy, x, lay, weight=w, saliency=e(2, 2, dtype=torch.float32),\n"
        "                                  saliency_mode='taylor')\n"
        "    inactive_grad_sq_(dy, x, lay, e(2, 2, dtype=torch.float32))\n"
        "    db = bias_grad(dy)\n"
        "    print('OK', tuple(dw.shape), tuple(db.shape))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (128, 128) (128,)" in result.stdout, result.stdout


def test_forward_reads_a_strided_bias_right(triton_kernels):
    p = make_problem(40, 3, 4, 32, 0.5, torch.float32)
    layout = build_layout(p.mask, 32)
    strided = torch.stack([p.bias, torch.full_like(p.bias, 1e3)], dim=1)[:, 0]  # stride 2
    assert strided.stride(0) == 2
    y, _, _, _, _ = p.oracle()
    torch.testing.assert_close(block_sparse_forward(p.x, p.weight, layout, strided).double(), y,
                               **TOLERANCES[torch.float32])


def test_tma_device_refuses_a_misaligned_base(triton_kernels):
    p = make_problem(64, 2, 2, 32, 1.0, torch.float32)
    layout = build_layout(p.mask, 32)
    shifted = torch.cat([torch.zeros(1), p.x.flatten()])[1:].view(p.x.shape)  # 4 bytes into its storage
    with pytest.raises(ValueError, match="16-byte aligned, got an address 4 bytes"):
        block_sparse_forward(shifted, p.weight, layout, tma="device")


def test_tma_setting_is_not_followed_for_graphs_replayed_eagerly(monkeypatch):
    # Note [TMA by default]: the backend's aot_eager lowering replays kernels through torch's
    # wrapper, without Triton's scratch allocator: the setting cannot pick TMA there.
    from agpe_compile.kernels import launch

    x = torch.zeros(16, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(launch, "is_tracing", lambda: True)
    monkeypatch.setattr(launch, "tma_applies", lambda *args, **kwargs: True)
    monkeypatch.setenv("AGPE_TMA", "auto")
    assert launch._tma_mode("auto", x, x) == "device"
    with launch.traced_for_eager_replay():
        assert launch._tma_mode("auto", x, x) is None
        monkeypatch.setenv("AGPE_TMA", "persistent")
        assert launch._tma_mode("auto", x, x) is None
        monkeypatch.setenv("AGPE_TMA", "device")
        with pytest.raises(ValueError, match="AGPE_TMA=device needs the Inductor lowering"):
            launch._tma_mode("auto", x, x)
    assert launch._tma_mode("auto", x, x) == "device"


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from agpe_compile.layout import build_layout\n"
        "from agpe_compile.kernels import triton_available, gather_forward, block_sparse_forward\n"
        "assert not triton_available()\n"
        "layout = build_layout(torch.ones(1, 1, dtype=torch.bool), 16)\n"
        "x, w = torch.randn(4, 16), torch.randn(16, 16)\n"
        "torch.testing.assert_close(gather_forward(x, w, layout), x @ w.T)\n"
        "try:\n"
        "    block_sparse_forward(x, w, layout)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('launcher ran without triton')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]


def test_kernels_compile_for_hopper(triton_kernels):
    # The interpreter checks arithmetic only; this builds real sm_90 binaries with Triton's
    # bundled ptxas (no GPU needed) and checks they fit and use wgmma.
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import dataclasses, json\n"
        "from agpe_compile.kernels.aot import compile_for_target\n"
        "for kernel in ('forward', 'grad_input', 'grad_weight', 'grad_scores'):\n"
        "    print(json.dumps(dataclasses.asdict(compile_for_target(kernel, 128, 'bf16'))))\n"
    )
    result = _run_python(code, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    from agpe_compile.kernels.aot import HOPPER_SHARED_LIMIT

    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kernel"] for r in reports] == ["forward", "grad_input", "grad_weight", "grad_scores"]
    for report in reports:
        assert report["shared_bytes"] <= HOPPER_SHARED_LIMIT, report
        assert report["spill_bytes"] == 0, report
        assert report["wgmma"] > 0 and report["mma"] == 0, report


def test_launchers_trace_without_reading_tensor_contents(triton_kernels):
    # Inside a triton_op body the launchers run on fake tensors: any host read of a layout
    # tensor (.item(), bool()) would fail here, and each kernel must appear once, through
    # wrap_triton. Fake CUDA tensors need no GPU; the kernels must not be interpreted.
    code = FAKE_CUDA_HEADER + (
        "from agpe_compile.layout import BlockLayout, build_layout\n"
        "from agpe_compile.kernels import (block_sparse_forward, block_sparse_grad_input,\n"
        "                                  block_sparse_grad_weight, inactive_grad_sq_)\n"
        "def step(x, w, dy, sal, sq, flag, *tensors):\n"
        "    layout = BlockLayout.from_tensors(tensors, block_size=64, bucket=0.75)\n"
        "    y = block_sparse_forward(x, w, layout)\n"
        "    dx = block_sparse_grad_input(dy, w, layout)\n"
        "    dw = block_sparse_grad_weight(dy, x, layout, weight=w, saliency=sal, saliency_mode='taylor')\n"
        "    inactive_grad_sq_(dy, x, layout, sq, enabled=flag)\n"
        "    return y, dx, dw\n"
        "layout = build_layout(torch.tensor([[True, False], [True, True]]), 64)\n"
        "with FakeTensorMode():\n"
        "    def e(*shape, dtype=torch.bfloat16):\n"
        "        return torch.empty(shape, dtype=dtype, device='cuda')\n"
        "    args = [e(3, 100, 128), e(128, 128), e(3, 100, 128), e(2, 2, dtype=torch.float32),\n"
        "            e(2, 2, dtype=torch.float32), e(dtype=torch.bool)]\n"
        "    args += [e(*t.shape, dtype=t.dtype) for t in layout.tensors()]\n"
        "    graph = make_fx(step, tracing_mode='fake')(*args)\n"
        "print(graph.code)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("triton_kernel_wrapper_mutation(") == 4, result.stdout
    for argument in ("'row_ptr_ptr'", "'col_ptr_ptr'", "'slot_row_ptr'", "'block_slot_ptr'"):  # one per kernel
        assert result.stdout.count(argument) == 1, argument
    assert "_local_scalar_dense" not in result.stdout and "item" not in result.stdout


def test_empty_batch(path):
    p = make_problem(16, 2, 2, 16, 0.5, torch.float32)
    layout = build_layout(p.mask, 16)
    x, grad_out = p.x[:0], p.grad_out[:0]
    assert path.forward(x, p.weight, layout, p.bias).shape == (0, 32)
    assert path.grad_input(grad_out, p.weight, layout).shape == (0, 32)
    grad_weight = path.grad_weight(grad_out, x, layout)
    assert grad_weight.shape == (32, 32) and not grad_weight.any()


@settings(max_examples=12, deadline=None)
@given(m=st.integers(0, 150), n=st.integers(1, 300), batch=st.sampled_from([None, 3]),
       split=st.sampled_from([None, 1, 2, 5]), dtype=st.sampled_from(DTYPES), transposed=st.booleans())
def test_bias_grad_is_the_column_sum(m, n, batch, split, dtype, transposed):
    pytest.importorskip("triton")
    from agpe_compile.kernels import bias_grad

    gen = torch.Generator().manual_seed(m * 1000 + n)
    if batch is not None:
        grad_out = torch.randn(batch, m, n, generator=gen).to(dtype)
    elif transposed:  # a strided 2-D view (dY^T of a [n, m] tensor)
        grad_out = torch.randn(n, m, generator=gen).to(dtype).t()
    else:
        grad_out = torch.randn(m, n, generator=gen).to(dtype)
    rows = grad_out.numel() // n
    if split is not None and split > max(1, rows):
        split = None
    got = bias_grad(grad_out, split=split)
    expected = grad_out.reshape(-1, n).double().sum(0)
    assert got.dtype == dtype and got.shape == (n,)
    rtol, atol = OUTPUT_TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=rtol, atol=atol * max(1, rows) ** 0.5)


def test_bias_grad_rejects_a_bad_split(triton_kernels):
    from agpe_compile.kernels import bias_grad

    with pytest.raises(ValueError, match="split"):
        bias_grad(torch.ones(4, 4), split=0)


def test_bias_grad_traces_as_one_user_kernel(triton_kernels):
    # Inside the op's backward on CUDA: fake tensors, one wrap_triton launch, no host read.
    code = FAKE_CUDA_HEADER + (
        "from agpe_compile.kernels import bias_grad\n"
        "with FakeTensorMode():\n"
        "    dy = torch.empty(4, 256, 384, dtype=torch.bfloat16, device='cuda')\n"
        "    graph = make_fx(lambda g: bias_grad(g), tracing_mode='fake')(dy)\n"
        "print(graph.code)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("triton_kernel_wrapper_mutation(") == 1, result.stdout
    assert "'EVEN_N': True" in result.stdout and "grid = [(3, 32, 1)]" in result.stdout, result.stdout
    assert "_local_scalar_dense" not in result.stdout and "item" not in result.stdout


def test_bias_grad_kernel_compiles_for_hopper_with_vector_loads(triton_kernels):
    # Memory-bound: what matters is 128-bit loads (EVEN_N drops the column mask) and no spills.
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import json\n"
        "from agpe_compile.kernels.aot import compile_column_sum\n"
        "print(json.dumps([compile_column_sum(d, e) for d in ('bf16', 'fp32') for e in (True, False)]))\n"
    )
    result = _run_python(code, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    even_bf16, odd_bf16, even_fp32, odd_fp32 = json.loads(result.stdout.splitlines()[-1])
    for report in (even_bf16, odd_bf16, even_fp32, odd_fp32):
        assert report["spill_bytes"] == 0 and report["shared_bytes"] <= 4096, report
    assert even_bf16["widest_load_bits"] == 128 and even_fp32["widest_load_bits"] == 128
    assert odd_bf16["widest_load_bits"] == 16  # the masked tail: why the launcher passes EVEN_N


@pytest.mark.parametrize("mode", ["host", "device", "persistent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 70, 128])
def test_tma_forward_candidate_matches_the_forward_kernel(triton_kernels, dtype, m, mode):
    p = make_problem(m, 3, 4, 32, 0.5, dtype)
    layout = build_layout(p.mask, 32)
    expected = block_sparse_forward(p.x, p.weight, layout, p.bias)  # NaN in inactive blocks: never read
    assert not expected.isnan().any()
    got = block_sparse_forward(p.x, p.weight, layout, p.bias, tma=mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_tma_forward_refuses_operands_tma_cannot_read(triton_kernels):
    from agpe_compile.kernels.launch import block_sparse_forward_tma

    p = make_problem(64, 2, 2, 32, 1.0, torch.float32)
    layout = build_layout(p.mask, 32)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        block_sparse_forward_tma(p.x.t().contiguous().t(), p.weight, layout)


def test_tma_candidates_compile_for_hopper_with_bulk_copies(triton_kernels):
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import json\n"
        "from agpe_compile.kernels.aot import compile_tma\n"
        "from agpe_compile.kernels.configs import TMA_CANDIDATES\n"
        "reports = [compile_tma(k, config=c) for k, cs in TMA_CANDIDATES.items() for c in cs]\n"
        "reports += [compile_tma(k, device_descriptors=True) for k in ('forward', 'grad_input', 'grad_weight')]\n"
        "import torch\n"
        "from agpe_compile.kernels.configs import config_for\n"
        "from agpe_compile.kernels.launch import tma_shared_bytes\n"
        "sizes = []\n"  # the persistent grid's estimate must bound what Triton allocates
        "for k, cs in TMA_CANDIDATES.items():\n"
        "    for b, c in [(128, c) for c in cs] + [(b, config_for(k, b, torch.bfloat16, interpret=False, tma=True))\n"
        "                                         for b in (32, 64)]:\n"
        "        report = compile_tma(k, block_size=b, config=c, device_descriptors=True)\n"
        "        stage = (2 * c.block_m * b if k == 'grad_weight' else (c.block_m + b) * c.block_k) * 2\n"
        "        sizes.append([k, b, report['shared_bytes'], tma_shared_bytes(k, c, b, torch.bfloat16), stage])\n"
        "from agpe_compile.kernels.configs import KernelConfig\n"  # deeper pipelines (re-audit BI)
        "for k, c in [('grad_input', KernelConfig(128, 64, num_warps=8, num_stages=8)),\n"
        "             ('forward', KernelConfig(64, 32, num_stages=10)),\n"  # and shallow ones (re-audit BJ)
        "             ('forward', KernelConfig(128, 64, num_warps=8, num_stages=2)),\n"
        "             ('grad_input', KernelConfig(128, 64, num_warps=8, num_stages=3))]:\n"
        "    report = compile_tma(k, block_size=128, config=c, device_descriptors=True)\n"
        "    sizes.append([k, 128, report['shared_bytes'], tma_shared_bytes(k, c, 128, torch.bfloat16), 0])\n"
        "print(json.dumps(sizes))\n"
        "print(json.dumps(reports))\n"
    )
    result = _run_python(code, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    from agpe_compile.kernels.aot import HOPPER_SHARED_LIMIT
    from agpe_compile.kernels.configs import TMA_CANDIDATES

    for report in json.loads(result.stdout.splitlines()[-1]):
        assert report["shared_bytes"] <= HOPPER_SHARED_LIMIT and report["spill_bytes"] == 0, report
        assert report["tma_loads"] > 0 and report["wgmma"] > 0, report
    sizes = json.loads(result.stdout.splitlines()[-2])
    assert len(sizes) == sum(len(cs) + 2 for cs in TMA_CANDIDATES.values()) + 4
    for kernel, block_size, allocated, estimate, stage in sizes:  # launch.tma_shared_bytes: an upper bound
        assert allocated <= estimate, (kernel, block_size, allocated, estimate)
        # and at block 128 (the targets' configs) it counts the programs an SM holds exactly: the
        # 6-stage dX default was counted at 1 where 2 fit (audit BF). (dW at block 32 keeps 3
        # stages of its 4, so it is counted at 3 programs where 4 fit.)
        if block_size == 128:
            assert 228 * 1024 // estimate == 228 * 1024 // (allocated + 1024), (kernel, allocated, estimate)


@pytest.mark.parametrize("mode", ["host", "device", "persistent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 70, 128])
def test_tma_grad_input_candidate_matches_the_grad_input_kernel(triton_kernels, dtype, m, mode):
    p = make_problem(m, 3, 4, 32, 0.5, dtype)
    layout = build_layout(p.mask, 32)
    expected = block_sparse_grad_input(p.grad_out, p.weight, layout)  # NaN in inactive blocks: never read
    assert not expected.isnan().any()
    got = block_sparse_grad_input(p.grad_out, p.weight, layout, tma=mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["host", "device", "persistent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, split, saliency_mode", [(1, 1, "taylor"), (70, 1, "magnitude"), (128, 1, "movement"),
                                                     (200, 3, "taylor"), (130, 16, "gradient")])
def test_tma_grad_weight_candidate_matches_the_grad_weight_kernel(triton_kernels, dtype, m, split, saliency_mode,
                                                                   mode):
    # A full-capacity layout over a half-live mask: padded slots exist and must stay untouched.
    p = make_problem(m, 3, 4, 32, 0.5, dtype, seed=5)
    layout = build_layout(torch.ones(3, 4, dtype=torch.bool), 32)
    assert update_layout_(layout, p.mask)
    weight = None if saliency_mode == "gradient" else p.weight  # NaN in inactive blocks: never read
    sums = {}
    for tma in (False, mode):
        sums[tma] = torch.full(p.mask.shape, PREFILL)
        sums[tma, "dw"] = block_sparse_grad_weight(p.grad_out, p.x, layout, weight=weight, saliency=sums[tma],
                                                   saliency_mode=saliency_mode, split=split, tma=tma)
    assert not sums[False, "dw"].isnan().any()
    torch.testing.assert_close(sums[mode, "dw"], sums[False, "dw"], rtol=0, atol=0)
    torch.testing.assert_close(sums[mode], sums[False], rtol=0, atol=0)
    assert (sums[mode][~p.mask] == PREFILL).all()


def test_tma_grad_weight_of_no_rows_takes_the_plain_kernel(triton_kernels):
    # No descriptor of zero rows: the plain kernel writes zeros and still adds magnitude scores.
    p = make_problem(4, 2, 2, 32, 1.0, torch.float32)
    saliency = torch.zeros(p.mask.shape)
    dw = block_sparse_grad_weight(p.grad_out[:0], p.x[:0], build_layout(p.mask, 32), weight=p.weight,
                                  saliency=saliency, saliency_mode="magnitude", tma="device")
    assert not dw.any()
    torch.testing.assert_close(saliency, p.weight.abs().view(2, 32, 2, 32).sum((1, 3)))


def test_tma_candidates_refuse_traced_calls(triton_kernels):
    # wrap_triton would record the launch without the descriptors: refuse instead.
    code = FAKE_CUDA_HEADER + (
        "from agpe_compile.layout import BlockLayout, build_layout\n"
        "from agpe_compile.kernels.launch import block_sparse_forward_tma\n"
        "layout = build_layout(torch.tensor([[True, False], [True, True]]), 64)\n"
        "def step(x, w, *tensors):\n"
        "    return block_sparse_forward_tma(x, w, BlockLayout.from_tensors(tensors, block_size=64, bucket=0.75))\n"
        "with FakeTensorMode():\n"
        "    e = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device='cuda')\n"
        "    args = [e(300, 128), e(128, 128)] + [e(*t.shape, dtype=t.dtype) for t in layout.tensors()]\n"
        "    try:\n"
        "        make_fx(step, tracing_mode='fake')(*args)\n"
        "    except RuntimeError as error:\n"
        "        assert 'eagerly only' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError('traced a TMA launch')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_tma_device_descriptor_candidates_trace_as_user_kernels(triton_kernels):
    # Descriptors built in the kernel: plain pointer arguments, so wrap_triton records them.
    code = FAKE_CUDA_HEADER + (
        "from agpe_compile.layout import BlockLayout, build_layout\n"
        "from agpe_compile.kernels import block_sparse_forward, block_sparse_grad_input, block_sparse_grad_weight\n"
        "layout = build_layout(torch.tensor([[True, False], [True, True]]), 64)\n"
        "def step(x, w, dy, *tensors):\n"
        "    lay = BlockLayout.from_tensors(tensors, block_size=64, bucket=0.75)\n"
        "    return [out for mode in ('device', 'persistent') for out in (\n"
        "        block_sparse_forward(x, w, lay, tma=mode), block_sparse_grad_input(dy, w, lay, tma=mode),\n"
        "        block_sparse_grad_weight(dy, x, lay, tma=mode))]\n"
        "with FakeTensorMode():\n"
        "    e = lambda *s, dtype=torch.bfloat16: torch.empty(s, dtype=dtype, device='cuda')\n"
        "    args = [e(300, 128), e(128, 128), e(300, 128)] + [e(*t.shape, dtype=t.dtype) for t in layout.tensors()]\n"
        "    graph = make_fx(step, tracing_mode='fake')(*args)\n"
        "print(graph.code)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("triton_kernel_wrapper_mutation(") == 6, result.stdout
    assert "'x_ptr'" in result.stdout and "'dy_ptr'" in result.stdout, result.stdout


@pytest.mark.parametrize("mode", ["host", "device", "persistent"])
def test_tma_candidates_take_3d_operands(triton_kernels, mode):
    # Note [Kernel operands]: the device-descriptor kernels get the [B, S, K] tensor itself.
    p = make_problem(70, 3, 4, 32, 0.5, torch.float32, batch=2)
    layout = build_layout(p.mask, 32)
    torch.testing.assert_close(block_sparse_forward(p.x, p.weight, layout, p.bias, tma=mode),
                               block_sparse_forward(p.x, p.weight, layout, p.bias, tma=False), rtol=0, atol=0)
    torch.testing.assert_close(block_sparse_grad_input(p.grad_out, p.weight, layout, tma=mode),
                               block_sparse_grad_input(p.grad_out, p.weight, layout, tma=False), rtol=0, atol=0)
    torch.testing.assert_close(block_sparse_grad_weight(p.grad_out, p.x, layout, tma=mode),
                               block_sparse_grad_weight(p.grad_out, p.x, layout, tma=False), rtol=0, atol=0)


def test_persistent_tma_grids_hold_what_the_gpu_runs_at_once(triton_kernels):
    # Note [Persistent TMA programs]: SMs x programs per SM (by shared memory), at most one per tile.
    from agpe_compile.kernels.configs import config_for
    from agpe_compile.kernels.launch import _multiprocessors, persistent_programs

    sms = _multiprocessors(torch.device("cuda"))  # 132 (an H100/H200) on a host without a GPU
    compiled = object()  # not an interpreter kernel
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    forward = config_for("forward", 128, bf16, interpret=False, tma=True)  # 3 x 32 KB in flight: 2 per SM
    assert persistent_programs(10**6, forward, "forward", 128, bf16, cuda, compiled) == 2 * sms
    assert persistent_programs(50, forward, "forward", 128, bf16, cuda, compiled) == 50
    small = config_for("forward", 32, bf16, interpret=False, tma=True)  # 6 stages, Triton keeps 3 x 10 KB: 7 per SM
    assert persistent_programs(10**6, small, "forward", 32, bf16, cuda, compiled) == 7 * sms
    grad_weight = config_for("grad_weight", 128, bf16, interpret=False, tma=True)  # 4 x 32 KB: 1 per SM
    assert persistent_programs(10**6, grad_weight, "grad_weight", 128, bf16, cuda, compiled, split=4) == sms // 4
    from agpe_compile.kernels.forward_tma import forward_tma_device_kernel
    from agpe_compile.kernels.runtime import is_interpreted

    if is_interpreted(forward_tma_device_kernel):  # the interpreter: 2, so the tile loop runs
        assert persistent_programs(6, forward, "forward", 128, torch.bfloat16, torch.device("cpu"),
                                   forward_tma_device_kernel) == 2


def test_tma_mode_must_be_named(triton_kernels):
    p = make_problem(8, 2, 2, 32, 1.0, torch.float32)
    with pytest.raises(ValueError, match="tma in"):
        block_sparse_forward(p.x, p.weight, build_layout(p.mask, 32), tma="yes")


def _hopper_rule(*operands, dtype=torch.bfloat16, capability=(9, 0)):
    from agpe_compile.kernels.launch import tma_applies

    return tma_applies(torch.device("cuda"), dtype, operands, capability=capability)


def test_auto_takes_tma_only_on_hopper_for_16_bit_operands_it_can_read():
    # Note [TMA by default]: the rule on shapes, strides and offsets (no GPU needed: CPU
    # tensors stand in for the operands, the device and capability are given).
    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    x = torch.zeros(16, 32, dtype=torch.bfloat16)
    assert _hopper_rule(x, w)
    assert not _hopper_rule(x, w, capability=(8, 0))  # Ampere: no TMA
    assert not _hopper_rule(x, w, capability=(10, 0))  # Blackwell: not timed
    assert not _hopper_rule(x.float(), w.float(), dtype=torch.float32)  # tf32: not timed
    assert not _hopper_rule(x.t().contiguous().t(), w)  # last dimension not contiguous
    odd = torch.zeros(16, 36, dtype=torch.bfloat16)[:, :30]  # rows of 72 bytes: not 16-byte aligned
    assert not _hopper_rule(odd, w)
    shifted = torch.zeros(16 * 32 + 1, dtype=torch.bfloat16)[1:].view(16, 32)  # base 2 bytes off
    assert not _hopper_rule(shifted, w)
    from agpe_compile.kernels.launch import tma_applies

    assert not tma_applies(torch.device("cpu"), torch.bfloat16, (x, w), capability=(9, 0))


def test_agpe_tma_setting_is_validated_and_off_forces_the_plain_kernels(triton_kernels, monkeypatch):
    from agpe_compile.kernels import launch
    from agpe_compile.kernels.launch import _tma_mode

    x = torch.zeros(16, 32, dtype=torch.bfloat16)
    monkeypatch.setenv("AGPE_TMA", "sometimes")
    with pytest.raises(ValueError, match="AGPE_TMA"):
        _tma_mode("auto", x, x)
    monkeypatch.setenv("AGPE_TMA", "off")
    assert _tma_mode("auto", x, x) is None
    monkeypatch.setenv("AGPE_TMA", "device")
    assert _tma_mode("auto", x, x) == "device"
    assert _tma_mode(False, x, x) is None  # an explicit choice wins over the setting
    monkeypatch.setenv("AGPE_TMA", "auto")
    assert _tma_mode("auto", x, x) is None  # CPU operands: the plain kernels
    monkeypatch.setenv("AGPE_TMA", "persistent")
    assert _tma_mode("auto", x, x) is None  # like auto: only where TMA applies
    monkeypatch.setattr(launch, "tma_applies", lambda *args, **kwargs: True)
    assert _tma_mode("auto", x, x) == "persistent"
    monkeypatch.setenv("AGPE_TMA", "auto")
    assert _tma_mode("auto", x, x) == "device"
    monkeypatch.undo()
    monkeypatch.delenv("AGPE_TMA", raising=False)
    assert _tma_mode("auto", x, x) is None  # the default is off (Note [TMA by default])
    p = make_problem(70, 3, 4, 32, 0.5, torch.float32)
    layout = build_layout(p.mask, 32)
    monkeypatch.setenv("AGPE_TMA", "device")  # forced: the TMA kernel, same result
    torch.testing.assert_close(block_sparse_forward(p.x, p.weight, layout, p.bias),
                               block_sparse_forward(p.x, p.weight, layout, p.bias, tma=False), rtol=0, atol=0)


def test_tma_kernels_have_their_own_tiles_where_the_sweep_found_better_ones():
    from agpe_compile.kernels.configs import TMA_CANDIDATES, config_for

    plain = config_for("forward", 128, torch.bfloat16, interpret=False)
    tma = config_for("forward", 128, torch.bfloat16, interpret=False, tma=True)
    assert (plain.block_m, tma.block_m) == (256, 128)
    for kernel in ("forward", "grad_input"):  # every TMA default is a candidate the sweep times
        assert config_for(kernel, 128, torch.bfloat16, interpret=False, tma=True) in TMA_CANDIDATES[kernel]
    assert config_for("forward", 64, torch.bfloat16, interpret=False, tma=True) == config_for(
        "forward", 64, torch.bfloat16, interpret=False)  # no TMA table entry: the plain tile


def test_known_interpreter_incompatibility_is_named(monkeypatch):
    """triton <= 3.6's interpreter with numpy >= 2.4 cannot take loaded loop bounds; the
    launch then raises InterpreterUnavailable naming both versions and the fix (conftest.py
    skips with that reason), and any other combination or error is left alone."""
    import numpy
    import triton

    from agpe_compile.kernels import runtime

    check = runtime.interpreter_problem.__wrapped__
    for triton_version, numpy_version, broken in [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                  ("3.7.1", "2.4.6", False), ("3.9.0", "2.4.6", False),
                                                  ("3.5.1", "2.10.0", True)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        problem = check()
        assert (problem is not None) == broken, (triton_version, numpy_version)
        if broken:
            assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem

    def failing(message):
        def launch(*args, **kwargs):
            raise RuntimeError(message)
        return launch

    monkeypatch.setattr(runtime, "interpreter_problem", lambda: "triton 3.6.0's CPU interpreter ...")
    with pytest.raises(runtime.InterpreterUnavailable, match="3.6.0"):
        runtime._interpreted(failing("TypeError('only 0-dimensional arrays can be converted')"))()
    with pytest.raises(RuntimeError, match="something else") as info:
        runtime._interpreted(failing("something else"))()
    assert not isinstance(info.value, runtime.InterpreterUnavailable)
    monkeypatch.setattr(runtime, "interpreter_problem", lambda: None)
    with pytest.raises(RuntimeError) as info:
        runtime._interpreted(failing("only 0-dimensional arrays"))()
    assert not isinstance(info.value, runtime.InterpreterUnavailable)


def test_the_cpu_path_of_a_layout_is_costed_at_its_own_bucket():
    """Capacity rounds up (103 slots of 1024 blocks in bucket 0.10): costed through
    bucket_for, the fraction 0.1006 took the next bucket (0.15) and the dense path."""
    from agpe_compile.ops import paths

    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask.view(-1)[:100] = True
    layout = build_layout(mask, 32)  # 1024 x 1024 weight, block 32, density 0.098
    assert layout.bucket == 0.1 and layout.capacity == 103
    x, weight = torch.randn(2048, 1024), torch.randn(1024, 1024)
    assert paths.choose(x, weight, layout) == choose_cpu_path(2048, 1024, 1024, 0.1, 32) == "gather"


def test_the_gpu_crossover_follows_persistent_tma_for_16_bit_weights_on_hopper(monkeypatch):
    # GPU_DENSE_CROSSOVER_PERSISTENT_TMA (ops/paths.py): with AGPE_TMA=persistent the block-128
    # kernels beat cuBLAS at the 0.75 bucket on the H200 (0.87-0.95), so that bucket runs them;
    # other settings, dtypes and GPUs keep the plain crossover, and so do blocks 32 and 64.
    from agpe_compile.kernels import launch
    from agpe_compile.layout import build_layout
    from agpe_compile.ops import paths

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("AGPE_TMA", "persistent")
    assert launch.persistent_tma_setting(cuda, torch.bfloat16)
    assert paths.dense_from(128, cuda, torch.bfloat16) == 1.0
    assert paths.dense_from(128, cuda, torch.float16) == 1.0
    assert paths.dense_from(128, cuda, torch.float32) == 0.75  # tf32 keeps the plain kernels
    assert paths.dense_from(64, cuda, torch.bfloat16) == paths.GPU_DENSE_CROSSOVER[64]  # not timed
    assert paths.dense_from(32, cuda, torch.bfloat16) == paths.GPU_DENSE_CROSSOVER[32]
    assert paths.dense_from(128, cuda) == 0.75  # no dtype: the plain rule
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask.view(-1)[:12] = True
    layout = build_layout(mask, 128)
    assert layout.capacity == 12  # the 0.75 bucket
    assert not paths.skips_masking(layout, cuda, True, torch.bfloat16)  # it runs the kernels
    assert paths.skips_masking(layout, cuda, True, torch.float32)
    full = build_layout(torch.ones(4, 4, dtype=torch.bool), 128)
    assert paths.skips_masking(full, cuda, True, torch.bfloat16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(paths.kernels, "triton_available", lambda: True)
    # fake CUDA tensors on a machine without a GPU: FakeTensorMode initializes CUDA when
    # torch.cuda.is_available() says yes (a CUDA build of torch without a driver fails there),
    # so the capability goes to the setting's check instead
    monkeypatch.undo()
    monkeypatch.setenv("AGPE_TMA", "persistent")
    monkeypatch.setattr(paths.kernels, "triton_available", lambda: True)
    monkeypatch.setattr(paths.kernels, "persistent_tma_setting",
                        lambda device, dtype: launch.persistent_tma_setting(device, dtype, capability=(9, 0)))
    with FakeTensorMode():  # CUDA operands on a machine without CUDA
        x = torch.empty(64, 512, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(512, 512, dtype=torch.bfloat16, device="cuda")
        assert paths.choose(x, w, layout) == "triton"
        assert paths.choose(x, w, full) == "dense"
        assert paths.choose(x.float(), w.float(), layout) == "dense"  # fp32: the plain crossover
    monkeypatch.undo()
    monkeypatch.setenv("AGPE_TMA", "persistent")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with launch.traced_for_eager_replay():  # aot_eager graphs never take TMA
        monkeypatch.setattr(launch, "is_tracing", lambda: True)
        assert not launch.persistent_tma_setting(cuda, torch.bfloat16)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for setting in ("off", "auto", "device"):
        monkeypatch.setenv("AGPE_TMA", setting)
        assert paths.dense_from(128, cuda, torch.bfloat16) == 0.75
    monkeypatch.setenv("AGPE_TMA", "persistent")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # Ampere
    assert paths.dense_from(128, cuda, torch.bfloat16) == 0.75
    assert not launch.persistent_tma_setting(torch.device("cpu"), torch.bfloat16)


def test_the_step_hook_re_zeroes_from_the_lower_crossover_whatever_the_setting(monkeypatch):
    # Re-audit BV: the op decides at trace time (the aot_eager lowering traces outside TMA, so
    # with the plain crossover: W unmasked at the 0.75 bucket), the hook at run time (reading
    # AGPE_TMA=persistent: "no skip"): the hook then left a layer the graph reads unmasked
    # without re-zeroing. It now re-zeroes from the lower crossover of any setting.
    from agpe_compile import zero_weights
    from agpe_compile.kernels import launch
    from agpe_compile.layout import build_layout
    from agpe_compile.ops import paths

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("AGPE_TMA", "persistent")
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask.view(-1)[:12] = True
    layout = build_layout(mask, 128)  # the 0.75 bucket
    assert not paths.skips_masking(layout, cuda, True, torch.bfloat16)  # traced with Inductor: the kernels
    with launch.traced_for_eager_replay():
        monkeypatch.setattr(launch, "is_tracing", lambda: True)
        assert paths.skips_masking(layout, cuda, True, torch.bfloat16)  # traced for aot_eager: W unmasked
    assert paths.may_skip_masking(layout, cuda, True)  # so the hook re-zeroes it
    assert not paths.may_skip_masking(layout, cuda, False)
    monkeypatch.setenv("AGPE_TMA", "persistant")  # misspelt: the op raises at its launch, never the hook
    assert paths.may_skip_masking(layout, cuda, True)

    class State:  # what zero_weights.skips reads
        weight = torch.zeros(512, 512, dtype=torch.bfloat16)
        zero_inactive = True

        def layout(self):
            return layout

    seen = []
    monkeypatch.setattr(zero_weights, "may_skip_masking", lambda *args: seen.append(args) or True)
    assert zero_weights.skips(State()) and seen == [(layout, State.weight.device, True)]
