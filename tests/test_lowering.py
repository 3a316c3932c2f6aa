"""The ``triton_op`` lowering of ``agpe::sparse_linear`` (Note [Triton op lowering]).

AOTAutograd decomposes a triton_op into its body under FunctionalTensorMode; this traces
the forward and backward ops the same way (``dispatch_functionalize`` + ``make_fx``) on
fake CUDA tensors, which needs no GPU, and checks what Inductor would be given: the Triton
kernels as ``triton_kernel_wrapper_functional`` nodes below the crossover density, cuBLAS
matmuls plus the fused mask-and-score kernel above it, the bias gradient's column-sum
kernel on both (Note [Bias gradient]), and the opaque host ops off CUDA.
Runs in a subprocess: the kernels must be real (not interpreted) Triton functions.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PROBE = r'''
import json, sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
import agpe_compile  # registers torch.ops.agpe
from agpe_compile.packed_layout import build_packed

from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
R = C = 4
B = 64


def trace(device, density, zero_inactive):
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[: round(density * R * C)] = True
    packed, bucket = build_packed(mask.view(R, C), B, (1.0, 0.75, 0.5, 0.25, 0.1))

    def step(x, w, bias, m, sal, dgs, flag, counters, layout, dy):
        y = torch.ops.agpe.sparse_linear(x, w, bias, m, sal, dgs, flag, counters, layout, B, "taylor", zero_inactive)
        gx, gw = torch.ops.agpe.sparse_linear_backward(dy, x, w, m, sal, dgs, flag, counters, layout, B, "taylor",
                                                       True, True, zero_inactive)
        gb = torch.ops.agpe.bias_grad(dy)  # what the op's autograd formula calls for the bias
        return y, gx, gw, gb

    with FakeTensorMode():
        def e(*shape, dtype=torch.bfloat16):
            return torch.empty(shape, dtype=dtype, device=device)
        args = [e(2, 100, C * B), e(R * B, C * B), e(R * B), e(R, C, dtype=torch.bool),
                e(R, C, dtype=torch.float32), e(R, C, dtype=torch.float32), e(dtype=torch.bool),
                e(2, dtype=torch.int64), e(packed.shape[0], dtype=torch.int32), e(2, 100, R * B)]
        graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(*args)
    kernels = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
               for node in graph.graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    targets = [str(node.args[0]) if "auto_functionalized" in str(node.target) else str(node.target)
               for node in graph.graph.nodes if node.op == "call_function"]  # a mutating op: the op it wraps
    return {"bucket": bucket, "kernels": kernels, "targets": targets}


# each argument: device,density,zero_inactive (0 or 1); one trace per argument, in turn
print(json.dumps({arg: trace(arg.split(",")[0], float(arg.split(",")[1]), arg.split(",")[2] == "1")
                  for arg in sys.argv[1:]}))
'''

# Every trace the tests below read, made by one subprocess per worker (importing torch and
# tracing costs ~4 s per process; the traces are independent of each other)
_CASES = [("cuda", 0.25, False), ("cuda", 1.0, False), ("cpu", 0.25, False), ("cuda", 1.0, True),
          ("cuda", 0.25, True)]
_traced: dict = {}


def _key(device: str, density: float, zero_inactive: bool) -> str:
    return f"{device},{density},{int(zero_inactive)}"


def _trace(device: str, density: float, zero_inactive: bool = False) -> dict:
    if not _traced:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", PROBE, *[_key(*case) for case in _CASES]],
                                capture_output=True, text=True, timeout=300, env={**env, "PYTHONPATH": root}, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        _traced.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return _traced[_key(device, density, zero_inactive)]


def test_cuda_below_crossover_inlines_the_block_sparse_kernels():
    traced = _trace("cuda", 0.25)
    assert traced["bucket"] == 0.25
    assert sorted(traced["kernels"]) == ["column_sum_kernel", "forward_kernel", "grad_input_kernel",
                                         "grad_scores_kernel", "grad_weight_kernel"]
    assert not any("agpe." in t for t in traced["targets"]), traced["targets"]  # fully decomposed
    assert not any(t.startswith("aten.mm") or t.startswith("aten.addmm") for t in traced["targets"])


def test_cuda_above_crossover_uses_cublas_and_the_fused_mask_kernel():
    traced = _trace("cuda", 1.0)
    assert traced["bucket"] == 1.0
    assert traced["kernels"] == ["mask_scores_kernel", "column_sum_kernel"]
    assert not any("agpe." in t for t in traced["targets"]), traced["targets"]
    assert sum(t.startswith("aten.mm") or t.startswith("aten.addmm") for t in traced["targets"]) >= 2


def test_other_devices_call_the_opaque_host_ops():
    traced = _trace("cpu", 0.25)
    assert traced["kernels"] == []
    assert "agpe.sparse_linear_host.default" in traced["targets"]
    assert "agpe.sparse_linear_backward_host.default" in traced["targets"]
    assert "aten.sum.dim_IntList" in traced["targets"]  # the bias gradient: a plain sum off CUDA


def test_cuda_dense_path_with_the_zero_weight_promise_does_not_mask_the_weight():
    # Note [Zero inactive weights]: the two W*M products (forward, dX) disappear; the
    # mask-and-score pass over dW stays.
    masked = _trace("cuda", 1.0)
    promised = _trace("cuda", 1.0, zero_inactive=True)
    assert promised["kernels"] == ["mask_scores_kernel", "column_sum_kernel"]
    assert masked["targets"].count("aten.mul.Tensor") - promised["targets"].count("aten.mul.Tensor") == 2
    below = _trace("cuda", 0.25, zero_inactive=True)  # the block-sparse kernels never mask anyway
    assert sorted(below["kernels"]) == sorted(_trace("cuda", 0.25)["kernels"])
