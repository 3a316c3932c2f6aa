"""Pruning algorithms as small dataclasses that override one or two hooks (jaxpruner style).

The hooks a policy answers at each mask update (the Sparsifier does the rest, the same
way for every policy, so comparisons are apples to apples):

=====================  ==============================================  ==================
hook                   question                                        default
=====================  ==============================================  ==================
``target``             global density at this update (and new state)  final density
``drop_fraction``      fraction of active blocks swapped               0 (no swaps)
``drop_score``         which active blocks go first (lowest)           block L1 magnitude
``grow_score``         which inactive blocks come first (highest)      none (never grows)
``layer_score``        a layer's claim on the budget (redistribution)  None (no moving)
=====================  ==============================================  ==================

==========  ======================================================================
``dense``   all blocks, never updates
``static``  fixed sparse layout (uniform/ERK), never updates
``set``     + swaps a cosine-decaying fraction, regrows at random (Mocanu et al.)
``rigl``    SET, regrowing by dense-gradient norm (Evci et al.)
``snfs``    RigL + budget moved across layers by mean momentum (Dettmers & Zettlemoyer),
            each layer kept within its density bucket, since the global target never
            moves (Note [Layer budgets and buckets])
``gmp``     prunes by magnitude on the cubic schedule, never regrows (Zhu & Gupta)
``agpe``    drops by saliency EMA, regrows by dense gradient, moves the budget by
            saliency share, global target from the adaptive schedule
==========  ======================================================================

Example::

    >>> policy = make_policy(AGPEConfig(policy="rigl"))
    >>> type(policy).__name__, policy.needs_dense_grad
    ('RigL', True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch

from agpe_compile.state import LayerState

from .adaptive_schedule import AdaptiveSchedule, Feedback
from .config import AGPEConfig
from .schedules import CosineDropFraction, CubicSchedule


@dataclasses.dataclass(frozen=True)
class LayerView:
    """What a policy sees of one layer at an update: host tensors of the [R, C] grid
    (Note [Host-side updates] in host_sync.py); ``state`` for shapes and names only.

    ``magnitude`` (block L1 norm of the weight) is filled when the policy sets
    ``uses_magnitude``, ``momentum_blocks`` (block L1 norm of SGD momentum / Adam's
    ``exp_avg``) when it sets ``uses_momentum`` and the optimizer has one.
    """

    name: str
    state: LayerState
    mask: torch.Tensor
    saliency_ema: torch.Tensor
    dense_grad_sq: torch.Tensor
    magnitude: Optional[torch.Tensor] = None
    momentum_blocks: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Static sparse training: the base every other policy overrides."""

    config: AGPEConfig
    needs_dense_grad = False
    updates_masks = False
    grows = False  # grow_score returns a score (else layers never gain blocks: Note [Policies that never grow])
    uses_magnitude = True  # the default drop score
    uses_momentum = False

    def initial_schedule_state(self) -> Any:
        return None

    def target(self, step: int, schedule_state: Any, feedback: Feedback) -> Tuple[float, Any, str]:
        return self.config.final_density, schedule_state, "constant"

    def drop_fraction(self, step: int) -> float:
        return 0.0

    def drop_score(self, layer: LayerView) -> torch.Tensor:
        if layer.magnitude is None:
            raise RuntimeError(f"agpe: policy {type(self).__name__} drops by weight magnitude but the view of "
                               f"{layer.name!r} has none (uses_magnitude must be set)")
        return layer.magnitude

    def grow_score(self, layer: LayerView, generator: torch.Generator) -> Optional[torch.Tensor]:
        return None

    def layer_score(self, layer: LayerView) -> Optional[float]:
        return None


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    def target(self, step, schedule_state, feedback):
        return 1.0, schedule_state, "dense"


@dataclasses.dataclass(frozen=True)
class Static(Policy):
    pass


@dataclasses.dataclass(frozen=True)
class SET(Policy):
    updates_masks = True
    grows = True

    def drop_fraction(self, step: int) -> float:
        return CosineDropFraction(self.config.drop_fraction, self.config.end_step).fraction_at(step)

    def grow_score(self, layer, generator):
        return torch.rand(layer.mask.shape, generator=generator)


@dataclasses.dataclass(frozen=True)
class RigL(SET):
    needs_dense_grad = True

    def grow_score(self, layer, generator):
        return layer.dense_grad_sq


@dataclasses.dataclass(frozen=True)
class SNFS(RigL):
    """Our SNFS regrows by dense gradient (masked gradients leave inactive momentum at 0);
    with no momentum in the optimizer (plain SGD) it does not move the budget."""

    uses_momentum = True

    def layer_score(self, layer):
        if layer.momentum_blocks is None:
            return None
        return _active_mean(layer.momentum_blocks, layer.mask)


@dataclasses.dataclass(frozen=True)
class GMP(Policy):
    updates_masks = True

    def target(self, step, schedule_state, feedback):
        cfg = self.config
        if step + cfg.update_interval > cfg.end_step:  # the last update of the window: the final density
            return cfg.final_density, schedule_state, "cubic"
        schedule = CubicSchedule(cfg.start_density, cfg.final_density, cfg.begin_step, cfg.end_step)
        return schedule.density_at(step), schedule_state, "cubic"


@dataclasses.dataclass(frozen=True)
class AGPE(RigL):
    def schedule(self) -> AdaptiveSchedule:
        cfg = self.config
        return AdaptiveSchedule(
            initial_density=cfg.start_density, final_density=cfg.final_density, end_step=cfg.end_step,
            update_interval=cfg.update_interval, max_density=cfg.max_density, buckets=cfg.buckets,
            improve_tol=cfg.improve_tol, backoff_tol=cfg.backoff_tol, regret_threshold=cfg.regret_threshold,
            patience=cfg.patience, cooldown=cfg.cooldown, max_backoffs=cfg.max_backoffs,
            loss_smoothing=cfg.loss_smoothing, noise_z=cfg.noise_z,
        )

    def initial_schedule_state(self):
        return self.schedule().initial_state()

    def target(self, step, schedule_state, feedback):
        schedule = self.schedule()
        new_state = schedule.next_state(schedule_state, step, feedback)
        return schedule.density(new_state), new_state, new_state.event

    uses_magnitude = False  # drops by the saliency EMA

    def drop_score(self, layer):
        return layer.saliency_ema

    def layer_score(self, layer):
        return _active_mean(layer.saliency_ema, layer.mask)


POLICY_CLASSES = {"dense": Dense, "static": Static, "set": SET, "rigl": RigL, "snfs": SNFS, "gmp": GMP, "agpe": AGPE}


def make_policy(config: AGPEConfig) -> Policy:
    """The policy object named by ``config.policy``."""
    return POLICY_CLASSES[config.policy](config)


def _active_mean(scores: torch.Tensor, mask: torch.Tensor) -> float:
    active = scores[mask]
    return float(active.mean()) if active.numel() else 0.0
