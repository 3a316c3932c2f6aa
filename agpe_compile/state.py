"""Per-layer mask and saliency state, held as buffers of the module that owns the weight.

Note [Where masks live]
~~~~~~~~~~~~~~~~~~~~~~~
For an ``nn.Linear`` named ``fc`` with block size b, :func:`prepare` registers on ``fc``:

=================================  ===========  =========================================
buffer                             shape/dtype  meaning
=================================  ===========  =========================================
``weight_block_mask``              [R, C] bool  True = block active (R, C = N/b, K/b)
``weight_saliency``                [R, C] f32   running sum of per-block scores
``weight_saliency_dense_grad_sq``  [R, C] f32   running sum of |dense grad|^2, inactive blocks
``weight_saliency_score_dense``    [] bool      fill dense_grad_sq on this step?
``weight_saliency_counters``       [2] int64    [rows seen by backward, calls skipped]
``weight_block_layout``            [L] int32    index tensors of the mask for the kernels
=================================  ===========  =========================================

so they are in ``model.state_dict()`` as ``fc.weight_block_mask`` and so on. The
Parameter itself carries a reference to its :class:`LayerState` (attribute
``_agpe_state``). That is the one link from the backend to the buffers: Dynamo hands the
backend the live Parameter objects as example inputs, the backend reads ``_agpe_state``,
and its call wrapper appends the state's tensors to every call. No global registry.

Invariant: a buffer's identity never changes, only its contents. Edit masks in place
(``mask.copy_(new)``, ``mask[0, 1] = False``); ``load_state_dict`` copies in place too.
Assigning a new tensor to the attribute is detected by the call wrapper, which raises.
The one exception is ``weight_block_layout`` (Note [Packed layout]): it is derived from
the mask, resynced in place by the call wrapper whenever the mask changed, and replaced
only by :func:`agpe_compile.rebucket` when a layer's density crosses a bucket.

A model compiled without :func:`prepare` gets states created by the backend (all blocks
active); they are not yet module buffers, and :func:`prepare` (which the controller calls)
adopts them: the very same tensors become buffers of the owning module, so the compiled
code keeps seeing them.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import distributed, sharding
from .config import BackendConfig
from .layout import DEFAULT_BUCKETS, BlockLayout, capacity_for, update_layout_
from .ops.mask_cache import contents_token
from .other_backends import NESTED, TRACED_ELSEWHERE, mark_traced_elsewhere, other_backend, say_compiled_by
from .packed_layout import build_packed, capacity_of, unpack

log = logging.getLogger(__name__)

STATE_ATTR = "_agpe_state"
LAYOUT_NAMES_ATTR = "_agpe_layout_buffers"
LAYERS_ATTR = "_agpe_layers"
# On a weight that prepare() left out by include/exclude: the backend keeps it dense too
# (a Sparsifier's AGPEConfig(exclude=...) reaches torch.compile without repeating it).
EXCLUDED_ATTR = "_agpe_excluded"  # the reason, a str; also on its module (Note [Exclusions travel with the module])
EXCLUSIONS_ATTR = "_agpe_exclusions"  # on a module: param name -> _Exclusion
# On a weight that agpe_compile.strip() finished: the backend refuses to make a new state
# for it (a graph compiled before would silently recompile it as an unprepared layer);
# prepare() clears it. A plain bool, so a pickled model still loads without agpe.
STRIPPED_ATTR = "_agpe_stripped"
DENSE_SAID_ATTR = "_agpe_dense_said"  # on a weight prepare() warned it leaves dense for its shape
# On every 2-D parameter prepare() left without a state: the block size it prepared the model
# with, so a graph holding none of the prepared layers (one after a graph break: a router
# used through F.linear, a head) makes its new layers at that block size, not the default
# (a helper audit, twenty-second session). A plain int, held by the module too so that it
# outlives copy.deepcopy (``_PreparedBlockSize``, as Note [Exclusions travel with the
# module]); strip() removes both.
PREPARED_BLOCK_SIZE_ATTR = "_agpe_prepared_block_size"
PREPARED_BLOCK_SIZES_ATTR = "_agpe_prepared_block_sizes"  # on a module: param name -> _PreparedBlockSize
# 2-D parameters a compiled graph used without rewriting them (a computed weight
# ``F.linear(x, self.weight * s)``, a pattern or block size that left it out) -> (reason,
# weak references to those graphs). prepare() warns when it gives such a weight a state while
# one of them is alive, since it keeps the weight dense and unscored until Dynamo recompiles
# (Note [Weights a graph left dense] in backend.py). Keyed weakly by identity: nothing
# travels with a copy or a pickle, and torch._dynamo.reset() frees the graphs.
_COMPILED_DENSE: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def mark_compiled_dense(param: torch.Tensor, reason: str, graph: Any) -> None:
    """A graph that is alive as long as ``graph`` is left ``param`` dense."""
    _, graphs = _COMPILED_DENSE.get(param, (reason, []))
    graphs = [g for g in graphs if g() is not None] + [weakref.ref(graph)]
    _COMPILED_DENSE[param] = (reason, graphs)


def clear_compiled_dense(param: torch.Tensor) -> None:
    """A graph rewrote ``param``: the earlier marks say nothing more about it."""
    _COMPILED_DENSE.pop(param, None)


def compiled_dense_reason(param: Optional[torch.Tensor]) -> Optional[str]:
    """Why a compiled graph that is still alive left ``param`` dense, or None."""
    entry = _COMPILED_DENSE.get(param) if param is not None else None
    if entry is None or not any(g() is not None for g in entry[1]):
        return None
    return entry[0]
BUFFER_SUFFIXES = (
    "block_mask",
    "saliency",
    "saliency_dense_grad_sq",
    "saliency_score_dense",
    "saliency_counters",
    "block_layout",
)


# Note [Replaced buffers]
# ~~~~~~~~~~~~~~~~~~~~~~
# Everything reads a layer's tensors through its LayerState, and the call wrapper hands
# them to the compiled graph on every call. ``model.to(dtype/device)`` (``Module._apply``)
# and an assignment ``fc.weight_block_mask = t`` replace the module's buffer objects; the
# wrapper then adopts them (``check_identity``) before the call, so the compiled code, the
# Sparsifier and the optimizer hooks all see the module's current buffers. Every public
# entry that reads or writes the tensors outside a call adopts them first too
# (``adopt_buffers``: ``layer_state(s)``, ``prepare``, the Sparsifier's ``step``, ``flops``,
# ``densities``, state dicts and loads, ``rebucket``, ``strip``, ``explain``): before, a
# mask edited after ``model.to(device)``, or a mask update between a device round trip and
# the next call, went to the old tensors and the next call undid it (helper audit BL). The fp32
# saliency sums are cast back to fp32 if a dtype conversion touched them. A CUDA graph
# captured by GraphedStep re-captures: its signature holds the buffers' addresses.
_TENSOR_FIELDS = ("block_mask", "saliency", "dense_grad_sq", "score_dense", "counters", "block_layout")
_FP32_FIELDS = ("saliency", "dense_grad_sq")


@dataclasses.dataclass(eq=False)
class LayerState:
    """Mask and saliency tensors of one weight; see Note [Where masks live].

    Example::

        >>> st = agpe_compile.layer_state(model.fc)
        >>> st.block_mask[0, 1] = False      # in place: takes effect on the next call
        >>> st.density
        0.75
    """

    name: str
    param_name: str
    block_size: int
    weight_shape: Tuple[int, int]
    block_mask: torch.Tensor
    saliency: torch.Tensor
    dense_grad_sq: torch.Tensor
    score_dense: torch.Tensor
    counters: torch.Tensor
    block_layout: torch.Tensor
    layout_bucket: float = 1.0
    layout_mask_version: int = -1
    layout_mask_token: Optional[object] = None  # ops.mask_cache.contents_token at the last sync
    # The saliency mode the backend compiled this layer with (None until compiled); the
    # Sparsifier checks it against AGPEConfig.saliency.
    saliency_mode: Optional[str] = None
    # Set by the explicit Sparsifier, which then keeps inactive weights exactly zero; graphs
    # compiled afterwards skip masking W on the dense path (Note [Zero inactive weights]).
    zero_inactive: bool = False
    module_ref: Optional[weakref.ReferenceType] = None
    weight_ref: Optional[weakref.ReferenceType] = None
    # Zero-code mode: the controller that drives this layer's mask, found by every backend
    # instance (``backend="agpe"`` builds a new one per compiled graph).
    controller_ref: Optional[weakref.ReferenceType] = None
    # The explicit Sparsifier driving this layer's mask (one at a time).
    sparsifier_ref: Optional[weakref.ReferenceType] = None
    # A graph that cannot see this layer's bucket crossings was told once (Note [Layouts a
    # graph cannot see change] in backend.py).
    warned_unseen_crossing: bool = False
    # The layouts handed to such graphs, at the capacity they were compiled for, with the
    # mask version each was last rebuilt from; weakly held (the call wrapper owns them).
    # GraphedStep rebuilds them before a replay, which skips the call wrapper.
    capacity_layouts: List[list] = dataclasses.field(default_factory=list)
    # Set when the module ran outside a compiled graph since the last optimizer step that
    # held its weight (``_read_layouts``); the step hook then re-zeroes its inactive blocks.
    ran_eagerly: bool = False
    # Note [Eager runs of a prepared layer]: the (mask, weight) versions last checked, and
    # whether the warning was given.
    eager_checked: Optional[tuple] = None
    warned_eager_unmasked: bool = False
    eager_pending: bool = False  # the hook ran eagerly and no agpe graph has served the layer since
    # The BackwardTokens of the compiled calls with grad enabled through this layer whose
    # backward has not come yet (weakly: each lives as long as its call's autograd graph);
    # Sparsifier.step() warns while one waits (Note [Mistakes the Sparsifier names] in
    # controller/misuse.py).
    backward_tokens: List[weakref.ReferenceType] = dataclasses.field(default_factory=list)
    # Backwards that reached a compiled call through this layer (or a GraphedStep replay of
    # one); the Sparsifier compares its layers' sum between steps (same Note).
    backwards_reached: int = 0
    # Made by a graph compiled before prepare (named from that graph's frame, not from the
    # layer's path in the model): prepare() gives it its path once (``_take_path_name``).
    graph_named: bool = False
    # Set by agpe_compile.strip(): the mask is folded into the weight and the buffers are
    # gone; a graph compiled before raises instead of running on the orphaned tensors.
    stripped: bool = False

    @classmethod
    def create(cls, name: str, param_name: str, weight: torch.Tensor, block_size: int) -> "LayerState":
        n, k = weight.shape
        grid = (n // block_size, k // block_size)
        dev = weight.device
        block_mask = torch.ones(grid, dtype=torch.bool, device=dev)
        block_layout, bucket = build_packed(block_mask, block_size, DEFAULT_BUCKETS)
        return cls(
            name=name,
            param_name=param_name,
            block_size=block_size,
            weight_shape=(n, k),
            block_mask=block_mask,
            saliency=torch.zeros(grid, dtype=torch.float32, device=dev),
            dense_grad_sq=torch.zeros(grid, dtype=torch.float32, device=dev),
            score_dense=torch.zeros((), dtype=torch.bool, device=dev),
            counters=torch.zeros(2, dtype=torch.int64, device=dev),
            block_layout=block_layout,
            layout_bucket=bucket,
            layout_mask_version=block_mask._version,
            layout_mask_token=contents_token(block_mask, block_size),
            weight_ref=weakref.ref(weight),
        )

    def tensors(self) -> List[torch.Tensor]:
        """The op's state arguments, in the op's order."""
        return [getattr(self, field) for field in _TENSOR_FIELDS]

    def buffer_names(self) -> List[str]:
        return [f"{self.param_name}_{suffix}" for suffix in BUFFER_SUFFIXES]

    @property
    def module(self) -> Optional[nn.Module]:
        return None if self.module_ref is None else self.module_ref()

    @property
    def weight(self) -> Optional[torch.nn.Parameter]:
        if self.weight_ref is None and self.module is not None:  # unpickled: find it again
            weight = self.module._parameters.get(self.param_name)
            self.weight_ref = None if weight is None else weakref.ref(weight)
        return None if self.weight_ref is None else self.weight_ref()

    @property
    def traced_elsewhere(self) -> bool:
        """Traced for another backend inside a higher-order op's body (activation
        checkpointing), where no call can be marked: re-zeroed after every optimizer step
        from then on (Note [Prepared layers under other backends]). Known by name, so a
        layer of the same name in another model is re-zeroed too (harmless)."""
        return self.name in TRACED_ELSEWHERE

    # Note [Copying prepared models]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # ``copy.deepcopy(model)``: Parameter.__deepcopy__ drops the Parameter's attributes, so
    # the state travels with the module (``attach`` lists it in ``module._agpe_layers``) and
    # is copied onto the copies of the module, its buffers and its weight (``memo`` maps each
    # original to its copy): the copy has its own masks, equal to the original's.
    # ``torch.save(model)`` pickles the state with a strong reference to its module (weak
    # references cannot be pickled); the weight is found again through the module.
    # Controllers are not copied: a copy is driven by nothing until a Sparsifier takes it,
    # so it makes no zero-weight promise (its graphs mask W) and its load hook is inert.
    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        for field in _TENSOR_FIELDS:
            setattr(new, field, copy.deepcopy(getattr(self, field), memo))
        module, weight = self.module, self.weight
        new.module_ref = None if module is None else weakref.ref(copy.deepcopy(module, memo))
        new_weight = None if weight is None else copy.deepcopy(weight, memo)
        new.weight_ref = None if new_weight is None else weakref.ref(new_weight)
        if new_weight is not None:
            setattr(new_weight, STATE_ATTR, new)
        new.controller_ref = new.sparsifier_ref = None
        new.capacity_layouts = []  # the copy is compiled by graphs of its own
        new.backward_tokens = []  # (weak references to the original's calls)
        new.zero_inactive = False  # no Sparsifier keeps the copy's inactive weights at zero
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state["module_ref"] = self.module
        state["weight_ref"] = state["controller_ref"] = state["sparsifier_ref"] = None
        state["zero_inactive"] = False  # the loaded model is driven by no Sparsifier yet
        state["capacity_layouts"] = []  # weak references; graphs are not pickled
        state["backward_tokens"] = []
        return state

    def __setstate__(self, state):
        module = state.pop("module_ref")
        self.__dict__.update(state)
        self.module_ref = None if module is None else weakref.ref(module)
        # a pickle written before a field with a default factory existed (re-audit CD: a
        # torch.save(model) of an earlier version failed at its first training call)
        for field in dataclasses.fields(self):
            if field.name not in self.__dict__ and field.default_factory is not dataclasses.MISSING:
                setattr(self, field.name, field.default_factory())

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.block_mask.shape)

    @property
    def density(self) -> float:
        return float(self.block_mask.float().mean())

    @property
    def layout_buffer_name(self) -> str:
        return f"{self.param_name}_block_layout"

    def layout(self) -> BlockLayout:
        """The kernels' view of ``block_layout`` (Note [Packed layout])."""
        return unpack(self.block_layout, self.grid, self.block_size)

    def layout_in_sync(self) -> bool:
        """Whether the layout was synced from the mask as it is now: by the version counter,
        and where the mask is cached (CPU) also by its contents, which a write through
        ``mask.data`` or ``mask.numpy()`` changes without the counter (Note [Mask-derived
        tensors] in ops/mask_cache.py)."""
        if self.layout_mask_version != self.block_mask._version:
            return False
        token = contents_token(self.block_mask, self.block_size)
        return token is None or token is self.layout_mask_token

    def mark_layout_synced(self) -> None:
        """Record that the layout matches the mask as it is now."""
        self.layout_mask_version = self.block_mask._version
        self.layout_mask_token = contents_token(self.block_mask, self.block_size)

    def sync_layout(self) -> None:
        """Rewrite the layout in place if the mask changed since the last sync.

        Raises if the mask no longer fits the layout's bucket: that needs
        :func:`agpe_compile.rebucket` (between steps, not inside a compiled call).
        """
        if self.layout_in_sync():
            return
        if not update_layout_(self.layout(), self.block_mask):
            raise RuntimeError(
                f"agpe: layer {self.name!r} has density {self.density:.3f}, above the capacity of its "
                f"layout bucket {self.layout_bucket}; call agpe_compile.rebucket(model) after changing "
                f"masks (the Sparsifier does this at its update steps)"
            )
        self.mark_layout_synced()
        if self.zero_inactive:  # a mask edited outside the Sparsifier: keep the promise
            from .zero_weights import zero_inactive_

            zero_inactive_(self)

    def add_capacity_layout(self, layout: torch.Tensor) -> None:
        """Track a layout at a graph's compiled capacity (Note [Layouts a graph cannot see
        change] in backend.py) so :meth:`sync_capacity_layouts` keeps it current."""
        self.capacity_layouts = [entry for entry in self.capacity_layouts
                                 if entry[0]() is not None and entry[0]() is not layout]
        self.capacity_layouts.append([weakref.ref(layout), -1])

    def rebuild_capacity_layout(self, layout: torch.Tensor) -> None:
        """Rewrite ``layout`` (a compiled capacity, possibly not this layer's bucket) in place
        from the mask; raises if the mask has more live blocks than it holds."""
        with torch.no_grad(), torch.inference_mode(False):
            if not update_layout_(unpack(layout, self.grid, self.block_size), self.block_mask):
                raise RuntimeError(unseen_capacity_error(self, capacity_of(layout, self.grid)))
        for entry in self.capacity_layouts:
            if entry[0]() is layout:
                entry[1] = self.block_mask._version

    def sync_capacity_layouts(self) -> None:
        """Rebuild every tracked compiled-capacity layout whose mask changed since (what the
        call wrapper does at every call; a CUDA graph replay skips the wrapper)."""
        version = self.block_mask._version
        for entry in list(self.capacity_layouts):
            layout = entry[0]()
            if layout is None:
                self.capacity_layouts.remove(entry)
            elif entry[1] != version:
                self.rebuild_capacity_layout(layout)

    def attach(self, module: nn.Module) -> None:
        """Register the tensors as buffers of ``module`` (same objects, no copy).

        Also registers a forward pre-hook that reads the layout buffer, so Dynamo guards on
        its length: a bucket crossing (a new length) recompiles once, in-place edits never.
        Dynamo only sees hooks that exist when it first compiles: prepare before compiling.
        Two load_state_dict hooks resize a saved layout of another bucket (pre) and move the
        state to a weight that ``load_state_dict(..., assign=True)`` put in place (post).
        """
        for buffer_name, tensor in zip(self.buffer_names(), self.tensors()):
            existing = module._buffers.get(buffer_name)
            if existing is not None and existing is not tensor:
                raise RuntimeError(f"agpe: {self.name}: buffer {buffer_name!r} already exists")
            module.register_buffer(buffer_name, tensor)
        names = getattr(module, LAYOUT_NAMES_ATTR, None)
        if names is None:
            names = []
            setattr(module, LAYOUT_NAMES_ATTR, names)
            module.register_forward_pre_hook(_read_layouts)
            module._register_load_state_dict_pre_hook(_resize_layouts_on_load, with_module=True)
            _adopt_on_load(module)
        if self.layout_buffer_name not in names:
            names.append(self.layout_buffer_name)
        module.__dict__.setdefault(LAYERS_ATTR, {})[self.param_name] = self  # Note [Copying prepared models]
        self.module_ref = weakref.ref(module)

    def check_identity(self) -> None:
        """Adopt the buffers the module replaced (Note [Replaced buffers]); raise if one was
        removed or replaced by a tensor of another shape or kind."""
        if self.stripped:
            raise RuntimeError(
                f"agpe: layer {self.name!r} was stripped by agpe_compile.strip() (its mask is folded into the "
                f"weight, its buffers removed); this graph was compiled before: call torch._dynamo.reset() and compile "
                f"the model with another backend (it is a plain model now), or agpe_compile.prepare(model) first "
                f"to train it sparse again")
        module = self.module
        if module is None:
            return
        for field, buffer_name in zip(_TENSOR_FIELDS, self.buffer_names()):
            current, new = getattr(self, field), module._buffers.get(buffer_name)
            if new is current:
                continue
            if not isinstance(new, torch.Tensor) or new.shape != current.shape:
                raise RuntimeError(
                    f"agpe: buffer {self.name}.{buffer_name} was replaced by "
                    f"{'nothing' if new is None else f'a tensor of shape {tuple(new.shape)}'}; it must keep shape "
                    f"{tuple(current.shape)}. Edit it in place instead (e.g. .copy_(new)).")
            if field in _FP32_FIELDS and new.dtype != torch.float32:
                with torch.inference_mode(False):  # an eval under inference_mode must not make them inference tensors
                    new = new.float()  # model.to(torch.bfloat16) casts it: the running sums stay fp32
                module.register_buffer(buffer_name, new)
            elif new.dtype != current.dtype:
                raise RuntimeError(f"agpe: buffer {self.name}.{buffer_name} was replaced by a {new.dtype} "
                                   f"tensor; it must stay {current.dtype}")
            setattr(self, field, new)
            if field == "block_mask":
                self.layout_mask_version = -1  # rewrite the layout from the adopted mask


