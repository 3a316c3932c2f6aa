"""Zero-code mode: ``torch.compile(model, backend="agpe", options={"target_sparsity": 0.9})``.

The backend splits the options (:func:`split_options`), builds one controller per compiled
graph with :func:`make_zero_code_controller` over that graph's layer states, and its call
wrapper calls the controller (the "tick") at the start of every compiled call made with
grad enabled. The training loop is unchanged; the controller runs the same Sparsifier
with no loss, stepping after the optimizer it finds (or counting ticks without one).

Note [Zero-code step counting]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The controller follows the optimizer when it can. It registers a global
``torch.optim`` step post-hook; the first ``optimizer.step()`` of an optimizer that holds
one of its layers' weights binds that optimizer, and from then on every step of it is one
training step: right after it, the controller runs ``Sparsifier.step()`` (mask update,
optimizer-moment reset of changed blocks, re-bucketing) and sets the ``score_dense`` flags
for the next backward. This is the explicit Sparsifier's loop with ``loss=None``, at the
same point of the step, so:

* gradient accumulation and forwards with grad enabled that are not training steps
  (validation without ``torch.no_grad()``) do not count; only optimizer steps do;
* moments of pruned and regrown blocks are reset (the hook hands over the optimizer);
* layouts re-bucket between steps, so prepared layers (``agpe_compile.prepare`` before
  ``torch.compile``) shrink to their bucket's capacity and run the block-sparse kernels;
  the next call recompiles once per crossing of a bucket the layout takes (Note [Buckets
  no path tells apart] in buckets.py), as in explicit mode.

Fallback (no ``torch.optim`` optimizer holding these weights ever steps, e.g. a hand-written
update, or ``follow_optimizer=False``): the call wrapper's "tick" at the start of every
compiled call made with grad enabled counts steps. Tick k (k >= 2) means training step
k - 1 is over, so it runs ``Sparsifier.step()`` for step k - 1 and sets the flags before
this call's backward; calls made while an earlier call's graph is alive and still waits
for its backward (D(real) + D(fake), losses summed before one backward) belong to that
step and do not tick it. A call whose graph is dropped without a backward (validation
with grad enabled) still counts as a step: wrap validation in ``torch.no_grad()``. So one
compiled call with grad enabled, or several before one backward, = one training step (scale
``update_interval``/``end_step`` by micro-batches under gradient accumulation); the last
step of a run is never processed. The tick runs inside a call whose graph Dynamo already
chose, so a bucket change cannot be applied there: unprepared layers keep their
full-capacity layout (correct, dense speed), and a prepared layer keeps its layout while
its mask fits and raises if the mask outgrows its capacity (use the explicit Sparsifier or
a torch.optim optimizer). Without an optimizer the
moments cannot be reset: a pruned block's weight may drift from zero between updates
(stale momentum); the op masks it, and every update re-zeroes all inactive weights.

A graph break gives each graph its own controller and budget.

Note [Zero-code holds the optimizer weakly]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each compiled graph holds its controller, and Dynamo keeps compiled graphs until
``torch._dynamo.reset()`` (an ``AgpeBackend`` instance keeps its controllers as long as it
lives). A controller holding its optimizer strongly kept that optimizer, its weights and
its moments (12 bytes per fp32 parameter under AdamW) alive after the user dropped the
model, and kept a replaced optimizer alive for the rest of the run, while pruning stopped,
since only the first optimizer's steps counted (a helper audit, twenty-first session). The
controller and its Sparsifier hold the optimizer weakly, and the first optimizer of the
same weights to step after the followed one is freed takes over the counting (that step
counts). Other optimizers of the weights never count a step (several optimizers that each
step part of the layers, an extra optimizer stepping now and then, GradScaler skipping only
the followed one's step: each training step counts once, as the followed one steps), but
their moments of changed blocks are reset too. A replaced optimizer that stays referenced
somewhere keeps being followed: after max(10, update_interval) steps of another optimizer
of the weights that holds all of the followed one's (a replacement) without one of its
own, a warning says that pruning is paused and how to free it. The first step of each other optimizer of the weights runs one gc.collect(), so a
replaced optimizer caught in a reference cycle (a subclass storing a bound method of
itself, a hook closing over it) is freed then and the replacement takes over at once.
Known gap: the first optimizer to step is the one followed, so an auxiliary optimizer
over some layers that happens to step first and then only now and then is counted
instead of the main one (pruning slows; a warning comes only when it misses
max(10, update_interval) steps of another). (A re-audit found that taking over from a live optimizer after two missed steps
counted steps twice with co-stepping optimizers and GradScaler skips.)

Example::

    >>> tick = make_zero_code_controller(list(agpe_compile.prepare(model, {"block_size": 8}).values()),
    ...                                  {"target_sparsity": 0.9, "policy": "rigl", "block_size": 8})
    >>> for x, y in loader:
    ...     tick(); loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from agpe_compile import sharding
from agpe_compile.buckets import rebucket
from agpe_compile.optimizer_hooks import register_step_post_hook
from agpe_compile.step_nesting import inner_step
from agpe_compile.state import LayerState, adopt_buffers

from .config import AGPEConfig
from .sparsifier import Sparsifier

log = logging.getLogger(__name__)

SHARED_OPTION_KEYS = frozenset({"block_size", "include", "exclude", "saliency"})
AGPE_OPTION_KEYS = frozenset(f.name for f in dataclasses.fields(AGPEConfig)) - SHARED_OPTION_KEYS - {"version"}


def split_options(options: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(backend options, AGPE-only options). Shared keys (block size, patterns, saliency) go to the backend.

    >>> split_options({"block_size": 8, "target_sparsity": 0.9})
    ({'block_size': 8}, {'target_sparsity': 0.9})
    """
    options = dict(options or {})
    return ({k: v for k, v in options.items() if k not in AGPE_OPTION_KEYS},
            {k: v for k, v in options.items() if k in AGPE_OPTION_KEYS})


