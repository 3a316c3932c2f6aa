"""The ``agpe`` torch.compile backend: options -> rewrite -> lower -> call wrapper.

``torch.compile(model, backend="agpe", options={...})`` reaches :func:`agpe_backend`
through the ``torch_dynamo_backends`` entry point. The pipeline, in order:

1. ``BackendConfig.from_options``: validate the options.
2. ``find_linear_sites``: every ``x @ W^T + b`` in Dynamo's graph.
3. ``decide_layers``: which weights are rewritten (attaching their LayerState) and why
   the others are not.
4. ``rewrite_linears``: a copy of the graph with ``agpe::sparse_linear`` calls and six
   extra placeholders per layer (Note [Extra graph inputs] in passes/rewrite_linears.py).
5. lower the copy with Inductor (``compile_fx``, with agpe's post-grad pass:
   inductor_passes.py) or aot_eager.
6. return :class:`AgpeCompiledGraph`, which appends the layers' live tensors to every call
   (and, in zero-code mode, first ticks the graph's controller on every training call; the
   controller steps after the optimizer when it found one, see controller/zero_code.py).

Example::

    >>> cmodel = torch.compile(model, backend="agpe", options={"block_size": 64})
    >>> backend = AgpeBackend({"inductor": False}, on_graph=graphs.append)   # tests, explain
    >>> cmodel = torch.compile(model, backend=backend)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from agpe_compile import ops  # noqa: F401  (registers torch.ops.agpe.*)
from agpe_compile import sharding
from agpe_compile.config import BackendConfig
from agpe_compile.controller.zero_code import (AGPE_OPTION_KEYS, config_from_options, make_zero_code_controller,
                                               split_options, watch_for_nothing_to_prune)
from agpe_compile.passes.decide_layers import LayerDecision, _placeholder_examples, decide_layers
from agpe_compile.passes.match_linears import REWRITTEN_FORMS, find_linear_sites
from agpe_compile.passes.rewrite_linears import RewriteResult, rewrite_linears
from agpe_compile.buckets import (check_bucket_set_recompiles, ensure_recompile_headroom, recompile_budget,
                                  start_frame_compile)
from agpe_compile.state import (_TENSOR_FIELDS, DENSE_SAID_ATTR, STATE_ATTR, LayerState, clear_compiled_dense,
                                mark_compiled_dense, state_of)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphRecord:
    """What the backend did with one Dynamo graph (for explain() and golden tests)."""

    index: int
    original: fx.GraphModule
    rewritten: fx.GraphModule
    decisions: List[LayerDecision]


class AgpeCompiledGraph:
    """Call wrapper: Dynamo's arguments + the live mask/saliency/layout tensors of each layer.

    The tensors are read from the layer states on every call: a layer that left a density
    bucket and later returns to it has a new layout buffer of the old length, and Dynamo
    then reuses this cached graph (its guard is on the length), which must see the new one.
    """

    def __init__(self, compiled: Callable, states: List[LayerState],
                 before_training_call: Optional[Callable[[], None]] = None,
                 weight_indices: Optional[List[int]] = None, layout_read: Optional[List[bool]] = None,
                 full_layouts: Optional[Dict[int, torch.Tensor]] = None):
        self.compiled = compiled
        # Whether the graph reads each layer's layout (masked_weight layers, e.g. MHA, do not).
        self.layout_read = layout_read if layout_read is not None else [True] * len(states)
        self.states = states
        self.before_training_call = before_training_call
        self.layout_shapes = [state.block_layout.shape for state in states]
        # Where each layer's weight sits in Dynamo's arguments (Note [Graphs shared by instances]).
        self.weight_indices = weight_indices
        self.compiled_as = [(state.block_size, state.grid, state.zero_inactive, state.saliency_mode)
                            for state in states]
        self._compiled_capacity_layouts = {}  # Note [Layouts a graph cannot see change]
        self._unseen_crossings: List[str] = []  # layers to name in this call's one warning
        # (argument index, weakref to the parameter, layer name, reason) of the state-less
        # weights this graph left dense (Note [Weights a graph left dense]); set by the backend
        self.left_dense: List[Tuple[int, Any, str, str]] = []
        # lowered with agpe's ops in place: arguments aliasing a score buffer are copied (set by the backend)
        self.unalias_score_buffers = False
        for i, layout in (full_layouts or {}).items():  # compiled at full capacity: rewritten in place
            state = states[i]
            self.layout_shapes[i] = layout.shape
            self._compiled_capacity_layouts[i] = ((id(state), id(state.block_mask)), layout, state.block_mask._version)
            state.add_capacity_layout(layout)

    def __call__(self, *args):
        # DDPOptimizer propagates FakeTensors through the pieces of a split graph (Note [Fake
        # example inputs] in passes/decide_layers.py): that is no training call, no mask can be
        # read then, and none needs to be (re-audit CG: a mask changed since prepare made the
        # sync raise a data-dependent error, and Dynamo fell back to one graph per layer).
        propagating = any(isinstance(arg, FakeTensor) for arg in args)
        if self.before_training_call is not None and torch.is_grad_enabled() and not propagating:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "agpe: zero-code mode cannot run inside a CUDA graph capture: its controller ticks on the "
                    "host in this call, which a replay would skip. Drive the masks with "
                    "agpe_compile.Sparsifier(model, optimizer, AGPEConfig(...)) between replays instead")
            self.before_training_call()
        if self.left_dense:
            self._check_left_dense(args)
        extra, written, served = [], [], []
        for i, (state, shape) in enumerate(zip(self.states, self.layout_shapes)):
            if self.weight_indices is not None:
                weight = args[self.weight_indices[i]]
                # A FakeTensor: DDPOptimizer runs the pieces of a split graph on fakes to
                # propagate shapes (Note [Fake example inputs] in passes/decide_layers.py).
                if weight is not state.weight and not isinstance(weight, FakeTensor):
                    state = self._state_of_another_instance(i, weight)
            state.check_identity()
            served.append(state)
            state.eager_pending = False  # Note [Eager runs of a prepared layer]
            if not propagating:
                state.sync_layout()
            if self.compiled_as[i][2] and not state.zero_inactive and self.weight_indices is not None:
                # compiled under a promise this layer does not keep (Note [A promise outlives its Sparsifier])
                args = _with_masked_weight(args, self.weight_indices[i], state)
            tensors = state.tensors()
            for j in _MUTATED_IN_BACKWARD:  # Note [Buffers written by the backward]
                tensors[j] = tensors[j].data
                written.append(tensors[j])
            if state.block_layout.shape != shape:  # Note [Layouts a graph cannot see change]
                tensors[-1] = self._layout_at_compiled_capacity(i, state, shape)
            extra.extend(tensors)
        if self._unseen_crossings:
            self._warn_unseen_crossings()
        if self.unalias_score_buffers:  # Note [Host ops in place] in eager_lowering.py
            from agpe_compile.eager_lowering import unalias_score_buffers

            args = unalias_score_buffers(args, served)
        # Dynamo calls backends unboxed; aot_autograd's forward is unboxed too even though
        # it inherits a `_boxed_call` attribute from what it wraps.
        outputs = self.compiled(*args, *extra)
        if written and torch.is_grad_enabled():
            token = _restore_versions_before_backward(outputs, written, args)
            if token is not None:  # Note [Mistakes the Sparsifier names]: step() before this backward
                ref = weakref.ref(token)
                token.served = [weakref.ref(state) for state in served]
                for state in served:
                    state.backward_tokens = [r for r in state.backward_tokens
                                             if (t := r()) is not None and not t.reached] + [ref]
            awaiting = getattr(self.before_training_call, "awaiting_backward", None)
            if token is not None and awaiting is not None:  # zero-code mode (Note [Zero-code step counting])
                awaiting(token)
        return outputs

    # Note [Layouts a graph cannot see change]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A bucket crossing gives a layer a layout buffer of another length, and Dynamo
    # recompiles because the module's forward pre-hook read that buffer (state.py). A graph
    # compiled without the hook never sees the change: it was compiled before prepare(), it
    # uses the weight without calling the module (F.linear(x, module.weight)), it compiles
    # the layer's own forward (Linear.compile()), or Dynamo compiled the layer's forward as a
    # frame of its own (torch.compile(DDP(nn.Sequential(...)))). The backend finds such
    # layers when it compiles: their module is absent from every node's ``nn_module_stack``
    # (``_full_layouts_for_unseen_modules``), and they are compiled at full capacity, where
    # every mask fits (on a GPU that is the dense path by density). At every call the
    # wrapper hands a graph whose layout length differs from the layer's a layout of the
    # compiled capacity rebuilt from the current mask, in place (the kernels walk only the
    # live blocks; the rest is padding), so it computes the same. That also serves a second
    # instance sharing the graph, and a graph compiled before prepare. It is logged once per
    # layer. A mask with more live blocks than the compiled capacity cannot run in the graph
    # and raises, naming the causes. The layer's state tracks these layouts (weakly), so
    # GraphedStep, whose replays skip this wrapper, rebuilds them before each replay
    # (``LayerState.sync_capacity_layouts``). One case the detection misses (found by an audit): a
    # module whose class overrides ``__call__`` to skip the hooks is in the stack but had no
    # hook traced; it raises if its mask grows past the compiled capacity.
    def _layout_at_compiled_capacity(self, i: int, state: LayerState, shape: torch.Size) -> torch.Tensor:
        from agpe_compile.packed_layout import capacity_of

        if not self.layout_read[i]:  # only masked_weight uses (dense W*M): any tensor of the length will do
            unused = self._compiled_capacity_layouts.get(i)
            if unused is None:
                unused = self._compiled_capacity_layouts[i] = torch.zeros(
                    shape, dtype=state.block_layout.dtype, device=state.block_layout.device)
            return unused
        owner, version = (id(state), id(state.block_mask)), state.block_mask._version
        cached = self._compiled_capacity_layouts.get(i)
        if cached is not None and cached[0] == owner and cached[2] == version:
            return cached[1]
        if cached is not None and cached[0] == owner:
            layout = cached[1]  # rewritten in place after the first time (a CUDA graph keeps its address)
        else:
            layout = torch.zeros(shape, dtype=state.block_layout.dtype, device=state.block_layout.device)
            state.add_capacity_layout(layout)  # GraphedStep rebuilds it before a replay
        capacity = capacity_of(layout, state.grid)
        state.rebuild_capacity_layout(layout)
        if not state.warned_unseen_crossing:
            state.warned_unseen_crossing = True
            self._unseen_crossings.append(f"{state.name} ({capacity_of(state.block_layout, state.grid)} blocks "
                                          f"now, the graph keeps {capacity})")
        self._compiled_capacity_layouts[i] = (owner, layout, version)
        return layout

    def _warn_unseen_crossings(self) -> None:
        """One warning per call for every layer that crossed a bucket unseen (said once per layer)."""
        names, self._unseen_crossings = self._unseen_crossings, []
        log.warning(
            "agpe: %d layer(s) changed layout bucket, but this graph was compiled without the module hook that "
            "makes Dynamo recompile for them: %s. Causes: the model was compiled before prepare or before the "
            "Sparsifier was created; a weight used without calling its module (F.linear(x, module.weight)); a "
            "layer's own forward compiled as a frame (Linear.compile(), a graph break inside a loop over the "
            "layers, torch.compile(DDP(nn.Sequential(...))): use DDP(torch.compile(model))). The graph keeps "
            "running at the capacity it was compiled with, which is correct but not faster; a mask with more live "
            "blocks than that raises (design.md, Known limits)", len(names), "; ".join(names))

    # Note [Graphs shared by instances]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # Dynamo passes parameters as graph inputs and reuses a cached graph for every instance
    # of the same module class whose guards pass (same shapes, same layout lengths). The
    # graph was compiled with the states of the instance it first saw; a call from another
    # instance must use THAT instance's masks and buffers, found through the weight Dynamo
    # passes in. What the graph baked in (block size, grid, the saliency mode) must match, or
    # the call raises instead of computing something else; a graph compiled under the
    # zero-weight promise is handed W * M for an instance that does not keep it (Note [A
    # promise outlives its Sparsifier] in zero_weights.py). A weight the graph left dense
    # that is an agpe layer in the calling instance raises too (``_check_left_dense``): the
    # graph would run it dense, unmasked and unscored.
    def _check_left_dense(self, args) -> None:
        """A weight this graph left dense must not have become another instance's agpe layer
        (Note [Graphs shared by instances]): this graph would run it dense and unscored. The
        instance it was compiled for was warned at prepare (Note [Weights a graph left dense])."""
        from agpe_compile.state import state_of

        for index, compiled_param, name, reason in self.left_dense:
            weight = args[index]
            compiled_for = compiled_param()
            if weight is compiled_for or isinstance(weight, FakeTensor):
                continue
            state = state_of(weight)
            # Prepared (attached to its module: masks a user or a Sparsifier sets), where the
            # instance the graph serves is not: a state another graph of an unprepared model
            # made is no reason (both instances run this graph the same way then).
            other = state_of(compiled_for) if compiled_for is not None else None
            if state is not None and state.module is not None and (other is None or other.module is None):
                raise RuntimeError(
                    f"agpe: Dynamo is reusing a graph compiled for another instance of the same module class, which "
                    f"left layer {name!r} dense ({reason}); in this instance that weight is an agpe layer "
                    f"({state.name!r}, block size {state.block_size}), which the graph would run dense, unmasked "
                    f"and unscored. Prepare every instance the same way before compiling any of them "
                    f"(agpe_compile.prepare or the Sparsifier first), or call torch._dynamo.reset() before "
                    f"compiling this one")

    def _state_of_another_instance(self, i: int, weight: torch.Tensor) -> LayerState:
        from agpe_compile.state import state_of

        compiled = self.states[i]
        state = state_of(weight)
        module = compiled.module
        driver = next((ref() for ref in (compiled.sparsifier_ref, compiled.controller_ref) if ref is not None), None)
        if (state is None and driver is not None and module is not None
                and module._parameters.get(compiled.param_name) is weight):
            # the same module with a new Parameter: not another instance (helper audit CB: this
            # named it "fc2#<id>" and, once the layer was sparse, blamed the graph's capacity)
            raise RuntimeError(
                f"agpe: layer {compiled.name!r}'s {compiled.param_name} was replaced after agpe prepared it (an "
                f"assignment such as `layer.weight = nn.Parameter(...)`, load_state_dict(..., assign=True), "
                f"to_empty()): its mask describes the old weight, and the optimizer holds the old one. Replace "
                f"weights before creating the Sparsifier and its optimizer (or before the first compiled call in "
                f"zero-code mode); to go on from a checkpoint, load it into the model in place (load_state_dict "
                f"without assign=True)")
        if state is None:  # never prepared nor compiled itself: dense, as the backend would make it
            if not isinstance(weight, torch.nn.Parameter):
                raise RuntimeError(f"agpe: layer {compiled.name!r} got a {type(weight).__name__}, not a Parameter")
            # Named after the graph's layer, made unique: sibling blocks of one model compiled as
            # frames of their own share this graph, and prepare() renames it to its path later.
            state = LayerState.create(f"{compiled.name}#{id(weight):x}", compiled.param_name, weight,
                                      compiled.block_size)
            state.graph_named = True
            setattr(weight, STATE_ATTR, state)
        block_size, grid, _, mode = self.compiled_as[i]  # the promise: __call__ masks W where it is not kept
        if state.saliency_mode is None:  # never compiled itself: what its Sparsifier wants, else the graph's
            driver = state.sparsifier_ref() if state.sparsifier_ref is not None else None
            state.saliency_mode = getattr(getattr(driver, "config", None), "saliency", None) or mode
        mismatch = [what for what, ok in (
            ("block size", state.block_size == block_size), ("block grid", state.grid == grid),
            ("saliency mode", state.saliency_mode == mode)) if not ok]
        if mismatch:
            raise RuntimeError(
                f"agpe: a graph compiled for layer {compiled.name!r} of one model instance is being reused for "
                f"another instance of the same class, whose layer differs in {', '.join(mismatch)}; compile each "
                f"model after preparing it the same way, or call torch._dynamo.reset() between them")
        if self.before_training_call is not None:
            raise RuntimeError(
                f"agpe: zero-code mode: this graph's controller drives the layers it was first compiled for "
                f"({compiled.name!r}, ...), and Dynamo is reusing the graph for another module of the same class: "
                f"either another model instance, or sibling submodules of one model that Dynamo compiled as frames "
                f"of their own (e.g. after a graph break inside a loop over the layers: `for block in self.blocks: "
                f"x = block(x); print(...)`). One controller cannot drive both. Use the explicit "
                f"agpe_compile.Sparsifier(model, optimizer, AGPEConfig(...)) (it prepares the model; create it "
                f"before torch.compile), or remove the graph break, or call torch._dynamo.reset() between models")
        return state


def _sharding_reason(gm: fx.GraphModule, example_inputs: Sequence[Any], sites):
    """Why this graph's linear layers compute with FSDP- or tensor-parallel-sharded weights, or
    None: a linear weight that is a DTensor or FlatParameter or a view of one, or a linear call
    inside a module of FSDP1/FSDP2 (FSDP2 hands the forward transient unsharded copies, plain tensors: helper
    audit BX). Other DTensor inputs (a buffer, an embedding split by tensor parallelism) are
    not refused (re-audit BZ)."""
    position = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for site in sites:
        i = position.get(site.weight)
        weight = example_inputs[i] if i is not None and i < len(example_inputs) else None
        reason = sharding.tensor_reason(weight)
        if reason is not None:
            return f"the weight {site.weight.name} of a linear layer in the compiled graph is {reason}"
        # FSDP1 with use_orig_params=True hands the forward views of its FlatParameter
        # (plain tensors; Dynamo skips the FSDP module, so no FSDP class is in the stack)
        reason = sharding.tensor_reason(getattr(weight, "_base", None))
        if reason is not None:
            return f"the weight {site.weight.name} of a linear layer in the compiled graph is a view of {reason}"
    classes = {entry[1] for site in sites for entry in (site.node.meta.get("nn_module_stack") or {}).values()
               if isinstance(entry, tuple) and len(entry) == 2}
    return sharding.classes_reason(classes)


class AgpeBackend:
    """A configured agpe backend. ``on_graph`` receives a :class:`GraphRecord` per graph."""

    def __init__(self, options: Optional[Mapping[str, Any]] = None,
                 on_graph: Optional[Callable[[GraphRecord], None]] = None, mode: Optional[str] = None):
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"agpe: options must be a dict of option names to values (e.g. {{'block_size': 32}}), "
                            f"got {type(options).__name__} {options!r}")
        if options is not None and "mode" in options:  # Note [Compile modes]
            options = dict(options)
            if mode is not None and mode != options["mode"]:
                raise ValueError(f"agpe: got mode {mode!r} and options['mode'] {options['mode']!r}; give one")
            mode = options.pop("mode")
        backend_options, agpe_options = split_options(options)
        self.config = BackendConfig.from_options(backend_options, also_accepted=AGPE_OPTION_KEYS,
                                                 handled=("mode",))
        # Zero-code mode: AGPE options given to the backend; validated now, run per graph.
        self.zero_code_options = dict(options) if agpe_options else None
        if self.zero_code_options is not None:
            config_from_options(self.zero_code_options)
        self.on_graph = on_graph
        # torch.compile(..., mode=...): Inductor's mode options (Note [Compile modes])
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"agpe: torch.compile mode got {mode!r}; expected one of {COMPILE_MODES}")
        if mode not in (None, "default") and not self.config.inductor:
            raise ValueError(f"agpe: torch.compile mode {mode!r} tunes Inductor; it needs the Inductor lowering "
                             f"(options={{'inductor': True}}, the default)")
        self.mode = mode
        self.graph_count = 0
        self.controllers: List[Any] = []  # zero-code mode: the ZeroCodeControllers of its graphs
        self.for_explain = False  # set by explain(): its compiles do not count against the recompile budget

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **compile_kwargs: Any) -> Callable:
        if compile_kwargs:  # torch.compile(model, backend=AgpeBackend(...), mode=... or options=...)
            raise TypeError(
                f"agpe: torch.compile passed {sorted(compile_kwargs)} to an AgpeBackend instance; give them to the "
                f"instance instead: AgpeBackend(options, mode=...), or use backend='agpe' with options={{..., "
                f"'mode': ...}}")
        sites, unmatched = find_linear_sites(gm.graph)
        sharding.refuse(_sharding_reason(gm, example_inputs, sites), "agpe backend")  # Note [Sharded weights]
        decisions = decide_layers(gm.graph, example_inputs, sites, unmatched, self.config)
        for decision in decisions:
            if not decision.rewritten:
                log.info("agpe: %s stays dense: %s", decision.name, decision.reason)
        left_dense = [] if self.for_explain else _left_dense(gm.graph, example_inputs, decisions)
        result = rewrite_linears(gm, decisions, self._saliency_of)
        if result.states:
            _keep_recompile_headroom(result.states, self.for_explain)
            if self.zero_code_options is None and not self.for_explain:
                _warn_undriven(result.states, {d.name for d in decisions if d.rewritten and d.sites
                                               and all(_in_linear_module(site) for site in d.sites)})
        if self.on_graph is not None:
            self.on_graph(GraphRecord(self.graph_count, gm, result.gm, decisions))
        self.graph_count += 1
        read = {n.meta["agpe_tensor"][2] for n in result.gm.graph.nodes  # indices of layers reading their layout
                if n.op == "placeholder" and n.meta.get("agpe_tensor", (None, None))[1] == "block_layout" and n.users}
        full = _full_layouts_for_unseen_modules(gm, result.states, read)  # Note [Layouts a graph cannot see change]
        if not self.config.inductor and result.states:  # Note [Host ops in place] in eager_lowering.py
            from agpe_compile import eager_lowering

            result.in_place = eager_lowering.enabled() and not eager_lowering.reads_score_buffers(
                gm.graph, example_inputs, result.states)
        compiled = self._lower(result, list(example_inputs), full)
        controller = None
        if self.zero_code_options is not None and result.states:
            if not self.for_explain:  # explain compiles to report: nothing to drive
                controller = self._controller_for(result.states)
        elif self.zero_code_options is not None and not decisions and not self.for_explain:
            watch_for_nothing_to_prune()  # no linear weight here: Note [Nothing to prune in zero-code mode]
        elif (self.zero_code_options is not None and decisions  # weights seen, none prunable: say so (once)
              and _first_time(("nothing prunable", tuple(d.name for d in decisions)))):
            dense = [f"{d.name} ({d.reason})" for d in decisions][:3]
            conv1d = any("without transpose" in str(d.reason) for d in decisions)
            log.warning("agpe: zero-code mode: no layer of this graph can be pruned, so it trains dense; %d weight "
                        "use(s) stay dense, e.g. %s. agpe_compile.explain(model, x) lists them all%s",
                        len(decisions), "; ".join(dense),
                        ". Hugging Face Conv1D layers (GPT-2): convert them with agpe_compile.linear_from_conv1d(model) "
                        "before compiling" if conv1d else "")
        position = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        if self.zero_code_options is None or result.states:  # else "nothing prunable" above said it
            _warn_misfit_block_size([d for d in decisions if not (d.weight in position and getattr(
                example_inputs[position[d.weight]], DENSE_SAID_ATTR, False))], self.for_explain)
        _warn_other_contractions([d for d in decisions if not (d.weight in position and not getattr(
            example_inputs[position[d.weight]], "requires_grad", True))], self.for_explain)  # frozen: nothing to prune
        weight_indices = [position[d.weight] for d in decisions if d.rewritten]
        assert [d.state for d in decisions if d.rewritten] == result.states
        graph = AgpeCompiledGraph(compiled, result.states, controller, weight_indices,
                                  layout_read=[i in read for i in range(len(result.states))], full_layouts=full)
        graph.unalias_score_buffers = result.in_place
        for param, reason, node, name in left_dense:  # Note [Weights a graph left dense]
            mark_compiled_dense(param, reason, graph)
            graph.left_dense.append((position[node], weakref.ref(param), name, reason))
        return graph

    def _saliency_of(self, state: LayerState) -> str:
        """The score ``state``'s layer computes: the saliency option, else the AGPEConfig's of
        the Sparsifier driving it, else taylor (the two must agree when both are given)."""
        driver = state.sparsifier_ref() if state.sparsifier_ref is not None else None
        return self.config.saliency_for(state.name, getattr(getattr(driver, "config", None), "saliency", None))

    def _controller_for(self, states: List[LayerState]) -> Callable[[], None]:
        """Zero-code mode: one controller per set of layers, shared by every graph compiled
        over them (recompiles after bucket crossings, the no-grad graph of an eval call),
        whichever backend object compiles it: ``torch.compile(backend="agpe", options=...)``
        builds a new backend per graph, so the controller is found through the layers'
        states. A second controller would step the same masks twice and re-draw the
        initial layout."""
        drivers = {id(c): c for c in (_live_controller(s) for s in states) if c is not None}
        if len(drivers) == 1:
            (controller,) = drivers.values()
            if {id(s) for s in controller.sparsifier.layers.values()} == {id(s) for s in states}:
                if controller.sparsifier.config != config_from_options(self.zero_code_options):
                    raise RuntimeError(
                        f"agpe: zero-code mode: layers {sorted(s.name for s in states)} are already driven by a "
                        f"zero-code controller with other options ({controller.sparsifier.config}); compile the "
                        f"model with the same options, or use agpe_compile.Sparsifier")
                if controller not in self.controllers:
                    self.controllers.append(controller)
                return controller
        if drivers:
            shared = sorted(s.name for s in states if _live_controller(s) is not None)
            raise RuntimeError(
                f"agpe: zero-code mode: a new graph covers layers {shared} together with other layers than "
                f"the graph that already drives them (a different graph break?); their masks cannot follow two "
                f"controllers. Use agpe_compile.Sparsifier(model, optimizer, AGPEConfig(...)) instead")
        controller = make_zero_code_controller(states, self.zero_code_options)
        for state in states:
            state.controller_ref = weakref.ref(controller)
        self.controllers.append(controller)
        return controller

    def _lower(self, result: RewriteResult, example_inputs: List[Any],
               full_layouts: Optional[Dict[int, torch.Tensor]] = None) -> Callable:
        extra = result.extra_inputs()
        per_layer = len(extra) // max(1, len(result.states))
        for i, layout in (full_layouts or {}).items():  # the layout is each layer's last extra input
            extra[(i + 1) * per_layer - 1] = layout
        fakes = _fakeify_static(extra)  # noqa: F841  (held: the fake mode memoizes them weakly)
        inputs = example_inputs + extra
        if self.config.inductor:
            from torch._inductor.compile_fx import compile_fx

            from agpe_compile.inductor_passes import lowering_patches

            # the mode's options and the post-grad pass (Note [Kernel inputs Inductor would copy])
            return compile_fx(result.gm, inputs, config_patches=lowering_patches(self.mode))
        from torch._dynamo.backends.debugging import aot_eager

        from agpe_compile.eager_lowering import eager_compilers
        from agpe_compile.kernels.launch import traced_for_eager_replay

        with traced_for_eager_replay():  # Note [TMA by default] in kernels/launch.py
            return aot_eager(result.gm, inputs, **eager_compilers(result.in_place))  # Note [Host ops in place]


def _full_layouts_for_unseen_modules(gm: fx.GraphModule, states: List[LayerState], read: set) -> Dict[int, torch.Tensor]:
    """Layers whose layout the graph reads but whose module is never called in it (Note
    [Layouts a graph cannot see change]): Dynamo records every module a node was traced in,
    keyed by ``str(id(module))`` in ``nn_module_stack`` (torch 2.11 and 2.13), so a layer
    whose module is absent had no hook traced and gets no recompile at its bucket crossings.
    Such a layer is compiled at full capacity (every mask fits; the dense path by density):
    {layer index: its full-capacity layout}."""
    from agpe_compile.packed_layout import build_packed

    called = {key for node in gm.graph.nodes for key in (node.meta.get("nn_module_stack") or {})}
    full = {}
    for i, state in enumerate(states):
        module = state.module
        if module is None or i not in read or str(id(module)) in called or state.layout_bucket == 1.0:
            continue  # unprepared layers never move bucket; a full layout already is one
        packed, _ = build_packed(state.block_mask.cpu(), state.block_size, (1.0,))
        full[i] = packed.to(state.block_layout.device)
        if not state.warned_unseen_crossing:
            state.warned_unseen_crossing = True
            log.warning(
                "agpe: layer %r: this graph uses its weight without calling its module (F.linear(x, module.weight); "
                "the layer's own forward compiled; a graph break inside a loop over the layers; or "
                "torch.compile(DDP(nn.Sequential(...))), where DDP(torch.compile(model)) works), so Dynamo cannot "
                "recompile it at the layer's bucket crossings; the layer is compiled at full capacity, which is "
                "correct at every density but runs the dense path. Call the module, and compile the module that "
                "calls it, for the block-sparse kernels (design.md, Known limits)", state.name)
    return full


# Note [Buffers written by the backward]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The op's backward adds block scores, inactive-block gradient norms and FLOP counts into
# the layer's saliency, dense_grad_sq and counters buffers, in place (the Sparsifier reads
# the sums). AOTAutograd keeps such an input for the backward and autograd checks, when the
# backward runs, that its version has not changed since the forward. Two compiled calls
# before one backward (D(real) + D(fake), siamese losses, two losses backwarded one after
# the other, retain_graph, a layer used on both sides of a graph break) would fail that
# check: the first backward's write bumps the version the second call recorded. So each
# call hands the graph ``buffer.data``: the same storage (every backward adds into the
# buffer itself, so the scores are the sum over the calls) with a version counter of its
# own. Running one graph's backward twice (``retain_graph=True``, ``autograd.functional.
# jacobian``) would still fail the check on that alias, so a pre-hook on the outputs'
# autograd nodes sets the aliases' versions back to their forward-time values before each
# backward reaches the graph (``torch._C._autograd._unsafe_set_version_counter``, in torch
# 2.11 and 2.13). Nothing else writes these buffers between a forward and its backward.
_MUTATED_IN_BACKWARD = tuple(_TENSOR_FIELDS.index(field) for field in ("saliency", "dense_grad_sq", "counters"))

def _compiled_nodes(outputs, inputs) -> Dict[int, Any]:
    """The autograd nodes of this call's compiled graph (AOTAutograd's
    ``CompiledFunctionBackward``): an output's ``grad_fn``, or, for an output AOTAutograd
    rebuilt as a view outside the graph, its base's. A view of an input (whose base may be
    another graph's output) leads to none and gets no hook."""
    nodes: Dict[int, Any] = {}
    given = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
    for output in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if not isinstance(output, torch.Tensor):
            continue
        for tensor in (output, output._base):
            if tensor is None or id(tensor) in given:
                continue
            node = tensor.grad_fn
            if node is not None and "CompiledFunction" in node.name():
                nodes[id(node)] = node
    return nodes


