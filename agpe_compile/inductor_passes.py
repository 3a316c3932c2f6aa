"""Inductor post-grad pass for graphs that launch agpe's Triton kernels (Note [Kernel inputs
Inductor would copy]).

``AgpeBackend`` lowers with ``compile_fx(..., config_patches=lowering_patches(mode))``; the
patch installs ``KernelInputsPass`` as ``post_grad_custom_post_pass`` (for the forward and
the backward graph), ahead of any pass the user configured there. It changes where values
are stored, never what is computed.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
from typing import Any, Dict, Iterator, Optional

import torch
from torch import fx

__all__ = ["KernelInputsPass", "lowering_key", "lowering_patches", "realize_shared_kernel_inputs", "unshare_kernel_outputs"]

_KERNEL_TARGETS = ("triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional")

# Note [Kernel inputs Inductor would copy]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Inductor lowers every input of a user-defined Triton kernel under a stride constraint
# (config.triton_kernel_default_layout_constraint = "needs_fixed_stride_order": graph.py
# calls ExternKernel.require_exact_strides before lowering a triton_kernel_wrapper node).
# For an input that is a pointwise result not stored yet (the GELU backward, the
# concatenated q/k/v gradient) require_strides finds no buffer and calls copy_input: a NEW
# stored buffer computing the producer again, while the producer itself stays unstored.
# Each kernel reading it repeats this, so the four kernels of a layer's backward (dX, dW,
# scores, bias column sum) got four stores of one value, fused into one Inductor kernel
# with four outputs (H200, twenty-first session: 1.27 ms of a 10.1 ms step at d=0.1;
# found in run2/output_code.txt.gz, reproduced on the CPU by lowering on fake CUDA
# tensors, tests/inductor_lowering_probe.py). A view in front of the kernel is not the
# cause (the ninth session's guess, Note [Kernel operands] in kernels/launch.py).
#
# realize_shared_kernel_inputs marks each graph value that two or more kernels read with
# the node meta "inductor_realize_to_strides" (the flag Inductor's own
# decompose_mem_bound_mm sets): GraphLowering.run_node then stores it once, at its
# producer, with its traced strides, and each kernel's constraint finds that buffer. It
# also sets "dislike_padding", or torch 2.13 pads that buffer's rows (width 1056 in bf16,
# say) and the kernels copy it again.
#
# unshare_kernel_outputs handles the outputs: AOTAutograd's CSE merges the identical
# torch.zeros that every layer of one shape allocates for dW (and the score buffers) into
# one aten.full node; Inductor's reinplacing then sees later users of it and clones it for
# every kernel but the last (a zero fill plus a full copy per dW). A fresh full node per
# kernel has one user and is reinplaced (the fill stays, the copy goes). This must run
# before reinplace_inplaceable_ops: post_grad_custom_post_pass does (torch 2.11, 2.13).


def _is_kernel(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _KERNEL_TARGETS


def _kernel_reads(node: fx.Node) -> Iterator[fx.Node]:
    """The graph values a kernel node reads (a functional node's ``tensors_to_clone`` are
    outputs it writes into clones; a mutation node's arguments all count as read)."""
    written = set(node.kwargs.get("tensors_to_clone", ()))
    for name, value in node.kwargs["kwargs"].items():
        if isinstance(value, fx.Node) and name not in written:
            yield value


def realize_shared_kernel_inputs(graph: fx.Graph) -> int:
    """Mark the values two or more kernels read to be stored once (Note [Kernel inputs
    Inductor would copy]). Returns how many were marked."""
    readers: Dict[fx.Node, int] = collections.Counter()
    for node in graph.nodes:
        if _is_kernel(node):
            for value in set(_kernel_reads(node)):
                readers[value] += 1
    marked = 0
    for value, count in readers.items():
        if count < 2 or value.op != "call_function" or not isinstance(value.meta.get("val"), torch.Tensor):
            continue  # graph inputs are stored already
        if not value.meta.get("inductor_realize_to_strides"):
            value.meta["inductor_realize_to_strides"] = True
            # stored with exactly its traced strides: torch 2.13 fixes a realized layout by
            # padding rows over 1024 elements that are not 128-byte multiples, which the
            # kernels' exact-stride constraint then copies again (a re-audit, AU)
            value.meta["dislike_padding"] = True
            marked += 1
    return marked


def unshare_kernel_outputs(graph: fx.Graph) -> int:
    """Give each kernel its own copy of a constant ``aten.full`` it writes into when that
    node has other users (Note [Kernel inputs Inductor would copy]). Returns how many."""
    count = 0
    for node in list(graph.nodes):
        if not _is_kernel(node) or "tensors_to_clone" not in node.kwargs:
            continue
        kwargs = dict(node.kwargs["kwargs"])
        changed = False
        for name in node.kwargs["tensors_to_clone"]:
            value = kwargs.get(name)
            if (not isinstance(value, fx.Node) or value.target is not torch.ops.aten.full.default
                    or len(value.users) < 2):
                continue
            val = value.meta.get("val")
            if not isinstance(val, torch.Tensor) or getattr(val, "fake_mode", None) is None:
                continue  # no fake value to give the copy its own storage
            with graph.inserting_before(node):
                fresh = graph.call_function(value.target, value.args, dict(value.kwargs))
            fresh.meta.update(value.meta)
            with val.fake_mode:  # its own storage, or reinplacing still sees a shared one
                fresh.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
            kwargs[name] = fresh
            changed = True
            count += 1
        if changed:
            node.kwargs = {**node.kwargs, "kwargs": kwargs}
    return count


def _custom_graph_pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


class KernelInputsPass(_custom_graph_pass_base()):  # type: ignore[misc]
    """The post-grad pass (Note [Kernel inputs Inductor would copy]). ``then``: a pass the
    user had configured, run after this one (torch 2.11 takes one pass only)."""

    def __init__(self, then: Optional[Any] = None):
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        unshare_kernel_outputs(graph)
        realize_shared_kernel_inputs(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Optional[str]:
        """The compile caches' key for this pass (Note [Compile caches and the traced kernels]),
        with the chained pass's key (``None``, which bypasses the caches, when it has none)."""
        key = lowering_key()
        if self.then is None:
            return key
        then_uuid = self.then.uuid() if hasattr(self.then, "uuid") else None
        return None if then_uuid is None else f"{key}:{then_uuid}"


# Note [Compile caches and the traced kernels]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch's AOTAutograd cache (on by default in 2.11 and 2.13) keys a compiled graph on
# Dynamo's graph, which holds only ``torch.ops.agpe.sparse_linear`` calls, and on the
# configs. Which kernels the op's body traces (AGPE_TMA, AGPE_INLINE_KERNELS, the crossover
# densities and the kernels of this version of agpe_compile) is in neither, so a second
# compile of the same model, in a new process with the same cache directory or after
# torch._dynamo.reset(), replayed the first compile's kernels: the twenty-first session's
# AGPE_TMA=auto/off training steps both ran the plain kernels (audit BF; their first steps
# after a crossing took 1-3 s instead of ~20 s). The post-grad pass's uuid is part of that
# key (and of the FX graph cache's), so it carries all of them: a hash of the sources the
# lowering traces and the settings read while tracing (the crossover densities as they are
# at compile time, should a user change ``paths.GPU_DENSE_CROSSOVER`` or
# ``paths.GPU_DENSE_CROSSOVER_PERSISTENT_TMA``).
_LOWERING_SOURCES = ("inductor_passes.py", "ops", "kernels", "layout.py", "packed_layout.py")


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for entry in _LOWERING_SOURCES:
        path = os.path.join(root, entry)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, name) for name in os.listdir(path) if name.endswith(".py"))
        for name in files:
            digest.update(os.path.relpath(name, root).encode())
            with open(name, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def lowering_key() -> str:
    """What decides the kernels an agpe graph traces: the lowering's sources and the
    settings read while tracing (Note [Compile caches and the traced kernels])."""
    from agpe_compile.kernels.launch import TMA_ENV
    from agpe_compile.ops.paths import GPU_DENSE_CROSSOVER, GPU_DENSE_CROSSOVER_PERSISTENT_TMA
    from agpe_compile.ops.sparse_linear import INLINE_KERNELS

    tma = os.environ.get(TMA_ENV, "off").strip().lower() or "off"
    # as set now, not their source
    crossover = ",".join(f"{b}={d!r}" for b, d in sorted(GPU_DENSE_CROSSOVER.items()))
    persistent = ",".join(f"{b}={d!r}" for b, d in sorted(GPU_DENSE_CROSSOVER_PERSISTENT_TMA.items()))
    return (f"{_sources_hash()}:tma={tma}:inline={int(INLINE_KERNELS)}:crossover={crossover}"
            f":crossover_persistent={persistent}")


def lowering_patches(mode: Optional[str]) -> Dict[str, Any]:
    """``compile_fx``'s config patches for an agpe graph: the options of ``torch.compile``'s
    ``mode`` and the post-grad pass, ahead of the user's ``post_grad_custom_post_pass`` as
    set now (compile_fx applies the same patches to the backward graph it compiles later,
    so a pass set only around ``.backward()`` does not reach it; one set around the forward
    does)."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    patches: Dict[str, Any] = dict(list_mode_options(mode) or {}) if mode not in (None, "default") else {}
    current = inductor_config.post_grad_custom_post_pass
    try:  # torch >= 2.12 runs a list of passes, each with its own cache key
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:  # torch 2.11: one pass
        get_custom_graph_passes = None
    if not current:
        patches["post_grad_custom_post_pass"] = KernelInputsPass()
    elif get_custom_graph_passes is not None:
        patches["post_grad_custom_post_pass"] = (KernelInputsPass(), *get_custom_graph_passes(current))
    else:
        patches["post_grad_custom_post_pass"] = KernelInputsPass(current)
    return patches
