"""The Sparsifier's checkpoint format: save, load, and upgrade older format versions.

The format is documented field by field in docs/checkpoint-format.md; keep them in step.
Version 2 added the FLOP totals, the counter snapshots and the partial loss window to
version 1, so a version-1 checkpoint resumes with FLOP accounting restarted from the
model's counters and an empty loss window (logged). Version 3 added the per-block ages
since regrowth (``protect_grown``); an older checkpoint resumes with every block counted as
never grown, so no block is protected at the first update (logged when ``protect_grown`` is
on). Version 4 added the layers' interval buffers (Note [Buffers the model did not load]); an
older checkpoint loads as before. Version 5 added the layout buckets each global
target had (Note [Layouts a target had before] in sparsifier.py); an older checkpoint
resumes remembering only the current target's, those of its masks. Version 6 added the
adaptive schedule's ``ref_loss`` and ``judged`` (Note [Judged against the last prune] in
adaptive_schedule.py); an older checkpoint resumes with no reference, as if no prune had
happened yet. Version 7 (current) added its ``recent_losses``, ``noise_readings`` and
``loss_noise`` (Note [Noise in the loss]); an older checkpoint resumes with no noise estimate,
which the next losses rebuild.

Note [Buffers the model did not load]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The unfinished interval's saliency sums, dense-gradient scores and row counters live in the
model's buffers (``model.state_dict()``). A model loaded BEFORE it was prepared (a fresh
model with ``strict=False``, Hugging Face ``from_pretrained``) drops them as unexpected keys,
so the run resumed from a partial interval and the FLOP report lost rows (counters restarted
at zero under the saved ``seen_counters``). The Sparsifier's state therefore carries a copy,
and loading it writes the copy into every layer whose buffers are behind the checkpoint:
their row counter (cumulative, only ever growing in a run) is below the saved one. That is
the case in exactly the orders where the model's own load has not filled them: before
``model.load_state_dict`` (which then writes the same values), after a load that dropped
them, and after such a load into a model that ran a few steps first (their sums belong to
no run the checkpoint knows). In fact it writes the copy into every layer: a layer at or past the saved counter holds
either the same values (the model's own load put them there) or a later point of some run
(the Sparsifier rolled back to an earlier step, or to the same step after a batch that was
thrown away before ``step()``), which the restored interval must not fold in (helper audits:
the rows of those steps were counted twice when only the weights were loaded; re-audits BN,
BQ: leaving such layers alone made the snapshot describe counters the buffers did not hold,
which every later read, save and model load had to work around).

Load order: either. The Sparsifier re-buckets each layer's layout buffer to the saved masks;
``model.load_state_dict`` resizes layout buffers of another bucket itself (a pre-hook that
``agpe_compile.prepare`` registers). Under data parallelism each rank's own
``rank_state_dict()`` goes LAST, after both (rank_checkpoint.py): the model's state dict
would overwrite its buffers with rank 0's.

Example::

    >>> torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
    ...             "sparsifier": sparsifier.state_dict()}, "ckpt.pt")
    >>> ckpt = torch.load("ckpt.pt")
    >>> sparsifier.load_state_dict(ckpt["sparsifier"]); model.load_state_dict(ckpt["model"])
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
from typing import TYPE_CHECKING, List

import torch

from agpe_compile.buckets import layout_buckets, rebucket

from .adaptive_schedule import AdaptiveState
from .config import AGPEConfig

if TYPE_CHECKING:
    from .sparsifier import Sparsifier

log = logging.getLogger(__name__)

FORMAT_VERSION = 7
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
BUFFER_FIELDS = ("saliency", "dense_grad_sq", "counters")  # Note [Buffers the model did not load]


def save(sp: "Sparsifier") -> dict:
    """The current-version state dict of ``sp`` (tensors are copies, on their own devices)."""
    if sp._snapshot_awaits_model_load:  # (re-audit BQ: their buffers would be saved as the checkpoint's)
        raise RuntimeError(
            f"agpe: the Sparsifier's state cannot be saved between loading a checkpoint without layer buffers "
            f"(format 3) and loading the model's state with its agpe buffers: layers "
            f"{sorted(sp._snapshot_awaits_model_load)[:5]} do not hold that checkpoint's counters and interval "
            f"sums yet. Load the model's state_dict (as model.state_dict() of the prepared model saved it, agpe "
            f"buffers included) first, or call sparsifier.step() to go on from the buffers the model has")
    schedule = sp.schedule_state
    return {
        "format_version": FORMAT_VERSION,
        "config": sp.config.to_dict(),
        "step": sp.step_count,
        "target_density": sp.target_density,
        "masks": {n: s.block_mask.clone() for n, s in sp.layers.items()},
        "saliency_ema": {n: t.clone() for n, t in sp.saliency.values.items()},
        "saliency_fresh": {n: t.clone() for n, t in sp.saliency.fresh.items()},
        "grown_age": {n: t.clone() for n, t in sp.grown_age.items()},
        "pruned_saliency": sp.pruned_saliency,
        "schedule_state": None if schedule is None else dict(dataclasses.asdict(schedule),
                                                             recent_losses=list(schedule.recent_losses),
                                                             noise_readings=list(schedule.noise_readings)),
        "rng_state": sp.generator.get_state(),
        "flops": sp.accountant.state_dict(),
        "seen_counters": {n: list(v) for n, v in sp.seen_counters.items()},
        "loss_window": _loss_window(sp),
        "scored_from": {n: int(t) for n, t in sp._scored_from.items()} if sp._flag_on else None,
        "skips_from": {n: int(t) for n, t in sp._skips_from.items()} if sp._flag_on else None,
        "layer_buffers": {n: {f: getattr(s, f).detach().clone() for f in BUFFER_FIELDS} for n, s in sp.layers.items()},
        "layout_sets": [[target, dict(buckets)] for target, buckets in sorted(sp.layout_sets.items())],
    }


def _loss_window(sp) -> dict:
    """The unfinished interval's losses: the sum of the finite ones, the steps, the others."""
    if sp._loss_sum is None:
        return {"sum": None, "steps": sp._loss_steps, "nonfinite": 0}
    total, nonfinite = (float(v) for v in sp._loss_sum.reshape(2))
    return {"sum": total, "steps": sp._loss_steps, "nonfinite": int(round(nonfinite))}