class BackwardToken:
    """Held only by the pre-hooks of one compiled call's autograd nodes: it lives as long as
    that call's graph, and ``reached`` calls ``on_backward`` (set by whoever waits for it)
    when a backward first reaches the call."""

    def __init__(self) -> None:
        self.reached = False
        self.on_backward: Optional[Callable[[], None]] = None
        self.served: List[Any] = []  # weak references to the call's LayerStates (set by the call wrapper)
        self.node_ids: frozenset = frozenset()  # ids of the call's autograd nodes


def _restore_versions_before_backward(outputs, aliases: List[torch.Tensor], inputs=()) -> Optional[BackwardToken]:
    """Note [Buffers written by the backward]: before each backward through this call, put
    the aliases' version counters back to what the graph recorded at the forward. Returns
    the call's :class:`BackwardToken` (None when no output has a graph)."""
    versions = [alias._version for alias in aliases]
    nodes = _compiled_nodes(outputs, inputs)
    if not nodes:
        return None
    token = BackwardToken()
    token.node_ids = frozenset(nodes)  # valid while the token lives: the nodes hold it (their pre-hooks)

    def restore(grad_outputs):
        if not token.reached:
            token.reached = True
            for ref in token.served:  # Note [Mistakes the Sparsifier names]
                state = ref()
                if state is not None:
                    state.backwards_reached += 1
            if token.on_backward is not None:
                token.on_backward()
        if torch.is_grad_enabled():  # the engine runs a create_graph=True backward with grad mode on
            raise RuntimeError(
                "agpe: double backward (autograd.grad/backward with create_graph=True, e.g. a gradient penalty) "
                "through a graph compiled with agpe is not supported: its backward writes the layers' score "
                "buffers, which AOTAutograd cannot differentiate. Compute the penalty on a model compiled with "
                "another backend or run eagerly, or leave the penalised layers out of agpe (options={'exclude': "
                "[...]})")
        torch._C._autograd._unsafe_set_version_counter(aliases, versions)

    for node in nodes.values():
        node.register_prehook(restore)
    return token


