"""Decide, for each weight placeholder used as a linear layer, whether it is rewritten.

Requires: the linear sites of a Dynamo graph (``match_linears``) and Dynamo's example
inputs, where ``example_inputs[i]`` is the live ``nn.Parameter`` of placeholder i.
Ensures: every eligible weight has a :class:`~agpe_compile.state.LayerState` attached
(created with all blocks active if the model was never prepared); every other weight
gets a human-readable reason; every use of a rewritten weight that is not one of its
linear sites is listed in ``other_uses`` (Note [Every use sees W * M]). Reads the graph,
never changes it; marks parameters used as embedding tables (Note [Tied weights across
graphs]).

Note [Every use sees W * M]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
A mask is a promise about the parameter: the model computes as if W were W * M. The
rewrite keeps it at the linear sites; any other use of the same weight in the graph
(``h @ W`` in a tied autoencoder, ``einsum("bi,oi->bo", x, W)``, ``W.sum()`` in a
regulariser) would read the raw W and break it silently. So every such use is handed
``masked_weight(W, ...)`` instead (dense compute, exact masking, saliency from its
gradient too), and a *prepared* weight the matcher does not recognise as a linear layer
at all is rewritten that way entirely (lowering ``masked_weight``). Uses that only read
metadata (``W.shape``, ``zeros_like(W)``) keep the raw weight, and so do uses through which
the weight is written in place, directly or through an alias (``W.data.clamp_()``): the
write must reach the parameter (``_role``/``_chain`` below).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from agpe_compile.config import BackendConfig
from agpe_compile.state import (EXCLUDED_ATTR, PREPARED_BLOCK_SIZE_ATTR, STATE_ATTR, STRIPPED_ATTR, LayerState, check_block_size_option,
                                layer_name, pattern_reason, skip_reason, state_of)
from torch.nn.utils import parametrize

from .match_linears import LinearSite, UnmatchedUse, embedding_weights

log = logging.getLogger(__name__)
_SOURCE_PART = re.compile(r"\.(?:_modules|_parameters|_buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclasses.dataclass
class LayerDecision:
    """Whether one weight is rewritten, and why not if it is not."""

    name: str
    weight: fx.Node
    sites: List[LinearSite]
    shape: Tuple[int, ...]
    state: Optional[LayerState]
    reason: Optional[str]
    other_uses: List[fx.Node] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> bool:
        return self.state is not None

    @property
    def lowering(self) -> Optional[str]:
        """``sparse_linear``, ``masked_weight`` (dense compute: inside a fused op, or a use
        that is not a linear site, Note [Every use sees W * M]) or both."""
        if not self.rewritten:
            return None
        forms = {"masked_weight" if s.form == "masked_weight" else "sparse_linear" for s in self.sites}
        if self.other_uses:
            forms.add("masked_weight")
        return "+".join(sorted(forms))


def source_path(placeholder: fx.Node) -> Optional[str]:
    """``fc.weight`` for a placeholder whose Dynamo source is ``L['self']._modules['fc']._parameters['weight']``."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return None
    name = grapharg.source.name
    name = name() if callable(name) else name
    root_end = name.find("]")
    parts = [a or b for a, b in _SOURCE_PART.findall(name[root_end + 1:])]
    return ".".join(parts) if parts else None


def _placeholder_examples(graph: fx.Graph, example_inputs: Sequence) -> Dict[fx.Node, object]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return {node: _live(node, example) for node, example in zip(placeholders, example_inputs)}


# Note [Fake example inputs]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# Dynamo hands a backend the live Parameters as example inputs, except where it splits a
# graph itself: DDPOptimizer (``torch.compile`` of a DistributedDataParallel model larger
# than one gradient bucket) compiles each piece with FakeTensors. A fake weight carries no
# agpe state, so the backend would make a new, dense one at the default block size. Dynamo
# keeps the live tensor behind the placeholder's ``grapharg`` (a weak reference): a weight
# is looked up there when the example is fake.
def _live(node: fx.Node, example: object) -> object:
    if not isinstance(example, FakeTensor):
        return example
    grapharg = node.meta.get("grapharg")
    try:
        live = getattr(grapharg, "example", None)
    except Exception:  # a collected weak reference: keep the fake
        return example
    return live if isinstance(live, torch.nn.Parameter) and not isinstance(live, FakeTensor) else example


def _layer_name(placeholder: fx.Node) -> str:
    path = source_path(placeholder)
    if path is None:  # a graph input: its local name (``x`` for ``L['x']``), else the node's
        grapharg = placeholder.meta.get("grapharg")
        name = getattr(getattr(grapharg, "source", None), "name", None)
        name = name() if callable(name) else name
        local = re.fullmatch(r"L\['(\w+)'\]", name) if isinstance(name, str) else None
        return local.group(1) if local else placeholder.name
    module_name, _, param_name = path.rpartition(".")
    return layer_name(module_name, param_name)