def _read_layouts(module: nn.Module, args) -> None:
    """Forward pre-hook: touching the layout buffers makes Dynamo guard on their shapes.

    Run eagerly (not traced: a ``torch.compiler.disable`` region, an eager model), the
    layer computes with its raw weight and its gradient reaches inactive blocks; it is
    marked so the Sparsifier's step hook re-zeroes it (Note [Zero inactive weights]). Traced
    for another backend than agpe's, likewise (Note [Prepared layers under other backends])."""
    for name in getattr(module, LAYOUT_NAMES_ATTR):
        getattr(module, name)
    if torch.compiler.is_compiling():
        backend = other_backend()  # a constant while tracing: "" for agpe's graphs
        if backend:  # Note [Prepared layers under other backends]
            for state in module.__dict__.get(LAYERS_ATTR, {}).values():
                say_compiled_by(state.name, backend)
                if backend.endswith(NESTED):  # no traced side effects inside a higher-order op
                    mark_traced_elsewhere(state.name)  # at trace time, for good
                else:
                    state.ran_eagerly = True  # traced: replayed after every call of that graph
        return
    for state in module.__dict__.get(LAYERS_ATTR, {}).values():
        state.ran_eagerly = True
        if getattr(module, state.param_name, None) is not state.weight:
            continue  # under functional_call: it computes with the weights it was given
        if state.eager_pending:
            _warn_if_eager_run_is_unmasked(state)  # the previous call computed outside our graphs
        state.eager_pending = True  # cleared by the call wrapper of a graph that serves the layer