def _with_masked_weight(args: tuple, index: int, state: LayerState) -> tuple:
    """``args`` with the weight at ``index`` replaced by ``W * M`` (out of place: autograd
    takes the gradient through the product, nothing is written into the weight)."""
    from agpe_compile.ops.dense_path import masked_weight

    args = list(args)
    weight = args[index]
    if not isinstance(weight, FakeTensor):
        args[index] = masked_weight(weight, state.block_mask, state.block_size)
    return tuple(args)


_explain_compiles: Dict[Any, int] = {}  # Dynamo frame id -> compiles made by explain()
_said: set = set()


def _warn_misfit_block_size(decisions, for_explain: bool) -> None:
    """Say (once per set of layers) which linear layers stay dense because the block size
    does not divide them: otherwise a typo in ``block_size`` compiles a dense model with no
    word. Callers leave out the layers ``prepare`` already warned about (``DENSE_SAID_ATTR``;
    the Sparsifier refuses such layers itself)."""
    misfits = [d for d in decisions if not d.rewritten and "not divisible by block size" in str(d.reason)]
    if not misfits or for_explain or not _first_time(("misfit", tuple((d.name, d.reason) for d in misfits))):
        return
    log.warning("agpe: %d linear layer(s) stay dense (not pruned): %s; a block size that divides them "
                "(options={'block_size': ...}) makes them prunable, exclude=[...] says they are meant to be dense",
                len(misfits), "; ".join(f"{d.name} ({d.reason})" for d in misfits[:5])
                + (f" and {len(misfits) - 5} more" if len(misfits) > 5 else ""))


