"""Rewrite linear sites into ``torch.ops.agpe.sparse_linear`` calls on a COPY of the graph.

Requires: the decisions of ``decide_layers`` for the graph ``gm`` that Dynamo handed over.
Ensures: a new GraphModule whose placeholders are Dynamo's, in order, followed by six
placeholders per rewritten weight (block mask, saliency, dense-grad scores, score flag,
counters, packed layout: ``LayerState.tensors()`` order); every rewritten site calls the op; the
transposes it consumed are gone; the graph lints. A higher-order op call whose body holds
sites (form ``subgraph``) gets a rewritten copy of its body under the same attribute name,
with the layers' six tensors appended to the call's operands and to the body's
placeholders in the same order (Note [Weights inside higher-order ops] in
match_linears.py). Dynamo's own GraphModule and bodies are not touched (Dynamo re-reads its
placeholders' ``grapharg`` after the backend returns).

Note [Extra graph inputs]
~~~~~~~~~~~~~~~~~~~~~~~~~
Dynamo's graph for ``fc(x)`` is::

    def forward(self, L_self_modules_fc_parameters_weight_, L_self_modules_fc_parameters_bias_, L_x_):
        linear = torch._C._nn.linear(l_x_, l_self_..._weight_, l_self_..._bias_)

and the rewritten copy is::

    def forward(self, L_..._weight_, L_..._bias_, L_x_, agpe_fc_block_mask, agpe_fc_saliency, ...):
        sparse_linear = torch.ops.agpe.sparse_linear(l_x_, l_..._weight_, l_..._bias_,
                                                     agpe_fc_block_mask, agpe_fc_saliency, ..., 32, 'taylor')

The backend's call wrapper appends the six tensors of each layer to Dynamo's arguments
on every call, so the compiled code reads the live buffers: editing a mask in place takes
effect on the next call and never recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import fx

from agpe_compile.state import BUFFER_SUFFIXES, LayerState

from .decide_layers import LayerDecision

SPARSE_LINEAR = torch.ops.agpe.sparse_linear.default
MASKED_WEIGHT = torch.ops.agpe.masked_weight.default


@dataclasses.dataclass
class RewriteResult:
    gm: fx.GraphModule
    states: List[LayerState]
    changed: bool
    # aot_eager lowering only: agpe's ops run in place (Note [Host ops in place] in
    # agpe_compile/eager_lowering.py); decided by the backend before it lowers
    in_place: bool = False

    def extra_inputs(self) -> List[torch.Tensor]:
        return [t for state in self.states for t in state.tensors()]


def copy_graph(gm: fx.GraphModule) -> Tuple[fx.Graph, Dict[fx.Node, fx.Node]]:
    """Node-by-node copy that keeps Dynamo's per-node metadata and sources; old -> new map."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if hasattr(node, "_dynamo_source"):
            new._dynamo_source = node._dynamo_source
        env[node] = new
    return graph, env


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name) or "layer"


def rewrite_linears(gm: fx.GraphModule, decisions: List[LayerDecision],
                    saliency_mode: Union[str, Callable[[LayerState], str]]) -> RewriteResult:
    """Copy ``gm`` and route every rewritten site through ``agpe::sparse_linear``.
    ``saliency_mode``: the score every layer computes, or a function of the layer's state
    giving it (the backend: its option, else the Sparsifier's)."""
    graph, old_to_new = copy_graph(gm)
    rewritten = [d for d in decisions if d.rewritten]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    states: List[LayerState] = []
    extras = []
    modes: List[str] = []
    used = {n.target for n in placeholders}
    bodies: Dict[fx.Node, _Body] = {}  # higher-order op call (new graph) -> its body's copy
    for index, decision in enumerate(rewritten):
        state = decision.state
        extra = []
        stem = f"agpe_{_safe(state.name)}"
        if any(f"{stem}_{suffix}" in used for suffix in BUFFER_SUFFIXES):  # two layers of one name
            stem = f"{stem}_{index}"
        for suffix, tensor in zip(BUFFER_SUFFIXES, state.tensors()):
            with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
                anchor = graph.placeholder(f"{stem}_{suffix}")
            used.add(anchor.target)
            anchor._dynamo_source = None
            anchor.meta["agpe_tensor"] = (state.name, suffix, index)
            extra.append(anchor)
        states.append(state)
        extras.append(extra)
        modes.append(saliency_mode(state) if callable(saliency_mode) else saliency_mode)
        for site in decision.sites:
            if site.form == "subgraph":
                _replace_in_body(gm, old_to_new, bodies, site, extra, state, modes[-1])
            else:
                _replace_site(graph, old_to_new, site, extra, state, modes[-1])
    for decision, extra, mode in zip(rewritten, extras, modes):  # after every site: a use may be another layer's site
        if decision.other_uses:
            _mask_other_uses(graph, old_to_new, decision, extra, decision.state, mode)
    graph.lint()
    new_gm = fx.GraphModule(gm, graph, class_name="AgpeGraphModule")
    new_gm.meta.update(gm.meta)
    for body in bodies.values():  # Dynamo's body modules stay as they were; the copy calls the op
        body.graph.lint()
        setattr(new_gm, body.target, fx.GraphModule(body.module, body.graph, class_name="AgpeBodyModule"))
    return RewriteResult(new_gm, states, changed=bool(rewritten))