def decide_layers(
    graph: fx.Graph,
    example_inputs: Sequence,
    sites: List[LinearSite],
    unmatched: List[UnmatchedUse],
    config: BackendConfig,
) -> List[LayerDecision]:
    """One decision per distinct weight (sites sharing a weight share a decision)."""
    examples = _placeholder_examples(graph, example_inputs)
    tied = embedding_weights(graph)
    _mark_tables(tied, examples)
    by_weight: Dict[fx.Node, List[LinearSite]] = {}
    decisions: List[LayerDecision] = []
    for site in sites:
        if site.form == "masked_weight" and not isinstance(examples.get(site.weight), torch.nn.Parameter):
            continue  # a 2-D activation handed to a fused attention op, not a weight
        if site.weight.op != "placeholder":
            decisions.append(LayerDecision(_computed_name(site), site.weight, [site], _shape_of(site.weight), None,
                                           "weight is computed in the graph, not a parameter"))
            continue
        by_weight.setdefault(site.weight, []).append(site)
    block_size = _default_block_size(by_weight, examples, config)
    for weight_node, weight_sites in by_weight.items():
        decisions.append(_decide(weight_node, weight_sites, examples.get(weight_node), tied, config, block_size))
    seen = set(by_weight)
    for node, example in examples.items():  # prepared weights used in no form the matcher knows
        state = state_of(example) if isinstance(example, torch.nn.Parameter) else None
        if node in seen or state is None or not _other_uses(node, []):
            continue
        seen.add(node)
        decisions.append(_decide(node, [], example, tied, config, block_size))
    for use in unmatched:
        example = examples.get(use.weight)
        if use.weight in seen or not isinstance(example, torch.nn.Parameter):
            continue
        seen.add(use.weight)
        decisions.append(LayerDecision(_layer_name(use.weight), use.weight, [], tuple(example.shape),
                                       None, getattr(example, EXCLUDED_ATTR, None) or use.reason))
    return decisions


# Note [Tied weights across graphs]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A weight tied with an embedding stays dense (masking rows of an embedding table is not a
# linear layer's pruning). Within one graph the embedding op shows the tie; across a graph
# break (``wte(idx)``, a print, then ``head(h)``) the head's graph has no embedding op. The
# graph with the lookup runs, so compiles, first: the table's parameter is marked there
# (``EXCLUDED_ATTR``, like ``prepare``'s exclusions), and a later graph that meets it as a
# linear weight leaves it dense with that reason.
_TIED_REASON = "weight tied/shared with an embedding"


def _mark_tables(tables, examples) -> None:
    for node in tables:
        weight = examples.get(node)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        state = state_of(weight)
        if state is not None and state.module is None:
            # a graph compiled earlier (the head ran before the lookup) made it a linear layer
            raise RuntimeError(
                f"agpe: parameter {_layer_name(node)!r} is an embedding table in this graph, but a graph compiled "
                f"earlier rewrote it as the linear layer {state.name!r} (a head tied with the embedding that runs "
                f"before the lookup, across a graph break). Tied weights stay dense: call "
                f"agpe_compile.prepare(model) before torch.compile (it finds the tie), then torch._dynamo.reset()")
        if state is None and not hasattr(weight, EXCLUDED_ATTR):
            setattr(weight, EXCLUDED_ATTR, _TIED_REASON)
        elif state is not None and state.name not in _TIED_SAID:
            # prepared as a linear layer: prepare finds ties through nn.Embedding modules only,
            # not F.embedding(idx, head.weight); its masks reach the lookup too (W * M everywhere)
            _TIED_SAID.add(state.name)
            log.warning("agpe: %s is pruned as a linear layer, but this graph also uses its weight as an embedding "
                        "table (F.embedding): its pruned blocks zero parts of the token embeddings too. A tie through "
                        "an nn.Embedding module stays dense; to keep this one dense, exclude it "
                        "(AGPEConfig(exclude=[%r]))", state.name, state.name)


_TIED_SAID: set = set()


# How a use treats the weight (Note [Every use sees W * M]): metadata only (keeps the raw
# weight, costs nothing), an alias of it (follow its users), or a read of its values.
_METADATA_METHODS = frozenset({"size", "dim", "numel", "stride", "element_size", "nelement", "is_contiguous",
                               "get_device", "data_ptr", "new_zeros", "new_empty", "new_ones", "new_full",
                               "new_tensor", "storage_offset", "is_floating_point", "is_complex"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "layout",
                             "is_leaf", "nbytes", "itemsize", "grad_fn", "names", "is_sparse", "is_quantized"})