def _load_loss_window(window: dict):
    steps = int(window["steps"])
    if window["sum"] is None:
        return None, steps
    total, nonfinite = float(window["sum"]), int(window.get("nonfinite", 0))
    if "nonfinite" not in window and not math.isfinite(total):  # saved before "nonfinite": a raw sum met NaN/inf
        total, nonfinite = 0.0, steps
    return torch.tensor([total, float(nonfinite)], dtype=torch.float32), steps


def upgrade(state: dict) -> dict:
    """Bring a state dict of any supported version to the current one."""
    if not isinstance(state, dict):
        raise TypeError(f"agpe: expected a Sparsifier.state_dict() (a dict), got {type(state).__name__}")
    version = state.get("format_version")
    if version is None:  # not a Sparsifier state dict at all: say what it looks like
        keys = sorted(map(str, state))
        inner = [k for k in keys if isinstance(state[k], dict) and "format_version" in state[k]]
        hint = ("; a rank_state_dict() goes to load_rank_state_dict()" if {"rank", "buffers"} <= set(keys) else
                f"; it holds one under {inner[0]!r}: pass checkpoint[{inner[0]!r}]" if inner else
                "; a model's state_dict goes to model.load_state_dict()" if any("." in k for k in keys) else "")
        raise ValueError(f"agpe: expected a Sparsifier.state_dict() (it has a 'format_version'), got a dict with "
                         f"keys {keys[:8]}{' ...' if len(keys) > 8 else ''}{hint}; nothing was loaded")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"agpe: checkpoint format_version got {version!r}; expected one of {SUPPORTED_VERSIONS}")
    if version == 1:
        log.warning("agpe: upgrading a version-1 sparsifier checkpoint: FLOP accounting restarts at the "
                    "model's current counters and the partial loss window is empty")
        state = dict(state, format_version=2, flops=None, seen_counters=None,
                     loss_window={"sum": None, "steps": 0}, scored_from=None)
    if state["format_version"] == 2:
        state = dict(state, format_version=3, grown_age=None)
    if state["format_version"] == 3:
        state = dict(state, format_version=4, layer_buffers=None)
    if state["format_version"] == 4:
        state = dict(state, format_version=5, layout_sets=None)
    if state["format_version"] == 5:  # AdaptiveState's defaults: ref_loss None, judged True
        schedule = state.get("schedule_state")
        if isinstance(schedule, dict):  # f3750f9's best_loss (a run's lowest loss, under format 5) is not a ref
            schedule = {k: v for k, v in schedule.items() if k != "best_loss"}
        state = dict(state, format_version=6, schedule_state=schedule)
    if state["format_version"] == 6:  # AdaptiveState's defaults: no recent losses, no noise estimate
        state = dict(state, format_version=7)
    return state


