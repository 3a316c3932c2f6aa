"""The aot_eager lowering's graph pass: agpe's host ops called in place, without the
functional wrapper AOTAutograd put around them (Note [Host ops in place]).

``AgpeBackend`` with ``inductor=False`` (the default off CUDA; the main job's lowering)
hands ``aot_eager`` a forward and a backward compiler that run :func:`call_host_ops_in_place`
on their graph and then torch's own ``boxed_nop``. It changes how a value is stored, never
what is computed.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from agpe_compile.env import switch
from agpe_compile.passes.decide_layers import source_path
from agpe_compile.state import BUFFER_SUFFIXES as _ALL_SUFFIXES

__all__ = ["call_host_ops_in_place", "eager_compilers"]

# Note [Host ops in place]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# The backward op mutates the layer's saliency, dense-gradient and counter buffers
# (Note [Saliency buffers] in ops/reference.py). AOTAutograd functionalizes the graph, so
# the aot_eager backward graph holds, per layer,
#
#     out = auto_functionalized_v2(agpe.sparse_linear_backward_host, ..., _all_bases=[sal, dgs, cnt])
#     copy_(sal, out[2]); copy_(dgs, out[3]); copy_(cnt, out[4])
#
# and aot_eager runs it as written: clone the three buffers, call the op on the clones
# through the custom-op dispatcher (autograd, ADInplaceOrView, CPU keys), copy each clone
# back. Inductor removes that wrapper (its reinplacing pass); aot_eager has no such pass,
# and on the project's CPU the wrapper and the dispatch cost ~0.36 ms per layer and step,
# more than the op's own work on a small layer (a 3-layer 32-wide MLP: 2.42 ms per
# aot_eager training step with the wrapper, 1.34 ms without, 0.49 ms without agpe; 2.86 ms
# before the host-side score sums of ops/sparse_linear.py too; benchmarks/cpu_step.py,
# 2026-11-28).
#
# This pass replaces each such node by ``_backward_in_place``, which calls the op on the
# buffers themselves, and deletes the copies back, when nothing else could see the
# difference: every base is a graph input (a placeholder) read by nothing but the op and
# its own copy back, and each of the op's new values is used by that copy alone.
# Anything else (a buffer one layer's two calls share, where the second call's base is the
# first's output) keeps the functional form, and so does a whole graph whose own inputs
# include one of the buffers (the model's forward reads ``fc.weight_saliency``): that input
# is another placeholder, and its reads would see the sums mid-backward (helper audit CF;
# ``reads_score_buffers``, checked by the backend before it lowers). What only aliases a
# buffer at run time (an argument passed after compiling, a DDPOptimizer piece's activation
# that is a view of one) the call wrapper replaces by a copy, the values the functional
# form read (``unalias_score_buffers``; re-audit CG). Not covered: a graph that also
# writes to such an argument in place writes to the copy, so the buffer misses that write
# (re-audit CH; an argument that is agpe's score buffer and that the model edits). A backward that fails
# part-way leaves the layers whose op already ran with this call's scores added, as
# Inductor's reinplaced graphs (the default lowering) always did; the functional form
# wrote them all at its end. The forward's ``sparse_linear_host`` mutates
# nothing; it and the backward then call the Python implementation directly where the op
# itself would (ops/sparse_linear.py ``_run_directly``: real CPU tensors, no tracing, no
# dispatch mode), through the op otherwise (fake tensors, as DDPOptimizer propagates shapes
# through a split graph's pieces, meet the op's fake implementation). ``masked_weight``'s
# backward (MHA projections, other uses of a weight) is called in place the same way,
# through its op.
# tests/test_eager_lowering.py checks graphs, values and buffers against the functional form;
# AGPE_EAGER_IN_PLACE=0 (read at each compile) keeps the functional form, for comparison
# (benchmarks/cpu_step.py times both in one process).


_MUTATED = ("saliency", "dense_grad_sq", "counters")
_BUFFER_SUFFIXES = ("saliency", "saliency_dense_grad_sq", "saliency_counters")  # their names on the module
assert set(_BUFFER_SUFFIXES) <= set(_ALL_SUFFIXES)


def _in_place_calls() -> dict:
    """Each mutating op the pass calls in place: (how many outputs it returns, the call)."""
    return {torch.ops.agpe.sparse_linear_backward_host.default: (2, _backward_in_place),
            torch.ops.agpe.masked_weight_backward.default: (1, _masked_weight_backward_in_place)}


def _whole_bases(kwargs: dict) -> list:
    bases = kwargs.pop("_all_bases")
    for name in _MUTATED:
        kwargs[name] = bases[kwargs.pop(f"_{name}_base_index")]
    return bases


def _forward_direct(*args: Any, **kwargs: Any) -> torch.Tensor:
    from agpe_compile.ops.sparse_linear import _forward_impl, _run_directly

    if _run_directly(args[0]):
        return _forward_impl(*args, **kwargs)
    return torch.ops.agpe.sparse_linear_host(*args, **kwargs)


def _backward_in_place(**kwargs: Any):
    """The backward op on the buffers themselves: (grad_input, grad_weight, *bases)."""
    from agpe_compile.ops.sparse_linear import _backward_impl, _run_directly

    bases = _whole_bases(kwargs)
    if _run_directly(kwargs["x"]):
        grad_input, grad_weight = _backward_impl(**kwargs)
    else:
        grad_input, grad_weight = torch.ops.agpe.sparse_linear_backward_host(**kwargs)
    return (grad_input, grad_weight, *bases)


def _masked_weight_backward_in_place(**kwargs: Any):
    """``masked_weight``'s backward on the buffers themselves: (grad_weight, *bases)."""
    bases = _whole_bases(kwargs)
    return (torch.ops.agpe.masked_weight_backward(**kwargs), *bases)