def _warn_other_contractions(decisions, for_explain: bool) -> None:
    """Weights used by a contraction the rewrite does not know (einsum, bmm, a library's own
    op: Mixtral's experts) stay dense: said once per set, they were in no table and no
    warning (audit AI: 84% of a Mixtral's weights)."""
    others = [d for d in decisions if not d.rewritten and REWRITTEN_FORMS in str(d.reason)]
    if not others or for_explain or not _first_time(("contraction", tuple(d.name for d in others))):
        return
    log.warning("agpe: %d weight(s) stay dense (not pruned) because they are used in a form agpe does not rewrite: "
                "%s. Write them as x @ W.T / F.linear / nn.Linear to prune them; agpe_compile.explain(model, x) "
                "lists every layer", len(others), "; ".join(f"{d.name} ({d.reason})" for d in others[:3])
                + (f" and {len(others) - 3} more" if len(others) > 3 else ""))


# Note [Weights a graph left dense]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A plain nn.Linear compiled before prepare gets its state from the compile, so a later
# Sparsifier drives the layer the graph rewrote. A weight the compile left dense does not:
# used through a computed form (``F.linear(x, self.weight * s)`` in an nn.Linear subclass,
# which becomes masked_weight only for a weight prepared before the compile), or left out by
# the backend's own patterns or block size. A later prepare gives it a state, but the graph
# compiled before keeps the raw weight: no mask in the forward, a dense gradient into pruned
# blocks, no saliency, so the Sparsifier would prune it blind (a helper audit, twentieth
# session). Dynamo does not recompile for it, so the compile marks such parameters
# (``state.mark_compiled_dense``, with a weak reference to the graph) and prepare warns when
# it takes one in while that graph is alive, naming the fix (torch._dynamo.reset(), or the
# Sparsifier before the first compiled call). A later graph that rewrites the weight clears
# the mark; the mark does not travel with a copy or a pickle of the model.
def _left_dense(graph: fx.Graph, example_inputs: Sequence[Any],
                decisions: List[LayerDecision]) -> List[Tuple[torch.nn.Parameter, str, fx.Node, str]]:
    """(parameter, reason, placeholder, layer name) for each 2-D parameter without a state that
    this graph leaves dense; the marks of parameters it rewrites go."""
    examples = _placeholder_examples(graph, example_inputs)
    found = []
    for decision in decisions:
        for node in _source_placeholders(decision.weight):
            param = examples.get(node)
            if not isinstance(param, torch.nn.Parameter) or param.dim() != 2:
                continue
            if decision.rewritten:
                clear_compiled_dense(param)
            elif state_of(param) is None:
                found.append((param, str(decision.reason), node, decision.name))
    return found