# Note [Eager runs of a prepared layer]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A prepared layer that runs outside a compiled graph computes with its raw weight. Under a
# Sparsifier or a zero-code controller the inactive blocks are zero, so that is W*M (the
# controller also re-zeroes after the step and warns when no backward reached the layer).
# Without one (masks set by hand, as in the quick start), inactive blocks may hold weights,
# and the call silently computes the dense layer: calling the module instead of the model
# torch.compile returned, a ``torch.compiler.disable`` region, a frame Dynamo skipped (torch
# 2.11 runs the layers of a ``model.compile()``-d ``nn.Sequential``, or called from a forward
# it skipped for a graph break in a loop, eagerly; 2.13 did so from the second call on when
# one ``nn.Linear`` had no agpe hook, Note [One call path per module class]). The hook runs
# eagerly in all of these (``_hook_frames_run_eagerly``), but so it does where Dynamo then
# compiles the layer's own forward as a frame (2.13), which is exact. So the eager hook only
# marks the layer (``eager_pending``), the call wrapper of any graph that serves it clears the
# mark, and the next eager hook run that still finds it checks, once per (mask, weight)
# version, whether an inactive block holds a nonzero weight: a warning once per layer, one
# call late. A forward under ``torch.func.functional_call`` with other weights is not checked
# (it computes with those).
@torch.compiler.disable  # called only outside a trace; the eager hook's callees are still frames Dynamo sees
def _warn_if_eager_run_is_unmasked(state: "LayerState") -> None:
    if state.warned_eager_unmasked or _driven(state):
        return
    weight = state.weight
    if weight is None or weight.is_meta or weight.dim() != 2:
        return
    key = (id(state.block_mask), state.block_mask._version, id(weight), weight._version)
    if key == state.eager_checked:
        return
    state.eager_checked = key
    rows, cols = state.grid
    b = state.block_size
    with torch.no_grad():
        held = weight.detach().reshape(rows, b, cols, b).ne(0).any(dim=3).any(dim=1) & ~state.block_mask
        count = int(held.sum())
    if not count:
        return
    state.warned_eager_unmasked = True
    log.warning(
        "agpe: layer %r ran outside a compiled graph (eagerly) with its raw weight, and %d of its inactive "
        "blocks hold nonzero weights: this call computed the dense layer, not W*M, and collected no saliency. "
        "Causes: calling the module instead of the model torch.compile(model, backend='agpe') returned; a frame "
        "Dynamo did not compile (model.compile() of an nn.Sequential root with torch 2.11, a graph break inside "
        "a loop over the layers: TORCH_LOGS=graph_breaks shows it; use torch.compile(model) and keep graph "
        "breaks out of the loop); a torch.compiler.disable region. An agpe_compile.Sparsifier keeps inactive "
        "weights at zero, so eager runs compute W*M under it; with masks set by hand, zero the inactive weights "
        "too. (Said once per layer.)", state.name, count)


