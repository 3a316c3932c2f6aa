"""The mistakes in a training loop that the Sparsifier names: its checks, as a mixin.

Each check reads the Sparsifier's own state and warns (once) or raises; the Sparsifier
calls them from ``step()`` and its updates (sparsifier.py). They live here so that
sparsifier.py reads as the pipeline it runs; their warnings keep the Sparsifier's logger
(``agpe_compile.controller.sparsifier``), so logging filters and tests that select it still
see them. Note [Mistakes the Sparsifier names] below lists what is checked and why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from agpe_compile import sharding
from agpe_compile.state import compiled_dense_reason, sharded_reason, state_of

from .layer_budget import global_density as _global_density

if TYPE_CHECKING:
    from .sparsifier import _Snapshot

log = logging.getLogger("agpe_compile.controller.sparsifier")  # the Sparsifier's (see the module doc)


class MisuseChecks:
    """The Sparsifier's checks of how it is used (a mixin of :class:`Sparsifier`)."""

    def _check_one_call_per_optimizer_step(self) -> None:
        """Warn (once) when step() is called again with no optimizer step in between: each
        call counts one training step. (Counting calls, not optimizer steps, keeps the count
        right when the optimizer is replaced or wrapped; a step skipped by torch.amp's
        GradScaler then counts too, which shifts the schedule by that one step.)"""
        counted = self._optimizer_steps_at_step
        self._optimizer_steps_at_step = self._optimizer_steps
        if (counted is not None and self._optimizer_steps == counted and self._optimizer_steps > 0
                and not self._warned_double_step):
            self._warned_double_step = True
            log.warning("agpe: Sparsifier.step() was called with no optimizer.step() since the previous call; each "
                        "call counts one training step (update_interval, end_step). Call it once per optimizer "
                        "step (under gradient accumulation too); a torch.amp.GradScaler that skipped an "
                        "overflowing step also causes this, and then the skipped step counts as a step")

    # Note [Mistakes the Sparsifier names]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # Three mistakes in a training loop that trained silently wrong or failed in torch's words
    # (helper audit CB, twenty-sixth session), each named once, as a warning, at step():
    # * step() called once per several steps of its optimizer, or never: the schedule counts
    #   step() calls, so masks changed at a fraction of the rate or not at all. Only steps of
    #   the optimizer given count (co-stepping optimizers of other layers would not mean a
    #   missed call); "never" is told from the optimizer hook after max(10, 2 * update_interval)
    #   of its steps; not past end_step (no mask changes then) nor for policies that never
    #   change masks. Explicit mode only (zero-code mode steps from the hook itself). A CUDA
    #   graph replay counts its step (Note [Optimizer steps a replay runs] in graphs.py).
    # * the optimizer given never stepped the layers before the first mask update of this
    #   process (audit CS: the warning above needs one optimizer step to compare with):
    #   said at that update; torch.optim optimizers only (the hook counts their steps).
    # * step() between the forward and loss.backward(): the step before an update switches the
    #   scoring flag in place (and set/gmp's update edits the weight), so the backward failed
    #   with torch's "modified by an inplace operation" at some steps only. Said when a
    #   compiled call's graph still waits for its backward (``LayerState.backward_tokens``)
    #   and either the loss given depends on it (its autograd graph reaches the call's nodes:
    #   the last micro-batch under gradient accumulation, re-audit CE) or no backward reached a
    #   compiled call through its layers since the last step() (``LayerState.backwards_reached``;
    #   a GraphedStep replay counts one). A waiting graph in a loop whose loss was
    #   backpropagated and does not reach it is one no loss uses (an auxiliary output, an
    #   evaluation with grad enabled kept alive; re-audit CC). Nor when the loss's backward
    #   ran up to the waiting call and stopped there (the node taking its output released its
    #   saved tensors): ``loss.backward(inputs=[...])`` of parameters outside the model (audit
    #   CC; seen unless ``retain_graph=True``; audit CK narrowed it from any node of the
    #   loss's graph, which hid real mistakes). A warning, not an error.
    # * a model state_dict of a run (its counters show rows) loaded into a Sparsifier at step
    #   0 whose own state was never loaded: its schedule starts again at step 0 (agpe regrew a
    #   50%-sparse model to density 1.0). The warning comes at the first step(), so every
    #   documented load order (model before or after the Sparsifier's state) passes; not for
    #   policies that never change masks.

    def _check_optimizer_ever_stepped(self) -> None:
        """At an update step: the optimizer given never stepped the layers since the
        Sparsifier was created (audit CS: the masks changed and nothing trained)."""
        end = self.config.end_step
        if (self._optimizer_steps or getattr(self, "_warned_never_stepped", False) or not self._hooks
                or getattr(self, "model", None) is None or not self.policy.updates_masks
                or not isinstance(self.optimizer, torch.optim.Optimizer)
                or (end is not None and self.step_count > end)):
            return
        self._warned_never_stepped = True
        log.warning("agpe: Sparsifier.step() reached a mask update (step %d) and the optimizer given has not stepped "
                    "the layers once since the Sparsifier was created: the masks change while the weights do not "
                    "train. Call optimizer.step() before sparsifier.step(loss) in every training step (a "
                    "torch.amp.GradScaler that skipped every step so far also causes this)", self.step_count)

    def _check_no_missed_optimizer_steps(self) -> None:
        missed = self._own_optimizer_steps - self._own_steps_at_step
        self._own_steps_at_step = self._own_optimizer_steps
        if missed >= 2 and getattr(self, "model", None) is not None:
            self._warn_missed_steps(f"Sparsifier.step() was called once for {missed} optimizer steps")

    def _warn_missed_steps(self, what: str) -> None:
        end = self.config.end_step
        if self._warned_missed_steps or not self.policy.updates_masks or (end is not None and self.step_count >= end):
            return  # (past end_step no mask changes: re-audit CC)
        self._warned_missed_steps = True
        log.warning("agpe: %s: each call counts one training step (update_interval=%d and end_step=%s count "
                    "calls), so the masks change only as often as it is called. Call sparsifier.step(loss) once "
                    "after every optimizer.step() (under gradient accumulation: once per optimizer step)", what,
                    self.config.update_interval, self.config.end_step)

    def _count_optimizer_step(self, own: bool) -> None:
        """One optimizer step of the layers (from the optimizer hook, or a GraphedStep replay);
        ``own``: of the optimizer given."""
        self._optimizer_steps += 1
        if own:
            self._after_own_optimizer_step()

    def _after_own_optimizer_step(self) -> None:
        """step() not called for many steps of its optimizer."""
        self._own_optimizer_steps += 1
        missed = self._own_optimizer_steps - self._own_steps_at_step
        if (missed >= max(10, 2 * self.config.update_interval) and not self._warned_missed_steps
                and getattr(self, "model", None) is not None):
            self._warn_missed_steps(f"{missed} optimizer steps and no Sparsifier.step() since "
                                    f"{'the Sparsifier was created' if self._own_steps_at_step == 0 else 'the last one'}")

    def _backwards_reached(self) -> int:
        """Backwards that reached a compiled call through this Sparsifier's layers (another
        model's backward, a GAN's other network, says nothing about this one: re-audit CD)."""
        return sum(state.backwards_reached for state in self.layers.values())

    def _check_no_backward_pending(self, loss=None) -> None:
        reached = self._backwards_reached()
        in_order, self._backwards_at_step = reached != self._backwards_at_step, reached
        if self._warned_before_backward or getattr(self, "model", None) is None:
            return  # (zero-code mode steps from its own hooks and skips waiting graphs)
        waiting = {name: [t for t in (ref() for ref in state.backward_tokens) if t is not None and not t.reached]
                   for name, state in self.layers.items()}
        waiting = {name: tokens for name, tokens in waiting.items() if tokens}
        if not waiting:
            return
        # The loss given depends on a waiting call: its backward has not run (under gradient
        # accumulation too, where earlier micro-batches' backwards moved the count: re-audit
        # CE). Otherwise a backward reached these layers since the last step(): the loop is in
        # order, and the waiting graph is one no loss uses (an auxiliary output, an evaluation
        # kept alive; re-audit CC).
        ids = frozenset().union(*(t.node_ids for tokens in waiting.values() for t in tokens))
        if not _depends_on(loss, ids) and in_order:
            return
        if _skipped_by_its_backward(loss, ids):  # ``loss.backward(inputs=[...])`` of parameters outside
            return  # the model ran the loss's backward up to the waiting call and not into it (audit CC)
        self._warned_before_backward = True
        log.warning(
            "agpe: Sparsifier.step() was called while a compiled call through layer %s still waits for its "
            "backward. Call it after loss.backward() (and after optimizer.step()): called before the "
            "backward, a step that changes the layers' buffers (the one before each mask update, and the "
            "update itself) makes that backward fail in torch with \"one of the variables needed for "
            "gradient computation has been modified by an inplace operation\". If that call was an "
            "evaluation, run it under torch.no_grad()", next(iter(waiting)))

    def _check_resumed_state(self) -> None:
        loaded = self._model_loaded_without_state
        if loaded is None:
            return
        self._model_loaded_without_state = None
        if not self.policy.updates_masks:  # static / dense: no schedule to restart (re-audit CC)
            return
        name, rows = loaded
        zero_code = getattr(self, "model", None) is None
        log.warning(
            "agpe: a model state_dict from a run (layer %s's counters show %d rows trained; global density %.3f) "
            "was loaded under this Sparsifier, but its own state was not: %s", name, rows, self.global_density,
            "zero-code mode keeps no resumable schedule state, so its schedule starts again at step 0 (agpe may "
            "regrow the loaded masks at its first update). To resume a run, use agpe_compile.Sparsifier and load "
            "its state_dict() too (docs/checkpoint-format.md)" if zero_code else
            "its schedule starts again at step 0 (agpe may regrow the loaded masks at its first update; rigl and "
            "set restart their drop-fraction schedule). To resume the run, also call "
            "sparsifier.load_state_dict(checkpoint['sparsifier']) before the first step (docs/checkpoint-format.md); "
            "to start a new schedule from these weights on purpose, ignore this warning")

    def _check_weights_still_attached(self) -> None:
        """A layer whose weight stopped being its module's parameter (parametrized or replaced
        after the Sparsifier was created) trains with a weight no mask describes."""
        lost = [name for name, state in self.layers.items() if state.module is not None
                and state.module._parameters.get(state.param_name) is not self._weights[name]()]
        if lost:
            model = getattr(self, "model", None)
            if model is not None:  # Note [Sharded weights]: FSDP wrapped the model after the Sparsifier
                sharding.refuse(sharded_reason(model), f"agpe: layers {lost} lost their weights")
            raise RuntimeError(
                f"agpe: layers {lost} no longer have the weight the Sparsifier prepared (a torch.nn.utils."
                f"parametrize parametrization, or the parameter was replaced after the Sparsifier was created: "
                f"model.to('meta') / to_empty(), load_state_dict(..., assign=True), an assignment, or FSDP "
                f"wrapping the model, which agpe does not support: Note [Sharded weights]): their masks "
                f"no longer describe the weights they train with, and its optimizer holds the old ones. Parametrize "
                f"or replace weights before creating the Sparsifier and its optimizer (parametrized layers then "
                f"stay dense); to go on from a checkpoint, load it into the model in place (load_state_dict "
                f"without assign=True)")

    def _check_modules_still_in_model(self) -> None:
        """A layer whose module was swapped out of the model after the Sparsifier was created
        (``resize_token_embeddings`` makes a new head, a user replaces a block) is no longer
        trained: its mask drives nothing, and the new module trains dense, unseen. Checked at
        updates (one walk over the modules)."""
        model = getattr(self, "model", None)  # None: for_layers (zero-code mode)
        if model is None:
            return
        left_out = getattr(self, "_left_out_frozen", {})
        thawed = sorted(n for n, ref in left_out.items() if ref() is not None and ref().requires_grad)
        if thawed:  # Note [Frozen layers] in sparsifier.py: left out at creation, now trained with the mask it had
            described = []
            for name in thawed:
                weight = left_out.pop(name)()
                state = state_of(weight) if weight is not None else None
                mask = getattr(state, "block_mask", None)
                if mask is None or bool(mask.all()):
                    described.append(f"{name} (dense)")
                else:  # a mask set by hand: the compiled model computes W*M with it (audit CO)
                    described.append(f"{name} (density {float(mask.float().mean()):.3f}, its mask as it was)")
            log.warning("agpe: %s, frozen when the Sparsifier was created and left out then, %s now "
                        "(requires_grad=True) with the mask %s had: the Sparsifier never prunes or regrows %s. "
                        "To prune %s, create the Sparsifier after unfreezing (a layer frozen after it is created "
                        "keeps its mask while frozen and is pruned again once unfrozen)", ", ".join(described),
                        "trains" if len(thawed) == 1 else "train", "it" if len(thawed) == 1 else "each",
                        "it" if len(thawed) == 1 else "them", "it" if len(thawed) == 1 else "them")
        present = {id(m) for m in model.modules()}
        gone = [name for name, state in self.layers.items()  # module None: attached once, since freed
                if state.module_ref is not None and (state.module is None or id(state.module) not in present)]
        if gone:
            raise RuntimeError(
                f"agpe: layers {gone} are no longer part of the model: their modules were replaced after the "
                f"Sparsifier was created (e.g. by resize_token_embeddings, or a module swap), so their masks drive "
                f"nothing and the new modules train dense. Change the model's modules before creating the "
                f"Sparsifier (and the optimizer)")

    def _check_target_reached(self, masks) -> None:
        """Warn (once) when the masks cannot get near the global target: layers of very few
        blocks (a layer keeps at least one block, and ERK caps small layers at density 1)."""
        density = _global_density(masks.values())
        blocks = sum(int(m.numel()) for m in masks.values())
        if (masks and not self.policy.grows and density * blocks < round(self.target_density * blocks) - 0.5
                and not self._warned_below_target and not self._adopted):  # (adoption's warning said it)
            # Note [Policies that never grow] in layer_budget.py
            self._warned_below_target = True
            log.warning("agpe: global density %.3f below the target %.3f: policy %r never regrows blocks and the "
                        "layers have fewer active blocks than the target asks (masks loaded or set sparser than its "
                        "schedule); it keeps them and prunes again when the target falls below %.3f. Use policy "
                        "'agpe' or 'rigl' to regrow", density, self.target_density, self.config.policy, density)
        # beyond rounding (a budget is whole blocks), by 0.05 or by half the target, whichever is
        # less (an absolute 0.05 never fired at high sparsity: 0.0039 for a target of 0.001, audit CV)
        excess = (density > min(self.target_density + 0.05, 1.5 * self.target_density)
                  and density * blocks > round(self.target_density * blocks) + 0.5)
        if masks and excess and not self._warned_target and not self._adopted:
            self._warned_target = True
            sizes = ", ".join(f"{n}: {int(m.numel())}" for n, m in masks.items())
            frozen = sorted(self._frozen)
            if frozen:  # Note [Frozen layers] (sparsifier.py): they keep their blocks, the others cannot make up for them
                log.warning("agpe: global density %.3f instead of the target %.3f: frozen layer(s) %s keep their "
                            "masks and hold more blocks than the target leaves for the others",
                            density, self.target_density, ", ".join(frozen))
            else:
                log.warning("agpe: global density %.3f instead of the target %.3f: the layers have too few blocks "
                            "at block_size=%d to prune further (blocks per layer: %s); use a smaller block size",
                            density, self.target_density, next(iter(self.layers.values())).block_size, sizes)

    def _check_loss_given(self, step: int, loss: Optional[float]) -> None:
        """Warn (once) when policy 'agpe' got no loss in a whole interval: without one its
        adaptive schedule cannot react to training and prunes every ``patience + cooldown``
        updates (helper audit CV; zero-code mode, which has no loss, says so in its docs)."""
        final = 1.0 - self.config.target_sparsity
        moving = step < self.config.end_step and self.target_density > final + 1e-9  # else nothing left to adapt
        if (loss is None and moving and self.config.policy == "agpe" and getattr(self, "model", None) is not None
                and not self.__dict__.get("_warned_no_loss", False)):
            self._warned_no_loss = True
            log.warning("agpe: Sparsifier update at step %d: none of the last %d step() calls passed a loss, so policy 'agpe' "
                        "cannot adapt the sparsity to training (it prunes every patience + cooldown = %d updates "
                        "instead, Note [Adaptive schedule]); pass the training loss: sparsifier.step(loss)",
                        step, self.config.update_interval, self.config.patience + self.config.cooldown)

    def _check_backward_reached(self, step: int, rows_now: int, scored: bool) -> None:
        """Warn (once) when an update comes with no backward through the layers since the last
        interval: the scores are all zero, e.g. the uncompiled module was trained. (Layers fed
        ``W * M`` through ``masked_weight`` score without counting rows: hence both.)"""
        rows_before, self.rows_at_interval = self.rows_at_interval, rows_now
        all_frozen = all(s.weight is not None and not s.weight.requires_grad for s in self.layers.values())
        if (rows_now == rows_before and not scored and self.layers and self._updates_at(step)
                and not self._warned_no_backward and not all_frozen):
            self._warned_no_backward = True
            log.warning(
                "agpe: Sparsifier update at step %d: no backward pass reached the agpe layers since the last "
                "interval, so their saliency is zero and masks change without gradient information. Train the "
                "model returned by torch.compile(model, backend='agpe') (not the module itself; model.compile() "
                "of an nn.Sequential root runs its layers eagerly with torch 2.11, and so does a graph break "
                "inside a loop over the layers); with an explicit Sparsifier, call sparsifier.step() after "
                "loss.backward() and optimizer.step()", step)

    def _check_every_layer_reached(self, step: int, snap: "_Snapshot") -> None:
        """Warn (once per layer) when some layers were trained through the compiled model since
        the last interval and others were not (no rows, no saliency): e.g. regional compilation
        (``block.compile()`` for the decoder blocks only) leaves the head eager, and its mask
        would change on zero scores. (All layers missed: ``_check_backward_reached``.)"""
        if not self._updates_at(step):
            return
        missed = [n for n, s in self.layers.items()
                  if int(snap.counters[n][0]) == self.seen_counters[n][0] and not bool(snap.saliency[n].any())
                  and n not in self._frozen and s.weight is not None and s.weight.requires_grad]
        if missed and len(missed) < len(self.layers) and not set(missed) <= self._warned_missed_layers:
            self._warned_missed_layers |= set(missed)
            # a weight fed as W * M to a fused op (masked_weight) never counts rows: only its
            # scores tell, and an exactly zero gradient scores zero too
            never = [n for n in missed if int(snap.counters[n][0]) == 0]
            uncounted = (f" ({', '.join(never[:5])}: no rows counted so far; for a weight handed to a fused op as "
                         f"W * M (masked_weight in explain), whose rows are never counted, an exactly zero gradient "
                         f"looks the same)" if never else "")
            stale = [n for n in missed if compiled_dense_reason(self.layers[n].weight) is not None]
            if stale:  # Note [Weights a graph left dense] in backend.py
                uncounted += (f" ({', '.join(stale[:5])}: a graph compiled before the Sparsifier was created used "
                              f"the weight without rewriting it ({compiled_dense_reason(self.layers[stale[0]].weight)}); "
                              f"call torch._dynamo.reset() so the next compiled call rewrites it)")
            log.warning(
                "agpe: Sparsifier update at step %d: no backward pass through the compiled model reached %s since "
                "the last interval (the other layers were reached), so %s without gradient information. "
                "Outside the compiled region (regional compilation: compile the module that calls %s too, or "
                "exclude %s), run eagerly where Dynamo broke the graph (a hook of yours on the layer that calls "
                ".item() or print, or any register_full_backward_hook; TORCH_LOGS=graph_breaks shows where), or "
                "unused in this phase?%s", step, ", ".join(missed[:5]) +
                (f" and {len(missed) - 5} more" if len(missed) > 5 else ""),
                "its mask changes" if len(missed) == 1 else "their masks change",
                "it" if len(missed) == 1 else "them", "it" if len(missed) == 1 else "them", uncounted)