def _source_placeholders(node: fx.Node, depth: int = 0) -> List[fx.Node]:
    """The placeholders ``node`` is computed from (itself if it is one)."""
    if node.op == "placeholder":
        return [node]
    if depth > 16:
        return []
    found: List[fx.Node] = []
    for source in node.all_input_nodes:
        found.extend(n for n in _source_placeholders(source, depth + 1) if n not in found)
    return found


def _in_linear_module(site) -> bool:
    """Whether this linear call runs inside an nn.Linear or nn.MultiheadAttention module (the
    innermost entry of its node's module stack)."""
    stack = [entry for entry in (site.node.meta.get("nn_module_stack") or {}).values()
             if isinstance(entry, tuple) and len(entry) == 2]
    return bool(stack) and isinstance(stack[-1][1], type) and issubclass(
        stack[-1][1], (torch.nn.Linear, torch.nn.MultiheadAttention))


def _warn_undriven(states: Sequence[LayerState], module_layers: set = frozenset()) -> None:
    """A graph whose layers a Sparsifier drives, with some layers no Sparsifier drives: the
    compile found them (a parameter used through F.linear or x @ W.T outside nn.Linear, which
    a Sparsifier created before compiling cannot see), and they would train dense with every
    block live, outside the global density, without a word (audit AI: a Mixtral router)."""
    driven = [s for s in states if s.sparsifier_ref is not None and s.sparsifier_ref() is not None]
    left_out = set().union(*(getattr(s.sparsifier_ref(), "frozen_at_creation", ()) for s in driven))
    undriven = [s for s in states if (s.sparsifier_ref is None or s.sparsifier_ref() is None)
                and s.weight is not None and s.weight.requires_grad  # frozen: left out on purpose
                and s.name not in left_out]  # frozen at creation, trains now: the Sparsifier says so
    if not driven or not undriven or not _first_time(("undriven", tuple(s.name for s in undriven))):
        return
    names = ", ".join(s.name for s in undriven[:5]) + (f" and {len(undriven) - 5} more" if len(undriven) > 5 else "")
    if all(s.name in module_layers for s in undriven):
        # linear modules no Sparsifier holds: added to the model after it (helper audit CB), or
        # another model traced in the same graph (a teacher), whose names may be the driven
        # model's own: then excluding them by name would exclude the driven layers (re-audit CC)
        taken = set().union(*(getattr(s.sparsifier_ref(), "layers", {}).keys() for s in driven))
        clash = any(s.name in taken for s in undriven)
        log.warning("agpe: this compile found linear layer(s) %s that no Sparsifier drives (the Sparsifier driving "
                    "%s does not hold them: a module added to the model after it was created, or another model's "
                    "layers traced in the same graph), so they train dense with every block live and are not in its "
                    "global density. To prune an added module, add it before creating the optimizer and the "
                    "Sparsifier; another model's layers (a teacher) stay dense without this warning when frozen "
                    "(requires_grad_(False))%s", names, driven[0].name,
                    "" if clash else "; or compile with options={'exclude': [...]} naming them")
        return
    log.warning("agpe: this compile found layer(s) %s (weights used as x @ W.T outside an nn.Linear, e.g. "
                "F.linear on a parameter) that the Sparsifier driving %s does not drive: it was created before they "
                "were found, so they train dense with every block live and are not in its global density. To prune "
                "them, run one compiled forward (under torch.no_grad()) before creating the Sparsifier; to keep them "
                "dense, exclude them (AGPEConfig(exclude=[...]))", names, driven[0].name)