def _hook_frames_run_eagerly(*hooks) -> None:
    """Dynamo compiles a hook as a frame of its own where the module is called from code it
    does not compile (a frame it skipped, an ``nn.Sequential``'s loop): there the compiled hook
    would drop its eager branch while the layer computes outside any graph. Those frames run
    eagerly; inlined into a compiled forward (the usual case) the hooks are traced as before.
    ``skip_code`` is private Dynamo API, present in torch 2.11 and 2.13."""
    skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)
    if skip_code is not None:
        for hook in hooks:
            skip_code(hook.__code__)


def _driven(state: "LayerState") -> bool:
    """A live Sparsifier or zero-code controller keeps this layer's inactive weights at zero."""
    return any(ref is not None and ref() is not None for ref in (state.sparsifier_ref, state.controller_ref))


def _resize_layouts_on_load(module: nn.Module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a saved layout of another bucket gets a buffer of its size.

    So ``model.load_state_dict`` works before or after the Sparsifier's own state, and a
    model saved at density 0.1 loads into a freshly prepared (dense) one.
    """
    for name in getattr(module, LAYOUT_NAMES_ATTR):
        saved = state_dict.get(prefix + name)
        current = module._buffers[name]
        if saved is None or saved.shape == current.shape:
            continue
        state = state_of(getattr(module, name[: -len("_block_layout")]))
        with torch.inference_mode(False):
            resized = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        module.register_buffer(name, resized)
        state.block_layout = resized
        state.layout_bucket = _bucket_of_capacity(capacity_of(saved, state.grid), state.grid)
        state.layout_mask_version = -1  # resync from the loaded mask on the next call


def _adopt_assigned_weights(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: ``load_state_dict(..., assign=True)`` replaces the module's
    Parameters and buffers; the layer's state moves to the new weight, so compiled calls keep
    masking it (without this the backend would meet a weight with no state and run it dense),
    and adopts the loaded buffers at once (Note [Replaced buffers]): ``strip``, ``explain`` and
    a Sparsifier created next read the loaded mask, not the one it replaced."""
    for param_name, state in module.__dict__.get(LAYERS_ATTR, {}).items():
        weight = module._parameters.get(param_name)
        if isinstance(weight, nn.Parameter) and weight is not state.weight and state_of(weight) is None:
            setattr(weight, STATE_ATTR, state)
            state.weight_ref = weakref.ref(weight)
        if not state.stripped:
            state.check_identity()
    for param_name, record in module.__dict__.get(EXCLUSIONS_ATTR, {}).items():
        weight = module._parameters.get(param_name)
        if isinstance(weight, nn.Parameter) and weight is not record.weight and state_of(weight) is None:
            setattr(weight, EXCLUDED_ATTR, record.reason)  # Note [Exclusions travel with the module]
            record.weight = weight
    for param_name, sized in module.__dict__.get(PREPARED_BLOCK_SIZES_ATTR, {}).items():
        if getattr(sized, "module_ref", None) is None or sized.module_ref() is not module:
            sized.module_ref, sized.name = weakref.ref(module), param_name  # an unpickled module's record
        param = module._parameters.get(param_name)
        if isinstance(param, nn.Parameter) and param is not sized.param_ref():
            setattr(param, PREPARED_BLOCK_SIZE_ATTR, sized.block_size)  # the mark follows the new parameter
            sized.param_ref = weakref.ref(param)


# Note [Exclusions travel with the module]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# prepare() marks a weight its include/exclude patterns (or a tie with an embedding) leave
# dense with ``EXCLUDED_ATTR``, which the backend reads (an AGPEConfig(exclude=...) reaches
# torch.compile without being repeated). Like the LayerState (Note [Copying prepared
# models]) the mark must outlive ``copy.deepcopy(model)``, whose Parameter.__deepcopy__ drops
# a Parameter's attributes, and ``load_state_dict(..., assign=True)``, which puts new
# Parameters in place: without it a copy's excluded layer was rewritten as an agpe layer (or
# warned about as "not meant to be dense"). So the module records it too: an ``_Exclusion``
# in ``module._agpe_exclusions`` puts the mark on the copy's weight when deep-copied, and
# the load post-hook ``_adopt_assigned_weights`` on an assigned weight.
class _Exclusion:
    """The mark of one excluded weight, held by its module (a strong reference: the module
    holds the weight anyway, and pickling keeps both as one object)."""

    def __init__(self, weight: nn.Parameter, reason: str) -> None:
        self.weight, self.reason = weight, reason

    def __deepcopy__(self, memo):
        new_weight = copy.deepcopy(self.weight, memo)  # the copy's own weight (memo: the same object)
        if isinstance(new_weight, nn.Parameter):
            setattr(new_weight, EXCLUDED_ATTR, self.reason)
        new = _Exclusion(new_weight, self.reason)
        memo[id(self)] = new
        return new


class _PreparedBlockSize:
    """``PREPARED_BLOCK_SIZE_ATTR`` of the parameter ``name`` of a module, held by the module so
    that a deep copy of the module puts it on the copy's parameter (Parameter.__deepcopy__
    drops it). Weak references: a parameter replaced by ``load_state_dict(..., assign=True)``
    or by assignment (``module.w = nn.Parameter(...)``) is freed, and a copy or a pickle of the
    module carries the parameter the module holds now, never a replaced one (re-audit BH)."""

    def __init__(self, param: nn.Parameter, block_size: int, module: Optional[nn.Module] = None,
                 name: Optional[str] = None) -> None:
        self.param_ref, self.block_size = weakref.ref(param), block_size
        self.module_ref = None if module is None else weakref.ref(module)
        self.name = name

    def current(self) -> Optional[nn.Parameter]:
        """The module's parameter now (the recorded one where the module is not known)."""
        module = None if getattr(self, "module_ref", None) is None else self.module_ref()
        if module is None:
            return self.param_ref()
        param = module._parameters.get(self.name)
        return param if isinstance(param, nn.Parameter) else None

    def __deepcopy__(self, memo):
        param = self.current()
        new_param = None if param is None else copy.deepcopy(param, memo)  # the copy's own (memo: the same)
        if isinstance(new_param, nn.Parameter):
            setattr(new_param, PREPARED_BLOCK_SIZE_ATTR, self.block_size)
        new = copy.copy(self)
        new.param_ref = (lambda: None) if new_param is None else weakref.ref(new_param)
        module = None if getattr(self, "module_ref", None) is None else self.module_ref()
        new_module = None if module is None else memo.get(id(module))  # the copy (made before its dict)
        new.module_ref = None if new_module is None else weakref.ref(new_module)
        memo[id(self)] = new
        return new

    def __getstate__(self):  # torch.save(model): the module pickles the parameter anyway (one object)
        module = None if getattr(self, "module_ref", None) is None else self.module_ref()
        return {"param": self.current(), "block_size": self.block_size, "name": getattr(self, "name", None),
                "module": module}

    def __setstate__(self, state):
        param = state["param"]
        self.param_ref = (lambda: None) if param is None else weakref.ref(param)
        self.block_size = state["block_size"]
        if isinstance(param, nn.Parameter):  # one assigned after prepare was pickled without the mark
            setattr(param, PREPARED_BLOCK_SIZE_ATTR, self.block_size)
        self.name = state.get("name")
        module = state.get("module")  # (None in a pickle of the twenty-second session's code)
        self.module_ref = None if module is None else weakref.ref(module)


def _adopt_on_load(module: nn.Module) -> None:
    """Register ``_adopt_assigned_weights`` as a load post-hook of ``module`` once."""
    if not any(hook is _adopt_assigned_weights for hook in module._load_state_dict_post_hooks.values()):
        module.register_load_state_dict_post_hook(_adopt_assigned_weights)


def mark_excluded(module: nn.Module, param_name: str, weight: nn.Parameter, reason: str) -> None:
    """Leave ``module.<param_name>`` dense for the backend too (Note [Exclusions travel with the module])."""
    setattr(weight, EXCLUDED_ATTR, reason)
    records = module.__dict__.get(EXCLUSIONS_ATTR)
    if records is None:
        records = module.__dict__[EXCLUSIONS_ATTR] = {}
        _adopt_on_load(module)
    records[param_name] = _Exclusion(weight, reason)


def clear_excluded(module: nn.Module, param_name: str, weight: nn.Parameter) -> None:
    """Undo :func:`mark_excluded` (a prepare with other patterns, strip)."""
    if hasattr(weight, EXCLUDED_ATTR):
        delattr(weight, EXCLUDED_ATTR)
    module.__dict__.get(EXCLUSIONS_ATTR, {}).pop(param_name, None)


def _bucket_of_capacity(capacity: int, grid: Tuple[int, int]) -> float:
    blocks = grid[0] * grid[1]
    for bucket in DEFAULT_BUCKETS:
        if capacity_for(bucket, blocks) == capacity:
            return bucket
    return min(1.0, capacity / blocks)


def unseen_capacity_error(state: LayerState, capacity: int) -> str:
    """Why a graph compiled without the layer's module hook cannot run its mask (Note
    [Layouts a graph cannot see change] in backend.py)."""
    return (
        f"agpe: layer {state.name!r} has {int(state.block_mask.sum())} live blocks, more than the "
        f"{capacity} this graph was compiled for, and the graph cannot recompile for it: it was compiled "
        f"without the module hook that lets Dynamo see a layout change. Either (a) it was compiled "
        f"before agpe_compile.prepare() registered the hook (prepare the model before torch.compile, or "
        f"call torch._dynamo.reset() and compile again); or (b) the graph uses the layer's weight "
        f"without calling its module (F.linear(x, module.weight)), or compiles the layer's own forward "
        f"(Linear.compile(), torch.compile(linear.forward)): call the module, and compile the module "
        f"that calls it; or (c) Dynamo compiled the layer's forward as a frame of its own, outside its "
        f"hooks (e.g. torch.compile(DDP(nn.Sequential(...))): use DDP(torch.compile(model)))")


def adopt_buffers(states: Iterable[LayerState]) -> None:
    """Adopt the buffers each layer's module replaced (Note [Replaced buffers]); stripped
    layers have none."""
    for state in states:
        if not state.stripped:
            state.check_identity()


def state_of(param: torch.Tensor) -> Optional[LayerState]:
    """The LayerState attached to a weight parameter, or None."""
    return getattr(param, STATE_ATTR, None)


def layer_state(module: nn.Module, param_name: str = "weight") -> LayerState:
    """The LayerState of ``module.<param_name>``; raises if it was neither prepared nor compiled."""
    param = getattr(module, param_name, None)
    state = None if param is None else state_of(param)
    if state is None:
        raise ValueError(
            f"agpe: {type(module).__name__}.{param_name} has no agpe state; expected a layer "
            f"prepared with agpe_compile.prepare() or compiled with backend='agpe'"
        )
    adopt_buffers([state])
    return state


def layer_states(model: nn.Module) -> Dict[str, LayerState]:
    """All LayerStates reachable from ``model``'s parameters, keyed by layer name."""
    found: Dict[str, List[LayerState]] = {}
    paths: Dict[int, str] = {}
    for path, param in model.named_parameters():
        state = state_of(param)
        if state is not None and id(state) not in paths:
            module_path, _, param_name = path.rpartition(".")
            paths[id(state)] = layer_name(module_path, param_name)
            found.setdefault(state.name, [])
            found[state.name].append(state)
    # Two layers of one name (prepared through different submodules, each driven by its own
    # Sparsifier): listed under their paths in ``model`` so neither hides the other.
    adopt_buffers(state for states in found.values() for state in states)
    return {(name if len(states) == 1 else paths[id(state)]): state
            for name, states in found.items() for state in states}


def layer_name(module_name: str, param_name: str) -> str:
    """Name used for patterns and reports: ``fc`` for ``fc.weight``, else the full name."""
    if param_name == "weight" and module_name:
        return module_name
    return f"{module_name}.{param_name}" if module_name else param_name


def pattern_reason(name: str, config: BackendConfig) -> Optional[str]:
    """Why the include/exclude patterns keep layer ``name`` dense, or None."""
    if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return f"not matched by include patterns {list(config.include)}"
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    return None


def skip_reason(
    name: str, weight: torch.Tensor, config: BackendConfig, block_size: int
) -> Optional[str]:
    """Why a weight cannot be rewritten, or None. Shared by prepare() and the backend."""
    if not isinstance(weight, nn.Parameter):
        return "weight is not a parameter"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "parameter not materialized yet (lazy module): run one forward pass before prepare"
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    reason = pattern_reason(name, config)
    if reason is not None:
        return reason
    n, k = weight.shape
    if n % block_size or k % block_size:
        return f"shape {n}x{k} not divisible by block size {block_size}"
    return None


def _linear_weight_names(module: nn.Module) -> Tuple[str, ...]:
    if isinstance(module, nn.Linear):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):
        if (nn.utils.parametrize.is_parametrized(module, "in_proj_weight")  # checked first: reading it runs it
                or module._parameters.get("in_proj_weight") is not None):
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")  # kdim/vdim differ from embed_dim
    return ()