def _graph_nodes(loss, limit: int = 100_000):
    """The nodes of ``loss``'s autograd graph (at most ``limit``), each once. The walk holds
    every node it met: autograd makes a fresh Python object for a C++ node each time it is
    asked, so a node let go could give its ``id`` to a later one, which a set of ids would
    then skip with its whole subgraph (seen on torch 2.11: a gradient-accumulation loss whose
    last micro-batch hid behind a freed wrapper's id; helper audit CK)."""
    root = getattr(loss, "grad_fn", None) if isinstance(loss, torch.Tensor) else None
    if root is None:
        return
    seen, todo = {id(root): root}, [root]
    while todo and len(seen) <= limit:
        node = todo.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen[id(child)] = child
                todo.append(child)


def _depends_on(loss, node_ids: frozenset, limit: int = 100_000) -> bool:
    """Whether ``loss``'s autograd graph reaches one of the nodes ``node_ids`` (ids of live
    nodes: the compiled calls' own, kept alive by their graphs), walking at most ``limit`` nodes."""
    return bool(node_ids) and any(id(node) in node_ids for node in _graph_nodes(loss, limit))


def _skipped_by_its_backward(loss, node_ids: frozenset, limit: int = 100_000) -> bool:
    """Whether a backward already ran through ``loss``'s graph as far as each waiting call
    (``node_ids``) it takes and no further: every node that takes such a call's output has released
    its saved tensors (autograd frees them as it runs a node, unless ``retain_graph``),
    as ``loss.backward(inputs=[temperature])`` leaves it. Other nodes do not count: a loss
    summed over one backpropagated and one waiting part, or built on a tensor an earlier
    backward freed, still waits (helper audit CK). Reads the saved tensors' packed data,
    never unpacks them (an unpack reruns a non-reentrant activation checkpoint's region);
    False where that cannot be seen (a consumer that saves no tensor, ``retain_graph``)."""
    if not node_ids:
        return False
    reached, pending = set(), set()  # the waiting calls the loss takes; those a consumer not yet run takes
    for node in _graph_nodes(loss, limit):
        waiting = {id(child) for child, _ in node.next_functions if child is not None and id(child) in node_ids}
        if waiting:
            reached |= waiting
            if not _released(node):
                pending |= waiting
    # every consumer of every one (a second loss summed in, over the same output or another
    # call, still waits: re-audit CL)
    return bool(reached) and not pending


def _released(node) -> bool:
    """Whether autograd ran ``node`` and freed what it saved: every saved tensor's packed data
    is gone (``_raw_saved_*``: torch 2.11 and 2.13). False for a node that saves none."""
    saved = []
    try:
        for name in dir(node):
            if name.startswith("_raw_saved_"):
                value = getattr(node, name)
                saved.extend(value if isinstance(value, (list, tuple)) else [value])
        packed = [getattr(item, "data") for item in saved if hasattr(item, "unpack_hook")]
    except (AttributeError, RuntimeError):
        return False
    return bool(packed) and all(data is None for data in packed)
