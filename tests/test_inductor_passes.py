"""agpe's Inductor post-grad pass (Note [Kernel inputs Inductor would copy] in
agpe_compile/inductor_passes.py): a value several Triton kernels read is stored once, and
a kernel writes its own zeros instead of a clone of a shared zeros node.

The lowering tests run tests/inductor_lowering_probe.py in a subprocess: it lowers a
two-layer agpe MLP through Inductor on fake CUDA tensors (no GPU) and reports which buffer
each kernel reads.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import fx

import agpe_compile
from agpe_compile import inductor_passes
from agpe_compile.ops import paths
from agpe_compile.inductor_passes import (KernelInputsPass, lowering_patches, realize_shared_kernel_inputs,
                                          unshare_kernel_outputs)

from .models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lower(*flags):
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # real Triton functions
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "inductor_lowering_probe.py"), *flags],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    names = [k["kernel"] for k in report["kernels"]]
    assert names == ["forward_kernel", "forward_kernel", "grad_input_kernel", "grad_weight_kernel",
                     "grad_scores_kernel", "column_sum_kernel"] * 1 + [
        "grad_input_kernel", "grad_weight_kernel", "grad_scores_kernel", "column_sum_kernel"], names
    return report


def _fc1_gradient_buffers(report):
    """The buffers fc1's four backward kernels read as dY (the GELU backward's result)."""
    fc1 = report["kernels"][6:]
    return [k["args"]["dy_ptr"] for k in fc1[:3]] + [fc1[3]["args"]["g_ptr"]]


def _gelu_output_buffers(report):
    """The buffers fc2's forward, dW and score kernels read as x (the GELU's result)."""
    kernels = report["kernels"]
    return [kernels[1]["args"]["x_ptr"], kernels[3]["args"]["x_ptr"], kernels[4]["args"]["x_ptr"]]


def test_inductor_alone_copies_a_shared_kernel_input_once_per_kernel():
    # What the pass is for, seen by the same probe (torch 2.11 on the H200 did the same:
    # docs/benchmarks.md, twenty-first session). If this fails, Inductor stopped copying.
    report = _lower("--cse")
    assert len(set(_fc1_gradient_buffers(report))) == 4, report["kernels"]
    assert len(set(_gelu_output_buffers(report))) == 3, report["kernels"]
    assert report["clones"], "the merged dW/score zeros were expected to be cloned"


def test_the_backends_pass_stores_each_kernel_input_once_and_clones_no_zeros():
    report = _lower("--cse", "--agpe-pass")
    assert len(set(_fc1_gradient_buffers(report))) == 1, report["kernels"]
    assert len(set(_gelu_output_buffers(report))) == 1, report["kernels"]
    assert report["clones"] == []
    # what Inductor still copies for a kernel: only the small score buffers it writes
    # (a zeros fill materialized for the kernel, one each), never an [M, K] operand
    assert all(copy["dtype"] == "torch.float32" and len(copy["size"]) == 2 and int(copy["size"][0]) <= 16
               for copy in report["copies"]), report["copies"]
    dw = [report["kernels"][i]["args"]["dw_ptr"] for i in (3, 7)]
    assert len(set(dw)) == 2


def test_a_shared_input_is_stored_once_without_padding_at_any_width():
    # torch 2.13 pads a realized buffer's rows over 1024 elements that are not 128-byte
    # multiples (bf16 width 1056); unless the pass marks it dislike_padding, the kernels'
    # exact-stride constraint then copied it again (a re-audit, AU)
    report = _lower("--cse", "--agpe-pass", "--width", "1056", "--block", "32")
    assert len(set(_fc1_gradient_buffers(report))) == 1, report["kernels"]
    assert len(set(_gelu_output_buffers(report))) == 1, report["kernels"]
    assert not any(copy["size"][-1] == "1056" for copy in report["copies"]), report["copies"]


def _kernel_node_graph():
    """A graph with the shape the pass looks for: call_function nodes named like torch's
    Triton kernel wrappers, reading and writing placeholders and computed values."""

    def triton_kernel_wrapper_functional(**kwargs):  # noqa: ARG001 (only its name matters)
        return {}

    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, 4)
    shared = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    shared.meta["val"] = torch.empty(4, 4)
    single = graph.call_function(torch.ops.aten.add.Tensor, (x, 1))
    single.meta["val"] = torch.empty(4, 4)
    first = graph.call_function(triton_kernel_wrapper_functional,
                                kwargs={"kwargs": {"a": shared, "b": x, "out": single}, "tensors_to_clone": ["out"]})
    second = graph.call_function(triton_kernel_wrapper_functional,
                                 kwargs={"kwargs": {"a": shared, "b": x}, "tensors_to_clone": []})
    graph.output((first, second))
    return graph, x, shared, single


def test_only_values_two_kernels_read_are_marked():
    graph, x, shared, single = _kernel_node_graph()
    assert realize_shared_kernel_inputs(graph) == 1
    assert shared.meta.get("inductor_realize_to_strides") is True
    assert "inductor_realize_to_strides" not in x.meta  # a graph input is stored already
    assert "inductor_realize_to_strides" not in single.meta  # written (a clone target), read by no kernel
    assert realize_shared_kernel_inputs(graph) == 0  # idempotent


def test_a_kernel_gets_its_own_zeros_only_where_the_zeros_are_shared():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def triton_kernel_wrapper_functional(**kwargs):  # noqa: ARG001
        return {}

    with FakeTensorMode() as mode:
        val = torch.empty(8, 8)
    graph = fx.Graph()
    zeros = graph.call_function(torch.ops.aten.full.default, ([8, 8], 0.0), {"dtype": torch.float32})
    zeros.meta["val"] = val
    kernels = [graph.call_function(triton_kernel_wrapper_functional,
                                   kwargs={"kwargs": {"dw": zeros}, "tensors_to_clone": ["dw"]}) for _ in range(2)]
    graph.output(tuple(kernels))
    assert unshare_kernel_outputs(graph) == 1  # the first gets a copy; the last keeps the node
    got = [k.kwargs["kwargs"]["dw"] for k in kernels]
    assert got[0] is not zeros and got[1] is zeros
    assert got[0].target is torch.ops.aten.full.default and got[0].args == zeros.args
    assert got[0].kwargs == zeros.kwargs and all(len(node.users) == 1 for node in got)
    assert got[0].meta["val"].untyped_storage()._cdata != val.untyped_storage()._cdata
    assert got[0].meta["val"].fake_mode is mode and got[0].meta["val"].shape == val.shape
    assert unshare_kernel_outputs(graph) == 0


def test_lowering_patches_keep_the_mode_and_a_users_pass():
    patches = lowering_patches("max-autotune")
    assert patches["max_autotune"] is True
    assert isinstance(patches["post_grad_custom_post_pass"], KernelInputsPass)
    assert lowering_patches(None).keys() == {"post_grad_custom_post_pass"}
    assert lowering_patches("default").keys() == {"post_grad_custom_post_pass"}

    seen = []

    class UserPass(KernelInputsPass.__mro__[1]):  # torch's CustomGraphPass
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "user-pass-1"

    user = UserPass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=user):
        installed = lowering_patches(None)["post_grad_custom_post_pass"]
    passes = installed if isinstance(installed, tuple) else (installed,)
    assert isinstance(passes[0], KernelInputsPass)
    graph = fx.Graph()
    graph.output(())
    for p in passes:
        p(graph)
    assert seen == [graph]  # the user's pass still runs, once
    keys = [p.uuid() for p in passes]
    assert all(keys) and ("user-pass-1" in keys or keys[0].endswith(":user-pass-1"))


def test_the_pass_key_follows_the_lowerings_code_and_settings(monkeypatch):
    monkeypatch.delenv("AGPE_TMA", raising=False)
    key = KernelInputsPass().uuid()
    assert key == KernelInputsPass().uuid() and ":tma=off:inline=1:crossover=" in key
    assert KernelInputsPass(lambda graph: None).uuid() is None  # a chained pass without a key: no caching
    monkeypatch.setenv("AGPE_TMA", "persistent")
    assert KernelInputsPass().uuid() == key.replace(":tma=off", ":tma=persistent")
    monkeypatch.setitem(paths.GPU_DENSE_CROSSOVER, 128, 0.5)  # changed at run time: its source is the same
    assert KernelInputsPass().uuid() not in (key, key.replace(":tma=off", ":tma=persistent"))
    monkeypatch.setattr(inductor_passes, "_LOWERING_SOURCES", ("inductor_passes.py",))
    inductor_passes._sources_hash.cache_clear()
    try:
        assert KernelInputsPass().uuid().split(":")[0] != key.split(":")[0]  # the kernels' sources count
    finally:
        monkeypatch.undo()
        inductor_passes._sources_hash.cache_clear()


_CACHE_SCRIPT = """
import os, sys, torch
import agpe_compile
from torch._dynamo.utils import counters
from tests.models import MLP
hits = []
for tma in ("off", "persistent", "off"):
    os.environ["AGPE_TMA"] = tma
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MLP()
    agpe_compile.prepare(model, {"block_size": 16})
    torch.compile(model, backend="agpe")(torch.randn(4, 64)).sum().backward()
    hits.append(counters["aot_autograd"]["autograd_cache_hit"])
print(hits)
"""


def test_a_compile_under_another_agpe_tma_is_not_served_from_the_cache(tmp_path):
    # Audit BF: the AOTAutograd cache replayed the kernels of the first compile whatever
    # AGPE_TMA said (Note [Compile caches and the traced kernels])
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [0, 0, 1]  # persistent: compiled anew; off again: hit


def test_the_backend_runs_the_pass_on_the_forward_and_backward_graphs(monkeypatch):
    calls = []
    original = inductor_passes.realize_shared_kernel_inputs

    def recording(graph):
        calls.append(graph)
        return original(graph)

    monkeypatch.setattr(inductor_passes, "realize_shared_kernel_inputs", recording)
    torch._dynamo.reset()
    model = MLP((16, 32, 8))
    agpe_compile.prepare(model, options={"block_size": 8})
    compiled = torch.compile(model, backend="agpe")
    # a graph found in Inductor's or AOTAutograd's on-disk cache skips the passes
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled(torch.randn(4, 16)).sum().backward()
    assert len(calls) == 2  # the forward graph and the backward graph
    torch._dynamo.reset()