def _linear_weights(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, nn.Parameter]]:
    """Weights prepare() knows to be used as linear layers before any tracing. Parametrized
    ones are left out (:func:`_parametrized_linears`): reading them would run the
    parametrization (a spectral_norm power iteration), and one that returns its input
    unchanged would hand over the parametrization's own parameter."""
    for module_name, module in model.named_modules():
        for param_name in _linear_weight_names(module):
            if nn.utils.parametrize.is_parametrized(module, param_name):
                continue
            weight = getattr(module, param_name, None)
            if weight is not None:
                yield module_name, module, param_name, weight


def _parametrized_linears(model: nn.Module) -> List[str]:
    """Names of the linear weights computed by a torch.nn.utils.parametrize parametrization:
    they stay dense (a mask on the parametrization's input does not describe the weight)."""
    return [layer_name(module_name, param_name) for module_name, module in model.named_modules()
            for param_name in _linear_weight_names(module)
            if nn.utils.parametrize.is_parametrized(module, param_name)]


def sharded_reason(model: nn.Module, config: Optional[BackendConfig] = None) -> Optional[str]:
    """Why the weights ``prepare`` would give masks are sharded by FSDP or tensor parallelism,
    or None (Note [Sharded weights] in sharding.py)."""
    return sharding.module_reason(model, [(layer_name(module_name, param_name), weight) for module_name, _, param_name,
                                          weight in _linear_weights(_unwrapped(model))])


