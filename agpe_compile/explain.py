"""``agpe_compile.explain``: what the backend does to a model, as text and records.

Example::

    >>> report = agpe_compile.explain(model, x, options={"exclude": ["head"]})
    >>> print(report)                        # rewritten graph(s) + per-layer table + graph breaks
    >>> [(l.name, l.rewritten, l.reason) for l in report.layers]
    [('fc1', True, None), ('head', False, "excluded by pattern 'head'")]

``lowering`` says how a rewritten layer runs: ``sparse_linear`` (the block-sparse op) or
``masked_weight`` (W*M handed to a fused attention op, dense compute).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .backend import AgpeBackend, GraphRecord
from .state import _unwrapped


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One weight used as a linear layer, and what the backend did with it.

    The columns of the printed table: ``layer`` (``name``: module path, plus the parameter
    name when it is not ``weight``), ``shape`` (the weight's), ``block`` (``block_size``),
    ``density`` (the fraction of active blocks of its mask now; ``-`` when not rewritten),
    ``graph`` (index into :attr:`ExplainReport.graphs` of the graph it was found in) and
    ``rewritten`` (``yes (lowering)`` with ``lowering`` the op the sites call,
    ``sparse_linear``, or ``masked_weight`` for fused attention and for uses of the weight that are
    not linear sites (Note [Every use sees W * M] in passes/decide_layers.py), or ``no: reason``).
    """

    name: str
    shape: Tuple[int, ...]
    block_size: Optional[int]
    density: Optional[float]
    rewritten: bool
    reason: Optional[str]
    graph: int
    lowering: Optional[str] = None
    # the Sparsifier keeps its inactive weights at zero, so the dense path skips masking
    # (Note [Zero inactive weights])
    zero_inactive: bool = False


@dataclasses.dataclass
class ExplainReport:
    """What :func:`explain` found: the code of every rewritten graph (``graphs``), one
    :class:`LayerRecord` per weight used as a linear layer (``layers``) and Dynamo's
    graph-break reasons (``graph_breaks``). ``str(report)`` prints all three."""

    graphs: List[str]
    layers: List[LayerRecord]
    graph_breaks: List[str]

    def __str__(self) -> str:
        lines = [f"agpe explain: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s)"]
        for index, code in enumerate(self.graphs):
            lines += ["", f"--- rewritten graph {index} ---", code.rstrip()]
        lines += ["", "--- layers ---", _table(self.layers)]
        if self.graph_breaks:
            lines += ["", "--- graph breaks ---"] + [f"- {reason}" for reason in self.graph_breaks]
        return "\n".join(lines)


def _table(layers: List[LayerRecord]) -> str:
    header = ("layer", "shape", "block", "density", "graph", "rewritten")
    rows = [
        (
            r.name,
            "x".join(map(str, r.shape)),
            "-" if r.block_size is None else str(r.block_size),
            "-" if r.density is None else f"{r.density:.3f}",
            str(r.graph),
            (f"yes ({r.lowering}, inactive weights kept at zero)" if r.zero_inactive else f"yes ({r.lowering})")
            if r.rewritten else f"no: {r.reason}",
        )
        for r in layers
    ]
    if not rows:
        return "(no linear layers found)"
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*row) for row in [header] + rows)


def _records(graph: GraphRecord) -> List[LayerRecord]:
    out = []
    for d in graph.decisions:
        st = d.state
        out.append(LayerRecord(d.name, d.shape, None if st is None else st.block_size,
                               None if st is None else st.density, d.rewritten, d.reason, graph.index,
                               d.lowering, st is not None and st.zero_inactive))
    return out


def explain(model: nn.Module, *example_inputs: Any, options: Optional[Mapping[str, Any]] = None,
            **example_kwargs: Any) -> ExplainReport:
    """Compile ``model`` with the agpe rewrite (aot_eager lowering) and report.

    Runs ONE forward ``model(*example_inputs, **example_kwargs)`` (keyword inputs as in
    ``model(**batch)``; ``options`` is agpe's) with gradients enabled when the model is in
    training mode, as a training step's forward (activation checkpointing, for one, is
    traced only then; the backward graph is compiled too, so this takes longer than in
    eval mode), else under ``torch.no_grad()``. No backward runs, so saliency
    buffers are untouched, and no zero-code controller is made or ticked; modules that
    update statistics in forward, like BatchNorm in train mode, still do. Compiling
    attaches agpe state to eligible layers that were not prepared, exactly as
    ``torch.compile(model, backend="agpe")`` would.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.explain: expected an nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"agpe.explain: options= is agpe's option dict (e.g. {{'block_size': 32}}), got "
                        f"{type(options).__name__}; a model keyword input named 'options' cannot be passed through "
                        f"explain: call explain(model, ..., **{{other inputs}}) on a wrapper that sets it")
    model = _unwrapped(model)  # a torch.compile wrapper: its module (layer names without "__self__.")
    options = dict(options or {})
    options["inductor"] = False
    graphs: List[GraphRecord] = []
    backend = AgpeBackend(options, on_graph=graphs.append)
    backend.for_explain = True  # its compiles do not use up the model's recompile budget
    breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
    # Compiled in place (model.compile(...)): calling the module runs ITS compiled code, which
    # the explain compile would only see as a call it cannot trace into (0 graphs reported).
    compiled_in_place = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        with torch.enable_grad() if model.training else torch.no_grad():
            torch.compile(model, backend=backend)(*example_inputs, **example_kwargs)
    finally:
        model._compiled_call_impl = compiled_in_place
    breaks_after = torch._dynamo.utils.counters["graph_break"]
    graph_breaks = [
        reason for reason, count in breaks_after.items() for _ in range(count - breaks_before.get(reason, 0))
    ]
    return ExplainReport(
        graphs=[g.rewritten.print_readable(print_output=False) for g in graphs],
        layers=[record for g in graphs for record in _records(g)],
        graph_breaks=graph_breaks,
    )