_METADATA_FUNCTIONS = frozenset({torch.zeros_like, torch.empty_like, torch.ones_like, torch.full_like,
                                 torch.rand_like, torch.randn_like, torch.randint_like, torch.numel,
                                 torch.is_floating_point, torch.is_complex, torch.is_tensor})
# methods where a weight passed as an argument (not as self) only lends its dtype/device
_METADATA_ARG_METHODS = frozenset({"type_as", "to", "new_zeros", "new_empty", "new_ones", "new_full"})
_ALIAS_METHODS = frozenset({"detach", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "narrow",
                            "select", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "expand_as",
                            "swapaxes", "swapdims", "movedim", "as_strided", "unbind", "split", "chunk",
                            "contiguous", "__getitem__"})
_ALIAS_ATTRS = frozenset({"data", "T", "mT", "H", "mH"})
_ALIAS_FUNCTIONS = frozenset({operator.getitem, torch.detach, torch.t, torch.transpose, torch.narrow, torch.select,
                              torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.permute,
                              torch.swapaxes, torch.swapdims, torch.movedim, torch.unbind, torch.split,
                              torch.chunk})


_ALIAS_FUNCTION_NAMES = frozenset({"_get_data_attr"})  # ``W.data`` as Dynamo records it


def _role(use: fx.Node, source: fx.Node) -> str:
    """``"metadata"``, ``"alias"``, ``"write"`` (an in-place op on ``source`` itself) or
    ``"read"``: how ``use`` treats ``source`` (the weight, or an alias of it)."""
    is_self = bool(use.args) and use.args[0] is source
    if use.op == "call_method":
        if _in_place(use.target):
            return "write" if is_self else "read"
        if use.target in _METADATA_METHODS and is_self:
            return "metadata"
        if use.target in _METADATA_ARG_METHODS and not is_self:
            return "metadata"
        return "alias" if use.target in _ALIAS_METHODS and is_self else "read"
    if use.op == "call_function":
        target = use.target
        if target is getattr and len(use.args) > 1:
            return "metadata" if use.args[1] in _METADATA_ATTRS else ("alias" if use.args[1] in _ALIAS_ATTRS else "read")
        if target in _METADATA_FUNCTIONS:
            return "metadata"
        if _in_place(getattr(target, "__name__", "")):
            return "write" if is_self else "read"
        aliasing = target in _ALIAS_FUNCTIONS or getattr(target, "__name__", "") in _ALIAS_FUNCTION_NAMES
        return "alias" if aliasing and is_self else "read"
    return "metadata" if use.op == "output" else "read"  # a graph output is the parameter itself


_IN_PLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
                                 "iand", "ior", "ixor", "ilshift", "irshift"})