def _refuse_meta_weights(model: nn.Module, config: BackendConfig) -> None:
    """A layer on the meta device has no values to build a mask from, and ``to_empty`` would
    later give its mask and layout uninitialized memory: materialize first."""
    meta = [layer_name(module_name, param_name) for module_name, _, param_name, weight in
            _linear_weights(_unwrapped(model))
            if weight.is_meta and state_of(weight) is None
            and pattern_reason(layer_name(module_name, param_name), config) is None]
    if meta:
        raise ValueError(
            f"agpe.prepare: the weights of {', '.join(meta)} are on the meta device (no values yet); materialize "
            f"the model first (model.to_empty(device=...) and load its weights, or "
            f"load_state_dict(..., assign=True)), then prepare it or create the Sparsifier")


def _embedding_weights(model: nn.Module) -> set:
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def prepare(model: nn.Module, options: Optional[Mapping[str, Any]] = None) -> Dict[str, LayerState]:
    """Give every eligible linear weight of ``model`` its mask and saliency buffers.

    Idempotent. Also adopts states the backend created for a model compiled without
    prepare(). Returns the prepared layers by name. Layers left dense by the user's
    include/exclude patterns or tied with an embedding are logged at INFO; layers left dense
    for their shape (not divisible by the block size), dtype or an unmaterialized lazy
    parameter are named in one WARNING (``agpe_compile.explain`` shows every reason too).

    Example::

        >>> states = agpe_compile.prepare(model, options={"block_size": 32})
        >>> sorted(states)
        ['fc1', 'fc2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.prepare: expected an nn.Module, got {type(model).__name__}")
    config = BackendConfig.from_options(options)
    for path, param in model.named_parameters():  # refuse before changing anything
        state = state_of(param)
        if state is not None and pattern_reason(state.name, config) is None:
            module_path, _, param_name = path.rpartition(".")
            check_block_size_option(state, config, seen_as=layer_name(module_path, param_name))
    sharding.refuse(sharded_reason(model, config), "agpe.prepare")  # Note [Sharded weights]
    _refuse_meta_weights(model, config)
    tied = _embedding_weights(model)
    prepared: Dict[str, LayerState] = {}
    unexpected: List[str] = []  # left dense for their shape, dtype or laziness: said as a warning
    named = _unwrapped(model)  # layer names: paths in the model torch.compile wrapped, if it did
    conflicts = _shared_pattern_conflicts(named, config)
    stale: List[str] = []  # prepared now, left dense by a graph compiled before
    for module_name, module, param_name, weight in _linear_weights(named):
        name = layer_name(module_name, param_name)
        if hasattr(weight, STRIPPED_ATTR):
            delattr(weight, STRIPPED_ATTR)  # prepared again after strip(): a new sparse run
        state = state_of(weight)
        if state is not None and any(state is other for other in prepared.values()):
            continue  # a weight shared by two modules: one layer, listed under its first name
        if state is not None and id(weight) in tied and state.module is None:
            raise RuntimeError(
                f"agpe.prepare: {name} is tied with an embedding, but a graph compiled before prepare rewrote it "
                f"as a linear layer; tied weights stay dense: call torch._dynamo.reset() before prepare, or "
                f"prepare before torch.compile")
        if state is not None:
            _take_path_name(state, name)
            excluded = conflicts.get(id(weight)) or pattern_reason(name, config)
            if excluded is not None:  # a state from an earlier compile or explain: not ours to manage
                log.info("agpe.prepare: %s stays out: %s", name, excluded)
                _mark_left_out(module, param_name, weight, excluded)  # later compiles leave it dense too
                continue
            check_block_size_option(state, config)
            if state.module is None:
                state.attach(module)
            else:
                adopt_buffers([state])
            _unmark_left_out(module, param_name, weight)
            prepared[name] = state
            continue
        block_size = config.resolved_block_size
        reason = skip_reason(name, weight, config, block_size)
        if reason is None and id(weight) in tied:  # named: explain lists it under the embedding's name
            reason = f"weight tied/shared with an embedding, as the weight of linear {name!r}"
        if id(weight) in conflicts and (reason is None or pattern_reason(name, config) is not None):
            reason = conflicts[id(weight)]  # one reason under every name: it is the weight's mark
        if reason is not None:
            log.info("agpe.prepare: %s stays dense: %s", name, reason)
            if (pattern_reason(name, config) is not None or id(weight) in tied  # the backend leaves it dense too
                    or id(weight) in conflicts):
                mark_excluded(module, param_name, weight, f"{reason} (at prepare)")
            else:
                unexpected.append(f"{name} ({reason})")
                setattr(weight, DENSE_SAID_ATTR, True)  # the backend does not say it again
            continue
        if str(getattr(weight, EXCLUDED_ATTR, "")).endswith("(at prepare)"):
            clear_excluded(module, param_name, weight)  # an earlier prepare's exclusion (a tie found by the backend stays)
        state = LayerState.create(name, param_name, weight, block_size)
        setattr(weight, STATE_ATTR, state)
        state.attach(module)
        prepared[name] = state
        left_dense = compiled_dense_reason(weight)
        if left_dense is not None:
            stale.append(f"{name} ({left_dense})")
    for name in _parametrized_linears(named):
        reason = pattern_reason(name, config)
        if reason is None:
            unexpected.append(f"{name} (weight computed by a torch.nn.utils.parametrize parametrization)")
        else:
            log.info("agpe.prepare: %s stays dense: %s", name, reason)
    linear = {id(w) for _, _, _, w in _linear_weights(named)}
    for module_name, module in named.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            state = state_of(param)
            if state is None and id(param) not in linear:
                _mark_other_weight(module, layer_name(module_name, param_name), param_name, param, config)
            if state is None or any(state is other for other in prepared.values()):
                continue
            _take_path_name(state, layer_name(module_name, param_name))
            if state.name in prepared:
                continue
            excluded = conflicts.get(id(param)) or pattern_reason(state.name, config)
            if excluded is not None:
                _mark_left_out(module, param_name, param, excluded)
                continue
            check_block_size_option(state, config)
            if state.module is None:
                state.attach(module)
            _unmark_left_out(module, param_name, param)
            prepared.setdefault(state.name, state)
    for module in named.modules():  # Note on PREPARED_BLOCK_SIZE_ATTR
        for param_name, param in module.named_parameters(recurse=False):
            if not nn.parameter.is_lazy(param) and param.dim() >= 2 and state_of(param) is None:
                setattr(param, PREPARED_BLOCK_SIZE_ATTR, config.resolved_block_size)
                module.__dict__.setdefault(PREPARED_BLOCK_SIZES_ATTR, {})[param_name] = _PreparedBlockSize(
                    param, config.resolved_block_size, module, param_name)
                _adopt_on_load(module)
    _separate_clashing_names(prepared)
    _one_call_path(named, prepared)
    _watch_out_projections(named)  # Note [Projections called through their parent]
    _warn_unmatched_patterns(config, _candidate_names(named))
    if unexpected:
        log.warning("agpe.prepare: %d linear layer(s) stay dense (not pruned, not counted as sparse): %s",
                    len(unexpected), "; ".join(unexpected))
    if stale:
        log.warning("agpe.prepare: a graph compiled before this prepare (or Sparsifier) used %s without rewriting "
                    "it, and keeps doing so until Dynamo recompiles it: there the mask is not applied and the layer "
                    "gets no saliency, so a Sparsifier would prune it blind. Call torch._dynamo.reset() now (the "
                    "next compiled call rewrites it), or create the Sparsifier before the first compiled call",
                    "; ".join(stale))
    distributed.ignore_in_ddp(model, buffer_paths(model, prepared.values()))  # Note [Data-parallel masks]
    return prepared


# Note [One call path per module class]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Where Dynamo compiles a layer's own forward as a frame (``model.compile()`` of an
# ``nn.Sequential`` root, a graph break inside a loop over the layers), it decides per code
# object: a module called without forward hooks (``Module._call_impl``'s fast path) makes
# Dynamo skip that forward's code from then on, for every instance. One ``nn.Linear`` that is
# not an agpe layer (a head the block size does not divide, an excluded layer) then made
# every prepared ``nn.Linear`` run eagerly, with its raw weight, from the second call on
# (torch 2.13; a helper audit in the seventeenth session measured 0.17 off the masked
# reference). So prepare gives every module of a prepared layer's class that has no agpe
# hook a no-op forward pre-hook: all instances take the same call path and stay compiled.
# Not covered: a subclass that inherits the forward (``class Head(nn.Linear): pass``) among
# them. Dynamo skips its frame, hooks or not, and then that forward's code for every
# instance (a helper audit, torch 2.13): the layers run eagerly from the second call and
# say so (Note [Eager runs of a prepared layer]); ``torch.compile(model)`` is not affected.
# Whole-model graphs inline the hook away; strip() removes it.
def _same_call_path(module: nn.Module, args) -> None:
    """Forward pre-hook that does nothing (Note [One call path per module class])."""


# Note [Projections called through their parent]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``nn.MultiheadAttention`` never calls its ``out_proj``: ``F.multi_head_attention_forward``
# reads ``out_proj.weight`` directly. So the projection's own pre-hook (``_read_layouts``)
# never runs, and an eager run of the attention (the module called directly, a graph break
# inside it) computed the dense projection without the warning of Note [Eager runs of a
# prepared layer] (helper audit CO), and without marking the layer for re-zeroing. prepare
# gives such an attention module a pre-hook that runs the projection's, so the projection is
# read, marked and checked exactly when its parent runs.
def _read_out_projection_layouts(module: nn.Module, args) -> None:
    """Forward pre-hook of an nn.MultiheadAttention: its prepared out_proj's pre-hook."""
    out_proj = module._modules.get("out_proj")
    if out_proj is not None and out_proj.__dict__.get(LAYOUT_NAMES_ATTR):
        _read_layouts(out_proj, args)