def _as_tensor(value, key: str):
    """``value`` (a tensor, a list, a numpy array) as a tensor, or the malformed refusal."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"agpe: the sparsifier checkpoint is malformed or incomplete ({key}: {error}); nothing "
                         f"was loaded") from None


def _check_shapes(sp: "Sparsifier", state: dict) -> None:
    """Every per-layer tensor of the checkpoint must have the layer's block-grid shape."""
    for name, layer in sp.layers.items():
        grid = tuple(layer.block_mask.shape)
        for key in ("masks", "saliency_ema", "saliency_fresh", "grown_age"):
            table = state.get(key)
            tensor = table.get(name) if isinstance(table, dict) else None
            if tensor is not None:
                tensor = _as_tensor(tensor, f"{key}[{name!r}]")
                if tuple(tensor.shape) != grid:
                    _wrong_grid(f"{key}[{name!r}]", name, tensor, layer, grid)
        table = state.get("layer_buffers")
        buffers = table.get(name) if isinstance(table, dict) else None  # (_read refuses other kinds)
        for field in ("saliency", "dense_grad_sq"):
            tensor = buffers.get(field) if isinstance(buffers, dict) else None
            if tensor is not None:
                tensor = _as_tensor(tensor, f"layer_buffers[{name!r}][{field!r}]")
                if tuple(tensor.shape) != grid:
                    _wrong_grid(f"layer_buffers[{name!r}][{field!r}]", name, tensor, layer, grid)


def _wrong_grid(key: str, name: str, tensor, layer, grid) -> None:
    raise ValueError(
        f"agpe: checkpoint {key} has block-grid shape {tuple(tensor.shape)}, but layer "
        f"{name!r} (weight {tuple(layer.weight_shape)}, block {layer.block_size}) has {grid}: the "
        f"checkpoint is from a different model or block size; nothing was loaded")


