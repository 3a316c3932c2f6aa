"""A model state dict loaded under a live Sparsifier: its FLOP and skip counts stay exact.

Note [Counters a model load rewrites]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each layer's ``weight_saliency_counters`` buffer holds [rows seen by backward, backward calls
whose scores were skipped], cumulative over the run; the Sparsifier counts FLOPs and skipped
calls as the difference to its own snapshot of them (``seen_counters``, taken at every
interval and every read of ``sparsifier.flops``). ``model.load_state_dict`` on its own (a
rollback to earlier weights, or weights of another run, under the same Sparsifier) rewrites
the buffer, and the differences then measured nothing that ran: the rows since the last
snapshot were lost or counted from zero, a later counter counted rows no step ran, and
skipped calls before the load went unreported (helper re-audits BI, BJ, BK).

So the Sparsifier hooks the load of every module that holds its layers. Before the module
loads a counters buffer (its key in the state dict), the rows run since the snapshot are
counted at the masks they ran under (an accounting point, as a read of ``flops`` is), with
the scored rows when dense scoring is on; after the load the snapshot moves to the loaded
counters, and every other count kept as a difference to the counters (skipped calls since
the interval and since dense scoring began, rows since the interval for the "no backward"
check) moves with them by the same amount, so those counts go on as if no load happened.
Loading the Sparsifier's own checkpoint sets all of it anyway: it writes the checkpoint's
buffers into every layer (Note [Buffers the model did not load] in checkpoint.py), so a
model load of the same checkpoint after it moves nothing. A checkpoint without layer buffers
(format 3) cannot: layers whose live counters moved since the last model load (or since the
Sparsifier found them), or are behind its snapshot, hold none of its counters (a fresh model
whose state is still to be loaded, a rollback, warm-up batches; re-audit BR) and are marked
(``_snapshot_awaits_model_load``), ``flops`` counts
none of their rows, a model load that brings counters at or past the snapshot (and, when
the live counters were past it too, not past them) neither counts nor moves them (re-audit
BN: the rows between the snapshot and the save were lost), another is an accounting point
as any (re-audit BS: another run's model), ``state_dict()`` refuses until then (re-audit BQ), and the
mark goes at the next ``step()``. The hooks hold the Sparsifier weakly, go with ``close()``, and a
copy or a pickle of the module carries inert ones (a copy's layers are driven by no
Sparsifier, Note [Copying prepared models] in state.py).
"""

from __future__ import annotations

import weakref
from typing import Dict, List

import torch
from torch import nn

from agpe_compile.state import BUFFER_SUFFIXES

from .host_sync import to_host


def watch(sparsifier, states: List) -> List:
    """Register the load hooks for ``states`` (grouped by module); returns their handles."""
    by_module: Dict[int, tuple] = {}
    for state in states:
        module = state.module
        if module is not None:
            by_module.setdefault(id(module), (module, []))[1].append(state.name)
    handles = []
    ref = weakref.ref(sparsifier)
    for module, names in by_module.values():
        handles.append(module.register_load_state_dict_pre_hook(_BeforeLoad(ref, names)))
        # after the load hooks registered by prepare(), which adopt buffers load(assign=True) put in place
        handles.append(module.register_load_state_dict_post_hook(_AfterLoad(ref, names)))
    return handles


def _counters_key(state, prefix: str) -> str:
    return prefix + state.buffer_names()[BUFFER_SUFFIXES.index("saliency_counters")]


class _BeforeLoad:
    """load_state_dict pre-hook: account the rows run so far, remember the counters."""

    def __init__(self, sparsifier_ref, names: List[str]) -> None:
        self.sparsifier_ref, self.names = sparsifier_ref, names

    def __call__(self, module: nn.Module, state_dict, prefix: str, *args) -> None:
        sp = self.sparsifier_ref()
        if sp is None or getattr(sp, "_closed", False):
            return
        for name in self.names:
            sp._counters_before_load.pop(name, None)  # left by a load that raised before its post-hook
            state = sp.layers.get(name)
            if state is None or state.module is not module or _counters_key(state, prefix) not in state_dict:
                continue
            if name in sp._snapshot_awaits_model_load:
                if _brings_the_checkpoints_counters(sp, name, state_dict[_counters_key(state, prefix)]):
                    sp._counters_before_load[name] = None  # the snapshot is already the loaded counters'
                    continue
                del sp._snapshot_awaits_model_load[name]  # another checkpoint's model: as any model load
            scoring = sp._flag_on and name in sp._scored_from
            tensors = [state.counters, state.block_mask] + ([sp._scored_from[name]] if scoring else [])
            host = to_host(tensors)
            counters, mask = host[0], host[1]
            scored_rows = max(0, int(counters[0]) - int(host[2])) if scoring else 0
            sp._account_layer(name, int(counters[0]), int(mask.sum()), scored_rows)
            sp._counters_before_load[name] = [int(v) for v in counters.tolist()]

    def __reduce__(self):
        return _BeforeLoad, (_dead, [])


def _brings_the_checkpoints_counters(sp, name: str, incoming) -> bool:
    """Whether a model load after ``Sparsifier.load_state_dict`` of a format-3 checkpoint (which
    saved no counters) brings that checkpoint's: at or past its snapshot, and, when the live
    counters were past it too (a rollback), not past them (re-audit BS: another run's model)."""
    if not isinstance(incoming, torch.Tensor) or incoming.numel() != 2:
        return False  # torch's own load refuses it
    rows = int(incoming.reshape(-1)[0])
    live, snapshot = sp._snapshot_awaits_model_load[name], sp.seen_counters[name][0]
    return rows >= snapshot and (live < snapshot or rows <= live)


class _AfterLoad:
    """load_state_dict post-hook: move the Sparsifier's snapshots to the loaded counters."""

    def __init__(self, sparsifier_ref, names: List[str]) -> None:
        self.sparsifier_ref, self.names = sparsifier_ref, names

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        sp = self.sparsifier_ref()
        if sp is None or getattr(sp, "_closed", False):
            return
        for name in self.names:
            if name not in sp._counters_before_load:
                continue
            before = sp._counters_before_load.pop(name)
            state = sp.layers.get(name)
            if state is None:
                continue
            after = [int(v) for v in to_host([state.counters])[0].tolist()]
            sp._counters_at_model_load[name] = after[0]
            if (sp.step_count == 0 and not sp._state_loaded and after[0] > 0
                    and sp._model_loaded_without_state is None):  # Note [Mistakes the Sparsifier names]
                sp._model_loaded_without_state = (name, after[0])
            if before is None:  # after Sparsifier.load_state_dict: it set the snapshot for this load
                sp._snapshot_awaits_model_load.pop(name, None)
                continue
            rows, skips = after[0] - before[0], after[1] - before[1]
            seen = sp.seen_counters[name]
            sp.seen_counters[name] = [after[0], seen[1] + skips]  # rows: accounted up to the load
            sp.rows_at_interval += rows
            with torch.inference_mode(False):  # a load under inference_mode: kept tensors stay normal
                if name in sp._scored_from:  # scored rows: accounted up to the load (when scoring)
                    sp._scored_from[name] = state.counters[0].clone()
                if name in sp._skips_from:
                    sp._skips_from[name] = sp._skips_from[name] + skips

    def __reduce__(self):
        return _AfterLoad, (_dead, [])


def _dead() -> None:
    return None
