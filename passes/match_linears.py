"""Find the linear layers in a Dynamo-level FX graph.

Requires: a graph as Dynamo hands it to a backend (torch functions, ``call_method`` nodes,
operators; no aten ops yet). Ensures nothing: it only reads the graph.

A *linear site* is a node that computes ``x @ W^T (+ b)`` with ``W`` a placeholder:

==========================================  ==========================================
pattern                                     written by the user as
==========================================  ==========================================
``torch._C._nn.linear(x, W, b)``            ``nn.Linear``, ``F.linear``
``matmul(x, t(W))``                         ``x @ W.t()``, ``x @ W.T``, ``torch.matmul``
``mm(x, t(W))``                             ``torch.mm(x, W.t())``
``addmm(b, x, t(W))``                       ``torch.addmm(b, x, W.t())`` (alpha=beta=1,
                                            also as keywords)
==========================================  ==========================================

where ``t(W)`` is ``W.t()``, ``W.T``, ``W.mT``, ``torch.t(W)``, a transpose/permute/swapaxes
of dims 0, 1, or ``.contiguous()`` of one of those; ``F.linear`` may take its arguments as
keywords. A 2-D placeholder passed as a projection weight to a fused attention op
(``F.multi_head_attention_forward``'s ``in_proj_weight``, ``q/k/v_proj_weight``,
``out_proj_weight``; the eval fast paths of ``nn.MultiheadAttention``/
``nn.TransformerEncoderLayer``) is a site of form ``masked_weight``: the op runs the
projections internally, so the backend hands it ``W * M`` instead (see
agpe_compile/ops/masked_weight.py). Its other tensor arguments (``attn_mask``) are not weights.
A placeholder that reaches a matmul-like op any other way (``x @ W``, ``W @ x``), or a
weight of 2 or more dims that reaches a contraction the rewrite does not know
(``torch.einsum``, ``bmm``, ``baddbmm``, ``tensordot``, an op of another library such as
``torch.ops.transformers.*``), is an *unmatched use*: the backend reports it instead of
silently skipping it (and masks it when the weight is rewritten or prepared: Note [Every
use sees W * M] in decide_layers.py).

Note [Weights inside higher-order ops]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Dynamo traces ``torch.utils.checkpoint`` regions (and other higher-order ops) into a
body graph called by ``tag_activation_checkpoint(body, x, W, ...)``: the weights are
operands of that call, and the ``x @ W^T`` nodes live in the body. A weight whose every
use in the body is a linear site there (``F.linear``, ``x @ W.t()``, ``addmm``) is a site
of form ``subgraph``: the rewrite gives the call its own copy of the body, appends the
layer's six tensors to the call's operands and to the body's placeholders, and rewrites
the body's sites into ``sparse_linear`` like the outer graph's (so the block-sparse
kernels run inside the region, recomputation included, and ``counters[0]`` counts its
rows). Activation checkpointing recomputes the forward op in the backward; the op's
forward mutates nothing, so recomputing it is exact. Any other body (the weight also read
another way there, handed to a nested higher-order op or a fused attention op, a body
shared by two calls) keeps the older, always-exact form: a site of form ``masked_weight``
on the outer operand, so the body computes with ``W * M`` (masking and saliency exact,
dense speed, rows not counted). So does ``x @ W.T`` written with the attribute inside the
region: Dynamo evaluates ``W.T`` in the outer graph and hands the body the transposed
tensor, which is not a placeholder the matcher knows (``W.t()`` stays in the body).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import List, Optional, Tuple

import torch
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.mm)
ADDMM_TARGETS = (torch.addmm,)
MATMUL_METHODS = ("matmul", "mm")  # Tensor methods, call_method nodes in Dynamo's graphs
EMBEDDING_TARGETS = (torch.nn.functional.embedding, torch.embedding)
# Contractions agpe does not rewrite: a weight reaching one is reported, not skipped silently.
OTHER_CONTRACTION_TARGETS = tuple(t for t in (torch.einsum, getattr(torch.functional, "einsum", None), torch.bmm,
                                              torch.baddbmm, torch.tensordot,
                                              getattr(torch.functional, "tensordot", None), torch.bilinear,
                                              torch.nn.functional.bilinear) if t is not None)
OTHER_CONTRACTION_METHODS = ("bmm", "baddbmm")
# The fused attention ops and where they take their projection weights: (positions, keyword
# names). Only these arguments are weights; another 2-D parameter handed to the op (a learned
# ``attn_mask``, say) is not a linear weight and is left alone.
_FUSED_WEIGHT_ARGS = {
    "multi_head_attention_forward": ((5, 11, 18, 19, 20), ("in_proj_weight", "out_proj_weight", "q_proj_weight",
                                                           "k_proj_weight", "v_proj_weight")),
    "_native_multi_head_attention": ((5, 7), ("qkv_weight", "proj_weight")),
    "_transformer_encoder_layer_fwd": ((3, 5, 14, 16), ("qkv_weight", "proj_weight", "ffn_weight_1", "ffn_weight_2")),
}
FUSED_ATTENTION_TARGETS = tuple(
    op
    for op in (
        torch.nn.functional.multi_head_attention_forward,
        getattr(torch, "_transformer_encoder_layer_fwd", None),
        getattr(torch, "_native_multi_head_attention", None),
    )
    if op is not None
)


@dataclasses.dataclass
class LinearSite:
    """One ``x @ W^T + b`` computation found in the graph."""

    node: fx.Node
    x: Optional[fx.Node]
    weight: fx.Node
    bias: Optional[fx.Node]
    form: str
    transpose: Optional[fx.Node] = None
    # form "subgraph": the weight's placeholder in the body and its linear sites there
    inner_weight: Optional[fx.Node] = None
    inner_sites: List["LinearSite"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class UnmatchedUse:
    """A placeholder used by a matmul-like op in a way that is not ``x @ W^T``."""

    node: fx.Node
    weight: fx.Node
    reason: str


def _transposed_placeholder(node) -> Optional[fx.Node]:
    """W if ``node`` is a 2-D transpose of placeholder W (``.contiguous()`` of one too), else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    if node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
        inner = node.args[0]
        return _transposed_placeholder(inner) if isinstance(inner, fx.Node) and len(inner.users) == 1 else None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "placeholder":
        return None
    rest = tuple(node.args[1:])
    if node.op == "call_method" and node.target == "t" and not rest:
        return src
    if node.op == "call_function" and node.target is torch.t and not rest:
        return src
    if node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)) and _ndim(src) == 2:
        return src
    if node.op == "call_method" and node.target in ("swapaxes", "swapdims") and sorted(rest) in ([0, 1], [-2, -1]):
        return src
    if node.op == "call_function" and node.target in (torch.swapaxes, torch.swapdims) and sorted(rest) in ([0, 1], [-2, -1]):
        return src
    if node.op == "call_method" and node.target == "transpose" and sorted(rest) in ([0, 1], [-2, -1], [-1, 0], [0, -1]):
        return src
    if node.op == "call_function" and node.target is torch.transpose and sorted(rest) in ([0, 1], [-2, -1]):
        return src
    if node.op == "call_method" and node.target == "permute" and rest in ((1, 0), ((1, 0),)):
        return src
    return None


