"""``AGPETrainer``: Hugging Face ``Trainer`` training a model sparse with an agpe ``Sparsifier``.

The Trainer owns the loop, so the Sparsifier is wired into it (each a Note below):

* the model is prepared (agpe buffers) and compiled in place with ``backend="agpe"``
  when the trainer is created (Note [Prepare and compile in place]);
* the Sparsifier is created on the Trainer's own optimizer, as soon as the Trainer has
  made it (``create_optimizer``; accelerate's wrapper is looked through), so before the
  first training forward;
* it is stepped once per optimizer step with that step's loss, summed over the
  gradient-accumulation micro-batches (Note [One Sparsifier step per optimizer step]);
* every ``save_model`` (so every checkpoint folder) gets ``agpe_sparsifier.pt``, and
  ``train(resume_from_checkpoint=...)`` loads it back (Note [Checkpoints]); under several
  data-parallel ranks each rank also saves and loads its own interval state
  (``Sparsifier.rank_state_dict``);
* ``agpe_density`` (the global density) is added to every log;
* settings that would silently train dense, train something else, or do nothing they seem
  to do, are refused with a ``ValueError`` that names the fix (Note [Refused settings]).

Example::

    >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    >>> from agpe_compile.integrations.hf import AGPETrainer
    >>> model = GPT2LMHeadModel(GPT2Config(...))
    >>> agpe_compile.linear_from_conv1d(model)    # GPT-2's Conv1D -> nn.Linear, before the trainer
    >>> trainer = AGPETrainer(model=model, args=TrainingArguments("out", max_steps=1000), train_dataset=ds,
    ...                       agpe_config=agpe_compile.AGPEConfig(target_sparsity=0.9, end_step=750))
    >>> trainer.train()                           # or trainer.train(resume_from_checkpoint=True)
    >>> trainer.sparsifier.global_density         # also logged as agpe_density
    0.1

A Trainer subclass of your own takes the same behaviour by putting this class first:
``class MyAGPETrainer(AGPETrainer, MyTrainer)`` (every override here calls ``super()``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import weakref
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from agpe_compile import distributed
from agpe_compile.backend import AgpeBackend
from agpe_compile.controller import AGPE_OPTION_KEYS, AGPEConfig, Sparsifier
from agpe_compile.conv1d import _is_conv1d
from agpe_compile.state import layer_states, prepare

log = logging.getLogger(__name__)

SPARSIFIER_NAME = "agpe_sparsifier.pt"  # in every checkpoint folder, beside model.safetensors
# each data-parallel rank's own Sparsifier.rank_state_dict() (Note [Ranks' own state])
RANK_STATE_NAME = "agpe_rank_state_{rank}.pt"
# Backend options that come from the AGPEConfig (prepare and the Sparsifier use them too).
_FROM_CONFIG = ("block_size", "include", "exclude", "saliency")

# Note [Prepare and compile in place]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The model is prepared in __init__, before the Trainer can load anything into it or run a
# forward: train(resume_from_checkpoint=...) loads the checkpoint's weights (Trainer.
# _load_from_checkpoint, load_state_dict(strict=False)) BEFORE it creates the optimizer,
# hence before the Sparsifier exists. Into an unprepared model the agpe buffers of the
# checkpoint would be dropped as unexpected keys, and with them the interval's saliency
# sums and the row counters (FLOP accounting): the resumed run would not be the
# uninterrupted one (checked: the counters then differ). Prepared, they
# load (the layout buffers are resized by prepare's load hook), and the Sparsifier then
# starts from the loaded masks. Preparing first also lets an evaluate() before train()
# compile with the layers' hooks (README: prepare before torch.compile).
#
# The model is compiled with nn.Module.compile (in place), not wrapped in torch.compile's
# OptimizedModule: the Trainer keeps the model's own class, so its state_dict and every
# checkpoint have the model's key names (no "_orig_mod." prefix), save_pretrained works as
# usual, and the Trainer's look at the forward signature (which columns to keep, label
# names, loss kwargs) sees the real forward, so remove_unused_columns and label_names need
# no special values. The compiled frame is the model's whole call, hooks included, so
# bucket crossings recompile as under torch.compile(model) (only a layer's OWN
# forward compiled, linear.compile(), loses that; design.md "Known limits").
# accelerate's own compile (TrainingArguments(torch_compile...)) is refused: it accepts
# only its list of backend names ("'AGPE' is not a valid DynamoBackend"), and with another
# backend it wraps the model in a second torch.compile, which only costs a compile (checked:
# the in-place agpe compile still runs, and 4 steps gave bit-identical weights with and
# without accelerate's inductor wrapper) while the setting reads as if it did something.

# Note [One Sparsifier step per optimizer step]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Trainer.training_step returns each micro-batch's loss already scaled for gradient
# accumulation (divided by the micro-batches of the step, or normalised by the step's
# item count num_items_in_batch), i.e. the loss its backward used; the Trainer sums them
# into the logged loss. training_step adds them up here the same way, and the callback's
# on_step_end (after optimizer.step() and the scheduler, once per global_step, the last
# shorter step of an epoch included) hands the sum to sparsifier.step and starts a new
# one. So the Sparsifier's step count is the Trainer's global_step, and the loss it gets
# is the one the Trainer logs for that step (README "Gradient accumulation": the whole
# step's loss, not the last micro-batch's). A step torch.amp's GradScaler skipped counts
# as a step in both. Checkpoints are written after on_step_end, so the saved Sparsifier
# is at the saved global_step.

# Note [Checkpoints]
# ~~~~~~~~~~~~~~~~~~
# The model's agpe buffers (masks, layouts, saliency sums, counters) are persistent
# buffers: the Trainer's model.safetensors holds them, with save_only_model too (checked).
# What is not in the model is the controller (step, schedule, EMAs, RNG, loss window):
# save_model writes sparsifier.state_dict() to agpe_sparsifier.pt in the same folder
# before the Trainer's own save, which _save_checkpoint calls before it pushes to the Hub
# or rotates old checkpoints. On train(resume_from_checkpoint=...) the file must exist (a
# checkpoint of a plain Trainer would restart the schedule at step 0 while the Trainer
# goes on from its step: refused); it is loaded right after the Sparsifier is created,
# whose step must then equal the restored global_step. That Sparsifier is created with
# read_zero_blocks=False: the masks were just loaded with the weights, and a block regrown
# at the update before the save is all zero under a full mask; read as pruned, it would
# only be put back by the load, after a warning about a pruned model (seen with agpe's
# schedule backing off to density 1.0 right before a save). A save_only_model checkpoint
# has no optimizer, scheduler or RNG state: the Trainer resumes from it all the same (with
# a fresh optimizer), and so does this; that is not the uninterrupted run. With
# load_best_model_at_end the Trainer reloads the best checkpoint's model (masks included)
# after training; on_train_end then loads that checkpoint's Sparsifier too, so masks and
# controller agree again.
#
# Note [The best checkpoint's Sparsifier]: its step count and schedule go back to the best
# checkpoint's step with it, but its FLOP report keeps the whole run's count (the report
# is what training cost; an audit saw 1.0x reported for a run that trained at 0.76x). A
# best checkpoint denser than the target (chosen by eval loss before pruning ended) is
# said, as a warning: the README's shipping recipe would ship it.

# Ranks' own state (Note [Ranks' own state] in controller/rank_checkpoint.py): save_model
# runs on every rank, so every rank writes its rank_state_dict() as agpe_rank_state_{rank}.pt
# beside the shared files (as the Trainer does for its RNG states) and loads it on resume
# after them; without it (another number of ranks) a warning says the next update may
# differ from the uninterrupted run's.

# Note [Batch-size retries]
# ~~~~~~~~~~~~~~~~~~~~~~~~~
# auto_find_batch_size reruns the Trainer's inner loop with a smaller batch after an
# out-of-memory error: the Trainer starts again at global step 0 (keeping the weights), but
# the Sparsifier cannot step back, so every later checkpoint would hold a Sparsifier ahead
# of its trainer state. A second on_train_begin within one train() is that retry: it is
# refused with the batch size to set. A retry before the first optimizer step goes on: the
# failed attempt's partial loss, saliency sums and row counts are dropped (the loss at
# every on_train_begin).

# Note [Refused settings]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Each of these would train something other than what the user asked, or pretend to:
# accelerate's torch.compile (torch_compile, torch_compile_backend/mode, or an accelerate
# config's dynamo backend) is a second compile around the agpe one that changes nothing
# (Note [Prepare and compile in place]), or, for backend 'agpe', accelerate's own error; a
# model already compiled was compiled before prepare (full-capacity layouts, or another
# backend); Conv1D layers (GPT-2) are not rewritten and train dense; a given optimizer
# that is not a torch.optim.Optimizer cannot be hooked, and one that lacks the layers'
# weights (made before linear_from_conv1d replaced them) steps stale Parameters, so those
# layers never train; FSDP and DeepSpeed replace or shard the Parameters that carry the
# agpe state; nn.DataParallel (n_gpu > 1) replicates the buffers each step; model_init
# makes a new model per train() that was never prepared.

class AGPETrainer(Trainer):
    """``transformers.Trainer`` that trains ``model`` block-sparse with an agpe Sparsifier.

    Takes every ``Trainer`` argument plus:

    ``agpe_config``: the :class:`agpe_compile.AGPEConfig` of the run (set ``end_step`` from
    the run's ``max_steps``; its default, 10,000 steps, is warned about on shorter runs).
    ``agpe_compile_options``: backend options other than the AGPEConfig's (``inductor``,
    ``mode``), e.g. ``{"inductor": False}`` to lower with aot_eager.

    ``trainer.sparsifier`` is the :class:`agpe_compile.Sparsifier` (``None`` until the
    optimizer exists, i.e. until ``train()`` or ``create_optimizer()``).
    """

    def __init__(self, *args: Any, agpe_config: AGPEConfig, agpe_compile_options: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any):
        if not isinstance(agpe_config, AGPEConfig):
            raise TypeError(f"AGPETrainer: agpe_config must be an agpe_compile.AGPEConfig, got "
                            f"{type(agpe_config).__name__}")
        # positions follow Trainer.__init__ only when the next __init__ in the MRO is Trainer's
        positional = getattr(super().__init__, "__func__", None) is Trainer.__init__
        given = _trainer_arguments(args if positional else (), kwargs)
        _refuse_before_init(given.get("model"), given.get("args"), given.get("model_init"),
                            (given.get("optimizers") or (None, None))[0])
        self.agpe_config = agpe_config
        self.agpe_compile_options = _compile_options(agpe_compile_options, agpe_config)
        self._sparsifier: Optional[Sparsifier] = None
        self._agpe_loss: Optional[torch.Tensor] = None  # this optimizer step's loss so far
        self._agpe_resume_from: Optional[str] = None
        self._agpe_train_begins = 0  # on_train_begin calls in this train() (Note [Batch-size retries])
        self._run_flops: Optional[dict] = None  # Note [The best checkpoint's Sparsifier]
        super().__init__(*args, **kwargs)
        # what the Trainer ended up with (a subclass may take its arguments in another order)
        _refuse_before_init(self.model, self.args, self.model_init, self.optimizer)
        self._refuse_after_init()
        # Note [Prepare and compile in place]
        agpe_config.check_model(self.model, layer_states(self.model))
        prepared = prepare(self.model, options=agpe_config.backend_options)
        if self.optimizer is not None:
            _check_holds_weights(self.optimizer, prepared)
        self.model.compile(backend="agpe", options=self.agpe_compile_options)
        self.add_callback(_AGPECallback(self))

    @property
    def sparsifier(self) -> Optional[Sparsifier]:
        """The run's Sparsifier (created with the optimizer, at the start of ``train()``)."""
        return self._sparsifier

    # ---- the Trainer's hooks ------------------------------------------------------------

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """The Trainer's optimizer, and the Sparsifier on it (once)."""
        optimizer = super().create_optimizer(model)
        inner = _inner_optimizer(optimizer)
        if self._sparsifier is None:
            if not _drivable(inner):
                raise ValueError(_not_drivable(inner, "the Trainer's optimizer (args.optim / create_optimizer)"))
            _check_holds_weights(inner, layer_states(self.model))
            if distributed.world_size() > 1 and self.agpe_config.data_parallel == "off":
                raise ValueError(
                    f"AGPETrainer: AGPEConfig(data_parallel='off') under {distributed.world_size()} data-parallel "
                    f"ranks: each rank would decide its own masks from its own shard, and the replicas would train "
                    f"different models (rank 0's is the one saved). Leave data_parallel at 'auto'")
            self._warn_schedule_past_end()
            quiet = _QuietAdoption() if self._agpe_resume_from else None  # Note [Checkpoints]: loaded next
            if quiet:
                _sparsifier_log.addFilter(quiet)
            try:  # resuming, the masks just loaded are the run's: no zero blocks read as pruned (Note [Checkpoints])
                self._sparsifier = Sparsifier(self.model, inner, self.agpe_config,
                                              read_zero_blocks=self._agpe_resume_from is None)
            finally:
                if quiet:
                    _sparsifier_log.removeFilter(quiet)
        elif self._sparsifier.optimizer is not inner:
            raise RuntimeError("AGPETrainer: the Trainer's optimizer was replaced after the Sparsifier was created on "
                               "the first one; create a new AGPETrainer for a new optimizer")
        if self._agpe_resume_from is not None:
            self._load_sparsifier(self._agpe_resume_from)
            self._agpe_resume_from = None
        return optimizer

    def training_step(self, model: nn.Module, inputs, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's step on one micro-batch; adds its (scaled) loss to the step's sum."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        part = loss.detach()
        self._agpe_loss = part if self._agpe_loss is None else self._agpe_loss + part
        return loss

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if isinstance(path, bool):  # True: the Trainer's last checkpoint (it raises if there is none)
            path = get_last_checkpoint(self.args.output_dir) if path else None
        if path is not None and not os.path.isfile(os.path.join(path, SPARSIFIER_NAME)):
            raise ValueError(
                f"AGPETrainer: checkpoint {path} has no {SPARSIFIER_NAME}, so the Sparsifier's schedule cannot "
                f"resume there (a checkpoint of a plain Trainer, or a folder saved without the Sparsifier). To "
                f"start sparse training from its weights, load the model from it (from_pretrained) and call "
                f"train() without resume_from_checkpoint")
        if path is not None:
            self._check_resume_block_size(path)
        self._agpe_resume_from = path
        self._agpe_train_begins = 0
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._agpe_resume_from = None

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus ``agpe_sparsifier.pt`` beside the model (Note [Checkpoints])
        and, with several data-parallel ranks, each rank's own interval state (Note [Ranks'
        own state]). Nothing of agpe's once the Sparsifier is closed (a model to ship)."""
        folder = output_dir if output_dir is not None else self.args.output_dir
        sparsifier = self._sparsifier
        if sparsifier is not None and not getattr(sparsifier, "_closed", False):
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                torch.save(sparsifier.state_dict(), os.path.join(folder, SPARSIFIER_NAME))
            if distributed.world_size() > 1:
                os.makedirs(folder, exist_ok=True)
                torch.save(sparsifier.rank_state_dict(),
                           os.path.join(folder, RANK_STATE_NAME.format(rank=distributed.rank())))
        super().save_model(output_dir, _internal_call)

    def log(self, logs, *args: Any, **kwargs: Any) -> None:
        if self._sparsifier is None or getattr(self._sparsifier, "_closed", False):
            return super().log(logs, *args, **kwargs)
        # A copy: evaluate() logs its metrics dict and then returns it to the caller, who gets
        # what the Trainer adds to it (the epoch) but not the density.
        logged = {**logs, "agpe_density": self._sparsifier.global_density}
        super().log(logged, *args, **kwargs)
        logs.update((key, value) for key, value in logged.items() if key != "agpe_density")

    # ---- helpers ------------------------------------------------------------------------

    def _step_sparsifier(self) -> None:
        """Note [One Sparsifier step per optimizer step]."""
        if self._sparsifier is None:
            raise RuntimeError("AGPETrainer: an optimizer step ran without a Sparsifier; the optimizer was not made "
                               "by create_optimizer (a subclass that overrides it must call super())")
        loss, self._agpe_loss = self._agpe_loss, None
        self._sparsifier.step(loss)

    def _load_best_model(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's reload of the best checkpoint's model puts its counters back: the
        run's FLOP report is taken first (Note [The best checkpoint's Sparsifier])."""
        sparsifier = self._sparsifier
        if sparsifier is not None and not getattr(sparsifier, "_closed", False):
            sparsifier.flops  # folds the rows of the last steps in
            self._run_flops = copy.deepcopy(sparsifier.accountant.state_dict())
        return super()._load_best_model(*args, **kwargs)

    def _load_sparsifier(self, folder: str, at_global_step: bool = True) -> None:
        saved = torch.load(os.path.join(folder, SPARSIFIER_NAME), map_location="cpu", weights_only=True)
        self._sparsifier.load_state_dict(saved)
        if at_global_step and self._sparsifier.step_count != self.state.global_step:
            raise ValueError(
                f"AGPETrainer: {os.path.join(folder, SPARSIFIER_NAME)} is at step {self._sparsifier.step_count}, "
                f"but the checkpoint's trainer state is at global step {self.state.global_step}: the file belongs to "
                f"another checkpoint, or a second train() of one trainer (which restarts the Trainer's step count "
                f"but not the Sparsifier's) wrote this checkpoint. Resume from a folder AGPETrainer saved as a "
                f"whole during a single train(); to go on from this one's weights, load the model from it and "
                f"train() without resume_from_checkpoint")
        self._load_rank_state(folder)

    def _check_resume_block_size(self, folder: str) -> None:
        """Before the Trainer loads the model: a checkpoint of another block size has masks of
        another grid, and torch's size-mismatch error would not say why."""
        saved = torch.load(os.path.join(folder, SPARSIFIER_NAME), map_location="cpu", weights_only=True)
        block = (saved.get("config") or {}).get("block_size") if isinstance(saved, dict) else None
        if block is not None and block != self.agpe_config.block_size:
            raise ValueError(
                f"AGPETrainer: checkpoint {folder} was trained with AGPEConfig.block_size={block}, this trainer has "
                f"block_size={self.agpe_config.block_size}: its masks have another block grid and cannot resume "
                f"here. Resume with block_size={block}, or start a new run from its weights (load the model from "
                f"the checkpoint and train() without resume_from_checkpoint)")

    def _discard_partial_step(self) -> None:
        """A batch-size retry before the Sparsifier's first step (Note [Batch-size retries]):
        the failed attempt's micro-batches left saliency sums and row counts behind."""
        sparsifier = self._sparsifier
        with torch.no_grad():
            for name, state in sparsifier.layers.items():
                state.saliency.zero_()
                state.dense_grad_sq.zero_()
                state.counters.copy_(torch.tensor(sparsifier.seen_counters[name], dtype=state.counters.dtype))

    def _load_rank_state(self, folder: str) -> None:
        """Note [Ranks' own state]: this rank's interval sums, counters and controller state."""
        ranks = distributed.world_size()
        if ranks == 1:
            if os.path.isfile(os.path.join(folder, RANK_STATE_NAME.format(rank=1))):
                log.warning("agpe: %s was saved by several data-parallel ranks and is resumed by one process: "
                            "it goes on from rank 0's interval sums and counters, so the next mask update can "
                            "differ from the uninterrupted run's", folder)
            return
        path = os.path.join(folder, RANK_STATE_NAME.format(rank=distributed.rank()))
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
        if saved is None or saved.get("world_size") != ranks:
            log.warning("agpe: %s has no state of rank %d of %d (%s): this rank resumes from rank 0's interval "
                        "sums and counters, so the next mask update can differ from the uninterrupted run's "
                        "(a checkpoint saved at an update-interval boundary, where the sums are empty, resumes "
                        "exactly)", folder, distributed.rank(), ranks,
                        "saved by another number of ranks" if saved is not None else "no " + os.path.basename(path))
            return
        self._sparsifier.load_rank_state_dict(saved)

    def _warn_schedule_past_end(self) -> None:
        config, max_steps = self.agpe_config, self.state.max_steps
        if max_steps and config.start_density > config.final_density and config.end_step > max_steps:
            log.warning("agpe: AGPEConfig.end_step=%d is past the run's %d optimizer steps: policy %r prunes "
                        "towards density %.3f until end_step, so this run stops short of it. Set end_step from "
                        "the run's length, e.g. %s", config.end_step, max_steps, config.policy,
                        config.final_density, _schedule_advice(config, max_steps))

    def _refuse_after_init(self) -> None:
        from accelerate.utils import DynamoBackend

        plugin = getattr(self.accelerator.state, "dynamo_plugin", None)
        if plugin is not None and plugin.backend != DynamoBackend.NO:
            raise ValueError(
                f"AGPETrainer: accelerate is configured to torch.compile the model with backend "
                f"{plugin.backend.value.lower()!r} (an accelerate config or ACCELERATE_DYNAMO_BACKEND), a second "
                f"compile around the one AGPETrainer makes (in place, backend='agpe'). Set the dynamo backend to "
                f"'no' (unset ACCELERATE_DYNAMO_BACKEND); backend options go in agpe_compile_options={{...}}")
        sharded = [name for name, on in (("FSDP", getattr(self, "is_fsdp_enabled", False)),
                                         ("DeepSpeed", getattr(self, "is_deepspeed_enabled", False))) if on]
        if sharded:  # set by accelerate's config or ACCELERATE_USE_FSDP/_DEEPSPEED, not only args.fsdp
            raise ValueError(
                f"AGPETrainer: accelerate is configured for {sharded[0]} (an accelerate config or its "
                f"ACCELERATE_USE_* environment variable), which replaces or shards the Parameters that carry the "
                f"agpe state (Note [Sharded weights] in agpe_compile/sharding.py); train with "
                f"DistributedDataParallel (accelerate launch / torchrun without FSDP or DeepSpeed)")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"AGPETrainer: {self.args.n_gpu} GPUs in one process make the Trainer use nn.DataParallel, which "
                f"replicates the agpe buffers at every step. Launch one process per GPU (torchrun / accelerate "
                f"launch: DistributedDataParallel), or make one GPU visible (CUDA_VISIBLE_DEVICES)")