def _copies_back(node: fx.Node, first: int) -> Optional[List[fx.Node]]:
    """The copy-back node of each base if ``node`` can run in place, else None. The op's
    own ``first`` outputs come before the bases' new values."""
    bases = node.kwargs.get("_all_bases")
    if not bases or any(not isinstance(b, fx.Node) or b.op != "placeholder" for b in bases):
        return None
    for name in _MUTATED:  # each mutated argument is a whole base, not a view of one
        index = node.kwargs.get(f"_{name}_base_index")
        extra = [key for key in node.kwargs if key.startswith(f"_{name}_") and key != f"_{name}_base_index"]
        if not isinstance(index, int) or extra:
            return None
    copies = {}
    for user in node.users:
        if user.target is not operator.getitem:
            return None
        index = user.args[1]
        if index < first:
            continue
        base = bases[index - first]
        if len(user.users) != 1:
            return None
        (copy,) = user.users
        if (copy.target is not torch.ops.aten.copy_.default or copy.args[0] is not base or copy.args[1] is not user
                or copy.users):
            return None
        copies[base] = copy
    if len(copies) != len(bases) or len(set(bases)) != len(bases):
        return None
    for base in bases:  # the op and its copy back are the base's only readers
        if set(base.users) != {node, copies[base]}:
            return None
    return list(copies.values())


def call_host_ops_in_place(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (Note [Host ops in place]); returns how many ops it rewrote."""
    graph = gm.graph
    functional = torch.ops.higher_order.auto_functionalized_v2
    calls = _in_place_calls()
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.agpe.sparse_linear_host.default:
            node.target = _forward_direct
            rewritten += 1
            continue
        if node.target is not functional or not node.args or node.args[0] not in calls:
            continue
        first, call = calls[node.args[0]]
        copies = _copies_back(node, first)
        if copies is None:
            continue
        for copy in copies:
            graph.erase_node(copy)
        for user in list(node.users):  # the bases' new values, read by nobody now
            if user.args[1] >= first and not user.users:
                graph.erase_node(user)
        node.target = call
        node.args = ()
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def _storages(t: torch.Tensor) -> List[Optional[int]]:
    """The data pointers behind ``t`` (a wrapper subclass's: its inner tensors'); None for
    a tensor whose memory cannot be read (re-audit CG: nested tensors raised here)."""
    try:
        return [t.untyped_storage().data_ptr()]
    except Exception:
        pass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [ptr for name in names for ptr in _storages(getattr(t, name))]
    return [None]


def _score_buffer_storages(states: Sequence[Any]) -> set:
    return {t.untyped_storage().data_ptr() for state in states
            for t in (state.saliency, state.dense_grad_sq, state.counters)}


def reads_score_buffers(graph: fx.Graph, example_inputs: Sequence[Any], states: Sequence[Any]) -> bool:
    """Whether one of Dynamo's own graph inputs is (a view of) a layer's mutated buffer: the
    model's forward reads ``fc.weight_saliency`` itself, say. That input is another
    placeholder than the op's, so the pass could not see its reads (helper audit CF). An
    input whose memory cannot be read counts as one. Inputs that only alias a buffer at
    run time (an argument, a DDPOptimizer piece's activation) are handled per call by
    :func:`unalias_score_buffers` (re-audit CG)."""
    buffers = _score_buffer_storages(states)
    suffixes = tuple(f"_{suffix}" for suffix in _BUFFER_SUFFIXES)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        if isinstance(example, FakeTensor):  # DDPOptimizer's pieces: the live tensor, if Dynamo kept it
            try:
                example = getattr(node.meta.get("grapharg"), "example", None)
            except Exception:  # a collected weak reference
                example = None
        if isinstance(example, torch.Tensor) and not isinstance(example, FakeTensor):
            if any(ptr is None or ptr in buffers for ptr in _storages(example)):
                return True
            continue
        path = source_path(node) or ""  # unknown contents: go by the name Dynamo read it under
        if path.endswith(suffixes):
            return True
    return False


def unalias_score_buffers(args: tuple, states: Sequence[Any]) -> tuple:
    """``args`` with a copy in place of each tensor that shares memory with one of the
    ``states``' mutated buffers: a graph lowered in place must not read a buffer its
    backward adds to (re-audit CG: an argument passed after compiling, a DDPOptimizer
    piece's activation that is a view of one). The copy is what the functional form read:
    the values as of the forward."""
    buffers = None
    out = None
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor) or isinstance(arg, (torch.nn.Parameter, FakeTensor)):
            continue
        if buffers is None:
            buffers = _score_buffer_storages(states)
        if any(ptr in buffers for ptr in _storages(arg) if ptr is not None):
            if out is None:
                out = list(args)
            out[i] = arg.clone()
    return args if out is None else tuple(out)


def enabled() -> bool:
    """Whether the pass runs: AGPE_EAGER_IN_PLACE is not 0/false/off/no (read at each compile;
    any other value than an on/off word is an error, agpe_compile/env.py)."""
    return switch("AGPE_EAGER_IN_PLACE")


def eager_compilers(in_place: bool = True) -> dict:
    """``fw_compiler`` / ``bw_compiler`` for ``aot_eager``: this pass (unless ``in_place`` is
    False or AGPE_EAGER_IN_PLACE=0), then torch's ``boxed_nop``."""
    from torch._dynamo.backends.debugging import boxed_nop

    in_place = in_place and enabled()

    def compiler(gm: fx.GraphModule, example_inputs: List[Any]) -> Callable:
        if in_place:
            call_host_ops_in_place(gm)
        return boxed_nop(gm, example_inputs)

    return {"fw_compiler": compiler, "bw_compiler": compiler}
