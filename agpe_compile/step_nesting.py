"""Optimizer step post-hooks that act once per step.

Note [Nested optimizer steps]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch wraps the ``step`` of an optimizer's class (hooks, profiling) when the first instance
of that class is created. A subclass whose ``step`` calls ``super().step()``
(``BlockSparseAdamW`` over ``AdamW``, a user's ``class MyAdam(Adam)``) then runs the global
step post-hooks twice per step once an instance of the parent class exists anywhere in the
process: first after the parent's part, then after the whole step. Zero-code mode counted
each as a training step (its schedule ran at twice the speed and updated masks between the
two halves of a step; a helper audit, twentieth session), and the zero-weight hook re-zeroed
before ``BlockSparseAdamW`` had stepped its live blocks. :func:`inner_step` tells the inner
call: the hook's caller is torch's step wrapper for this optimizer, and another such frame
for the same optimizer is further up the stack. A step compiled by Dynamo, where those
frames may not be on the Python stack, counts as before.
"""

from __future__ import annotations

import sys
from types import CodeType
from typing import Optional

import torch


def _wrapper_code() -> Optional[CodeType]:
    try:
        return torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__
    except Exception:  # another torch: every call counts, as before
        return None


_WRAPPER = _wrapper_code()


def inner_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step post-hook is running for a step nested in another step of the same
    ``optimizer`` (Note [Nested optimizer steps]): such a call is not a training step."""
    if _WRAPPER is None:
        return False
    frame = sys._getframe(1)
    found = 0
    while frame is not None:
        if frame.f_code is _WRAPPER:
            args = frame.f_locals.get("args") or (None,)
            if args[0] is optimizer:
                found += 1
                if found > 1:
                    return True
        frame = frame.f_back
    return False