def load(sp: "Sparsifier", state: dict) -> None:
    """Restore ``state`` into ``sp``; masks are copied in place (buffer identity kept).

    Every field is read and checked before anything is written (:func:`_read`): a
    checkpoint that is malformed or incomplete raises and changes nothing."""
    state = upgrade(state)
    for key in ("config", "masks"):  # read before the checks below: a clear refusal, not a KeyError
        if not isinstance(state.get(key), dict):
            raise ValueError(f"agpe: the sparsifier checkpoint is malformed or incomplete ({key}: expected a dict, "
                             f"got {type(state.get(key)).__name__}); nothing was loaded")
    names = set(sp.layers)
    if set(state["masks"]) != names:
        from agpe_compile.state import layer_states

        model = getattr(sp, "model", None)
        frozen = sorted(n for n, s in (layer_states(model) if model is not None else {}).items()
                        if n in set(state["masks"]) - names and s.weight is not None and not s.weight.requires_grad)
        hint = (f"; {frozen} {'is' if len(frozen) == 1 else 'are'} frozen (requires_grad=False), so this "
                f"Sparsifier left {'it' if len(frozen) == 1 else 'them'} out: create the Sparsifier before "
                f"freezing, as in the run that saved it" if frozen else "")
        raise ValueError(f"agpe: checkpoint layers {sorted(state['masks'])} do not match the model's "
                         f"agpe layers {sorted(names)}{hint}; nothing was loaded")
    _check_shapes(sp, state)
    try:
        read = _read(sp, state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        what = f"missing entry {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"agpe: the sparsifier checkpoint is malformed or incomplete ({what}); nothing was "
                         f"loaded") from error
    if read["config_changes"]:
        log.warning("agpe: checkpoint config differs from the Sparsifier's config in %s; using the Sparsifier's",
                    ", ".join(read["config_changes"]))
    sp.step_count = read["step"]
    sp.target_density = read["target_density"]
    with torch.no_grad():
        for name, layer in sp.layers.items():
            layer.block_mask.copy_(read["masks"][name])
    unwritten = _fill_stale_buffers(sp, read["layer_buffers"])
    sp.pruned_saliency = read["pruned_saliency"]
    sp.saliency.load_state_dict({"values": read["saliency_ema"], "fresh": read["saliency_fresh"]})
    from .sparsifier import AGE_NEVER_GROWN  # runtime import: sparsifier.py imports this module

    ages = read["grown_age"]
    if ages is None and sp.config.protect_grown:
        log.warning("agpe: the checkpoint predates format 3 and has no regrowth ages; no block is "
                    "protected from dropping at the next update (protect_grown=%d)", sp.config.protect_grown)
    for name, age in sp.grown_age.items():
        sp.grown_age[name] = torch.full_like(age, AGE_NEVER_GROWN) if ages is None else ages[name]
    if read["refit_schedule"] is not None:
        read["refit_schedule"]()  # the warning of _fit_schedule_state, now that the load goes ahead
    sp.schedule_state = read["schedule_state"]
    sp.generator.set_state(read["rng_state"])
    if read["flops"] is not None:
        sp.accountant.load_state_dict(read["flops"])
    seen = read["seen_counters"]
    sp.seen_counters = {n: list(seen[n]) if seen is not None else [int(v) for v in layer.counters.tolist()]
                        for n, layer in sp.layers.items()}
    sp.rows_at_interval = sum(counts[0] for counts in sp.seen_counters.values())  # rows seen at the save
    # Note [Counters a model load rewrites]: a checkpoint without layer buffers (format 3) leaves
    # the live counters; those behind its snapshot are a model's still to be loaded
    # (a layer still at the counters a model load put back, or the Sparsifier found, holds that
    # model's; one behind the snapshot, or that ran a backward since, none of the checkpoint's:
    # re-audit BR)
    sp._counters_before_load.clear()
    live = {name: int(sp.layers[name].counters[0]) for name in unwritten}
    sp._snapshot_awaits_model_load = {
        name: live[name] for name in unwritten
        if seen is not None and (live[name] != sp._counters_at_model_load.get(name)
                                 or live[name] < sp.seen_counters[name][0])}
    sp._loss_sum, sp._loss_steps = read["loss_window"]
    sp._set_score_dense(sp._scores_dense_at(sp.step_count + 1), force=True)
    sp.layout_sets = (read["layout_sets"] if read["layout_sets"] is not None else  # (format 4 and older)
                      {sp.target_density: sp._layout_set({n: m.cpu() for n, m in read["masks"].items()})})
    if sp._flag_on and read["scored_from"] is not None:
        # Not the live counters: the model's own state dict may be loaded after this one.
        sp._scored_from = {n: torch.tensor(v, dtype=torch.int64, device=sp.layers[n].counters.device)
                           for n, v in read["scored_from"].items()}
        sp._skips_from = {n: torch.tensor(v, dtype=torch.int64, device=sp.layers[n].counters.device)
                          for n, v in read["skips_from"].items()}
    rebucket(list(sp.layers.values()), sp.config.buckets)