def _in_place(name: str) -> bool:
    return isinstance(name, str) and ((name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS)


def _chain(node: fx.Node, source: fx.Node, depth: int = 0) -> set:
    """The roles met along ``node``'s use of ``source``, following aliases."""
    role = _role(node, source)
    if role != "alias" or depth > 16:
        return {role}
    found = set()
    for user in node.users:
        found |= _chain(user, node, depth + 1)
    return found or {"metadata"}


def _other_uses(weight_node: fx.Node, sites: List[LinearSite]) -> List[fx.Node]:
    """Uses of ``weight_node`` that its linear sites do not consume and that read its values
    (Note [Every use sees W * M]). A use through which the weight is written in place
    (``W.data.clamp_()``) keeps the raw weight: the write must reach the parameter."""
    site_nodes = {s.node for s in sites}
    transposes = set()
    for s in sites:
        node = s.transpose
        while isinstance(node, fx.Node) and node is not weight_node:  # contiguous(t(W)): both
            transposes.add(node)
            node = node.args[0] if node.args else None

    def consumed(node: fx.Node) -> bool:
        return node in site_nodes or (node in transposes and all(consumed(u) for u in node.users))

    uses = []
    for use in weight_node.users:
        if consumed(use):
            continue
        roles = _chain(use, weight_node)
        if "read" in roles and "write" not in roles:
            uses.append(use)
    return uses


def _shape_of(node: fx.Node) -> Tuple[int, ...]:
    value = node.meta.get("example_value")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _computed_name(site: LinearSite) -> str:
    """The module a computed weight's linear site runs in (``fc (computed weight)``), else the node."""
    stack = site.node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        path = str(path)  # "L['self'].blocks.0.fc": the root, then the module path
        module_path = path[path.find("]") + 1:].lstrip(".") if path.startswith("L[") else path
        if module_path:
            return f"{module_path} (computed weight)"
    return f"computed weight of {site.node.name}"


def _default_block_size(by_weight, examples, config: BackendConfig) -> int:
    """Block size of layers met here for the first time: the option, else the one block
    size of this graph's prepared layers (``prepare(model, {"block_size": 8})`` then
    ``torch.compile`` without options), else the one block size prepare() recorded on this
    graph's other weights (a graph after a break holding none of the prepared layers), else
    the default."""
    if config.block_size is not None:
        return config.block_size
    params = [examples.get(w) for w in by_weight if isinstance(examples.get(w), torch.nn.Parameter)]
    prepared = {state.block_size for state in map(state_of, params) if state is not None}
    if not prepared:
        prepared = {getattr(p, PREPARED_BLOCK_SIZE_ATTR) for p in params if hasattr(p, PREPARED_BLOCK_SIZE_ATTR)}
    return prepared.pop() if len(prepared) == 1 else config.resolved_block_size


def _decide(weight_node, sites, weight, tied, config: BackendConfig, block_size: int) -> LayerDecision:
    name = _layer_name(weight_node)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
    state = state_of(weight) if isinstance(weight, torch.nn.Parameter) else None
    if state is not None:
        check_block_size_option(state, config, seen_as=name)
        _check_not_parametrized(state)
        reason = pattern_reason(state.name, config)
        left_out = str(getattr(weight, EXCLUDED_ATTR, ""))
        if reason is None and left_out.endswith("(at prepare)") and (
                state.sparsifier_ref is None or state.sparsifier_ref() is None):
            reason = left_out  # a state of an earlier compile that the Sparsifier's patterns leave out
        if reason is not None:
            _check_not_driven(state, reason)
            return LayerDecision(state.name, weight_node, sites, shape, None, reason)
        return LayerDecision(state.name, weight_node, sites, shape, state, None, _other_uses(weight_node, sites))
    if isinstance(weight, torch.nn.Parameter) and getattr(weight, STRIPPED_ATTR, False):
        raise RuntimeError(
            f"agpe: layer {name!r} was finished by agpe_compile.strip(): its mask is folded into the weight and "
            f"its agpe state removed. Compile the stripped model with another backend (it is a plain model now), "
            f"or call agpe_compile.prepare(model) (or create a Sparsifier) to train it sparse again, then "
            f"torch._dynamo.reset() and compile")
    reason = getattr(weight, EXCLUDED_ATTR, None) if isinstance(weight, torch.nn.Parameter) else None
    if reason is None and weight_node in tied:
        reason = _TIED_REASON
    path = source_path(weight_node)
    if reason is None and path is not None and ".parametrizations." in f".{path}":
        # a parametrization that returns its input (switched off): prepare leaves the layer dense
        reason = "input of a torch.nn.utils.parametrize parametrization: the layer's weight is computed from it"
    if reason is None and not isinstance(weight, torch.nn.Parameter) and source_path(weight_node) is None:
        reason = ("a graph input, not a parameter: used as W in x @ W.T (an activation, or a weight passed in "
                  "as a tensor)")
    if reason is None:
        reason = skip_reason(name, weight, config, block_size)
    if reason is not None:
        return LayerDecision(name, weight_node, sites, shape, None, reason)
    state = LayerState.create(name, _param_name(weight_node), weight, block_size)
    state.graph_named = True  # named from this graph's frame; prepare() gives it its model path
    setattr(weight, STATE_ATTR, state)
    return LayerDecision(name, weight_node, sites, shape, state, None, _other_uses(weight_node, sites))


def _check_not_driven(state: LayerState, reason: str) -> None:
    """A layer an explicit Sparsifier drives, left dense by this compile's include/exclude
    options alone, would have its mask changed on zero saliency (the dense graph never scores
    it): the patterns belong in the AGPEConfig, which the Sparsifier and the backend share."""
    driver = state.sparsifier_ref() if state.sparsifier_ref is not None else None
    if driver is not None:
        raise RuntimeError(
            f"agpe: layer {state.name!r} is driven by a Sparsifier, but this compile's options leave it dense "
            f"({reason}): its mask would change without gradient information. Put the pattern in "
            f"AGPEConfig(include=..., exclude=...) (the Sparsifier then leaves the layer dense and the backend "
            f"follows it), or drop it from the compile options")


def _check_not_parametrized(state: LayerState) -> None:
    """A layer parametrized after prepare computes its weight from the prepared parameter:
    the mask would apply to the parametrization's input, not to the weight the layer uses."""
    module = state.module
    if module is not None and parametrize.is_parametrized(module, state.param_name):
        raise RuntimeError(
            f"agpe: layer {state.name!r} was prepared and then parametrized (torch.nn.utils.parametrize): its "
            f"weight is now computed from the prepared parameter, so its mask cannot describe the weight the "
            f"layer uses. Parametrize before agpe_compile.prepare / Sparsifier (the layer then stays dense), "
            f"or remove the parametrization")


def _param_name(placeholder: fx.Node) -> str:
    path = source_path(placeholder)
    return path.rpartition(".")[2] if path else "weight"
