"""The audit trail: one JSON object per line, appended at every update interval.

Record kinds (field ``event``):

* ``start`` -- once per Sparsifier: ``config`` (AGPEConfig as a dict), ``layers``
  ({name: {shape, block_size, grid}}), ``step``, ``audit_version`` (2 since ``load``
  records exist; absent before).
* ``load`` -- at ``Sparsifier.load_state_dict``: ``step``, the step it resumes from (records
  of a run that went past it before being resumed are superseded: the report drops them).
* ``interval`` -- at every ``update_interval`` steps: ``step``, ``loss`` (mean training
  loss of the interval, or null), ``flops`` ({sparse, dense} cumulative), ``updated``
  (a mask update ran; it may change no block, e.g. when the schedule holds), ``schedule`` (the schedule's event; ``"hold:nonfinite-scores"`` for
  an update held because its scores were not finite, Note [Intervals without a finite
  score] in sparsifier.py; ``nonfinite_skips`` below counts the skipped calls of every
  data-parallel rank), ``target_density``,
  ``global_density_before``/``_after``, ``bucket`` (bucket of the global target),
  ``rebucketed`` (layers whose layout moved to another density bucket at this update:
  the next compiled call recompiles at most once; not at all when Dynamo still holds a
  graph for those layout sizes), ``recalled_layouts`` (true when the global target came
  back to a value it had before and the plan kept every layer it planned in the layout
  bucket it had there; a frozen layer keeps its mask, whatever bucket that is: Note
  [Layouts a target had before] in sparsifier.py), ``recompiles`` (graphs compiled since the previous
  record, when a counter was given: a recompile caused by this record's re-bucketing
  shows in the next record), ``pruned_saliency`` (the regret signal; None for ``saliency="movement"``), ``loss``
  (the mean of the interval's finite training losses; None when none was given or none
  was finite),
  ``update_seconds`` and ``layers``: {name: {density_before, density_after, dropped,
  grown, dropped_just_grown (of the dropped blocks, those grown at the previous update),
  bucket_before, bucket_after, saliency: {mean, max, min, active_mean}, nonfinite_skips}}.
* anything a caller adds with :meth:`AuditLog.write` (the example logs ``eval`` records).

Example::

    >>> log = AuditLog("run.jsonl")
    >>> log.write({"event": "eval", "step": 100, "accuracy": 0.84})
    >>> read_records("run.jsonl")[-1]["accuracy"]
    0.84
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from agpe_compile.layout import bucket_for

# 2: a Sparsifier restored with load_state_dict writes a "load" record, so a "start" with
# no "load" after it is a fresh run (Note [Runs appended to one audit file] in report.py).
AUDIT_VERSION = 2


class AuditLog:
    """Appends JSON records to ``path`` (nothing is written when ``path`` is None)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path is not None:
            if os.path.isdir(path):
                raise ValueError(f"agpe: AGPEConfig.audit_path {path!r} is a directory; expected a file path "
                                 f"(e.g. {os.path.join(path, 'agpe.jsonl')!r})")
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
        self._checked_end = False

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        text = json.dumps(_jsonable(record), sort_keys=True) + "\n"
        if not self._checked_end:  # a run killed mid-write left a torn last line: start on a line of our own
            self._checked_end = True
            if _ends_torn(self.path):
                text = "\n" + text
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)


def _ends_torn(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_records(path: str) -> List[dict]:
    """All records of a JSONL audit file, in order; ``ValueError`` naming the line that is not
    a JSON object. A torn record (a run killed while writing it: the file's last line without
    its newline, or a line cut short that a later run's ``start`` record follows) is skipped
    with a warning."""
    records = []
    torn = None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):  # line by line: the file's text is never held whole
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if torn is None and line.lstrip().startswith("{"):
                    torn = (number, error.msg)  # decided by what follows it
                    continue
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg}): not an agpe audit file") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object: not an agpe audit file")
            if torn is not None:
                if record.get("event") != "start":
                    raise ValueError(f"{path}: line {torn[0]} is not JSON ({torn[1]}): not an agpe audit file")
                _warn_torn(path, torn[0])
                torn = None
            records.append(record)
    if torn is not None:
        _warn_torn(path, torn[0])
    return records


def _warn_torn(path: str, number: int) -> None:
    logging.getLogger(__name__).warning(
        "agpe: %s: line %d is a record cut short (the run was killed while writing it); skipped", path, number)


def saliency_stats(ema: torch.Tensor, mask: torch.Tensor) -> dict:
    """Summary of one layer's saliency EMA (all blocks, and the active ones' mean).

    >>> saliency_stats(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]]))
    {'mean': 2.0, 'max': 3.0, 'min': 1.0, 'active_mean': 1.0}
    """
    active = ema[mask]
    return {
        "mean": float(ema.mean()),
        "max": float(ema.max()),
        "min": float(ema.min()),
        "active_mean": float(active.mean()) if active.numel() else 0.0,
    }


def layer_records(after: Dict[str, torch.Tensor], before: Dict[str, torch.Tensor], saliency: Dict[str, torch.Tensor],
                  skips: Dict[str, int], buckets: Tuple[float, ...],
                  just_grown: Dict[str, torch.Tensor]) -> Dict[str, dict]:
    """The per-layer part of an ``interval`` record: host masks before vs. after the update
    (``just_grown``: the blocks grown at the previous update)."""
    records = {}
    for name, mask in after.items():
        old = before[name]
        density_before, density_after = float(old.float().mean()), float(mask.float().mean())
        records[name] = {
            "density_before": density_before, "density_after": density_after,
            "dropped": int((old & ~mask).sum()), "grown": int((~old & mask).sum()),
            "dropped_just_grown": int((old & ~mask & just_grown[name]).sum()),
            "bucket_before": bucket_for(density_before, buckets), "bucket_after": bucket_for(density_after, buckets),
            "saliency": saliency_stats(saliency[name], mask), "nonfinite_skips": skips[name],
        }
    return records


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