def _read(sp: "Sparsifier", state: dict) -> dict:
    """Every field of an upgraded ``state`` as ``load`` writes it, converted to the live
    tensors' devices and dtypes and checked against the layers; raises on anything
    missing or malformed, before ``load`` writes anything."""
    layers = sp.layers

    def per_layer(key, convert):
        table = state[key]
        if not isinstance(table, dict):
            raise TypeError(f"{key}: expected a dict of the layers' values, got {type(table).__name__}")
        missing = [name for name in layers if name not in table]
        if missing:
            raise KeyError(f"{key}[{missing[0]!r}]")
        return {name: convert(name, table[name]) for name in layers}

    def grid_tensor(dtype, live):
        def convert(name, value):
            tensor = torch.as_tensor(value)
            if tuple(tensor.shape) != tuple(layers[name].block_mask.shape):
                raise ValueError(f"{name!r} has shape {tuple(tensor.shape)}, expected the block grid "
                                 f"{tuple(layers[name].block_mask.shape)}")
            return tensor.to(live(name).device, dtype).clone()
        return convert

    read = {"step": int(state["step"]), "target_density": float(state["target_density"])}
    read["masks"] = per_layer("masks", grid_tensor(torch.bool, lambda n: layers[n].block_mask))
    buffers = state["layer_buffers"]
    read["layer_buffers"] = None if buffers is None else per_layer("layer_buffers", lambda name, saved: {
        field: _buffer(name, field, saved[field], getattr(layers[name], field)) for field in BUFFER_FIELDS})
    pruned = state["pruned_saliency"]
    read["pruned_saliency"] = None if pruned is None else float(pruned)
    read["saliency_ema"] = per_layer("saliency_ema", grid_tensor(torch.float32, lambda n: sp.saliency.values[n]))
    read["saliency_fresh"] = per_layer("saliency_fresh", grid_tensor(torch.bool, lambda n: sp.saliency.fresh[n]))
    ages = state["grown_age"]
    read["grown_age"] = None if ages is None else per_layer("grown_age", grid_tensor(torch.int32, lambda n: sp.grown_age[n]))
    saved_config = {**AGPEConfig().to_dict(), **state["config"]}  # fields added later: their defaults
    # where the audit log goes changes nothing the checkpoint restores
    current = {k: v for k, v in sp.config.to_dict().items() if k != "audit_path"}
    saved_config.pop("audit_path", None)
    read["config_changes"] = sorted(k for k, v in current.items() if saved_config.get(k) != v)
    schedule = state["schedule_state"]
    loaded = None if schedule is None else _typed_schedule(AdaptiveState(**schedule))
    read["refit_schedule"] = None
    if saved_config == current:
        if loaded is not None and sp.policy.initial_schedule_state() is not None:
            ladder = sp.policy.schedule().ladder
            if not 0 <= loaded.rung < len(ladder):  # else an IndexError at the next update
                raise ValueError(f"schedule_state['rung'] is {loaded.rung}, outside the schedule's {len(ladder)} "
                                 f"rungs {ladder}")
        read["schedule_state"] = loaded
    else:
        read["schedule_state"], read["refit_schedule"] = _fit_schedule_state(sp, loaded, read["target_density"])
    rng = state["rng_state"]
    torch.Generator(device=sp.generator.device).set_state(rng)  # a state this generator can take
    read["rng_state"] = rng
    flops = state["flops"]
    if flops is not None:
        per_layer("flops", lambda name, v: v)  # every layer's totals present (named if not), then well formed:
        copy.deepcopy(sp.accountant).load_state_dict(flops)
    read["flops"] = flops
    seen = state["seen_counters"]
    read["seen_counters"] = None if seen is None else per_layer("seen_counters", lambda name, v: [int(v[0]), int(v[1])])
    read["loss_window"] = _load_loss_window(state["loss_window"])
    read["layout_sets"] = _layout_sets(state["layout_sets"], layers, _rungs(sp, read["target_density"]),
                                       {n: layout_buckets(sp.config.buckets, s.block_size) for n, s in layers.items()})
    scored = state["scored_from"]
    read["scored_from"] = None if scored is None else per_layer("scored_from", lambda name, v: int(v))
    # a checkpoint written before skips_from existed: skips counted from the last interval
    skips = state.get("skips_from")
    if scored is not None:
        seen_at = read["seen_counters"] or {n: [0, int(layers[n].counters[1])] for n in layers}
        read["skips_from"] = (per_layer("skips_from", lambda name, v: int(v)) if skips else
                              {n: seen_at[n][1] for n in layers})
    return read


