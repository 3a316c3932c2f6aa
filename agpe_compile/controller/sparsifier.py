"""The Sparsifier: runs a policy over a model's agpe layers, one call per training step.

The training loop, and what happens where::

    sparsifier = Sparsifier(model, optimizer, AGPEConfig(target_sparsity=0.9))  # prepare + layout
    cmodel = torch.compile(model, backend="agpe")
    for x, y in loader:
        loss = loss_fn(cmodel(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
        sparsifier.step(loss)

``step`` adds the loss to a device-side sum and counts the step; nothing else happens
(no host sync) except at every ``update_interval``-th step, where it takes one host
snapshot of every layer's small tensors (Note [Host-side updates] in host_sync.py) and, in order:

1. reads the backward's counters and accounts training FLOPs at the masks in force;
2. folds the saliency buffers into the per-block EMAs and zeroes them (saliency.py);
3. at an update step: asks the policy for the global target (schedule), plans the
   per-layer counts (layer_budget.py), drops and grows blocks (drop_grow.py) on the host,
   writes masks and layouts back in one transfer, and zeroes the weights and optimizer
   moments of changed blocks on the device (optimizer_state.py);
4. appends an audit record (audit.py).

Before the backward of every update step of a policy that regrows by gradient, it sets
each layer's ``score_dense`` flag so the backward fills ``dense_grad_sq``. Along the way it
checks how it is used and names the mistakes it sees (misuse.py, a mixin of the Sparsifier).
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from agpe_compile import distributed, sharding
from agpe_compile.buckets import layout_buckets, mark_layouts_synced, plan_layouts, rebucket
from agpe_compile.layout import bucket_for
from agpe_compile.ops.reference import block_sum
from agpe_compile.state import LayerState, adopt_buffers, layer_states, prepare, sharded_reason
from agpe_compile.zero_weights import install as install_zero_hooks
from agpe_compile.zero_weights import zero_inactive_, zero_outside_

from . import checkpoint, model_loads, rank_checkpoint
from .adaptive_schedule import Feedback
from .audit import AUDIT_VERSION, AuditLog, layer_records
from .config import AGPEConfig
from .drop_grow import DropGrow, drop_and_grow
from .flops import FlopAccountant, FlopReport
from .host_sync import to_device, to_host
from .init_layouts import block_counts, initial_masks, layer_densities
from .layer_budget import bucket_range, plan_counts, swap_counts
from .layer_budget import global_density as _global_density
from .misuse import MisuseChecks
from .optimizer_state import momentum_of, zero_optimizer_state
from .policies import LayerView, make_policy
from .saliency import SaliencyEMA

log = logging.getLogger(__name__)

# Note [Protecting grown blocks]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# ``grown_age[layer]`` counts, per block, the mask updates since the block was last grown
# (AGE_NEVER_GROWN for blocks never grown). At an update a block with age <
# ``protect_grown`` is protected: it is dropped only when the layer must lose more blocks
# than it has unprotected ones, and then by its drop score (drop_grow.py). Age 0 is
# set when a block is grown and every update adds 1, so ``protect_grown=1`` shields a
# grown block at exactly the next update. The ages are part of the checkpoint.
AGE_NEVER_GROWN = 2 ** 30


_RESCALE_SAID: set = set()  # zero-code policies whose sparse start has said it rescales weights


def _loss_value(loss) -> torch.Tensor:
    """``step``'s loss as a 0-d float tensor; a clear error for anything else (a per-sample
    loss would otherwise pass until the update reads the interval's mean)."""
    if torch.is_tensor(loss):
        if loss.dtype == torch.bool or loss.is_complex() or loss.device.type == "meta":
            raise TypeError(f"agpe: Sparsifier.step(loss) expects a real scalar loss, got a {loss.dtype} tensor "
                            f"on {loss.device}")
        if loss.numel() != 1:
            raise ValueError(f"agpe: Sparsifier.step(loss) expects the scalar loss of the step (the one "
                             f"backward was called on), got a tensor of shape {tuple(loss.shape)}; "
                             f"reduce it first, e.g. loss.mean()")
        return loss.detach().float().reshape(())
    try:
        if isinstance(loss, (bool, str, bytes)) or (type(loss).__module__ == "numpy"
                                                    and type(loss).__name__ in ("bool", "bool_")):
            raise TypeError
        return torch.tensor(float(loss))  # int, float, numpy scalars, ...
    except (TypeError, ValueError):
        raise TypeError(f"agpe: Sparsifier.step(loss) expects a scalar tensor or number, got "
                        f"{type(loss).__name__} {loss!r}") from None