@dataclasses.dataclass
class _Body:
    """The copy of one higher-order op's body graph that the rewrite edits."""

    target: str
    module: fx.GraphModule
    graph: fx.Graph
    old_to_new: Dict[fx.Node, fx.Node]


def _replace_in_body(gm: fx.GraphModule, old_to_new, bodies: Dict[fx.Node, _Body], site, extra,
                     state: LayerState, saliency_mode: str) -> None:
    """A layer used inside a higher-order op's body (Note [Weights inside higher-order ops]
    in match_linears.py): its six tensors become operands of the call and placeholders of
    the body's copy, and the body's sites call the op on them."""
    call = old_to_new[site.node]
    body = bodies.get(call)
    if body is None:
        target = site.node.args[0].target
        module = getattr(gm, target)
        graph, body_map = copy_graph(module)
        body = bodies[call] = _Body(target, module, graph, body_map)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    anchor, names = placeholders[-1], {n.target for n in placeholders}
    inner = []
    for outer in extra:
        name = outer.target
        while name in names:
            name = f"{name}_"
        with body.graph.inserting_after(anchor):
            anchor = body.graph.placeholder(name)
        names.add(name)
        anchor.meta["agpe_tensor"] = outer.meta["agpe_tensor"]
        inner.append(anchor)
    call.args = (*call.args, *extra)
    for inner_site in site.inner_sites:
        _replace_site(body.graph, body.old_to_new, inner_site, inner, state, saliency_mode)


def _mask_other_uses(graph, old_to_new, decision: LayerDecision, extra, state: LayerState, saliency_mode: str) -> None:
    """Hand every other use of the weight one shared ``masked_weight(W)`` (Note [Every use
    sees W * M] in decide_layers.py)."""
    weight = old_to_new[decision.weight]
    uses = [old_to_new[u] for u in decision.other_uses]
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(min(uses, key=order.__getitem__)):
        masked = graph.call_function(MASKED_WEIGHT, (weight, *extra[:5], state.block_size, saliency_mode))
    masked.meta["example_value"] = weight.meta.get("example_value")
    for use in uses:
        use.replace_input_with(weight, masked)


def _replace_site(graph, old_to_new, site, extra, state: LayerState, saliency_mode: str) -> None:
    node = old_to_new[site.node]
    state.saliency_mode = saliency_mode
    if site.form == "masked_weight":
        weight = old_to_new[site.weight]
        with graph.inserting_before(node):
            # The fused op runs dense, so the layout (the last extra input) is not needed.
            masked = graph.call_function(MASKED_WEIGHT, (weight, *extra[:5], state.block_size, saliency_mode))
        masked.meta["example_value"] = weight.meta.get("example_value")
        node.replace_input_with(weight, masked)
        return
    x = old_to_new[site.x] if isinstance(site.x, fx.Node) else site.x
    weight = old_to_new[site.weight]
    bias = old_to_new[site.bias] if isinstance(site.bias, fx.Node) else site.bias
    # addmm broadcasts any bias shape; the op takes the 1-D bias of F.linear only.
    separate_bias = bias is not None and _ndim(bias) != 1
    with graph.inserting_before(node):
        # zero_inactive (Note [Zero inactive weights]) is static: passed only when set, so
        # graphs of layers without the promise read as before
        flag = (True,) if state.zero_inactive else ()
        call = graph.call_function(
            SPARSE_LINEAR, (x, weight, None if separate_bias else bias, *extra, state.block_size, saliency_mode, *flag)
        )
        result = graph.call_function(torch.add, (call, bias)) if separate_bias else call
    call.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack", "source_fn_stack")})
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    # A later site may read this one's output (linear directly into linear): it must find
    # the new node, not the erased one.
    old_to_new[site.node] = result
    transpose = old_to_new[site.transpose] if site.transpose is not None else None
    while isinstance(transpose, fx.Node) and transpose.op != "placeholder" and not transpose.users:
        source = transpose.args[0]  # contiguous(t(W)): the t goes too
        graph.erase_node(transpose)
        transpose = source


def _ndim(node) -> int:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else node
    return value.dim() if isinstance(value, torch.Tensor) else -1