def _rungs(sp: "Sparsifier", target_density: float) -> tuple:
    """The target densities this Sparsifier's schedule takes (its ladder; the saved target)."""
    schedule = getattr(sp.policy, "schedule", None)
    ladder = schedule().ladder if callable(schedule) and sp.policy.initial_schedule_state() is not None else ()
    return tuple(ladder) + (target_density,)


def _snap(value: float, exact: tuple) -> float:
    """``value`` as the member of ``exact`` nearest to it, when within 1e-3 (a float32 copy of
    0.05 is 0.0500000007, a float16 one 0.04998779, which the bucket rules would read as
    another bucket and the schedule as no rung at all); else itself. An exact value is its
    own nearest member."""
    near = [e for e in exact if abs(e - value) <= 1e-3]
    return min(near, key=lambda e: abs(e - value)) if near else value


def _layout_sets(saved, layers, rungs: tuple = (), buckets: "dict | None" = None) -> "dict | None":
    """``layout_sets`` as ``[[target, {layer: bucket}], ...]`` -> {target: {layer: bucket}}
    (None stays None: format 4 and older); densities in [0, 1] and known layer names;
    targets and buckets written at another precision are snapped to the schedule's rungs
    and the layers' layout buckets (:func:`_snap`)."""
    if saved is None:
        return None
    if not isinstance(saved, (list, tuple)):
        raise TypeError(f"layout_sets: expected a list of [target, {{layer: bucket}}] pairs, got {type(saved).__name__}")

    def density(value, what):
        value = value.item() if hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == () else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"layout_sets: {what} is {value!r}, expected a density in [0, 1]")
        return float(value)

    sets = {}
    for entry in saved:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
            raise TypeError(f"layout_sets: expected [target, {{layer: bucket}}] pairs, got {entry!r}")
        target = _snap(density(entry[0], "a target"), rungs)
        unknown = sorted(str(n) for n in entry[1] if n not in layers)
        if unknown:
            raise ValueError(f"layout_sets: layer {unknown[0]!r} (target {target}) is not one of this Sparsifier's")
        sets[target] = {name: _snap(density(bucket, f"the bucket of {name!r}"), (buckets or {}).get(name, ()))
                        for name, bucket in entry[1].items()}
    return sets


def _typed_schedule(loaded: AdaptiveState) -> AdaptiveState:
    """``loaded`` with Python values (numpy scalars and 0-d tensors converted), or TypeError
    naming a field of the wrong kind (a str rung failed only at the next update)."""
    def plain(value):
        return value.item() if hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == () else value

    def whole(field):
        value = plain(getattr(loaded, field))
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"schedule_state[{field!r}] is a {type(value).__name__}, expected an int")
        return int(value)

    def number(field):  # the schedule smooths finite losses only, so a saved loss is finite or None
        value = plain(getattr(loaded, field))
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"schedule_state[{field!r}] is a {type(value).__name__}, expected a number or None")
        if value is not None and not math.isfinite(value):
            raise ValueError(f"schedule_state[{field!r}] is {value}, expected a finite number or None")
        return None if value is None else float(value)

    def flag(field):  # a bool, or 0 / 1 (an int that is neither is not a flag: CY LOW-6)
        value = plain(getattr(loaded, field))
        if not isinstance(value, (bool, numbers.Integral)):
            raise TypeError(f"schedule_state[{field!r}] is a {type(value).__name__}, expected a bool")
        if value not in (0, 1):
            raise ValueError(f"schedule_state[{field!r}] is {int(value)}, expected a bool (or 0 / 1)")
        return bool(value)

    if not isinstance(loaded.event, str):
        raise TypeError(f"schedule_state['event'] is a {type(loaded.event).__name__}, expected a str")
    def finite_list(field, most, what):  # Note [Noise in the loss]: a list, a tuple, a 1-D tensor or array
        values = plain(getattr(loaded, field))
        if hasattr(values, "tolist") and len(getattr(values, "shape", ())) == 1:
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) > most:
            raise TypeError(f"schedule_state[{field!r}] is {values!r}, expected a list of at most {most} {what}")
        values = tuple(plain(x) for x in values)
        if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in values):
            raise ValueError(f"schedule_state[{field!r}] is {list(values)}, expected finite numbers")
        return tuple(float(x) for x in values)

    recent = finite_list("recent_losses", 3, "losses")
    readings = finite_list("noise_readings", 2, "readings")
    if any(x < 0 for x in readings):
        raise ValueError(f"schedule_state['noise_readings'] is {list(readings)}, expected numbers >= 0")
    noise = number("loss_noise")
    if noise is not None and noise < 0:
        raise ValueError(f"schedule_state['loss_noise'] is {noise}, expected a number >= 0 or None")
    return dataclasses.replace(loaded, rung=whole("rung"), cooldown_left=whole("cooldown_left"),
                               holds=whole("holds"), backoffs=whole("backoffs"),
                               smoothed_loss=number("smoothed_loss"), ref_loss=number("ref_loss"),
                               backed_off=flag("backed_off"), judged=flag("judged"),
                               recent_losses=recent, noise_readings=readings, loss_noise=noise)


