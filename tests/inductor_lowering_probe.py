"""Lower a two-layer agpe MLP (GELU between) through Inductor on fake CUDA tensors, without a
GPU, and print as JSON what each user-defined Triton kernel reads (Note [Kernel inputs
Inductor would copy] in agpe_compile/inductor_passes.py).

Runs AOTAutograd, Inductor's post-grad passes and ``GraphLowering.run`` (no code
generation), with the CUDA device queries, the Triton driver and the constant folding's
real factory calls redirected to the CPU. The autograd engine cannot run a backward on
fake CUDA tensors without a driver, so the backward is written out as the op's autograd
formula calls it (ops/sparse_linear.py ``_backward``) and compiled in one inference graph.

    python tests/inductor_lowering_probe.py [--agpe-pass] [--cse] [--width 256] [--block 64]

``--agpe-pass``: lower with the backend's own config patches (``lowering_patches``);
``--cse``: first merge identical nodes as AOTAutograd's partitioner does for training
graphs (both layers are width x width, so their dW and score zeros merge).
"""

import inspect
import json
import sys
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget


class _Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def __getattr__(self, name):
        raise AttributeError(name)


triton.runtime.driver.set_active(_Driver())
_PROPS = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=140 * 2**30,
                         regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, warp_size=32,
                         gcnArchName="", shared_memory_per_block_optin=232448, L2_cache_size=50 * 2**20)
torch.cuda.get_device_properties = lambda *a, **k: _PROPS
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.current_device = lambda: 0
torch.cuda.device_count = lambda: 1
torch.cuda.is_bf16_supported = lambda *a, **k: True
torch.cuda.set_device = lambda *a, **k: None
torch.cuda._lazy_init = lambda: None

import torch.nn.functional as F  # noqa: E402
from torch._guards import TracingContext, detect_fake_mode, tracing  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._inductor import ir  # noqa: E402
from torch._inductor.compile_fx import (_recursive_post_grad_passes,  # noqa: E402
                                        _recursive_record_original_output_strides, compile_fx)
from torch._inductor.fx_passes import joint_graph  # noqa: E402
from torch._inductor.graph import GraphLowering  # noqa: E402
from torch._inductor.virtualized import V  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import agpe_compile  # noqa: E402,F401  (registers torch.ops.agpe)
from agpe_compile.inductor_passes import lowering_patches  # noqa: E402
from agpe_compile.packed_layout import build_packed  # noqa: E402


