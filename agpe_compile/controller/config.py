"""AGPEConfig: what the training controller does, as one frozen, validated value.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, the value got and what is accepted. The controller's mutable state (step, masks,
EMAs, schedule state) lives in :class:`~agpe_compile.controller.sparsifier.Sparsifier`,
never here.

Example::

    >>> cfg = AGPEConfig(target_sparsity=0.9, policy="rigl", block_size=8, end_step=5000)
    >>> cfg.final_density
    0.1
    >>> AGPEConfig(target_sparsity=1.0)
    Traceback (most recent call last):
    ValueError: agpe: AGPEConfig.target_sparsity got 1.0; expected a number in [0, 1)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from numbers import Integral, Real
from typing import Any, Mapping, Optional, Tuple

from torch import nn

from agpe_compile.config import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, SALIENCY_MODES
from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.state import layer_name

AGPE_CONFIG_VERSION = 1
POLICIES = ("dense", "static", "set", "rigl", "gmp", "snfs", "agpe")
DISTRIBUTIONS = ("erk", "uniform")
DATA_PARALLEL = ("auto", "off")
MASK_UPDATING_POLICIES = ("set", "rigl", "gmp", "snfs", "agpe")  # the others keep their initial layout
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
FLOAT_FIELDS = ("target_sparsity", "initial_density", "drop_fraction", "saliency_decay", "max_layer_density",
                "min_layer_share", "improve_tol", "backoff_tol", "regret_threshold", "max_density",
                "loss_smoothing", "noise_z")


@dataclasses.dataclass(frozen=True)
class AGPEConfig:
    """Configuration of the prune-and-regrow controller.

    Attributes:
        target_sparsity: fraction of weight blocks pruned at the end, in [0, 1). The budget
            is whole blocks, ``round((1 - target_sparsity) * blocks)``, so the sparsity
            reached can differ from it by up to one block either way (0.9006 for 0.9 over
            352 blocks), and every layer keeps at least one block. Policy ``dense`` ignores it.
        policy: ``dense``, ``static`` (fixed sparse layout), ``set``, ``rigl``, ``gmp``,
            ``snfs`` or ``agpe`` (see policies.py).
        block_size: block side handed to ``agpe_compile.prepare``; ``None`` = the block size
            the layers were prepared with (``prepare`` or a compile before the Sparsifier),
            else the backend default (32). Must divide both dimensions of every included
            linear layer.
        include, exclude: fnmatch patterns on layer names, as in the backend options.
        saliency: the per-block score the backend computes for this Sparsifier's layers
            (``taylor``, ``gradient``, ``magnitude``, ``movement``); the backend's
            ``saliency`` option may be left out, and if given must be the same (the compile
            raises otherwise). AGPE drops the blocks with the lowest EMA of it.
        distribution: how a global density is split over layers: ``erk`` or ``uniform``.
            Policies that move the budget by score (``agpe``, ``snfs`` with momentum) use
            it only for a sparse initial layout; from a dense start it has no effect.
        initial_density: density at step 0; ``None`` = the policy's default (1.0 for
            ``dense``, ``gmp`` and ``agpe``, the final density for the others). ``static``
            never changes its layout, so it takes only the final density.
        update_interval: training steps between mask updates (and audit records).
        begin_step, end_step: masks change only at update steps in (begin_step, end_step];
            GMP's cubic schedule runs over this window; end_step is also RigL's T_end.
        drop_fraction: fraction of active blocks swapped per update by set/rigl/snfs/agpe,
            decayed by a cosine from step 0 (not begin_step, as in RigL) to 0 at end_step.
        saliency_decay: EMA decay of the per-block saliency, per update interval.
        protect_grown: for this many mask updates after a block is grown it cannot be
            dropped (0 = off). A grown block restarts from zero weight, so its first
            interval's saliency is low by construction, not because it is not needed;
            without protection it is the first candidate to be dropped again.
        max_layer_density: cap on any layer's density when budgets are redistributed; at
            least the start density and ``max_density`` (so 1.0 for ``agpe`` and ``gmp``,
            which start dense unless ``initial_density`` says otherwise). Caps
            are whole blocks; where they add up to fewer blocks than the global budget (small
            layers) the layers with the most room are raised a block at a time until it fits,
            so such a layer can end above the cap.
        min_layer_share: floor on any layer's density when budgets are redistributed, as a
            share of the global target density (0.5: no layer below half the target). Floors
            are whole blocks, at least one per layer; where they add up to more than the
            global budget (shares near 1, small layers) the largest are lowered a block at a
            time until they fit, so such a layer can end below the floor. Only the policies
            that redistribute by score (``agpe``, ``snfs`` with momentum) apply it, from
            their first update on (a sparse initial layout is the distribution's split; the
            first update raises a layer below its floor, which may move it to another
            bucket); the others keep the distribution's split and ignore it.
        buckets: density buckets of the kernel layouts; must include 1.0. AGPE's global
            target moves between bucket values, and redistribution keeps every layer inside
            its bucket while that target stays put, so layouts re-bucket (recompile) only at
            the updates where the global target moves (Note [Layer budgets and buckets]).
        improve_tol, backoff_tol, regret_threshold, patience, cooldown, max_backoffs,
        max_density, loss_smoothing, noise_z: the adaptive schedule's feedback rules (Note
            [Adaptive schedule] in adaptive_schedule.py). In short: the smoothed interval
            loss improving by ``improve_tol`` (relative) prunes one rung, so does the
            ``patience``-th consecutive stalled update (``2 * patience`` from a back-off
            until the next prune on improvement), getting worse by ``backoff_tol`` since the
            last update, or ending a prune's cooldown ``backoff_tol`` above where that prune
            started (relative; Note [Judged against the last prune]; on a noisy loss, or
            ``noise_z`` standard deviations of its measured noise if more, 0 to turn that
            off: Note [Noise in the loss]), backs off one rung (at
            most ``max_backoffs`` times; none left: it holds), a loss coming back from a
            prune or a spike stalls rather than improves, and so does an update whose dropped
            blocks (pruned or swapped out) carried at least ``regret_threshold`` of an
            average active block's saliency (not for ``saliency="movement"``; in practice it
            undoes the first prunes of a run: Note [Regret in practice]). ``max_density``
            (``agpe`` only; at least the start density) is a density above a sparse start
            that back-offs may return to (refused below the start density; the other
            policies ignore it). A return to a target the run had before puts each layer
            back in the layout bucket it had there where those buckets can hold the budget
            (Note [Layouts a target had before] in sparsifier.py), so back-offs compile one
            graph per target of the ladder (and kind of call), not one per return: before
            that rule an 8-layer GPT
            with ``max_backoffs=1000`` whose loss spiked every 200 steps had compiled 125
            graphs in 12,000 steps, on course to the recompile budget's error (helper audit
            BY).
        rescale_init: a sparse initial layout multiplies each layer's surviving weights by
            1/sqrt(layer density), so the output variance of the default (fan-in) init is
            kept with the smaller effective fan-in; without it a 90%-sparse 3-layer MLP
            starts with ~30x smaller logits and barely trains at first.
        seed: seeds random layouts and SET's random regrowth.
        audit_path: JSONL file to append one record per update interval to, or ``None``.
            Each record holds every layer (about 0.35-0.5 KB per layer, measured on 2- and
            8-layer models), also after ``end_step``: 1e6 steps at ``update_interval`` 100
            write about 4 MB per layer (``agpe_compile.report`` reads the whole file).
        data_parallel: ``auto`` (default): when ``torch.distributed`` is initialized with
            more than one rank, the ranks are data-parallel replicas of one model (DDP):
            every update averages the scores and loss over the ranks and checks that all
            ranks hold the same masks (Note [Data-parallel masks] in distributed.py).
            ``off``: each rank decides alone, e.g. ranks that train different models or
            hold different layers (pipeline or tensor parallel).
    """

    target_sparsity: float = 0.9
    policy: str = "agpe"
    block_size: Optional[int] = None
    include: Tuple[str, ...] = ("*",)
    exclude: Tuple[str, ...] = ()
    saliency: str = "taylor"
    distribution: str = "erk"
    initial_density: Optional[float] = None
    update_interval: int = 100
    begin_step: int = 0
    end_step: int = 10_000
    drop_fraction: float = 0.3
    saliency_decay: float = 0.5
    protect_grown: int = 0
    max_layer_density: float = 1.0
    min_layer_share: float = 0.0
    buckets: Tuple[float, ...] = DEFAULT_BUCKETS
    improve_tol: float = 0.01
    backoff_tol: float = 0.05
    regret_threshold: float = 0.5
    patience: int = 2
    cooldown: int = 1
    max_backoffs: int = 2
    max_density: Optional[float] = None
    loss_smoothing: float = 0.5
    noise_z: float = 2.0
    rescale_init: bool = True
    seed: int = 0
    audit_path: Optional[str] = None
    data_parallel: str = "auto"
    version: int = AGPE_CONFIG_VERSION

    def __post_init__(self) -> None:
        _number("target_sparsity", self.target_sparsity, 0.0, 1.0, "a number in [0, 1)", hi_open=True)
        _choice("policy", self.policy, POLICIES)
        if self.block_size is not None:
            _integer(self, "block_size", 1, MAX_BLOCK_SIZE)
        for field in ("include", "exclude", "buckets"):  # lists and a lone pattern, as the backend options take
            value = getattr(self, field)
            if isinstance(value, list) or (field != "buckets" and isinstance(value, str)):
                object.__setattr__(self, field, tuple(value) if isinstance(value, list) else (value,))
        _patterns("include", self.include)
        _patterns("exclude", self.exclude)
        _choice("saliency", self.saliency, SALIENCY_MODES)
        _choice("distribution", self.distribution, DISTRIBUTIONS)
        _choice("data_parallel", self.data_parallel, DATA_PARALLEL)
        if self.initial_density is not None:
            _number("initial_density", self.initial_density, 0.0, 1.0, "a number in (0, 1]", lo_open=True)
            if self.initial_density < self.final_density:
                raise ValueError(_bad("initial_density", self.initial_density,
                                      f"a density >= the final density {self.final_density}"))
        _integer(self, "update_interval", 1)
        _integer(self, "begin_step", 0)
        _integer(self, "end_step", 0)
        if self.end_step <= self.begin_step:
            raise ValueError(_bad("end_step", self.end_step, f"a step after begin_step={self.begin_step}"))
        if (self.policy in MASK_UPDATING_POLICIES and self.target_sparsity > 0
                and (self.end_step // self.update_interval) * self.update_interval <= self.begin_step):
            raise ValueError(_bad("end_step", self.end_step, (
                f"a step with at least one mask update after begin_step={self.begin_step} (every "
                f"update_interval={self.update_interval} steps); policy {self.policy!r} changes masks only at "
                f"updates")))
        if self.policy == "static" and self.initial_density is not None and self.initial_density != self.final_density:
            raise ValueError(_bad("initial_density", self.initial_density, (
                f"None or the final density {self.final_density} (1 - target_sparsity): policy 'static' keeps "
                f"its initial layout, so it would never reach the target")))
        _number("drop_fraction", self.drop_fraction, 0.0, 1.0, "a number in [0, 1]")
        _number("saliency_decay", self.saliency_decay, 0.0, 1.0, "a number in [0, 1)", hi_open=True)
        _integer(self, "protect_grown", 0)
        _number("max_layer_density", self.max_layer_density, 0.0, 1.0, "a number in (0, 1]", lo_open=True)
        _number("min_layer_share", self.min_layer_share, 0.0, 1.0, "a number in [0, 1]")
        _buckets(self.buckets)
        _number("improve_tol", self.improve_tol, 0.0, 1.0, "a number in [0, 1]")
        _number("backoff_tol", self.backoff_tol, 0.0, 1.0, "a number in [0, 1]")
        _number("regret_threshold", self.regret_threshold, 0.0, float("inf"), "a number > 0", lo_open=True)
        _integer(self, "patience", 1)
        _integer(self, "cooldown", 0)
        _integer(self, "max_backoffs", 0)
        if self.max_density is not None:
            _number("max_density", self.max_density, 0.0, 1.0, "a number in (0, 1]", lo_open=True)
            if self.max_density < self.final_density:
                raise ValueError(_bad("max_density", self.max_density,
                                      f"a density >= the final density {self.final_density}"))
            if self.policy == "agpe" and self.max_density < self.start_density:  # only a rung above the start
                raise ValueError(_bad("max_density", self.max_density, (
                    f"a density >= the start density {self.start_density} (the highest density back-offs "
                    f"may return to, above a sparse start; set initial_density for a sparser start)")))
        top = max(self.start_density, (self.max_density or 0.0) if self.policy == "agpe" else 0.0)
        if self.max_layer_density < top:
            raise ValueError(_bad("max_layer_density", self.max_layer_density,
                                  f"a density >= the start/max density {top}"))
        _number("loss_smoothing", self.loss_smoothing, 0.0, 1.0, "a number in [0, 1)", hi_open=True)
        _number("noise_z", self.noise_z, 0.0, 10.0, "a number in [0, 10]")
        if not isinstance(self.rescale_init, bool):
            raise ValueError(_bad("rescale_init", self.rescale_init, "True or False"))
        _integer(self, "seed", 0, MAX_SEED)
        if self.audit_path is not None and (not isinstance(self.audit_path, str) or not self.audit_path):
            raise ValueError(_bad("audit_path", self.audit_path, "a non-empty file path string or None"))
        if self.audit_path is not None and (self.audit_path.endswith(("/", os.sep)) or os.path.isdir(self.audit_path)):
            raise ValueError(_bad("audit_path", self.audit_path,
                                  f"a file path, not a directory (e.g. {os.path.join(self.audit_path, 'agpe.jsonl')!r})"))
        if self.version != AGPE_CONFIG_VERSION:
            raise ValueError(_bad("version", self.version, f"{AGPE_CONFIG_VERSION}"))
        object.__setattr__(self, "version", AGPE_CONFIG_VERSION)  # a plain int (np.int64(1) == 1 passes)
        # numpy scalars, Fractions, ... pass the checks as Real numbers; keep plain floats, so
        # the config serializes (audit file, checkpoints) and compares like any other
        for field in FLOAT_FIELDS:
            value = getattr(self, field)
            if value is not None and type(value) is not float:
                object.__setattr__(self, field, float(value))
        object.__setattr__(self, "buckets", tuple(float(b) for b in self.buckets))

    @property
    def final_density(self) -> float:
        """Density the schedules end at: 1 - target_sparsity (1.0 for policy ``dense``)."""
        return 1.0 if self.policy == "dense" else round(1.0 - self.target_sparsity, 12)

    @property
    def start_density(self) -> float:
        """``initial_density``, or the policy's default start."""
        if self.initial_density is not None:
            return 1.0 if self.policy == "dense" else self.initial_density
        return 1.0 if self.policy in ("dense", "gmp", "agpe") else self.final_density

    @property
    def backend_options(self) -> dict:
        """The options ``agpe_compile.prepare`` needs for this config."""
        options: dict = {"include": list(self.include), "exclude": list(self.exclude)}
        if self.block_size is not None:
            options["block_size"] = self.block_size
        return options

    def check_model(self, model: Any, prepared: Mapping[str, Any]) -> None:
        """Raise if a linear layer this config includes was not prepared because the block
        size does not divide it (``prepared``: the names ``agpe_compile.prepare`` returned)."""
        from agpe_compile.state import _unwrapped  # names as prepare() gives them

        size = self.block_size or DEFAULT_BLOCK_SIZE
        misfits, layers, attention, already = [], [], [], 0
        for module_name, module in _unwrapped(model).named_modules():
            name = layer_name(module_name, "weight")
            if not isinstance(module, nn.Linear):
                continue
            included = any(fnmatch.fnmatchcase(name, p) for p in self.include)
            excluded = any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
            if not included or excluded:
                continue
            if name in prepared:  # prepared earlier (a resume's prepare + load): its block size is set
                already += 1
                continue
            if nn.utils.parametrize.is_parametrized(module, "weight"):
                continue  # stays dense (prepare said so); reading it would run the parametrization
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"agpe: layer {name!r} is a lazy module whose weight is not materialized yet; run "
                                 f"one forward pass before creating the Sparsifier (or exclude={name!r})")
            n, k = module.weight.shape
            layers.append((name, n, k))
            if n % size or k % size:
                misfits.append((name, n, k))
        for module_name, module in _unwrapped(model).named_modules():  # MHA projections count for the hint
            if isinstance(module, nn.MultiheadAttention):
                for param_name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    if nn.utils.parametrize.is_parametrized(module, param_name):
                        continue
                    weight = getattr(module, param_name, None)
                    pname = layer_name(module_name, param_name)
                    if (weight is not None and weight.dim() == 2
                            and any(fnmatch.fnmatchcase(pname, p) for p in self.include)
                            and not any(fnmatch.fnmatchcase(pname, p) for p in self.exclude)):
                        attention.append((pname, *weight.shape))
        if misfits:
            raise ValueError(_bad("block_size", size, _misfit_hint(size, self.exclude, layers, misfits, attention,
                                                                   already)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AGPEConfig":
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        values = dict(values)
        for key in ("include", "exclude", "buckets"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def _bad(field: str, value: Any, accepted: str) -> str:
    return f"agpe: AGPEConfig.{field} got {value!r}; expected {accepted}"


def _number(field, value, lo, hi, accepted, lo_open=False, hi_open=False) -> None:
    too_low = too_high = True
    if not isinstance(value, bool) and isinstance(value, Real) and value == value:
        too_low = value <= lo if lo_open else value < lo
        too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        raise ValueError(_bad(field, value, accepted))


def _integer(config, field, lo, hi=None) -> None:
    """Check the integer field ``field`` of ``config`` and store it as a plain int: any
    ``numbers.Integral`` but bool passes (numpy integers too, as the float fields take numpy
    floats), so the config serializes and compares like any other."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < lo or (hi is not None and value > hi):
        upper = f", <= {hi}" if hi is not None else ""
        raise ValueError(_bad(field, value, f"an int >= {lo}{upper}"))
    object.__setattr__(config, field, int(value))


def _choice(field, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(_bad(field, value, f"one of {accepted}"))


def _patterns(field, value) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(_bad(field, value, "a list or tuple of non-empty fnmatch pattern strings"))


def _buckets(value) -> None:
    ok = isinstance(value, tuple) and value and all(
        isinstance(b, Real) and not isinstance(b, bool) and 0.0 < b <= 1.0 for b in value)
    if not ok or 1.0 not in value:
        raise ValueError(_bad("buckets", value, "a list or tuple of densities in (0, 1] that includes 1.0"))


_BLOCK_SIZES_SUGGESTED = (128, 64, 32, 16, 8)


def _misfit_hint(size, exclude, layers, misfits, attention, already) -> str:
    """What block_size's error suggests for included layers ``size`` does not divide: the
    exclude=[...] that keeps them dense; a block size that divides every included weight; or,
    where none does, the largest one that divides every weight some block size fits, with the
    other layers excluded (audit CS: for a 784-input layer and a 10-class head at block 32 the
    first alone left nothing to prune, while block 16 without the head keeps the first layer).
    ``attention``: the included attention projections (name, n, k), prunable where the block
    size divides them; ``already``: included linear layers prepared before, at their block
    size, which no other block size can change (re-audit CT)."""
    shapes = ", ".join(f"{name!r} is {n}x{k}" for name, n, k in misfits)
    fitting_attention = sum(1 for _, n, k in attention if n % size == 0 and k % size == 0)
    left = len(layers) - len(misfits) + already + fitting_attention
    hint = (f"keep {'it' if len(misfits) == 1 else 'them'} dense with "
            f"exclude={[*exclude, *(name for name, _, _ in misfits)]!r}"
            f"{'' if left else ', which leaves no layer to prune'}")
    weights = [*layers, *attention]
    what = "a common divisor of the dimensions of every included layer"
    if already:
        return f"{what}; {shapes} ({hint}; {already} included layer(s) were prepared before at their block size)"
    fits = [b for b in _BLOCK_SIZES_SUGGESTED if math.gcd(*(d for _, n, k in weights for d in (n, k))) % b == 0]
    if fits:
        return f"{what}; {shapes} ({hint}, or block_size={fits[0]}, which divides every included layer)"
    unfit = [name for name, n, k in layers if math.gcd(n, k) % _BLOCK_SIZES_SUGGESTED[-1]]
    kept = [(n, k) for name, n, k in weights if name not in unfit]
    rest = [d for pair in kept for d in pair]
    fits = [b for b in _BLOCK_SIZES_SUGGESTED if rest and math.gcd(*rest) % b == 0]
    if fits and len(kept) > left:
        hint += (f"; or block_size={fits[0]} with exclude={[*exclude, *unfit]!r}, which keeps {len(kept)} of "
                 f"{len(weights)} included {'weights' if attention else 'layers'} prunable")
    return f"{what}; {shapes} ({hint})"