def _watch_out_projections(model: nn.Module) -> None:
    for module in model.modules():
        out_proj = module._modules.get("out_proj") if isinstance(module, nn.MultiheadAttention) else None
        if (out_proj is not None and out_proj.__dict__.get(LAYOUT_NAMES_ATTR)
                and _read_out_projection_layouts not in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_read_out_projection_layouts)


_hook_frames_run_eagerly(_read_layouts, _same_call_path, _read_out_projection_layouts)


def _one_call_path(model: nn.Module, prepared: Mapping[str, "LayerState"]) -> None:
    classes = {type(state.module) for state in prepared.values() if state.module is not None}
    for module in model.modules():
        if (type(module) in classes and LAYOUT_NAMES_ATTR not in module.__dict__
                and _same_call_path not in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_same_call_path)


_UNMATCHED_SAID: set = set()


def _shared_pattern_conflicts(model: nn.Module, config: BackendConfig) -> Dict[int, str]:
    """id(weight) -> why it stays dense, for each weight several linear modules share whose
    names the include/exclude patterns split (``b.weight = a.weight`` with ``exclude=["a"]``):
    one tensor cannot be pruned for one module and dense for the other, and pruning it would
    prune the excluded module too, so it stays dense for both (said once as a warning)."""
    names: Dict[int, List[str]] = {}
    for module_name, _, param_name, weight in _linear_weights(model):
        names.setdefault(id(weight), []).append(layer_name(module_name, param_name))
    conflicts: Dict[int, str] = {}
    for key, shared in names.items():
        reasons = [(n, pattern_reason(n, config)) for n in shared]
        left_out = [(n, r) for n, r in reasons if r is not None]
        taken = [n for n, r in reasons if r is None]
        if left_out and taken:
            out_name, why = left_out[0]
            conflicts[key] = (f"weight shared by {', '.join(shared)}, and the patterns leave {out_name} dense "
                              f"({why}): one weight cannot be pruned for some of its modules only")
            log.warning("agpe.prepare: %s share one weight; the include/exclude patterns leave %s dense (%s) but "
                        "take in %s: the weight stays dense for all of them (to prune it, let the patterns "
                        "match all its names, or none of them)", ", ".join(shared),
                        ", ".join(n for n, _ in left_out), why, ", ".join(taken))
    return conflicts