class Sparsifier(MisuseChecks):
    """Prune-and-regrow controller for the agpe layers of ``model``.

    Example::

        >>> sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9, policy="rigl", block_size=8))
        >>> round(sp.global_density, 2)
        0.1
        >>> sp.step(loss)          # after optimizer.step(), every training step
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], config: AGPEConfig,
                 recompile_counter: Optional[Callable[[], int]] = None, read_zero_blocks: bool = True):
        """``read_zero_blocks``: over full masks, start the all-zero weight blocks of a model
        that looks pruned inactive (Note [Masks from zero blocks]); ``False`` for freshly
        initialized weights whose init leaves whole blocks at zero (``nn.init.eye_``)."""
        if not isinstance(config, AGPEConfig):
            raise TypeError(f"agpe: Sparsifier expected an AGPEConfig, got {type(config).__name__}")
        sharding.refuse(sharded_reason(model), "agpe: Sparsifier")  # Note [Sharded weights]
        config.check_model(model, layer_states(model))  # before prepare: a refused model is left as it was
        states = prepare(model, options=config.backend_options)
        frozen = sorted(name for name, state in states.items()
                        if state.weight is not None and not state.weight.requires_grad)
        left_out = {}
        if frozen:  # no gradient, no saliency, no way to train a regrown block: keep their masks
            log.warning("agpe: %s %s frozen (requires_grad=False) when the Sparsifier is created: it leaves %s out "
                        "for good (%s masks stay as they are, also once unfrozen, and they do not count in the "
                        "global density); create the Sparsifier after unfreezing to prune %s",
                        ", ".join(frozen), "is" if len(frozen) == 1 else "are", "it" if len(frozen) == 1 else "them",
                        "its" if len(frozen) == 1 else "their", "it" if len(frozen) == 1 else "them")
            left_out = {name: weakref.ref(states[name].weight) for name in frozen}
            states = {name: state for name, state in states.items() if name not in frozen}
        self.model = model  # the layer states only hold weak references to their modules
        self._read_zero_blocks = bool(read_zero_blocks)
        if not states and any(type(m).__name__ == "Conv1D" for m in model.modules()):
            warnings.warn("agpe: the model's projections are Hugging Face Conv1D layers (GPT-2), which agpe does not "
                          "rewrite: call agpe_compile.linear_from_conv1d(model) before creating the optimizer and "
                          "the Sparsifier", stacklevel=2)
        self._setup(list(states.values()), optimizer, config, recompile_counter)
        self._left_out_frozen = left_out  # Note [Frozen layers]: said again if one trains later
        self.frozen_at_creation = frozenset(frozen)  # the backend does not call them undriven
        if optimizer is None and self.layers:
            warnings.warn(
                "agpe: Sparsifier without an optimizer: pruned weights are zeroed only at mask updates and the "
                "optimizer moments of changed blocks are never reset, so momentum keeps moving pruned weights and "
                "a regrown block restarts with stale moments. Create the optimizer first and pass it: "
                "Sparsifier(model, optimizer, config)", stacklevel=2)

    @classmethod
    def for_layers(cls, states: List[LayerState], config: AGPEConfig,
                   optimizer: Optional[torch.optim.Optimizer] = None, between_steps: bool = True) -> "Sparsifier":
        """A Sparsifier over already prepared layer states (zero-code mode, tests).

        ``between_steps=False``: created while a graph is being compiled (zero-code mode),
        so the initial layout is applied without re-bucketing (see :func:`agpe_compile.rebucket`).
        """
        self = cls.__new__(cls)
        self._setup(list(states), optimizer, config, None, between_steps)
        return self

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer the Sparsifier was given: its step hooks keep pruned weights at zero
        and its moments of changed blocks are reset. Zero-code mode's controller sets the
        optimizer it follows with :meth:`_follow_weakly` (Note [Zero-code holds the optimizer
        weakly] in zero_code.py)."""
        held = self.__dict__.get("_optimizer")
        return held() if isinstance(held, weakref.ReferenceType) else held

    @optimizer.setter
    def optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.__dict__["_optimizer"] = optimizer

    def _follow_weakly(self, optimizer: torch.optim.Optimizer) -> None:
        self.__dict__["_optimizer"] = weakref.ref(optimizer)

    def _setup(self, states, optimizer, config, recompile_counter, between_steps: bool = True) -> None:
        self.config = config
        self.policy = make_policy(config)
        self.optimizer = optimizer
        # Other torch.optim optimizers seen stepping the layers' weights (one that replaced the
        # Sparsifier's mid-run): their moments of changed blocks are reset too.
        self._other_optimizers: "weakref.WeakSet" = weakref.WeakSet()
        # The optimizer that stepped the layers' weights last (momentum-reading policies follow it).
        self._last_optimizer: Optional["weakref.ReferenceType"] = None
        self._warned_no_momentum = False
        self.layers: Dict[str, LayerState] = {s.name: s for s in states}
        if not self.layers:
            warnings.warn("agpe: no eligible linear layer; the model trains dense", stacklevel=3)
        driven = sorted(s.name for s in states if s.sparsifier_ref is not None and s.sparsifier_ref() is not None)
        if driven:
            log.warning("agpe: layers %s are already driven by another Sparsifier (or zero-code mode): both will "
                        "step the same masks; call .close() on the one that should stop", driven)
        for state in states:
            state.sparsifier_ref = weakref.ref(self)
        # The weights it prepared: a replaced parameter (even one the layer adopted, after a
        # load_state_dict(assign=True)) is not the one the optimizer steps.
        self._weights = {s.name: weakref.ref(s.weight) if s.weight is not None else _dead for s in states}
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.saliency = SaliencyEMA(config.saliency_decay)
        # Mask updates since each block was last grown (Note [Protecting grown blocks]).
        self.grown_age: Dict[str, torch.Tensor] = {}
        self.accountant = FlopAccountant({n: (s.weight_shape, s.block_size) for n, s in self.layers.items()})
        self.schedule_state = self.policy.initial_schedule_state()
        self.pruned_saliency: Optional[float] = None
        self.seen_counters = {}
        # Data-parallel ranks decide the same masks: the run is recorded once, by rank 0.
        self.audit = AuditLog(config.audit_path if not self._data_parallel() or distributed.rank() == 0 else None)
        self.recompile_counter = recompile_counter
        self._graphs_seen = recompile_counter() if recompile_counter else 0
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_steps = 0
        self._flag_on = False
        self._scored_from: Dict[str, torch.Tensor] = {}
        self._skips_from: Dict[str, torch.Tensor] = {}  # counters[1] when dense scoring turned on
        self.seconds = 0.0
        self.update_seconds = 0.0
        for name, state in self.layers.items():
            # controller-side state lives on the host (Note [Host-side updates])
            self.saliency.add_layer(name, state.grid, "cpu")
            self.grown_age[name] = torch.full(state.grid, AGE_NEVER_GROWN, dtype=torch.int32)
        for name, counters in zip(self.layers, to_host([s.counters for s in self.layers.values()])):
            self.seen_counters[name] = [int(v) for v in counters.tolist()]
        self.rows_at_interval = sum(seen[0] for seen in self.seen_counters.values())
        # Note [Counters a model load rewrites] (model_loads.py)
        self._counters_before_load: Dict[str, Optional[List[int]]] = {}
        # layer -> its live row counter when a format-3 state was loaded before the model's
        # (Note [Counters a model load rewrites]); set by load_state_dict (checkpoint.py)
        self._snapshot_awaits_model_load: Dict[str, int] = {}
        # each layer's row counter as the last model load put it back (or as found at creation)
        self._counters_at_model_load: Dict[str, int] = {n: c[0] for n, c in self.seen_counters.items()}
        self._load_hooks = model_loads.watch(self, list(self.layers.values()))
        weakref.finalize(self, _remove_handles, self._load_hooks)
        # Note [Mistakes the Sparsifier names]: a model load that brought a run's state while
        # this Sparsifier's own state was never loaded ((layer, rows) of the first such layer)
        self._state_loaded = False
        self._model_loaded_without_state: Optional[tuple] = None
        self._warned_no_backward = False
        self._warned_missed_layers: set = set()
        self._warned_target = False
        self._warned_below_target = False
        self._frozen = set()  # layers frozen since creation (Note [Frozen layers])
        for name, state in self.layers.items():
            if optimizer is not None and not any(state.weight is p for g in optimizer.param_groups for p in g["params"]):
                log.warning("agpe: %s.weight is not in the optimizer given to the Sparsifier: the moments of its "
                            "changed blocks are reset only in optimizers seen stepping it (from their first step)",
                            name)
        self.target_density = self.config.start_density
        # Note [Layouts a target had before]: global target -> {layer: layout bucket} at the last update there
        self.layout_sets: Dict[float, Dict[str, float]] = {}
        self._adopted = False
        self.rebucketed: List[str] = []
        self.recalled_layouts = False  # whether the last update kept the layers in remembered layouts
        if self._data_parallel():  # Note [Data-parallel masks]: same config and layers everywhere, from step 0
            distributed.check_same_setup(config, self.layers)
        self._apply_initial_layout()
        if self._data_parallel():
            distributed.check_same_on_every_rank(
                dict(zip(self.layers, to_host([s.block_mask for s in self.layers.values()]))), "at the start")
        self._check_target_reached(dict(zip(self.layers, to_host([s.block_mask for s in self.layers.values()]))))
        self.rebucketed = rebucket(list(self.layers.values()), config.buckets, between_steps)
        self._hooks = []
        _LIVE.add(self)  # (GraphedStep: Note [Optimizer steps a replay runs] in graphs.py)
        if optimizer is not None and (not isinstance(optimizer, torch.optim.Optimizer)
                                      or not hasattr(optimizer, "_optimizer_step_post_hooks")):
            raise TypeError(
                f"agpe: Sparsifier expects a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the "
                f"optimizer it wraps (e.g. `wrapper.optimizer`): the Sparsifier hooks its step() to keep pruned "
                f"weights at zero and resets the moments of changed blocks")
        if optimizer is not None and self.layers:
            # Note [Zero inactive weights]: from here on inactive weights stay exactly zero,
            # so graphs compiled afterwards skip masking W on the dense path. Not with an
            # optimizer that evaluates the model inside its step (LBFGS runs the closure
            # again after moving the weights along its history, which reaches pruned blocks):
            # zeros hold only after the step, so those graphs keep masking.
            promise = not isinstance(optimizer, torch.optim.LBFGS)
            for state in self.layers.values():
                state.zero_inactive = promise
                zero_inactive_(state)
            self._hooks = install_zero_hooks(optimizer, list(self.layers.values()),
                                             on_step=_count_optimizer_steps(weakref.ref(self)))
            # the step hook is global; the promise is this Sparsifier's (Note [A dropped Sparsifier])
            # the list itself: install() appends the load hooks it registers later on
            weakref.finalize(self, _dropped, self._hooks, list(self.layers.values()))
        self._optimizer_steps, self._optimizer_steps_at_step = 0, None
        # steps of the optimizer given (not of other optimizers of the layers) in all, and
        # when step() last ran (Note [Mistakes the Sparsifier names])
        self._own_optimizer_steps, self._own_steps_at_step = 0, 0
        self._warned_missed_steps = False
        self._warned_before_backward = False
        self._backwards_at_step = self._backwards_reached()

        self._warned_double_step = False
        self._warned_no_loss = False
        self._set_score_dense(self._scores_dense_at(1))
        self.audit.write({"event": "start", "step": 0, "audit_version": AUDIT_VERSION, "config": config.to_dict(),
                          "layers": {
            n: {"shape": list(s.weight_shape), "block_size": s.block_size, "grid": list(s.grid)}
            for n, s in self.layers.items()}})

    # ---- public API -------------------------------------------------------------------

    def step(self, loss: Optional[torch.Tensor] = None, between_steps: bool = True) -> None:
        """Count one finished training step; update masks if it was an update step.

        ``between_steps=False``: called inside a compiled call (zero-code mode's tick), so
        layouts cannot re-bucket; see :func:`agpe_compile.rebucket`.
        """
        start = time.perf_counter()
        if getattr(self, "_closed", False):
            raise RuntimeError("agpe: Sparsifier.step() after close(): this Sparsifier no longer drives the layers "
                               "(their masks stay as they are); create a new Sparsifier to go on pruning")
        self._refuse_a_copy("step()")
        adopt_buffers(self.layers.values())  # Note [Replaced buffers]: model.to(device) since the last call
        self._snapshot_awaits_model_load.clear()  # Note [Counters a model load rewrites]: training went on
        self._check_weights_still_attached()
        self._check_one_call_per_optimizer_step()
        self._check_no_missed_optimizer_steps()
        self._check_no_backward_pending(loss)
        self._check_resumed_state()
        self._check_optimizer_state_survived_the_layout()
        if loss is not None:
            value = _loss_value(loss)
            finite = torch.isfinite(value)
            # [sum of the finite losses, count of the others], on the loss's device (no sync)
            pair = torch.stack((torch.where(finite, value, torch.zeros_like(value)), torch.logical_not(finite).float()))
            if self._loss_sum is None or self._loss_sum.device != value.device:
                self._loss_sum = pair if self._loss_sum is None else self._loss_sum.to(value.device) + pair
            else:
                self._loss_sum.add_(pair)
            self._loss_steps += 1
        self.step_count += 1
        if not self._hooks and between_steps:  # no step hook: re-zero layers run eagerly here
            for state in self.layers.values():
                if state.ran_eagerly or state.traced_elsewhere:
                    zero_inactive_(state)
                    state.ran_eagerly = False
        if self.step_count % self.config.update_interval == 0:
            self._check_optimizer_ever_stepped()
            self._interval(self.step_count, between_steps)
        self._set_score_dense(self._scores_dense_at(self.step_count + 1))
        self.seconds += time.perf_counter() - start

    def __deepcopy__(self, memo) -> "Sparsifier":
        """A copy to look at, not to train with: its layers are copies no hook of its own
        keeps (``step`` and ``load_state_dict`` refuse it, naming what to do instead)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["_a_copy"] = True
        return new

    def _refuse_a_copy(self, what: str) -> None:
        if self.__dict__.get("_a_copy"):  # helper audit BL: it failed naming parametrize
            raise RuntimeError(
                f"agpe: Sparsifier.{what} on a copy.deepcopy of a Sparsifier: the copy drives no layers (no "
                f"optimizer or load hooks of its own keep its layers' inactive weights at zero). To fork a run, save "
                f"model.state_dict(), optimizer.state_dict() and sparsifier.state_dict(), and load them into a "
                f"new model, optimizer and Sparsifier(model, optimizer, config)")

    def close(self) -> None:
        """Stop driving the layers: remove the optimizer and load hooks and release the masks,
        so another Sparsifier can take them. Masks and weights stay as they are. Graphs compiled
        while this one ran skip the masking of zero weights on the dense path; their call
        wrapper hands them ``W * M`` instead (Note [A promise outlives its Sparsifier] in
        zero_weights.py) until a new Sparsifier takes the layers or ``torch._dynamo.reset()``
        drops those graphs."""
        self._closed = True
        for handle in self._hooks + self._load_hooks:
            handle.remove()
        self._hooks, self._load_hooks[:] = [], []
        for state in self.layers.values():
            if state.sparsifier_ref is not None and state.sparsifier_ref() is self:
                state.sparsifier_ref = None
                state.zero_inactive = False

    def densities(self) -> Dict[str, float]:
        """Current density of every agpe layer (one device-to-host copy)."""
        adopt_buffers(self.layers.values())
        masks = to_host([s.block_mask for s in self.layers.values()])
        return {name: float(mask.float().mean()) for name, mask in zip(self.layers, masks)}

    @property
    def global_density(self) -> float:
        """Active blocks / all blocks over every agpe layer (1.0 with none)."""
        adopt_buffers(self.layers.values())
        return _global_density(to_host([s.block_mask for s in self.layers.values()]))

    @property
    def flops(self) -> FlopReport:
        """Cumulative training FLOPs so far, per layer and total (reads the counters)."""
        names = list(self.layers)
        adopt_buffers(self.layers.values())
        host = to_host([self.layers[n].counters for n in names] + [self.layers[n].block_mask for n in names])
        self._account(False, dict(zip(names, host[:len(names)])), dict(zip(names, host[len(names):])), {})
        return self.accountant.report()

    @property
    def audit_path(self) -> Optional[str]:
        return self.audit.path

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically; see docs/checkpoint-format.md."""
        adopt_buffers(self.layers.values())
        return checkpoint.save(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (any supported format version), masks in place."""
        if getattr(self, "_closed", False):  # (helper audit BL: it rewrote the masks a newer Sparsifier drives)
            raise RuntimeError("agpe: Sparsifier.load_state_dict() after close(): this Sparsifier no longer drives "
                               "the layers; load the state into the Sparsifier that does (or a new one)")
        self._refuse_a_copy("load_state_dict()")
        adopt_buffers(self.layers.values())
        checkpoint.load(self, state)
        self._state_loaded, self._model_loaded_without_state = True, None
        # the audit log goes on from here: the report drops what the log holds past this step
        self.audit.write({"event": "load", "step": self.step_count})

    def rank_state_dict(self) -> dict:
        """This data-parallel rank's own state (its interval sums and counters, which differ
        between ranks until the next update): save one per rank beside the shared checkpoint
        (Note [Ranks' own state] in rank_checkpoint.py)."""
        adopt_buffers(self.layers.values())
        return rank_checkpoint.save_rank(self)

    def load_rank_state_dict(self, state: dict) -> None:
        """Restore this rank's :meth:`rank_state_dict`; call it after loading the model's and
        the Sparsifier's shared state."""
        adopt_buffers(self.layers.values())
        rank_checkpoint.load_rank(self, state)

    # ---- one interval -----------------------------------------------------------------

    def _interval(self, step: int, between_steps: bool = True) -> None:
        start = time.perf_counter()
        self._check_modules_still_in_model()
        snap = self._snapshot()
        loss = self._take_loss(snap.loss) if snap.loss_over_ranks is None else self._take_loss_over_ranks(
            snap.loss_over_ranks)
        self._check_loss_given(step, loss)
        self._check_backward_reached(step, sum(int(snap.counters[n][0]) for n in self.layers),
                                     any(bool(snap.saliency[n].any()) for n in self.layers))
        self._check_every_layer_reached(step, snap)
        self._account(self._flag_on, snap.counters, snap.masks, snap.scored_from)
        if self._flag_on:  # scoring stays on (update_interval 1): count the next interval's scored rows from here
            self._set_score_dense(True, force=True)
        skips = {n: self._take_skips(n, snap.counters[n]) for n in self.layers}
        if self._data_parallel():  # the audit counts every rank's skipped calls (the mean times the ranks)
            world = distributed.world_size()
            skips = {n: int(round(float(snap.interval_skips[n].reshape(-1)[0]) * world)) for n in self.layers}
        blind = self._blind_layers(snap)
        for name, state in self.layers.items():
            if state.saliency_mode is not None and state.saliency_mode != self.config.saliency:
                raise ValueError(
                    f"agpe: layer {name!r} was compiled with saliency {state.saliency_mode!r} but "
                    f"AGPEConfig.saliency is {self.config.saliency!r}: its graph was compiled before this "
                    f"Sparsifier drove it, and keeps its score. Create the Sparsifier before torch.compile (or "
                    f"call torch._dynamo.reset() after creating it), or set AGPEConfig.saliency="
                    f"{state.saliency_mode!r}")
            if name not in blind:  # Note [Intervals without a finite score]: keeps the previous scores
                self.saliency.update(name, snap.saliency[name], self.config.update_interval)
            state.saliency.zero_()
        dense_grad = {n: self._take_dense_grad(n, s, snap.dense_grad_sq[n]) for n, s in self.layers.items()}
        before = snap.masks
        just_grown = {n: age == 0 for n, age in self.grown_age.items()}
        record = {"event": "interval", "step": step, "loss": loss if loss is None or math.isfinite(loss) else None,
                  "updated": False, "schedule": None,
                  "global_density_before": _global_density(before.values()), "pruned_saliency": self.pruned_saliency}
        self.rebucketed = []
        self.recalled_layouts = False
        after = before
        unscored, regrowth_blind = [], set()
        if self._updates_at(step):
            regrowth_blind = set(self._regrowth_blind_layers(snap))
            unscored = [n for n in self.layers if n in blind or n in regrowth_blind]
        if unscored and self._holds_when_blind(step, unscored, regrowth_blind):
            record["schedule"] = "hold:nonfinite-scores"
        elif self._updates_at(step):
            record["schedule"], after = self._update(step, loss, dense_grad, before, between_steps,
                                                     no_growth=regrowth_blind)
            record["updated"] = True
            if self._frozen != set(self.layers):  # every layer frozen: the masks are held, not planned
                self._check_target_reached(after)  # frozen layers included: the plan keeps the global density
        record["rebucketed"] = self.rebucketed
        record["recalled_layouts"] = self.recalled_layouts
        if self.audit.path is not None:
            self._write_record(record, before, after, just_grown, skips, start)
        self.update_seconds += time.perf_counter() - start

    # Note [Intervals without a finite score]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # The op skips the scores of a backward call whose scores are not finite (an fp16
    # overflow), so one such call cannot poison the running sums. When every call of an
    # interval was skipped for a layer (a GradScaler calibrating its scale from 2**16 down
    # skips the first steps of an fp16 run), the layer's sum is all zero: folded in, it
    # would drag its EMA towards zero, and an update would prune and regrow on nothing (an
    # audit saw 28 blocks pruned and 16 swapped on all-zero scores). The op counts skipped
    # calls, not calls, so "every call" is read as: at least update_interval skipped calls
    # and nothing scored (a zero-initialised layer scores exactly 0 on finite calls too, so
    # zeros alone say nothing); on the mean over the ranks when data-parallel, so every
    # rank decides alike. Such an interval keeps the layer's previous scores. Regrowth by
    # dense gradient reads the update step alone: skipped calls since dense scoring turned
    # on and an all-zero regrowth score (with inactive blocks to score) mean its calls
    # overflowed. An update
    # that falls on either is held for every layer (a budget compares layers) by the
    # policies that decide on scores (agpe: the saliency EMA; rigl, snfs: regrowth); the
    # schedule goes on at the next update. The window's last update is held only where the
    # density target is already reached: otherwise it prunes to the target on the scores
    # it has (of earlier intervals; none if every one overflowed), and says so; a layer
    # whose regrowth scores are all zero regrows nothing then (it would regrow in raster
    # order), and the blocks it would have gained go to the layers that can. gmp, set
    # and static never read the scores: nothing changes for them. Not caught (said in the
    # README): a layer called on fewer than update_interval steps (a conditional branch)
    # whose every call overflowed folds zeros in; a zero-initialised layer under gradient
    # accumulation may be taken for blind when one of its interval's steps overflowed.
    def _blind_layers(self, snap: "_Snapshot") -> List[str]:
        return [n for n in self.layers
                if float(snap.interval_skips[n].reshape(-1)[0]) >= self.config.update_interval
                and not bool(snap.saliency[n].any())]

    def _regrowth_blind_layers(self, snap: "_Snapshot") -> List[str]:
        if not self.policy.needs_dense_grad:
            return []
        return [n for n in self.layers
                if n in snap.update_skips and float(snap.update_skips[n].reshape(-1)[0]) > 0
                and not bool(snap.dense_grad_sq[n].any()) and not bool(snap.masks[n].all())]

    def _holds_when_blind(self, step: int, blind: List[str], regrowth_blind: set) -> bool:
        if self.policy.uses_magnitude and not self.policy.needs_dense_grad:
            return False
        names = ", ".join(blind[:5]) + (f" and {len(blind) - 5} more" if len(blind) > 5 else "")
        prunes = (not self._updates_at(step + self.config.update_interval)
                  and self.target_density != self.config.final_density)
        log.warning(
            "agpe: Sparsifier update at step %d %s: the scores it decides on were not finite for %s (every backward "
            "call of the interval, or of the update step for regrowth, overflowed: fp16 steps that "
            "torch.amp.GradScaler skips?), so %s", step, "not held" if prunes else "held", names,
            "as the last update of the end_step window it prunes to the target on the scores of earlier intervals "
            "(none if every interval so far overflowed)" + (
                " and regrows no block in the layers whose regrowth scores overflowed" if regrowth_blind else "")
            if prunes
            else "there is no new gradient information to prune or regrow by; the masks stay as they are until "
                 "the next update")
        return not prunes

    def _snapshot(self) -> "_Snapshot":
        """Host copies of everything an interval reads, in one transfer (Note [Host-side updates])."""
        names = list(self.layers)
        parts = [(n, key, t) for n in names for key, t in (
            ("masks", self.layers[n].block_mask), ("saliency", self.layers[n].saliency),
            ("dense_grad_sq", self.layers[n].dense_grad_sq), ("counters", self.layers[n].counters))]
        parts += [(n, "scored_from", t) for n, t in self._scored_from.items()]
        parts += [(n, "interval_skips", self.layers[n].counters[1:2].double() - self.seen_counters[n][1])
                  for n in names]
        if self._flag_on:  # skipped calls since dense scoring turned on: the regrowth scores' calls
            parts += [(n, "update_skips", self.layers[n].counters[1:2].double() - self._skips_from[n].double())
                      for n in names if n in self._skips_from]
        if self._loss_sum is not None:
            parts.append((None, "loss", self._loss_sum))
        summed_masks = None
        if self._data_parallel():  # Note [Data-parallel masks]
            parts, summed_masks = self._mean_over_ranks(parts)
        snap = _Snapshot()
        for (name, key, _), host in zip(parts, to_host([t for _, _, t in parts])):
            if key == "loss_over_ranks":
                snap.loss_over_ranks = host
            elif name is None:
                snap.loss = host
            else:
                getattr(snap, key)[name] = host
        if summed_masks is not None:
            distributed.check_same_on_every_rank(
                snap.masks, f"at step {self.step_count}", summed=dict(zip(names, to_host(summed_masks))))
        return snap

    def _data_parallel(self) -> bool:
        return self.config.data_parallel == "auto" and distributed.world_size() > 1

    def _mean_over_ranks(self, parts):
        """Replace the interval's saliency sums, dense-gradient scores and loss by their mean
        over the ranks, in one all-reduce that also sums the masks (for the check)."""
        reduced = [(n, key, t) for n, key, t in parts
                   if key in ("saliency", "dense_grad_sq", "interval_skips", "update_skips")]
        masks = [t for _, key, t in parts if key == "masks"]
        device = masks[0].device if masks else torch.device("cpu")
        loss = torch.zeros(3, dtype=torch.float64, device=device)
        if self._loss_sum is not None:
            loss[0], loss[2] = self._loss_sum.detach().to(device)
        loss[1] = float(self._loss_steps)
        means = distributed.mean_over_ranks([t for _, _, t in reduced] + [m.to(torch.float64) for m in masks] + [loss])
        world = distributed.world_size()
        mean_of = {(n, key): m for (n, key, _), m in zip(reduced, means)}
        out = [(n, key, mean_of.get((n, key), t)) for n, key, t in parts if key != "loss"]
        out.append((None, "loss_over_ranks", means[-1] * world))  # [loss sum, steps, non-finite] over all ranks
        return out, [m * world for m in means[len(reduced):-1]]

    def _update(self, step: int, loss: Optional[float], dense_grad: Dict[str, torch.Tensor],
                masks: Dict[str, torch.Tensor], between_steps: bool = True, no_growth: frozenset = frozenset()):
        """One mask update, decided on the host; returns (schedule event, new host masks).
        The layers in ``no_growth`` regrow no block (Note [Intervals without a finite score])."""
        feedback = Feedback(loss=loss, pruned_saliency=self.pruned_saliency)
        target, self.schedule_state, event = self.policy.target(step, self.schedule_state, feedback)
        moved, self.target_density = target != self.target_density, target
        all_views = self._views(masks, dense_grad)
        frozen = self._frozen_now()  # Note [Frozen layers]
        views = [v for v in all_views if v.name not in frozen]
        if frozen and views:  # the global density stays at the target: the others take the rest of the budget
            held = sum(int(v.mask.sum()) for v in all_views if v.name in frozen)
            total = sum(v.mask.numel() for v in all_views)
            budget = min(max(round(target * total), len(all_views)), total)  # the whole model's, as plan_counts
            # rounds it; the trainable layers' density is then an exact quotient (no second rounding)
            target = min(1.0, max(0.0, (budget - held) / sum(v.mask.numel() for v in views)))
        fraction = self.policy.drop_fraction(step)
        scores = [self.policy.layer_score(v) for v in views]
        current = [int(v.mask.sum()) for v in views]
        redistributes = bool(views) and not any(s is None for s in scores)  # else the split is the distribution's
        remembered = self._remembered_layouts(views) if moved and redistributes else None
        counts = plan_counts(current, [v.state.grid for v in views], [v.state.block_size for v in views],
                             target, moved, self.config.distribution,
                             scores if redistributes else None,
                             fraction, self.config.buckets, self.config.max_layer_density,
                             self.config.min_layer_share, grows=self.policy.grows,
                             no_growth=[v.name in no_growth for v in views], remembered=remembered) if views else []
        dropped_mass = active_mass = 0.0
        dropped = 0
        results = []
        for view, active, count in zip(views, current, counts):
            n_drop, n_grow = swap_counts(active, count, view.mask.numel(), fraction)
            grow_score = self.policy.grow_score(view, self.generator) if n_grow and view.name not in no_growth else None
            if grow_score is None:
                n_grow, grow_score = 0, torch.zeros_like(view.saliency_ema)
                n_drop = max(active - count, 0)
            result = drop_and_grow(view.mask, self.policy.drop_score(view), grow_score, n_drop, n_grow,
                                   protected=self._protected(view.name))
            dropped_mass += float(view.saliency_ema[result.dropped].sum())
            dropped += int(result.dropped.sum())
            active_mass += float(view.saliency_ema[view.mask].sum())
            results.append(result)
        # The adaptive schedule's regret signal at the next update (Note [Adaptive schedule]).
        mean_active = active_mass / max(sum(current), 1)
        self.pruned_saliency = ((dropped_mass / dropped) / mean_active
                                if dropped and mean_active > 0 and self.config.saliency != "movement" else None)
        decided = {v.name: r for v, r in zip(views, results)}
        results = [decided[v.name] if v.name in decided else
                   DropGrow(v.mask.clone(), torch.zeros_like(v.mask), torch.zeros_like(v.mask)) for v in all_views]
        if self._data_parallel():  # Note [Data-parallel masks]
            distributed.check_same_on_every_rank({v.name: r.mask for v, r in zip(all_views, results)},
                                                 f"after the mask update at step {step}")
        self.rebucketed = self._apply_all(list(self.layers.values()), results, between_steps=between_steps)
        if redistributes:  # (a distribution's split is a function of the target: nothing to remember)
            self.layout_sets[self.target_density] = self._layout_set({v.name: r.mask for v, r in zip(all_views, results)})
        # held: every layer inside its remembered bucket (the plan ignores buckets that cannot hold the budget)
        self.recalled_layouts = remembered is not None and all(lo <= n <= hi for (lo, hi), n in zip(remembered, counts))
        return event, {v.name: r.mask for v, r in zip(all_views, results)}

    # Note [Layouts a target had before]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A layer's layout capacity comes from its density bucket, so each combination of the
    # layers' layout buckets is one compiled graph per kind of call (Note [Recompile only at
    # bucket crossings]). While the global target stays put every layer stays in its bucket,
    # but each time the target moves the redistribution may put the layers in a new
    # combination, and AGPE's schedule comes back to a target after each back-off. A run
    # that backs off many times (``max_backoffs`` raised: helper audit BY's 8-layer GPT met 80
    # combinations at 5 targets, 125 graphs in 12,000 steps) kept compiling until the
    # recompile budget stopped it. So the Sparsifier remembers, per global target, each
    # layer's layout bucket after the last update there (``layout_sets``, saved in the
    # checkpoint), and when the target comes back the redistribution keeps each layer in
    # that bucket (``plan_counts(remembered=...)``): budget still moves between layers, inside
    # their buckets, and the return finds the graph compiled at the last visit. Graphs are
    # then bounded by the targets the ladder has, not by the number of back-offs. Where the
    # remembered buckets cannot hold the budget (layers frozen or thawed since, other floors
    # or caps), the plan goes free as before (the audit's ``recalled_layouts`` says which).
    # Only policies that move the budget by score remember (the others split it by the
    # distribution, the same at every visit). Layout buckets, not the configured ones:
    # buckets no path tells apart (Note [Buckets no path tells apart]) constrain nothing, so
    # block sizes under 32 (one layout bucket) plan exactly as without this rule.
    def _layout_set(self, masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Each layer's layout bucket for ``masks`` (host masks, per layer name)."""
        return {name: bucket_for(float(mask.float().mean()),
                                 layout_buckets(self.config.buckets, self.layers[name].block_size))
                for name, mask in masks.items()}

    def _remembered_layouts(self, views: List[LayerView]):
        """Per view, the counts of the layout bucket it had at the last update at the current
        global target; None when the target was not visited yet (or a view was not there)."""
        seen = self.layout_sets.get(self.target_density)
        if seen is None or any(v.name not in seen for v in views):
            return None
        ranges = []
        for view in views:
            own = layout_buckets(self.config.buckets, view.state.block_size)
            ranges.append(bucket_range(bucket_for(seen[view.name], own), view.mask.numel(), own))
        return ranges

    # Note [Frozen layers]
    # ~~~~~~~~~~~~~~~~~~~~
    # A weight with requires_grad=False gets no gradient: no saliency, and a regrown block
    # could never train (it would stay exactly zero while counted as active). Layers frozen
    # when the Sparsifier is created are left out for good; a layer frozen later keeps its
    # mask at every update while it is frozen (the layers that train share what is left of
    # the global block budget, so the global density stays at the target as long as the
    # frozen layers hold no more than it; beyond that the others keep their minimum of one
    # block each and the global density stays above the target) and takes part
    # again once it is unfrozen. Each change is logged, and so is a layer left out at
    # creation that trains later (it stays dense: no Sparsifier drives it).
    def _frozen_now(self) -> set:
        frozen = {name for name, state in self.layers.items()
                  if state.weight is not None and not state.weight.requires_grad}
        if frozen != self._frozen:
            newly, thawed = sorted(frozen - self._frozen), sorted(self._frozen - frozen)
            if newly:
                log.warning("agpe: %s frozen (requires_grad=False): the Sparsifier keeps %s while frozen%s",
                            ", ".join(newly), "its mask" if len(newly) == 1 else "their masks",
                            "; the other layers share the rest of the global block budget" if frozen != set(self.layers)
                            else "; every agpe layer is frozen now, so no mask changes until one trains again")
            if thawed:
                log.warning("agpe: %s again (requires_grad=True): the Sparsifier updates %s again",
                            ", ".join(thawed) + (" trains" if len(thawed) == 1 else " train"),
                            "its mask" if len(thawed) == 1 else "their masks")
            self._frozen = frozen
        return frozen

    def _views(self, masks: Dict[str, torch.Tensor], dense_grad: Dict[str, torch.Tensor]) -> List[LayerView]:
        """What the policy sees of each layer, on the host; the device-side block sums a
        policy asks for (weight magnitude, momentum) come over in one transfer."""
        states = list(self.layers.values())
        needed = []
        if self.policy.uses_magnitude:
            needed += [block_sum(s.weight.detach().abs(), s.block_size) for s in states]
        momenta = [self._momentum(s.weight) for s in states] if self.policy.uses_momentum else []
        missing = [s.name for s, m in zip(states, momenta) if m is None]
        if missing and not self._warned_no_momentum:  # one missing score keeps every layer's share (audit BM)
            self._warned_no_momentum = True
            log.warning("agpe: policy %r moves the layer budget by optimizer momentum, but no optimizer keeps one "
                        "for %s (momentum_buffer or exp_avg; e.g. plain SGD, Rprop): the budget of every layer "
                        "stays where it is", self.config.policy,
                        "the agpe layers" if len(missing) == len(states) else
                        ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        needed += [block_sum(m.abs(), s.block_size) for m, s in zip(momenta, states) if m is not None]
        host = iter(to_host(needed))
        magnitude = [next(host) if self.policy.uses_magnitude else None for _ in states]
        momentum = [next(host) if m is not None else None for m in momenta] or [None] * len(states)
        return [LayerView(s.name, s, masks[s.name], self.saliency.values[s.name], dense_grad[s.name],
                          magnitude=mag, momentum_blocks=mom)
                for s, mag, mom in zip(states, magnitude, momentum)]

    def _apply_all(self, states: List[LayerState], results, between_steps: bool = True,
                   relayout: bool = True) -> List[str]:
        """Write new masks (and their layouts) in one transfer, then update weights, moments
        and the host-side EMA/ages; returns the layers that changed layout bucket."""
        moved, writes = [], []
        if relayout:
            moved, writes = plan_layouts(states, [r.mask for r in results], self.config.buckets, between_steps)
        changed = [torch.empty(s.grid, dtype=torch.bool, device=s.block_mask.device) for s in states]
        to_device([(s.block_mask, r.mask) for s, r in zip(states, results)] + writes
                  + [(c, r.dropped | r.grown) for c, r in zip(changed, results)])
        if relayout:
            mark_layouts_synced(states)
        for state, result, blocks in zip(states, results, changed):
            with torch.no_grad():
                # Re-zeroing every inactive block (not only the dropped ones) keeps the invariant
                # even for weights an optimizer without our reset touched (zero-code mode, no
                # optimizer given); grown blocks restart from zero too, whatever their pruned
                # weights drifted to there (changed & mask = grown).
                keep = state.block_mask & ~blocks
                zero_outside_(state.weight, keep, state.block_size)
                grad = state.weight.grad
                if grad is not None and grad.shape == state.weight.shape:
                    # a gradient still held (step() called before optimizer.step(), or no
                    # zero_grad) would move the dropped blocks at the next step (audit BM)
                    zero_outside_(grad, keep, state.block_size)
            for optimizer in (self.optimizer, *self._other_optimizers):  # a replacement too
                zero_optimizer_state(optimizer, state.weight, blocks, state.block_size)
            self.saliency.mark_fresh(state.name, result.grown)
            age = self.grown_age[state.name]
            self.grown_age[state.name] = torch.where(result.grown, torch.zeros_like(age),
                                                     (age + 1).clamp_(max=AGE_NEVER_GROWN))
        return moved

    def _momentum(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The momentum of ``weight`` in the optimizer that stepped it last: a replacement
        optimizer's, not the stale state of the one the Sparsifier was given."""
        last = None if self._last_optimizer is None else self._last_optimizer()
        for optimizer in (last, self.optimizer, *self._other_optimizers):
            if optimizer is not None and weight in optimizer.state:
                return momentum_of(optimizer, weight)
        return None

    def _protected(self, name: str) -> Optional[torch.Tensor]:
        """Blocks grown too recently to be dropped first (Note [Protecting grown blocks])."""
        if self.config.protect_grown == 0:
            return None
        return self.grown_age[name] < self.config.protect_grown

    # ---- helpers ----------------------------------------------------------------------

    def _apply_initial_layout(self) -> None:
        states = list(self.layers.values())
        host = to_host([s.block_mask for s in states])
        if (all(bool(m.all()) for m in host) and self.config.policy != "dense"
                and getattr(self, "_read_zero_blocks", True)):
            host = self._masks_from_zero_blocks(states, host)
        if not all(bool(m.all()) for m in host):
            # Masks with inactive blocks: a loaded checkpoint, a previous Sparsifier or hand-set
            # masks. Drawing a fresh layout (and rescaling) would destroy the trained weights.
            self._adopted = True
            starts_dense = self.config.start_density >= 1.0 and self.policy.updates_masks
            log.warning(
                "agpe: the layers' masks already have inactive blocks (global density %.3f; a loaded model, an "
                "earlier Sparsifier or hand-set masks): no initial layout is drawn over them and no weight is "
                "rescaled. %s The schedule starts at step 0; to resume a run exactly, load the Sparsifier's "
                "state_dict() too (docs/checkpoint-format.md; zero-code mode keeps no resumable schedule state)",
                _global_density(host),
                f"Policy {self.config.policy!r} starts dense: its first update may regrow blocks toward its "
                f"schedule." if starts_dense and self.policy.grows else
                f"Policy {self.config.policy!r} never regrows: it keeps these masks until its schedule's target "
                f"falls below their density." if starts_dense else
                f"Policy {self.config.policy!r} starts from these masks (target density {self.target_density:.3f}).")
            return
        chosen = [(s, m.cpu()) for s, m in zip(states, initial_masks(states, self.config, self.generator))
                  if m is not None]
        if not chosen:
            return
        results = [DropGrow(mask, ~mask, torch.zeros_like(mask)) for _, mask in chosen]
        self._note_optimizer_state_reset(chosen)
        self._apply_all([s for s, _ in chosen], results, relayout=False)  # _setup re-buckets next
        if self.config.rescale_init:
            with torch.no_grad():
                for state, mask in chosen:
                    state.weight.mul_((mask.numel() / int(mask.sum())) ** 0.5)
            explicit = getattr(self, "model", None) is not None  # zero-code mode makes one Sparsifier per graph
            if explicit or self.config.policy not in _RESCALE_SAID:
                _RESCALE_SAID.add(self.config.policy)
                dense_start = ("leave initial_density unset (policy %r then starts dense and prunes by score)"
                               % self.config.policy if self.config.policy in ("agpe", "gmp")
                               else "use policy 'agpe' or 'gmp', which start dense and prune by score")
                log.warning("agpe: policy %r starts sparse: a random initial layout was drawn (global density %.3f) and "
                            "each layer's surviving weights were scaled by 1/sqrt(its density) (rescale_init=True, which "
                            "keeps the output scale of freshly initialized weights). For pretrained weights pass "
                            "rescale_init=False, or %s",
                            self.config.policy, _global_density([m for _, m in chosen]), dense_start)

    def _note_optimizer_state_reset(self, chosen) -> None:
        """A drawn initial layout resets the optimizer's moments on the blocks it drops. Where
        the optimizer already held state for a layer, remember the drawn mask: if the masks the
        first step() finds have live blocks that layout dropped, a run's masks were loaded
        after an optimizer state_dict was, and those blocks' loaded moments are gone (audit CS:
        the resumed run diverged silently). A model trained dense before the Sparsifier, or a
        resume whose masks are the drawn ones (static), keeps the drawn masks: nothing said."""
        self._drawn_over_optimizer_state = {
            state.name: mask.clone() for state, mask in chosen if not bool(mask.all()) and any(
                optimizer is not None and state.weight in optimizer.state and optimizer.state[state.weight]
                for optimizer in (self.optimizer, *self._other_optimizers))}

    def _check_optimizer_state_survived_the_layout(self) -> None:
        drawn = getattr(self, "_drawn_over_optimizer_state", None)
        if not drawn:
            return
        self._drawn_over_optimizer_state = {}
        names = [name for name in drawn if name in self.layers]
        masks = to_host([self.layers[name].block_mask for name in names])
        lost = {name: int((mask.cpu() & ~drawn[name]).sum()) for name, mask in zip(names, masks)
                if mask.shape == drawn[name].shape}
        lost = {name: count for name, count in lost.items() if count}
        if lost:
            log.warning("agpe: the optimizer already held state for %d layer(s) when this Sparsifier drew their initial "
                        "layout, which reset its moments on the blocks the layout dropped; the masks loaded since have "
                        "%d of those blocks live (%s), so their loaded moments are lost and the run does not continue "
                        "exactly. To resume: create the model, the optimizer and the Sparsifier, then load the three "
                        "state_dicts (docs/checkpoint-format.md)", len(drawn), sum(lost.values()),
                        ", ".join(list(lost)[:4]) + (", ..." if len(lost) > 4 else ""))

    def _masks_from_zero_blocks(self, states: List[LayerState], host: List[torch.Tensor]) -> List[torch.Tensor]:
        """Note [Masks from zero blocks]: a pruned model loaded without its agpe buffers
        (``from_pretrained``, a stripped checkpoint) arrives with full masks and its pruned
        blocks as exact zeros. Drawing a layout over it (and rescaling) would scramble it, so
        the blocks that are all zero start inactive. Only when the whole model looks pruned:
        some layer has both zero and nonzero blocks, and every layer the config's layout
        would make sparse at the final density has zero blocks. A freshly initialized
        weight has no all-zero block; one initialized with structure (``nn.init.eye_``)
        may, and usually the model's other layers have none; a layer initialized to zeros
        (a LoRA B matrix, a zero-init projection) tells nothing and keeps its full mask.
        A model structured in every layer reads as pruned: ``read_zero_blocks=False``."""
        live = to_host([(s.weight.detach() != 0).view(s.grid[0], s.block_size, s.grid[1], s.block_size)
                        .any(3).any(1) for s in states])
        found = {s.name: m for s, m in zip(states, live) if not bool(m.all()) and bool(m.any())}
        if not found:
            return host
        cfg = self.config
        counts = block_counts(layer_densities(cfg.distribution, [s.weight_shape for s in states], cfg.final_density,
                                              cfg.max_layer_density), [s.grid for s in states], cfg.final_density)
        unpruned = [s.name for s, m, count in zip(states, live, counts) if bool(m.all()) and count < m.numel()]
        if unpruned:  # a fresh model with a structured init, not a pruned one
            log.info("agpe: %s ha%s all-zero weight blocks, but %s, which the layout would prune, ha%s none: not "
                     "read as a pruned model", ", ".join(found), "s" if len(found) == 1 else "ve",
                     ", ".join(unpruned[:5]), "s" if len(unpruned) == 1 else "ve")
            return host
        to_device([(s.block_mask, found[s.name]) for s in states if s.name in found])
        log.warning("agpe: %s ha%s weight blocks that are all exactly zero (%s): a pruned model loaded without its "
                    "agpe buffers (from_pretrained, a stripped checkpoint)? Those blocks start inactive (for fresh "
                    "weights whose init leaves blocks at zero, pass read_zero_blocks=False to the Sparsifier)",
                    ", ".join(list(found)[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else ""),
                    "s" if len(found) == 1 else "ve",
                    ", ".join(f"{n}: {int((~m).sum())} of {m.numel()}" for n, m in list(found.items())[:5]))
        return [found.get(s.name, m) for s, m in zip(states, host)]

    def _updates_at(self, step: int) -> bool:
        cfg = self.config
        return (self.policy.updates_masks and bool(self.layers) and step % cfg.update_interval == 0
                and cfg.begin_step < step <= cfg.end_step)

    def _scores_dense_at(self, step: int) -> bool:
        return self.policy.needs_dense_grad and self._updates_at(step)

    def _set_score_dense(self, on: bool, force: bool = False) -> None:
        if on == self._flag_on and not force:
            return
        for name, state in self.layers.items():
            state.score_dense.fill_(on)
            if on:
                self._scored_from[name] = state.counters[0].clone()
                self._skips_from[name] = state.counters[1].clone()
        self._flag_on = on

    def _account(self, scored: bool, counters: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor],
                 scored_from: Dict[str, torch.Tensor]) -> None:
        """FLOPs of the rows seen since the last call, at the current masks (host copies)."""
        for name in self.layers:
            rows_now = int(counters[name][0])
            scored_rows = max(0, rows_now - int(scored_from[name])) if scored and name in scored_from else 0
            self._account_layer(name, rows_now, int(masks[name].sum()), scored_rows)

    def _account_layer(self, name: str, rows_now: int, active: int, scored_rows: int) -> None:
        """FLOPs of one layer's rows since the last accounting point, at ``active`` blocks."""
        if name in self._snapshot_awaits_model_load:
            return  # its live counters are not this run's until the model's load (re-audit BP)
        rows = rows_now - self.seen_counters[name][0]
        if rows < 0:  # the counters were rewound other than by a model load (Note [Counters a model
            rows = rows_now  # load rewrites]: e.g. copied into): count from there, never negative FLOPs
        self.accountant.add(name, rows, active, scored_rows)
        self.seen_counters[name][0] = rows_now

    def _accounted_to_now(self) -> None:
        """The accountant holds every row run so far (FLOP totals put back after a load):
        count on from the layers' counters as they are now."""
        for name, counters in zip(self.layers, to_host([s.counters for s in self.layers.values()])):
            self.seen_counters[name][0] = int(counters[0])
        self._snapshot_awaits_model_load.clear()
        self._counters_before_load.clear()

    def _take_skips(self, name: str, counters: torch.Tensor) -> int:
        now = int(counters[1])
        # (max: the model's counters rewound by a load of its state dict alone, re-audit BJ)
        skipped, self.seen_counters[name][1] = max(0, now - self.seen_counters[name][1]), now
        if skipped:
            log.warning("agpe: %s: %d backward call(s) had non-finite scores; their scores were skipped",
                        name, skipped)
        return skipped

    def _take_dense_grad(self, name: str, state: LayerState, scores: torch.Tensor) -> torch.Tensor:
        state.dense_grad_sq.zero_()
        if not bool(torch.isfinite(scores).all()):
            log.warning("agpe: %s: dense-gradient scores are not finite; regrowth falls back to zeros", name)
            scores = torch.zeros_like(scores)
        return scores

    def _take_loss_over_ranks(self, sum_steps_nonfinite: torch.Tensor) -> Optional[float]:
        total, steps, nonfinite = (float(v) for v in sum_steps_nonfinite)
        self._loss_sum, self._loss_steps = None, 0
        return self._interval_loss(total, int(round(steps)), int(round(nonfinite)), "steps of all ranks") if steps else None

    def _take_loss(self, loss_sum: Optional[torch.Tensor]) -> Optional[float]:
        if loss_sum is None or self._loss_steps == 0:
            return None
        total, nonfinite = (float(v) for v in loss_sum.reshape(2))
        steps, self._loss_sum, self._loss_steps = self._loss_steps, None, 0
        return self._interval_loss(total, steps, int(round(nonfinite)))

    def _interval_loss(self, total: float, steps: int, nonfinite: int, what: str = "steps") -> float:
        """The interval's mean loss over its finite steps; NaN when none was finite (policy
        agpe's schedule then holds unless its deadline prunes: Note [Adaptive schedule])."""
        holds = ("policy 'agpe' holds its target unless its end_step deadline prunes"
                 if self.config.policy == "agpe" else f"policy {self.config.policy!r} does not use the loss")
        if nonfinite >= steps:
            log.warning("agpe: training loss was not finite on any of the last interval's %d %s: not used as feedback "
                        "(%s)", steps, what, holds)
            return float("nan")
        if nonfinite:
            log.warning("agpe: training loss was not finite on %d of the last interval's %d %s; the interval's "
                        "loss is the mean of the other %d", nonfinite, steps, what, steps - nonfinite)
        loss = total / (steps - nonfinite)
        if not math.isfinite(loss):  # finite losses whose sum overflowed
            log.warning("agpe: the mean training loss over the last interval overflowed: not used as feedback (%s)",
                        holds)
            return float("nan")
        return loss

    def _write_record(self, record: dict, before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor],
                      just_grown: Dict[str, torch.Tensor], skips: Dict[str, int], start: float) -> None:
        graphs = self.recompile_counter() if self.recompile_counter else None
        report = self.accountant.report()
        record.update({
            "target_density": self.target_density, "bucket": bucket_for(self.target_density, self.config.buckets),
            "global_density_after": _global_density(after.values()), "flops": {"sparse": report.sparse, "dense": report.dense},
            "recompiles": None if graphs is None else graphs - self._graphs_seen,
            "layers": layer_records(after, before, self.saliency.values, skips, self.config.buckets, just_grown),
            "update_seconds": time.perf_counter() - start,
        })
        self.audit.write(record)
        if graphs is not None:
            self._graphs_seen = graphs


class _Snapshot:
    """Host copies of one interval's inputs, per layer name (see Sparsifier._snapshot)."""

    def __init__(self) -> None:
        self.masks: Dict[str, torch.Tensor] = {}
        self.saliency: Dict[str, torch.Tensor] = {}
        self.dense_grad_sq: Dict[str, torch.Tensor] = {}
        self.counters: Dict[str, torch.Tensor] = {}
        self.scored_from: Dict[str, torch.Tensor] = {}
        # backward calls whose scores were skipped this interval (mean over ranks when data-parallel)
        self.interval_skips: Dict[str, torch.Tensor] = {}
        self.update_skips: Dict[str, torch.Tensor] = {}  # since dense scoring turned on (when on)
        self.loss: Optional[torch.Tensor] = None
        self.loss_over_ranks: Optional[torch.Tensor] = None  # [sum, steps] over all ranks (data-parallel)


def _dead() -> None:
    return None


def _remove_handles(handles) -> None:
    for handle in handles:
        handle.remove()


# Note [A dropped Sparsifier]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A Sparsifier that is garbage-collected without close() (a local of a training function)
# can no longer keep its layers' inactive weights at zero: a weights-only load, or another
# optimizer stepping the layers, leaves them nonzero. So its finalizer does what close()
# does for the layers it still drove: their zero-weight promise ends (graphs compiled under
# it are handed W * M by their call wrapper, Note [A promise outlives its Sparsifier] in
# zero_weights.py, and later graphs mask W), and its optimizer hooks go.
def _dropped(handles, states) -> None:
    for handle in handles:
        handle.remove()
    for state in states:
        if state.sparsifier_ref is not None and state.sparsifier_ref() is None:  # still ours, now dead
            state.sparsifier_ref = None
            state.zero_inactive = False


def _count_optimizer_steps(ref: "weakref.ReferenceType[Sparsifier]"):
    def hook(optimizer) -> None:
        sparsifier = ref()
        if sparsifier is not None:
            sparsifier._last_optimizer = weakref.ref(optimizer)
            if optimizer is not sparsifier.optimizer:
                sparsifier._other_optimizers.add(optimizer)
            if _capturing():  # Note [Optimizer steps a replay runs] (graphs.py): no step runs now
                return
            sparsifier._count_optimizer_step(optimizer is sparsifier.optimizer)

    return hook


_LIVE: "weakref.WeakSet[Sparsifier]" = weakref.WeakSet()


def live_sparsifiers() -> List["Sparsifier"]:
    """The Sparsifiers alive and not closed in this process."""
    return [sp for sp in list(_LIVE) if not getattr(sp, "_closed", False)]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
