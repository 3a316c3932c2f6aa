"""``agpe_compile.explain``: what the backend does to a model, as text and records.

Example::

    >>> report = agpe_compile.explain(model, x, options={"exclude": ["head"]})
    >>> print(report)                        # rewritten graph(s) + per-layer table + graph breaks
    >>> [(l.name, l.rewritten, l.reason) for l in report.layers]
    [('fc1', True, None), ('head', False, "excluded by pattern 'head'")]
    >>> report.golden()                      # the same without file paths, lines, densities: golden tests

``lowering`` says how a rewritten layer runs: ``sparse_linear`` (the block-sparse op) or
``masked_weight`` (W*M handed to a fused attention op, dense compute).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .backend import COMPILE_MODES, AgpeBackend, GraphRecord
from .state import _linear_weights, _unwrapped, layer_name


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
    graph-break reasons (``graph_breaks``, including those that made Dynamo skip a whole frame
    and run it eagerly). ``str(report)`` prints all three. ``uncompiled_layers`` names the
    model's linear layers when no graph was compiled at all (Dynamo ran them eagerly, not
    rewritten); it is empty otherwise."""

    graphs: List[str]
    layers: List[LayerRecord]
    graph_breaks: List[str]
    uncompiled_layers: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [self._header()]
        for index, code in enumerate(self.graphs):
            lines += ["", f"--- rewritten graph {index} ---", code.rstrip()]
        lines += ["", "--- layers ---", self._layers_text(density=True)]
        if self.graph_breaks:
            lines += ["", "--- graph breaks ---"] + [f"- {reason}" for reason in self.graph_breaks]
        return "\n".join(lines)

    def golden(self) -> str:
        """The report as text for a golden test of the rewrite: the header, every rewritten
        graph and the layer table, without what changes when nothing about the rewrite does.

        Each graph's code is normalized as ``torch._dynamo.testing.normalize_gm`` does (the
        project's own golden tests use it): the ``# File: path:line in forward, code: ...``
        comments, which name source files, line numbers and source lines, are removed, with
        trailing spaces and runs of blank lines. The table leaves out the ``density`` column,
        which changes with the masks. Graph-break reasons are left out (they name files and
        lines); their number is in the header. Generated names (``L_self_modules_fc1_...``,
        ``agpe_layers_0_block_mask``) come from module paths and stay. ``graphs`` and ``str(report)``
        are unchanged.

        Example (``pip install expecttest``; regenerate with ``EXPECTTEST_ACCEPT=1``)::

            >>> class TestRewrite(expecttest.TestCase):
            ...     def test_model(self):
            ...         report = agpe_compile.explain(model, torch.randn(4, 32))
            ...         self.assertExpectedInline(report.golden(), """""")  # expecttest fills it in
        """
        from torch._dynamo.testing import normalize_gm

        lines = [self._header()]
        for index, code in enumerate(self.graphs):
            lines += ["", f"--- rewritten graph {index} ---", normalize_gm(code).rstrip()]
        lines += ["", "--- layers ---", self._layers_text(density=False)]
        return "\n".join(lines) + "\n"

    def _header(self) -> str:
        return f"agpe explain: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s)"

    def _layers_text(self, density: bool) -> str:
        if not self.layers and self.uncompiled_layers:
            # Note [Frames Dynamo skips]: the reason is a graph break, or was one at an earlier compile
            return (f"(no graph was compiled: Dynamo ran the model eagerly, so none of its "
                    f"{len(self.uncompiled_layers)} linear layer(s) ({', '.join(self.uncompiled_layers[:4])}"
                    f"{', ...' if len(self.uncompiled_layers) > 4 else ''}) was rewritten. Dynamo's reason is under "
                    f"graph breaks; where none is listed, Dynamo skipped the frame at an earlier compile of the same "
                    f"code (a graph break in a loop, say) and skips it silently until torch._dynamo.reset())")
        return _table(self.layers, density)