def _fused_weight_sites(node: fx.Node) -> List[LinearSite]:
    positions, names = _FUSED_WEIGHT_ARGS.get(getattr(node.target, "__name__", ""), ((), ()))
    candidates = [node.args[i] for i in positions if i < len(node.args)] + [node.kwargs.get(k) for k in names]
    sites = []
    for arg in candidates:
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and _ndim(arg) == 2:
            if all(site.weight is not arg for site in sites):
                sites.append(LinearSite(node, None, arg, None, "masked_weight"))
    return sites


def _ndim(node: fx.Node) -> int:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _subgraph_weight_sites(node: fx.Node) -> List[LinearSite]:
    """Weights a higher-order op (``torch.utils.checkpoint``'s ``tag_activation_checkpoint``,
    ``wrap``) hands to its body graph, where the body uses them as linear weights: sites of
    form ``subgraph`` where the body can be rewritten, else ``masked_weight`` on the outer
    operand (Note [Weights inside higher-order ops])."""
    if not isinstance(node.target, torch._ops.HigherOrderOperator) or not node.args:
        return []
    body_node, operands = node.args[0], node.args[1:]
    owner = node.graph.owning_module
    if not (isinstance(body_node, fx.Node) and body_node.op == "get_attr" and owner is not None):
        return []
    body = getattr(owner, body_node.target, None)
    if not isinstance(body, fx.GraphModule):
        return []
    inner = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(inner) != len(operands):
        return []
    outer_of = dict(zip(inner, operands))
    inner_sites = find_linear_sites(body.graph)[0]
    own_body = _body_of_one_call(node, body_node)
    sites: List[LinearSite] = []
    for site in inner_sites:
        weight = outer_of.get(site.weight)
        if not (isinstance(weight, fx.Node) and weight.op == "placeholder" and _ndim(weight) == 2
                and all(s.weight is not weight for s in sites)):
            continue
        mine = [s for s in inner_sites if s.weight is site.weight]
        if own_body and sum(o is weight for o in operands) == 1 and _only_linear_uses(site.weight, mine):
            sites.append(LinearSite(node, None, weight, None, "subgraph", inner_weight=site.weight,
                                    inner_sites=mine))
        else:
            sites.append(LinearSite(node, None, weight, None, "masked_weight"))
    return sites