def _mark_other_weight(module: nn.Module, name: str, param_name: str, param: nn.Parameter,
                       config: BackendConfig) -> None:
    """A 2-D parameter outside nn.Linear (``F.linear(x, self.router_w)``) that the patterns
    leave dense: marked, so the backend, which finds it only in the graph, leaves it dense too
    and does not warn about it (a Mixtral router excluded with ``*.mlp.gate`` was called a
    misfit of the block size); unmarked when a later prepare's patterns take it in."""
    if nn.parameter.is_lazy(param) or param.dim() < 2:
        return
    reason = pattern_reason(name, config)
    if reason is not None:
        _mark_left_out(module, param_name, param, reason)
    else:
        _unmark_left_out(module, param_name, param)


def _mark_left_out(module: nn.Module, param_name: str, param: nn.Parameter, reason: str) -> None:
    """The patterns leave ``param`` out: marked for the backend (a state from an earlier
    compile or explain stays on the weight, undriven; the mark keeps later compiles from
    rewriting it again)."""
    if not hasattr(param, EXCLUDED_ATTR):
        mark_excluded(module, param_name, param, f"{reason} (at prepare)")


def _unmark_left_out(module: nn.Module, param_name: str, param: nn.Parameter) -> None:
    """A later prepare's patterns take ``param`` in: an earlier prepare's mark goes."""
    if str(getattr(param, EXCLUDED_ATTR, "")).endswith("(at prepare)"):
        clear_excluded(module, param_name, param)


def _candidate_names(model: nn.Module) -> List[str]:
    """Names a pattern can mean: the linear layers prepare knows, and every other parameter
    of 2 or more dims: the backend rewrites a 2-D one where a graph uses it as a linear weight
    (``F.linear(x, self.proj_w)``) and names the others a graph contracts (3-D experts)."""
    names = [layer_name(m, p) for m, _, p, _ in _linear_weights(model)] + _parametrized_linears(model)
    for path, param in model.named_parameters():
        module_path, _, param_name = path.rpartition(".")
        name = layer_name(module_path, param_name)
        if not nn.parameter.is_lazy(param) and param.dim() >= 2 and name not in names:  # 3-D: experts an
            names.append(name)  # exclude may name to silence the compile's "not rewritten" warning
    return names


def _warn_unmatched_patterns(config: BackendConfig, names: List[str]) -> None:
    """An include/exclude pattern that matches no weight agpe could rewrite is most likely a
    typo (``"layer.1"`` for ``"layers.1"``): the layer meant to stay dense would be pruned
    with no word. Said once per set of patterns and names."""
    patterns = [p for p in config.exclude] + [p for p in config.include if p != "*"]
    unmatched = tuple(p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names))
    key = (unmatched, tuple(names))
    if not unmatched or not names or key in _UNMATCHED_SAID:
        return
    _UNMATCHED_SAID.add(key)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    log.warning("agpe.prepare: include/exclude pattern(s) %s match no layer of this model that agpe could rewrite "
                "(linear layers and other weights of 2 or more dims: %s); patterns are fnmatch patterns on these names",
                list(unmatched), shown)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), so that layers are
    named alike whether a Sparsifier is given the model or its compiled wrapper."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _take_path_name(state: LayerState, name: str) -> None:
    """Name a layer made by a graph compiled before prepare (or by explain) by its path in
    the model being prepared: the graph named it from its frame, which for a block compiled
    as a frame of its own ("fc1") is not its path ("blocks.1.fc1"), and sibling blocks would
    share it. Once only, and not while a zero-code controller drives it. Layers prepare()
    made keep their names (a later prepare through a wrapper, ``torch.compile``'s
    ``_orig_mod.`` or a submodule, must not change what checkpoints are keyed by)."""
    if not state.graph_named or state.name == name:
        return
    if state.controller_ref is not None and state.controller_ref() is not None:
        return
    log.info("agpe.prepare: layer %r is %r in this model", state.name, name)
    state.name = name
    state.graph_named = False


def _separate_clashing_names(prepared: Dict[str, LayerState]) -> None:
    """Layers prepared through different submodules can share a name (``prepare(encoder)``
    and ``prepare(decoder)``, each with a ``proj``); one model's Sparsifier, checkpoint and
    report key layers by name, so clashing layers take their paths in this model ("encoder.
    proj", "decoder.proj"), except while a Sparsifier or controller drives them."""
    by_name: Dict[str, List[Tuple[str, LayerState]]] = {}
    for path, state in prepared.items():
        if not any(state is other for _, other in by_name.get(state.name, [])):
            by_name.setdefault(state.name, []).append((path, state))
    for name, entries in by_name.items():
        if len(entries) < 2:
            continue
        for path, state in entries:
            driven = any(ref is not None and ref() is not None for ref in (state.sparsifier_ref, state.controller_ref))
            if driven:
                log.warning("agpe.prepare: layers %s share the name %r, and %s is driven by a Sparsifier or "
                            "zero-code controller, so it keeps it; reports and checkpoints cannot tell them apart",
                            [p for p, _ in entries], name, path)
            elif path != state.name:
                log.info("agpe.prepare: layer %r is %r in this model (its name clashed)", state.name, path)
                state.name = path


def buffer_paths(model: nn.Module, states) -> List[str]:
    """The fully qualified names in ``model`` of the states' buffers."""
    where = {id(module): name for name, module in model.named_modules()}
    paths = []
    for state in states:
        module = state.module
        if module is not None and id(module) in where:
            prefix = where[id(module)] + "." if where[id(module)] else ""
            paths += [prefix + name for name in state.buffer_names()]
    return paths


def check_block_size_option(state: LayerState, config: BackendConfig, seen_as: Optional[str] = None) -> None:
    """An explicit ``block_size`` option must match the block size a layer was prepared with.
    ``seen_as``: the layer's name in the graph being compiled, said when it differs (a layer
    prepared on its own, ``prepare(model.fc1)``, is named ``weight``)."""
    if config.block_size is not None and config.block_size != state.block_size:
        also = f" ({seen_as!r} here)" if seen_as and seen_as != state.name else ""
        raise ValueError(
            f"agpe: option 'block_size' got {config.block_size}, but layer {state.name!r}{also} was "
            f"prepared with block size {state.block_size} (by prepare, or by a torch.compile(backend='agpe') or "
            f"agpe_compile.explain call before it, which prepare unprepared layers with their options); expected "
            f"{state.block_size} or unset, or call agpe_compile.strip(model) first to start over"
        )