def _table(layers: List[LayerRecord], density: bool = True) -> str:
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
    if not density:
        header, rows = header[:3] + header[4:], [row[:3] + row[4:] for row in rows]
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
    ``torch.compile(model, backend="agpe")`` would; if explain raises, the layers it
    attached state to are left unprepared again.

    The run it is called from goes on as without it: the RNG states (CPU, and the CUDA
    devices of the model and inputs) are restored after the forward (dropout draws), and
    Dynamo's automatic-dynamic shape state is neither read nor changed (Note [Explain and
    automatic dynamic shapes]), so the graphs have the example's static shapes (a
    dimension marked with ``torch._dynamo.mark_dynamic`` stays symbolic: pass a fresh tensor
    for a golden text). The
    options ``inductor`` and ``mode`` are ignored (explain always lowers with aot_eager;
    neither changes the rewrite), so the options given to ``torch.compile`` can be passed
    as they are. An error agpe raises while compiling (a block size that clashes with the
    one a layer was prepared with, say) is raised as itself, not wrapped in Dynamo's
    ``BackendCompilerFailed``, which stays in its ``__cause__``.

    Each call compiles with a backend of its own, which Dynamo keeps (with the graphs)
    until ``torch._dynamo.reset()``: memory grows with the number of calls (a helper
    audit measured ~0.75 MB per call for a small MLP, ~6 MB for a 24-layer model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.explain: expected an nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"agpe.explain: options= is agpe's option dict (e.g. {{'block_size': 32}}), got "
                        f"{type(options).__name__}; a model keyword input named 'options' cannot be passed through "
                        f"explain: call explain(model, ..., **{{other inputs}}) on a wrapper that sets it")
    model = _unwrapped(model)  # a torch.compile wrapper: its module (layer names without "__self__.")
    options = dict(options or {})
    mode = options.pop("mode", None)
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"agpe.explain: options['mode'] got {mode!r}; expected one of {COMPILE_MODES} (explain "
                         f"ignores it: it lowers with aot_eager, and a compile mode does not change the rewrite)")
    options["inductor"] = False
    graphs: List[GraphRecord] = []
    backend = AgpeBackend(options, on_graph=graphs.append)
    backend.for_explain = True  # its compiles do not use up the model's recompile budget
    counters = torch._dynamo.utils.counters
    before = {kind: dict(counters[kind]) for kind in ("graph_break", "unimplemented", "frames")}
    agpe_attrs = [(param, _agpe_attrs(param)) for param in model.parameters()]
    # Compiled in place (model.compile(...)): calling the module runs ITS compiled code, which
    # the explain compile would only see as a call it cannot trace into (0 graphs reported).
    compiled_in_place = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        with _rng_kept(model, example_inputs, example_kwargs), _shape_state_kept(), \
                torch.enable_grad() if model.training else torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(*example_inputs, **example_kwargs)
    except BaseException as error:
        _remove_added_attrs(agpe_attrs)
        inner = getattr(error, "inner_exception", None)
        if isinstance(error, torch._dynamo.exc.BackendCompilerFailed) and _is_agpe_error(inner):
            raise inner from error
        raise
    finally:
        model._compiled_call_impl = compiled_in_place
    graph_breaks = _new(counters["graph_break"], before["graph_break"]) + _skipped_frames(counters, before)
    return ExplainReport(
        graphs=[g.rewritten.print_readable(print_output=False) for g in graphs],
        layers=[record for g in graphs for record in _records(g)],
        graph_breaks=graph_breaks,
        uncompiled_layers=[] if graphs else [layer_name(m, p) for m, _, p, _ in _linear_weights(model)],
    )


def _new(counts: Mapping[str, int], before: Mapping[str, int]) -> List[str]:
    return [key for key, count in counts.items() for _ in range(count - before.get(key, 0))]


# Note [Frames Dynamo skips]
# A graph break Dynamo cannot resume from (one inside a loop, for one) makes it skip the
# whole frame and run it eagerly; its reason is counted in counters["unimplemented"], not
# counters["graph_break"]. Every Unsupported raised is counted there, also ones Dynamo turns
# into an ordinary graph break, so explain lists them only when a frame failed (counted in
# counters["frames"]["total"] but not ["ok"]). A reason raised while handling an earlier one
# quotes it ("While handling this graph break, another graph break occurred"): the outer one
# is listed alone. Dynamo also remembers the skip: later compiles of that code skip it
# without a word until torch._dynamo.reset(), which the report says when no graph compiled.
def _skipped_frames(counters, before) -> List[str]:
    frames, was = counters["frames"], before["frames"]
    if frames["total"] - was.get("total", 0) == frames["ok"] - was.get("ok", 0):
        return []
    reasons = _new(counters["unimplemented"], before["unimplemented"])
    return [f"Dynamo skipped a frame and ran it eagerly: {reason}" for reason in reasons
            if not any(reason != other and reason in other for other in reasons)]


def _is_agpe_error(error: Optional[BaseException]) -> bool:
    """An error agpe raised itself (its messages start with "agpe"), not one of torch's."""
    return error is not None and str(error).startswith("agpe")


def _agpe_attrs(param: torch.Tensor) -> set:
    return {name for name in param.__dict__ if name.startswith("_agpe_")}  # STATE_ATTR, EXCLUDED_ATTR, ...


def _remove_added_attrs(before: List[Tuple[torch.Tensor, set]]) -> None:
    """Undo what a failed explain attached to weights: the backend attaches a new layer's
    state (and its exclusion reasons) to the weight only (no buffers on the module, no hooks;
    prepare() adds those), so removing the attributes leaves the layer unprepared. Layers
    prepared before keep theirs."""
    for param, had in before:
        for name in _agpe_attrs(param) - had:
            delattr(param, name)


def _rng_kept(model: nn.Module, inputs, kwargs) -> contextlib.AbstractContextManager:
    """Restores the CPU RNG and, if CUDA is initialized, that of the model's and the inputs'
    CUDA devices: a dropout in train mode draws from them."""
    devices = set()
    if torch.cuda.is_initialized():
        tensors = [*model.parameters(), *model.buffers(), *inputs, *kwargs.values()]
        devices = {t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    return torch.random.fork_rng(devices=sorted(devices))


# Note [Explain and automatic dynamic shapes]
# Dynamo keeps one automatic-dynamic record per code object (torch._dynamo.pgo's code
# state), shared by every compile of that code whatever the backend: a frame seen with batch
# 4 and then 8 is recompiled with a symbolic batch size. explain's compiles would read the
# user's record (its graphs would show "s77" after the user trained at two batch sizes) and
# write to it (an explain at another batch size made the user's next compile, a bucket
# crossing say, dynamic). explain compiles with dynamic=False, which does not read the
# record (the public switch), and restores the record afterwards (dynamic=False still
# overwrites it with its static sizes). The record's module is private: without it (another
# torch), explain still reads nothing but may write.
@contextlib.contextmanager
def _shape_state_kept() -> Iterator[None]:
    try:
        from torch._dynamo.pgo import get_code_state
    except ImportError:  # pragma: no cover (torch 2.11 and 2.13 have it)
        yield
        return
    saved = copy.deepcopy(get_code_state())
    try:
        yield
    finally:
        state = get_code_state()
        state.clear()
        state.update(saved)