def _body_of_one_call(node: fx.Node, body_node: fx.Node) -> bool:
    """The body module is read by this call alone, so the rewrite may give it a copy of its own."""
    readers = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == body_node.target]
    return readers == [body_node] and list(body_node.users) == [node]


_PLAIN_FORMS = ("linear", "matmul", "addmm")  # not a fused op's or a nested body's weight


def _only_linear_uses(weight: fx.Node, sites: List[LinearSite]) -> bool:
    """Every use of the body's weight placeholder is one of its linear sites (through the
    transposes they consume) and never as their input or bias."""
    if not sites or any(s.form not in _PLAIN_FORMS or s.x is weight or s.bias is weight for s in sites):
        return False
    allowed = {s.node for s in sites}
    for s in sites:
        chain = s.transpose
        while isinstance(chain, fx.Node) and chain is not weight:
            if any(user not in allowed for user in chain.users):
                return False
            allowed.add(chain)
            chain = chain.args[0] if chain.args else None
    return all(user in allowed for user in weight.users)


def _match(node: fx.Node) -> Tuple[List[LinearSite], List[UnmatchedUse]]:
    if node.op == "call_method" and node.target in OTHER_CONTRACTION_METHODS:
        return [], _unmatched_contraction(node, f"Tensor.{node.target}")
    if node.op == "call_method" and node.target in MATMUL_METHODS:  # x.matmul(W.t()), x.mm(W.t())
        if len(node.args) == 2 and not node.kwargs:
            return _match_matmul(node, *node.args)
        return [], _unmatched_contraction(node, f"Tensor.{node.target}", operands=list(node.args[:2]))
    if node.op == "call_method" and node.target == "addmm":  # b.addmm(x, W.t())
        return _match_addmm(node, list(node.args), dict(node.kwargs), "Tensor.addmm")
    if node.op != "call_function":
        return [], []
    if node.target in OTHER_CONTRACTION_TARGETS:
        return [], _unmatched_contraction(node, f"torch.{node.target.__name__}")
    if _custom_op(node.target):
        return [], _unmatched_contraction(node, str(node.target))
    if node.target in FUSED_ATTENTION_TARGETS:
        return _fused_weight_sites(node), []
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return _subgraph_weight_sites(node), []
    if node.target in LINEAR_TARGETS:
        args = list(node.args) + [None] * 3
        x = args[0] if args[0] is not None else node.kwargs.get("input")
        weight = args[1] if args[1] is not None else node.kwargs.get("weight")
        bias = args[2] if args[2] is not None else node.kwargs.get("bias")
        if isinstance(weight, fx.Node):
            return [LinearSite(node, x, weight, bias, "linear")], []
        return [], []
    if node.target in MATMUL_TARGETS and len(node.args) == 2 and not node.kwargs:
        return _match_matmul(node, *node.args)
    if node.target in ADDMM_TARGETS:
        return _match_addmm(node, list(node.args), dict(node.kwargs), "torch.addmm")
    return [], []