class _AGPECallback(TrainerCallback):
    """Steps the Sparsifier after each optimizer step; after load_best_model_at_end, loads
    the best checkpoint's Sparsifier; says when a second train() does not resume."""

    def __init__(self, trainer: AGPETrainer):
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        trainer._agpe_loss = None  # a step cut short (an out-of-memory retry) leaves part of its loss
        trainer._agpe_train_begins += 1
        sparsifier = trainer._sparsifier
        if trainer._agpe_train_begins > 1 and sparsifier is not None and sparsifier.step_count != state.global_step:
            raise RuntimeError(  # Note [Batch-size retries]
                f"AGPETrainer: auto_find_batch_size restarted training at global step {state.global_step} with "
                f"batch size {getattr(trainer, '_train_batch_size', '?')} after an out-of-memory error, but the "
                f"Sparsifier has already run {sparsifier.step_count} steps and cannot start over with it. Set "
                f"per_device_train_batch_size to that size (auto_find_batch_size=False) and start the run again")
        if trainer._agpe_train_begins > 1 and sparsifier is not None:
            trainer._discard_partial_step()
        if sparsifier is not None and sparsifier.step_count != state.global_step:
            log.warning("agpe: train() starts at global step %d, but the Sparsifier has run %d steps (an earlier "
                        "train() of this trainer): it goes on from there. Pass resume_from_checkpoint to go on from "
                        "a checkpoint instead", state.global_step, sparsifier.step_count)

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer()._step_sparsifier()

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        trainer = self._trainer()
        run_flops, trainer._run_flops = trainer._run_flops, None
        if args.load_best_model_at_end and best and not os.path.isfile(os.path.join(best, SPARSIFIER_NAME)):
            log.warning("agpe: load_best_model_at_end restored the model of %s, which has no %s: the model's masks "
                        "are that checkpoint's, the Sparsifier's state is the run's last", best, SPARSIFIER_NAME)
        elif args.load_best_model_at_end and best and getattr(trainer._sparsifier, "_closed", False):
            log.warning("agpe: load_best_model_at_end restored the model of %s, but the run's Sparsifier was closed: "
                        "its state is not restored (the model's masks are that checkpoint's)", best)
        elif args.load_best_model_at_end and best:
            sparsifier = trainer._sparsifier
            trainer._load_sparsifier(best, at_global_step=False)
            # Note [The best checkpoint's Sparsifier]: the model and the controller are the best
            # checkpoint's; the FLOPs are what this run executed, all of its steps
            if run_flops is not None:
                sparsifier.accountant.load_state_dict(run_flops)
                sparsifier._accounted_to_now()  # the run's totals hold the best model's rows (re-audit BP)
            density, final = sparsifier.global_density, sparsifier.config.final_density
            if density > final + 0.01:
                log.warning(
                    "agpe: load_best_model_at_end restored %s (step %d, %s=%s) with global density %.3f, above "
                    "the target %.3f: the best checkpoint by that metric was saved before pruning reached the "
                    "target (pruning usually costs some eval loss at first). To keep a checkpoint at the target, "
                    "evaluate and save only after end_step=%d, or leave load_best_model_at_end off",
                    best, sparsifier.step_count, args.metric_for_best_model, state.best_metric, density, final,
                    sparsifier.config.end_step)