def config_from_options(options: Optional[Mapping[str, Any]]) -> Optional[AGPEConfig]:
    """The AGPEConfig of zero-code mode, or None when no AGPE option is given.

    Raises ``ValueError`` naming the option for bad values (via AGPEConfig) and for
    options that need an optimizer.

    >>> config_from_options({"block_size": 8}) is None
    True
    >>> config_from_options({"target_sparsity": 0.9, "block_size": 8}).final_density
    0.1
    """
    backend_options, agpe_options = split_options(options)
    if not agpe_options:
        return None
    shared = {k: v for k, v in backend_options.items() if k in SHARED_OPTION_KEYS}
    for key in ("include", "exclude"):
        if isinstance(shared.get(key), str):
            shared[key] = (shared[key],)
        elif isinstance(shared.get(key), list):
            shared[key] = tuple(shared[key])
    if isinstance(agpe_options.get("buckets"), list):
        agpe_options["buckets"] = tuple(agpe_options["buckets"])
    config = AGPEConfig(**shared, **agpe_options)
    if config.policy == "snfs":
        raise ValueError("agpe: option 'policy' got 'snfs', which needs the optimizer's momentum; expected "
                         "another policy in zero-code mode, or agpe_compile.Sparsifier(model, optimizer, ...)")
    return config


