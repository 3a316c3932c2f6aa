"""The AGPE training controller: saliency EMAs, schedules, drop/grow, policies, resume, audit.

Explicit mode::

    >>> sparsifier = Sparsifier(model, optimizer, AGPEConfig(target_sparsity=0.9, block_size=8))
    >>> ...; optimizer.step(); sparsifier.step(loss)

Zero-code mode: the backend calls :func:`make_zero_code_controller` (zero_code.py).
"""

from .adaptive_schedule import AdaptiveSchedule, AdaptiveState, Feedback
from .audit import AuditLog, read_records
from .checkpoint import FORMAT_VERSION
from .config import AGPE_CONFIG_VERSION, POLICIES, AGPEConfig
from .drop_grow import DropGrow, drop_and_grow
from .flops import FlopAccountant, FlopReport, LayerFlops, step_flops
from .init_layouts import block_counts, erk_densities, random_block_mask, uniform_densities
from .optimizer_state import zero_optimizer_state
from .policies import AGPE, GMP, SET, SNFS, Dense, Policy, RigL, Static, make_policy
from .redistribute import apportion, redistribute
from .saliency import SaliencyEMA
from .schedules import ConstantSchedule, CosineDropFraction, CubicSchedule
from .sparsifier import Sparsifier
from .zero_code import (AGPE_OPTION_KEYS, ZeroCodeController, config_from_options,
                        make_zero_code_controller, split_options)

__all__ = [
    "AGPE", "AGPEConfig", "AGPE_CONFIG_VERSION", "AGPE_OPTION_KEYS", "AdaptiveSchedule", "AdaptiveState",
    "AuditLog", "ConstantSchedule", "CosineDropFraction", "CubicSchedule", "Dense", "DropGrow",
    "FORMAT_VERSION", "Feedback", "FlopAccountant", "FlopReport", "GMP", "LayerFlops", "POLICIES",
    "Policy", "RigL", "SET", "SNFS", "SaliencyEMA", "Sparsifier", "Static", "ZeroCodeController",
    "apportion", "block_counts", "config_from_options", "drop_and_grow", "erk_densities",
    "make_policy", "make_zero_code_controller", "random_block_mask", "read_records", "redistribute",
    "split_options", "step_flops", "uniform_densities", "zero_optimizer_state",
]