def _buffer(name: str, field: str, saved, live: torch.Tensor, table: str = "layer_buffers") -> torch.Tensor:
    tensor = torch.as_tensor(saved)
    if tuple(tensor.shape) != tuple(live.shape):
        raise ValueError(f"{table}[{name!r}][{field!r}] has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(live.shape)}")
    return tensor.to(live.device, live.dtype)


def _fill_stale_buffers(sp: "Sparsifier", saved) -> List[str]:
    """Note [Buffers the model did not load]: the saved interval buffers go into every layer;
    returns the layers it left (all of them when the checkpoint has none: format 3)."""
    if saved is None:
        return list(sp.layers)
    with torch.no_grad():
        for name, layer in sp.layers.items():
            for field in BUFFER_FIELDS:
                getattr(layer, field).copy_(saved[name][field])
    return []


def _fit_schedule_state(sp: "Sparsifier", loaded, target_density: float):
    """(state, warn) for going on after a checkpoint saved under another config (the
    Sparsifier's config is used): the checkpoint's state when it fits this config's
    schedule, else a state at the rung of this schedule nearest the checkpoint's
    ``target_density`` (another policy, target or bucket ladder); ``warn`` logs that
    (called once the load goes ahead) or is None. A state refitted to another rung keeps the
    checkpoint's smoothed loss, the last prune's ``ref_loss`` / ``judged`` and the noise
    estimate and its first readings (losses of the same run; Notes [Judged against the last
    prune] and [Noise in the loss]), counters and the recent losses start afresh (a move to
    another rung is a change). Policies without
    a schedule state keep none."""
    fresh = sp.policy.initial_schedule_state()
    if fresh is None:
        return None, None
    ladder = sp.policy.schedule().ladder
    if loaded is not None and 0 <= loaded.rung < len(ladder) and ladder[loaded.rung] == target_density:
        return loaded, None
    rung = min(range(len(ladder)), key=lambda i: (abs(ladder[i] - target_density), i))

    def warn():
        log.warning("agpe: the checkpoint's schedule state does not fit this config's schedule (%s); the adaptive "
                    "schedule goes on from density %g (rung %d of %s), the nearest to the checkpoint's target "
                    "density %g", "none saved: another policy" if loaded is None else f"rung {loaded.rung}",
                    ladder[rung], rung, ladder, target_density)

    return dataclasses.replace(fresh, rung=rung, smoothed_loss=None if loaded is None else loaded.smoothed_loss,
                               ref_loss=None if loaded is None else loaded.ref_loss,
                               judged=True if loaded is None else loaded.judged,
                               loss_noise=None if loaded is None else loaded.loss_noise,
                               noise_readings=() if loaded is None else loaded.noise_readings, event="resume"), warn