class ZeroCodeController:
    """Runs the Sparsifier for one compiled graph; see Note [Zero-code step counting].

    Call it (the tick) at the start of every compiled call made with grad enabled; with
    ``follow_optimizer`` it also binds to the first torch.optim optimizer that steps with
    one of its layers' weights and then counts that optimizer's steps instead of ticks.
    """

    def __init__(self, states: List[LayerState], config: AGPEConfig, follow_optimizer: bool = True):
        # Built while Dynamo compiles the first graph: no re-bucketing until between steps.
        self.sparsifier = Sparsifier.for_layers(states, config, optimizer=None, between_steps=False)
        self.calls = 0
        # the optimizer followed, weakly (Note [Zero-code holds the optimizer weakly])
        self._optimizer: Optional["weakref.ReferenceType"] = None
        self._bound = False
        # other optimizers of our weights -> their steps since the followed one's last
        self._foreign_steps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        # weak references, compared by identity: an id() of a freed weight can be reused by
        # another model's parameter, which this controller must not follow
        self._weights = {id(s.weight): weakref.ref(s.weight) for s in states if s.weight is not None}
        self._gave_up = False
        self._checked_sharding: "weakref.WeakSet" = weakref.WeakSet()  # optimizers checked for sharded parameters
        self._resume_following = False
        # Compiled calls since the last backward that reached one of ours (their BackwardTokens,
        # weakly: a graph dropped without a backward no longer counts).
        self._awaiting: List["weakref.ReferenceType"] = []
        self.closed = False
        self._hook = None
        if follow_optimizer and states:
            self._hook = register_step_post_hook(_weak_hook(weakref.ref(self)))
            weakref.finalize(self, self._hook.remove)

    def close(self) -> None:
        """Stop for good (``agpe_compile.strip``): remove the global optimizer hook, release the
        layers (their ``controller_ref`` and the Sparsifier's hold), and make later ticks no-ops.
        A graph that still holds this controller (Dynamo may keep compiled functions alive
        after ``torch._dynamo.reset()``) then meets stripped weights and raises."""
        self.closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.sparsifier.close()
        for state in self.sparsifier.layers.values():
            if state.controller_ref is not None and state.controller_ref() is self:
                state.controller_ref = None

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose steps are counted (None before the first, or once it is freed)."""
        return None if self._optimizer is None else self._optimizer()

    @property
    def follows_optimizer(self) -> bool:
        """True once an optimizer is bound (steps are counted by it, not by ticks), also after
        it is freed: the next optimizer of the weights to step takes its place."""
        return self._bound or self._resume_following

    def __call__(self) -> None:
        if self.closed:
            return
        if (not self._bound and not self._resume_following and self.calls > 0
                and not any(ref() is not None for ref in self._awaiting)):
            self.sparsifier.step(None, between_steps=False)
        self.calls += 1

    def awaiting_backward(self, token) -> None:
        """A compiled call of ours returned a graph (backend.BackwardToken): until a backward
        reaches one of them, further calls belong to the same training step (D(real) +
        D(fake), several losses summed before one backward), so ticks do not step, which
        would also edit masks and weights that graph saved for its backward."""
        token.on_backward = self._backward_reached
        self._awaiting = [ref for ref in self._awaiting if ref() is not None]  # graphs dropped unused
        self._awaiting.append(weakref.ref(token))

    def _backward_reached(self) -> None:
        self._awaiting = []

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The global optimizer hook's work: bind on the first step of an optimizer holding
        our weights, then one ``Sparsifier.step`` per step of that optimizer."""
        sparsifier = self.sparsifier
        if self.closed:
            return
        if not self._bound:
            if optimizer not in self._checked_sharding:  # Note [Sharded weights], once per optimizer
                self._checked_sharding.add(optimizer)
                # FSDP2 hands the compiled forward transient unsharded copies, plain tensors: what
                # shows it is an optimizer stepping sharded parameters of our layers' whole shapes
                # instead of our weights (helper audit BX; another model's optimizer is left alone)
                shapes = {tuple(w().shape) for w in self._weights.values() if w() is not None}
                reason = None if self._holds_weights(optimizer) else next(
                    (r for g in optimizer.param_groups for p in g["params"]
                     for r in (sharding.tensor_reason(p),) if r is not None and tuple(p.shape) in shapes), None)
                sharding.refuse(f"an optimizer steps parameters of the compiled layers' shapes that are {reason}, "
                                f"not the weights the compiled graph computed with" if reason else None,
                                "agpe zero-code mode")
            if self._gave_up or not self._holds_weights(optimizer):
                return
            if self._resume_following:
                # Restored from a state_dict that followed an optimizer: bind again, keep the count.
                self._bind(optimizer)
                sparsifier.step(None)
                return
            if sparsifier.step_count >= sparsifier.config.update_interval:
                # Ticks already ran an update (many micro-batches before the first optimizer
                # step and a short interval): switching now would count steps twice.
                self._gave_up = True
                log.warning("agpe: zero-code mode keeps counting compiled calls as training steps: the first "
                            "step of %s came after %d calls, past the first update. So for the rest of the run "
                            "every compiled call with grad enabled counts one step (micro-batches too), and the "
                            "optimizer is not followed: the moments of pruned blocks are not reset, so pruned "
                            "weights drift from zero between updates (the compiled model masks them and each "
                            "update re-zeroes them; the module run eagerly does not mask them). To have the "
                            "optimizer followed, run warm-up calls under torch.no_grad() (or call "
                            "torch._dynamo.reset() before training, which restarts the schedule)",
                            type(optimizer).__name__, self.calls)
                return
            # Steps the ticks counted before the first optimizer step were micro-batches of it;
            # no update ran yet, so the count can restart (Note [Zero-code step counting]).
            sparsifier.step_count = 0
            if sparsifier._flag_on and not sparsifier._scores_dense_at(1):
                # the ticks reached the step before an update (micro-batches == update_interval)
                # and turned dense-gradient scoring on for a micro-batch of step 1: the explicit
                # Sparsifier scores none of step 1 there, and those scores would reach the first
                # regrowth (with update_interval 1 it scores all of step 1, as the ticks did)
                adopt_buffers(sparsifier.layers.values())  # Note [Replaced buffers]
                for state in sparsifier.layers.values():
                    state.dense_grad_sq.zero_()
                sparsifier._set_score_dense(sparsifier._scores_dense_at(1))
            self._bind(optimizer)
        followed = self.optimizer
        if optimizer is followed:
            for other in list(self._foreign_steps.keys()):
                self._foreign_steps[other] = 0
            sparsifier.step(None)
        elif self._holds_weights(optimizer):
            # Note [Zero-code holds the optimizer weakly]: its moments of changed blocks are
            # reset too; it takes over the counting once the followed optimizer is freed
            sparsifier._other_optimizers.add(optimizer)
            if followed is not None and optimizer not in self._foreign_steps:
                del followed  # a replaced optimizer caught in a reference cycle is garbage
                gc.collect()  # now, not at some later collection (once per new optimizer)
                followed = self.optimizer
            if followed is None:
                log.info("agpe: zero-code mode now follows %s (the optimizer it followed was freed)",
                         type(optimizer).__name__)
                self._follow(optimizer)
                sparsifier.step(None)
                return
            count = self._foreign_steps[optimizer] = self._foreign_steps.get(optimizer, 0) + 1
            # a replacement holds every weight of ours the followed one holds (an optimizer
            # over some layers running an inner loop does not: no warning for it)
            if count == max(10, sparsifier.config.update_interval) and self._held(followed) <= self._held(optimizer):
                log.warning("agpe: zero-code mode counts the steps of the %s it followed first, which has not stepped "
                            "during the last %d steps of another %s holding its layers: pruning is paused. If the "
                            "%s replaced it, drop every reference to the old optimizer (del it, and any scheduler "
                            "holding it): the new one then takes over", type(followed).__name__, count,
                            type(optimizer).__name__, type(optimizer).__name__)

    def _follow(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.sparsifier._follow_weakly(optimizer)
        self.sparsifier._other_optimizers.discard(optimizer)
        self._bound = True
        self._foreign_steps.pop(optimizer, None)
        for other in list(self._foreign_steps.keys()):
            self._foreign_steps[other] = 0

    def _bind(self, optimizer: torch.optim.Optimizer) -> None:
        self._follow(optimizer)
        self._resume_following = False
        # First point between steps: move the initial layout to its bucket (one recompile).
        self.sparsifier.rebucketed = rebucket(list(self.sparsifier.layers.values()), self.sparsifier.config.buckets)
        log.info("agpe: zero-code mode follows %s: one optimizer step = one training step", type(optimizer).__name__)

    def _held(self, optimizer: torch.optim.Optimizer) -> set:
        """ids of this controller's weights that ``optimizer`` holds."""
        return {id(p) for group in optimizer.param_groups for p in group["params"]
                if self._weights.get(id(p), _dead)() is p}

    def _holds_weights(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(self._weights.get(id(p), _dead)() is p for group in optimizer.param_groups for p in group["params"])

    def state_dict(self) -> dict:
        return {"calls": self.calls, "follows_optimizer": self.follows_optimizer,
                "sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. A controller that followed an optimizer binds the
        first optimizer holding its weights that steps next, keeping the restored count."""
        self.calls = int(state["calls"])
        self.sparsifier.load_state_dict(state["sparsifier"])
        self._resume_following = bool(state.get("follows_optimizer", False)) and self._hook is not None


def _dead() -> None:
    return None


def _weak_hook(ref: "weakref.ReferenceType[ZeroCodeController]"):
    """A global optimizer hook that does not keep the controller alive."""

    def hook(optimizer, args, kwargs) -> None:
        controller = ref()
        if controller is not None and not inner_step(optimizer):  # Note [Nested optimizer steps]
            controller.after_optimizer_step(optimizer)

    # never traced: an optimizer step inside a compiled function would make Dynamo trace the
    # controller's host-side update (graph breaks in agpe's code, one graph per break)
    return torch.compiler.disable(hook)


def make_zero_code_controller(states: List[LayerState], options: Mapping[str, Any],
                              follow_optimizer: bool = True) -> ZeroCodeController:
    """A controller running the configured policy over ``states`` (``ValueError`` if no AGPE option)."""
    global _CONTROLLERS_MADE
    config = config_from_options(options)
    if config is None:
        raise ValueError(f"agpe: zero-code mode needs at least one of the options {sorted(AGPE_OPTION_KEYS)}; "
                         f"got {sorted(dict(options))}")
    _CONTROLLERS_MADE += 1
    return ZeroCodeController(states, config, follow_optimizer)


# Note [Nothing to prune in zero-code mode]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A graph with weights agpe cannot prune says so when it compiles (backend.py). A graph with
# no linear weight at all may be a piece of a model split by a graph break whose other
# pieces hold the layers, so it says nothing then; but a model with no linear layer at all
# (a conv net) trained dense without a word. By the first optimizer step every forward graph
# has compiled: if zero-code options reached a graph and no controller exists by then,
# nothing is being pruned, and that step warns (once per process).
_CONTROLLERS_MADE = 0
_WATCH: List[Any] = []  # the optimizer hook's handle while it waits


def watch_for_nothing_to_prune() -> None:
    """Arm the one-shot check of Note [Nothing to prune in zero-code mode]."""
    if _WATCH or _CONTROLLERS_MADE:
        return

    def check(optimizer, args, kwargs) -> None:
        _WATCH.pop().remove()
        _WATCH.append(None)  # said or not, never again in this process
        if not _CONTROLLERS_MADE:
            # FSDP2 sharding each layer (fully_shard per block): Dynamo skips the sharded
            # modules' forwards, so the graphs hold no linear layer (Note [Sharded weights]).
            # Said, not refused: nothing is pruned either way, and a DTensor that is not a
            # linear weight (tensor parallelism's embedding) proves no FSDP (re-audit CC).
            reason = next((r for g in optimizer.param_groups for p in g["params"]
                           for r in (sharding.tensor_reason(p),) if r is not None), None)
            if reason is not None:
                log.warning("agpe: zero-code mode: the options asked for pruning, but no compiled graph had a "
                            "linear layer agpe can prune, and the optimizer steps parameters that are %s: "
                            "sharded layers are not pruned (torch.compile does not hand agpe the layers FSDP2 "
                            "wraps), so the model trains dense. %s", reason, sharding.SUPPORTED)
                return
            log.warning("agpe: zero-code mode: the options asked for pruning, but no compiled graph had a linear "
                        "layer agpe can prune (nn.Linear, F.linear, x @ W.t(), nn.MultiheadAttention), so the model "
                        "trains dense. agpe_compile.explain(model, x) shows what each graph holds")

    _WATCH.append(register_step_post_hook(check))