def _match_matmul(node: fx.Node, x, rhs) -> Tuple[List[LinearSite], List[UnmatchedUse]]:
    weight = _transposed_placeholder(rhs)
    if weight is not None:
        return [LinearSite(node, x, weight, None, "matmul", transpose=rhs)], []
    return [], _unmatched(node, (x, rhs))


def _match_addmm(node: fx.Node, args: list, kwargs: dict, name: str) -> Tuple[List[LinearSite], List[UnmatchedUse]]:
    """torch.addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None) (Tensor.addmm: self is the
    input), operands by position or name."""
    given = len(args)
    args = args + [None] * 3
    bias = kwargs.get("input", kwargs.get("self", args[0]))
    x, rhs = kwargs.get("mat1", args[1]), kwargs.get("mat2", args[2])
    scales = {key: kwargs.get(key, 1) for key in ("beta", "alpha")}
    others = sorted(set(kwargs) - {"input", "self", "mat1", "mat2", "beta", "alpha"})
    if given <= 3 and not others and all(not isinstance(v, fx.Node) and v == 1 for v in scales.values()):
        weight = _transposed_placeholder(rhs)
        if weight is not None:
            return [LinearSite(node, x, weight, bias, "addmm", transpose=rhs)], []
        return [], _unmatched(node, (x, rhs))
    # not x @ W.T + b as such: the product's operands are listed (the added input is no weight)
    named = [f"{key}={value}" for key, value in scales.items() if isinstance(value, fx.Node) or value != 1]
    return [], _unmatched_contraction(node, f"{name} with " + ", ".join(named + [f"{k}=" for k in others]
                                                                      or ["extra arguments"]),
                                      operands=[x, rhs])


# The reason of a weight a contraction agpe does not rewrite uses (backend.py warns on it).
REWRITTEN_FORMS = "(agpe rewrites nn.Linear, F.linear and x @ W.T as matmul, mm or addmm only)"


def _unmatched(node: fx.Node, operands) -> List[UnmatchedUse]:
    found = []
    for position, operand in enumerate(operands):
        if isinstance(operand, fx.Node) and operand.op == "placeholder":
            side = "left operand" if position == 0 else "right operand without transpose"
            found.append(UnmatchedUse(node, operand, f"used as the {side} of {_target_name(node)}, not as x @ W.T"))
    return found


def _target_name(node: fx.Node) -> str:
    return f"Tensor.{node.target}" if isinstance(node.target, str) else node.target.__name__


def _custom_op(target) -> bool:
    """An op of a library other than torch's own and agpe's (``torch.ops.transformers.*``:
    Mixtral's grouped expert matmul)."""
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
    elif isinstance(target, torch._ops.OpOverloadPacket):
        namespace = target._qualified_op_name.split("::")[0]
    else:
        return False
    return namespace not in ("aten", "prim", "prims", "agpe")


def _unmatched_contraction(node: fx.Node, name: str, operands=None) -> List[UnmatchedUse]:
    """Weights (placeholders of 2 or more dims, directly or transposed) operands of a
    contraction the rewrite does not know (``operands``: all its arguments by default):
    reported as staying dense."""
    operands = list(node.args) + list(node.kwargs.values()) if operands is None else list(operands)
    flat = [o for a in operands for o in (a if isinstance(a, (list, tuple)) else (a,))]
    found = []
    for operand in flat:
        if not isinstance(operand, fx.Node):
            continue
        weight = operand if operand.op == "placeholder" else _transposed_placeholder(operand)
        if weight is not None and _ndim(weight) >= 2 and all(u.weight is not weight for u in found):
            found.append(UnmatchedUse(node, weight, f"used by {name} {REWRITTEN_FORMS}"))
    return found


def find_linear_sites(graph: fx.Graph) -> Tuple[List[LinearSite], List[UnmatchedUse]]:
    """All linear sites of ``graph`` in node order, and the unmatched matmul uses."""
    sites: List[LinearSite] = []
    unmatched: List[UnmatchedUse] = []
    for node in graph.nodes:
        found, misses = _match(node)
        sites.extend(found)
        unmatched.extend(misses)
    return sites, unmatched


def embedding_weights(graph: fx.Graph) -> set:
    """Placeholders used as an embedding table in this graph (tied weights)."""
    tables = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in EMBEDDING_TARGETS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node):
                tables.add(weight)
    return tables