class _CudaToCpu(TorchFunctionMode):
    """Inductor's uniform-value constant folding runs real factory calls on the graph's
    device; only their values are used."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


_fold = joint_graph.UniformValueConstantFolder.run


def _fold_on_cpu(self, *args, **kwargs):
    with _CudaToCpu():
        return _fold(self, *args, **kwargs)


joint_graph.UniformValueConstantFolder.run = _fold_on_cpu
if "input_device" in inspect.signature(joint_graph.lazy_init).parameters:  # torch >= 2.13 traces patterns there
    from torch._inductor.fx_passes import post_grad

    _joint_init, _post_init = joint_graph.lazy_init, post_grad.lazy_init
    joint_graph.lazy_init = lambda input_device=None: _joint_init(None)
    post_grad.lazy_init = lambda input_device=None: _post_init(None)

AGPE_PASS = "--agpe-pass" in sys.argv
CSE = "--cse" in sys.argv
WIDTH = int(sys.argv[sys.argv.index("--width") + 1]) if "--width" in sys.argv else 256
BLOCK = int(sys.argv[sys.argv.index("--block") + 1]) if "--block" in sys.argv else 64
# a CPU build of torch cannot copy results back into mutated fake CUDA inputs: return them
CLONE_ACCUMULATORS = not torch.backends.cuda.is_built()
B, D = BLOCK, WIDTH

copies = []  # copy_input calls made while lowering a Triton kernel node
_copy_input = ir.ExternKernel.copy_input


def _recording_copy_input(x):
    out = _copy_input(x)
    node = V.graph.current_node
    if node is not None and "triton_kernel_wrapper" in str(node.target):
        copies.append({"node": node.name, "size": [str(s) for s in x.get_size()], "dtype": str(x.get_dtype())})
    return out


ir.ExternKernel.copy_input = staticmethod(_recording_copy_input)
report = {}


def inner_compile(gm, example_inputs, **kwargs):
    fake_mode = detect_fake_mode(example_inputs)
    if CSE:
        from torch._functorch.compile_utils import fx_graph_cse

        gm.graph = fx_graph_cse(gm.graph)
        gm.recompile()
    _recursive_record_original_output_strides(gm)
    with V.set_fake_mode(fake_mode):
        _recursive_post_grad_passes(gm, is_inference=True)
        graph = GraphLowering(gm, example_inputs=example_inputs, shape_env=fake_mode.shape_env, is_inference=True)
        with V.set_graph_handler(graph), V.set_extern_kernel_nodes([]):
            graph.run(*example_inputs)
    kernels = []
    for op in graph.operations:
        if isinstance(op, ir.UserDefinedTritonKernel):
            kernel, *_ = op.get_kernel_and_metadata()
            args = {key: op.kwargs[key].get_name() for key in op.ordered_kwargs_for_cpp_kernel
                    if isinstance(op.kwargs.get(key), ir.IRNode)}
            kernels.append({"kernel": kernel.__name__, "args": args})
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    clones = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.clone.default]
    report.update(kernels=kernels, graph_inputs=inputs, clones=clones, copies=list(copies))

    def run(args):
        raise RuntimeError("lowered only")

    run._boxed_call = True
    return run


R = C = D // B
mask = torch.zeros(R * C, dtype=torch.bool)
mask[: R * C // 4] = True
packed, _ = build_packed(mask.view(R, C), B, (1.0, 0.75, 0.5, 0.25, 0.1))


class TwoLayers(torch.nn.Module):
    def forward(self, x, w1, b1, w2, b2, m1, m2, s1, d1, s2, d2, flag, c1, c2, l1, l2, dy):
        if CLONE_ACCUMULATORS:
            s1, d1, s2, d2, c1, c2 = s1.clone(), d1.clone(), s2.clone(), d2.clone(), c1.clone(), c2.clone()
        h = torch.ops.agpe.sparse_linear(x, w1, b1, m1, s1, d1, flag, c1, l1, B, "taylor")
        a = F.gelu(h)
        y = torch.ops.agpe.sparse_linear(a, w2, b2, m2, s2, d2, flag, c2, l2, B, "taylor")
        ga, gw2 = torch.ops.agpe.sparse_linear_backward(dy, a, w2, m2, s2, d2, flag, c2, l2, B, "taylor", True, True)
        gb2 = torch.ops.agpe.bias_grad(dy)
        gh = torch.ops.aten.gelu_backward(ga, h)  # a pointwise result four kernels of fc1 read
        gx, gw1 = torch.ops.agpe.sparse_linear_backward(gh, x, w1, m1, s1, d1, flag, c1, l1, B, "taylor", True, True)
        gb1 = torch.ops.agpe.bias_grad(gh)
        outputs = (y, gx, gw1, gb1, gw2, gb2)
        return outputs + ((s1, d1, s2, d2, c1, c2) if CLONE_ACCUMULATORS else ())


gm = torch.fx.symbolic_trace(TwoLayers())
fake_mode = FakeTensorMode(shape_env=ShapeEnv())
with fake_mode:
    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="cuda")

    example = [empty(2, 128, D), empty(D, D), empty(D), empty(D, D), empty(D),
               empty(R, C, dtype=torch.bool), empty(R, C, dtype=torch.bool),
               *[empty(R, C, dtype=torch.float32) for _ in range(4)],
               empty(dtype=torch.bool), empty(2, dtype=torch.int64), empty(2, dtype=torch.int64),
               empty(packed.shape[0], dtype=torch.int32), empty(packed.shape[0], dtype=torch.int32), empty(2, 128, D)]
with tracing(TracingContext(fake_mode)):
    compile_fx(gm, example, inner_compile=inner_compile, config_patches=lowering_patches(None) if AGPE_PASS else None)
print("REPORT " + json.dumps(report))