_sparsifier_log = logging.getLogger("agpe_compile.controller.sparsifier")


class _QuietAdoption(logging.Filter):
    """Drops the Sparsifier's "masks already have inactive blocks ... load the Sparsifier's
    state_dict() too" warning while resuming: the trainer loads it right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("agpe: the layers' masks already have inactive blocks")


def _schedule_advice(config: AGPEConfig, max_steps: int) -> str:
    """``AGPEConfig(end_step=..., ...)`` for a run of ``max_steps``, with the fields it needs
    beside end_step (update_interval, when the default is longer than the run) so that
    AGPEConfig accepts it."""
    begin, end = config.begin_step, max(1, int(0.75 * max_steps))
    fields = {}
    if begin >= end:  # the schedule would not even start within the run
        begin = fields["begin_step"] = 0
    fields["end_step"] = end
    if config.update_interval > (end - begin) // 3:  # room for a few updates, not one jump
        fields["update_interval"] = max(1, (end - begin) // 8)
    text = "AGPEConfig(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
    try:
        dataclasses.replace(config, **fields)
    except (TypeError, ValueError) as error:  # still not a valid config: say why instead of a wrong example
        return f"{text} (with this config's other fields: {error})"
    return text


def _trainer_arguments(args: tuple, kwargs: dict) -> dict:
    """``model``, ``args``, ``model_init`` and ``optimizers`` as given to the trainer: by
    keyword, or positionally in ``Trainer.__init__``'s order (``args`` is empty when a
    subclass's own __init__ comes first: its positions are its own). Only read for the
    checks that must come before the Trainer's own __init__; __init__ checks what the
    Trainer ended up with again."""
    names = list(inspect.signature(Trainer.__init__).parameters)[1:]
    given = dict(zip(names, args))
    given.update((name, kwargs[name]) for name in names if name in kwargs)
    return given


def _refuse_before_init(model, args, model_init, optimizer) -> None:
    """Note [Refused settings]: what can be checked before the Trainer is built (its
    accelerator refuses torch_compile_backend="agpe" with a message about its own list)."""
    if model_init is not None:
        raise ValueError("AGPETrainer: pass the model itself (model=...): model_init builds a new model per "
                         "train() (hyperparameter search), which the trainer could not prepare before it runs")
    if not isinstance(model, nn.Module):
        model = nn.Module()  # nothing (the Trainer will say so) or not known yet: its checks run after __init__
    if isinstance(model, OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise ValueError("AGPETrainer: the model is already compiled (torch.compile / model.compile()), before the "
                         "agpe layers were prepared. Pass the uncompiled model: AGPETrainer compiles it in place with "
                         "backend='agpe' (backend options go in agpe_compile_options={...})")
    conv1d = [name for name, module in model.named_modules() if name and _is_conv1d(module)]
    if conv1d:
        which = (f"{conv1d[0]} is a Hugging Face Conv1D layer" if len(conv1d) == 1 else
                 f"{conv1d[0]} and {len(conv1d) - 1} more are Hugging Face Conv1D layers")
        raise ValueError(f"AGPETrainer: {which} (GPT-2), which agpe does not rewrite, so they would train dense. "
                         f"Call agpe_compile.linear_from_conv1d(model) before creating the optimizer and the trainer")
    if hasattr(args, "torch_compile"):
        if args.torch_compile:  # also set by torch_compile_backend or torch_compile_mode
            raise ValueError(
                f"AGPETrainer: TrainingArguments has torch_compile=True (backend {args.torch_compile_backend!r}, "
                f"mode {args.torch_compile_mode!r}), which makes accelerate compile the model: accelerate does not "
                f"accept backend 'agpe', and another backend only wraps a second compile around the agpe one. Leave "
                f"torch_compile, torch_compile_backend and torch_compile_mode unset: AGPETrainer compiles the model "
                f"in place with backend='agpe' (a mode or inductor=False go in agpe_compile_options={{...}})")
        if args.fsdp or args.deepspeed:
            raise ValueError("AGPETrainer: FSDP and DeepSpeed replace or shard the Parameters that carry the agpe "
                             "state; train with DistributedDataParallel (torchrun, no fsdp/deepspeed argument)")
    if optimizer is not None and not _drivable(_inner_optimizer(optimizer)):
        raise ValueError(_not_drivable(optimizer, "optimizers[0]"))


def _compile_options(options: Optional[Mapping[str, Any]], config: AGPEConfig) -> dict:
    """The backend options: the user's (validated) plus the config's saliency, so a graph
    compiled before the Sparsifier exists (evaluate() first) scores what it will use."""
    options = dict(options or {})
    from_config = sorted(key for key in options if key in _FROM_CONFIG or key in AGPE_OPTION_KEYS)
    if from_config:
        raise ValueError(f"AGPETrainer: agpe_compile_options {from_config} are AGPEConfig fields; set them in "
                         f"agpe_config=AGPEConfig(...), which the backend, prepare and the Sparsifier share")
    options["saliency"] = config.saliency
    AgpeBackend(options)  # raises now, naming the option, instead of at the first forward
    return options


def _inner_optimizer(optimizer):
    """The torch.optim optimizer inside accelerate's AcceleratedOptimizer (what a Trainer
    holds after accelerator.prepare), or the optimizer itself."""
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover - transformers' Trainer requires accelerate
        return optimizer
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _drivable(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks")


def _not_drivable(optimizer, what: str) -> str:
    return (f"AGPETrainer: {what} is a {type(optimizer).__name__}, not a torch.optim.Optimizer the Sparsifier can "
            f"drive (it hooks the optimizer's step() to keep pruned weights at zero and resets the moments of "
            f"changed blocks). Pass the torch.optim optimizer itself (for a wrapper, the optimizer it wraps), or "
            f"leave optimizers=(None, None) and let the Trainer create one (args.optim)")


def _check_holds_weights(optimizer, states) -> None:
    """Every trainable agpe layer's weight must be one the optimizer steps: an optimizer made
    before linear_from_conv1d (or for another copy of the model) holds other Parameters."""
    held = {id(p) for group in _inner_optimizer(optimizer).param_groups for p in group["params"]}
    missing = sorted(name for name, state in states.items()
                     if state.weight is not None and state.weight.requires_grad and id(state.weight) not in held)
    if missing:
        raise ValueError(
            f"AGPETrainer: the optimizer does not hold the weights of agpe layers {missing[:3]}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, so they would not train: it was made "
            f"before agpe_compile.linear_from_conv1d(model) replaced them, or for another model. Create the "
            f"optimizer from model.parameters() after the conversion (or leave optimizers=(None, None))")