def _first_time(key) -> bool:
    """Whether a once-per-process message with this key has not been logged yet."""
    if key in _said:
        return False
    _said.add(key)
    return True


def _keep_recompile_headroom(states: Sequence[LayerState], for_explain: bool = False) -> None:
    """Note [Recompile budget] in buckets.py: this frame may recompile at every bucket crossing.
    Each explain() call compiles the model's frame once more; those compiles are added to the
    budget, so a training run that calls explain() every epoch never runs out of it. A compile
    that finds the same layouts as earlier ones of its frame counts against Dynamo's own limit
    (Note [Recompiles within a bucket set])."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None or compile_id.frame_compile_id is None:
        return  # not under Dynamo (a test handing a graph to the backend directly)
    frame_id, frame_compile = compile_id.frame_id, compile_id.frame_compile_id
    name = _frame_name(frame_id)
    _refuse_a_per_call_recompile_limit(len(states), name)
    known, reason = _recompile_reason()
    region = _isolate_recompiles_region()
    if start_frame_compile(frame_id, frame_compile, region, first_in_cache=known and reason is None):
        _explain_compiles.pop(frame_id, None)
    if for_explain:
        _explain_compiles[frame_id] = _explain_compiles.get(frame_id, 0) + 1
    ensure_recompile_headroom(frame_compile + 1, len(states), name, explained=_explain_compiles.get(frame_id, 0))
    if not for_explain:
        bucket_set = tuple((s.name, s.block_size, tuple(s.block_layout.shape), s.zero_inactive, s.saliency_mode)
                           for s in states)
        check_bucket_set_recompiles((frame_id, region), bucket_set, name, reason)


def _recompile_reason() -> Tuple[bool, Optional[str]]:
    """(whether Dynamo's record could be read, its reason for the compile in progress): the
    first failed guard it reports (of its most recent cached graph), None when Dynamo does
    not call this compile a recompile (no graph of the frame in its cache: a first compile)."""
    try:
        from torch._dynamo.utils import get_metrics_context

        metrics = get_metrics_context()._metrics  # a private record (torch 2.11 and 2.13)
    except Exception:
        return False, None
    if not isinstance(metrics, dict) or "recompile_reason" not in metrics:
        return False, None  # e.g. a compile nested in another, which Dynamo does not record
    reason = metrics["recompile_reason"]
    return True, reason if isinstance(reason, str) else None


def _isolate_recompiles_region() -> int:
    """The ``isolate_recompiles`` region of the compile in progress (torch 2.13); -1 (the
    shared cache) where torch has none."""
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_isolate_recompiles_id", None)
    try:
        return int(get()) if get is not None else -1
    except Exception:
        return -1


def _per_call_recompile_limit() -> Optional[int]:
    """``torch.compile(..., recompile_limit=N)`` (torch 2.13): Dynamo patches its limit to N
    for each compile of that model, from a ``ConvertFrameAssert`` up the stack."""
    from torch._dynamo import convert_frame

    kind = getattr(convert_frame, "ConvertFrameAssert", None)
    frame = sys._getframe(1)
    while frame is not None and kind is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            limit = getattr(owner, "_recompile_limit", None)
            return limit if isinstance(limit, int) else None
        frame = frame.f_back
    return None


def _refuse_a_per_call_recompile_limit(layers: int, frame: str) -> None:
    """A per-call limit is put back at every compile, so agpe cannot keep headroom above it
    (Note [Recompile budget]): after N compiles Dynamo would run the frame eagerly, its layers
    unmasked, with no error. Refused unless N covers the crossings."""
    limit = _per_call_recompile_limit()
    needed = recompile_budget(layers) + 2
    if limit is not None and limit < needed:
        raise RuntimeError(
            f"agpe: torch.compile(..., recompile_limit={limit}) sets Dynamo's limit for every compile of {frame}, "
            f"so agpe cannot raise it for density-bucket crossings: past {limit} compiles Dynamo would run the frame "
            f"eagerly, with its agpe layers unmasked and unscored. Leave recompile_limit out of torch.compile and "
            f"set torch._dynamo.config.recompile_limit={limit} instead (agpe adds its crossing budget to it), or "
            f"pass recompile_limit >= {needed}")


def _frame_name(frame_id) -> str:
    context = torch._guards.TracingContext.try_get()
    codes = list(getattr(context, "traced_code", None) or [])
    ours = os.path.dirname(os.path.abspath(__file__))
    user = [c for c in codes if f"{os.sep}torch{os.sep}" not in c.co_filename and not c.co_filename.startswith(ours)]
    if codes:
        code = (user or codes)[0]
        return f"{code.co_name!r} ({code.co_filename}:{code.co_firstlineno})"
    return f"Dynamo frame {frame_id}"


# Note [Static extra inputs]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# The layer tensors appended to Dynamo's inputs were never seen by Dynamo unless a prepared
# module's hook read them. AOTAutograd fakeifies such tensors with a fresh symbol per size
# and no source; when the op's traced body (CUDA) computes with those sizes (the packed
# layout's capacity, the mask shape check), the guards it adds name symbols Dynamo cannot
# express, and ``produce_guards`` fails with an IndexError. Their sizes are fixed for a
# compiled graph (a bucket crossing replaces the layout and recompiles), so we fakeify them
# first with static shapes in Dynamo's fake mode; AOTAutograd then finds them memoized. The
# memo holds fakes weakly: the caller keeps the returned list alive until lowering is done.
def _fakeify_static(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    if fake_mode is None:
        return []  # called outside Dynamo (no shape env): nothing symbolic to avoid
    return [fake_mode.from_tensor(tensor, static_shapes=True) for tensor in tensors]


def _live_controller(state: LayerState):
    ref = state.controller_ref
    return ref() if ref is not None else None


# Note [Compile modes]
# ~~~~~~~~~~~~~~~~~~~~
# ``torch.compile(model, backend="agpe", mode=...)`` hands ``mode`` to the backend, which
# lowers the rewritten graph with Inductor's options of that mode (``list_mode_options``:
# max-autotune, coordinate descent, CUDA graphs for "reduce-overhead"). With
# ``options={"inductor": False}`` only "default" is accepted. torch.compile refuses ``mode``
# together with ``options``; with agpe options, put the mode among them
# (``options={"mode": "max-autotune", "block_size": 64}``). An ``AgpeBackend`` instance
# takes both itself: ``AgpeBackend(options, mode=...)``.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def agpe_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> Callable:
    """The function registered as ``backend="agpe"``."""
    return AgpeBackend(options, mode=mode)(gm, example_inputs)
