"""agpe's global optimizer step post-hooks, called through one hook of torch's.

Note [One global optimizer hook]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``torch.optim`` calls its global step post-hooks while iterating the OrderedDict that holds
them (torch 2.11 and 2.13), so adding or removing one during that loop raises "OrderedDict
mutated during iteration" out of ``optimizer.step()``. agpe's hooks remove hooks: zero-code
mode's one-shot "nothing to prune" check removed itself, and zero-code's ``gc.collect()``
(when another optimizer of its weights steps) can run the finalizer of a dropped Sparsifier,
which removes that Sparsifier's hook (Note [A dropped Sparsifier] in
controller/sparsifier.py). Both made the first ``optimizer.step()`` raise (helper audit BH).
A Sparsifier created, or a zero-code model first compiled, inside a user's hook adds one
(re-audit BJ).

So agpe registers a single hook with torch, once per process, when agpe_compile is imported
(a first registration inside a user's hook would still add to torch's dict, re-audit BK),
that calls agpe's hooks from a snapshot of its own table (its ids taken under a lock): adding or removing an agpe hook at any
time, from inside a hook or a finalizer, never touches torch's dict. A hook removed by an
earlier hook of the same step is not called. agpe's hooks run in their registration order,
together, at the place of the first one among torch's global hooks: a user's global hook
registered after that runs after all of them (re-audit BI), as a per-optimizer hook
(``optimizer.register_step_post_hook``) always did; a hook that writes to pruned weights
after agpe re-zeroed them breaks the zero-weight promise either way, so register such a
hook before the first Sparsifier. A copy or a pickle of a handle (a deep-copied
Sparsifier's) removes nothing: the copy never registered a hook (re-audit BI: closing a copy
removed the original's).

Example::

    >>> handle = register_step_post_hook(lambda optimizer, args, kwargs: None)
    >>> handle.remove()
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Any, Callable, List, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook as _register_with_torch

Hook = Callable[[torch.optim.Optimizer, Any, Any], None]

# Kept across importlib.reload (which re-runs this file in the same module dict): a second
# table, counter or torch hook would run hooks twice or let an old handle remove a new hook.
_HOOKS: "collections.OrderedDict[int, Hook]" = globals().get("_HOOKS", collections.OrderedDict())
_IDS = globals().get("_IDS", itertools.count())
_INSTALLED: List[Any] = globals().get("_INSTALLED", [])  # torch's handle of the one hook
_LOCK = globals().get("_LOCK", threading.Lock())


class HookHandle:
    """Removes its hook from agpe's table (at any time, also from inside a hook)."""

    __slots__ = ("id",)

    def __init__(self, hook_id: Optional[int]) -> None:
        self.id = hook_id

    def remove(self) -> None:
        if self.id is not None:
            _HOOKS.pop(self.id, None)

    def __deepcopy__(self, memo) -> "HookHandle":
        return HookHandle(None)

    def __reduce__(self):
        return HookHandle, (None,)


def register_step_post_hook(hook: Hook) -> HookHandle:
    """Like ``torch.optim.optimizer.register_optimizer_step_post_hook`` (Note [One global
    optimizer hook])."""
    with _LOCK:
        hook_id = next(_IDS)
        _HOOKS[hook_id] = hook
    return HookHandle(hook_id)


def registered() -> List[Hook]:
    """agpe's hooks now registered, in order (for tests and diagnostics)."""
    return list(_HOOKS.values())


# Never traced: an optimizer step inside a compiled function would otherwise make Dynamo
# trace agpe's host-side hooks (each is disabled too).
@torch.compiler.disable
def _run_hooks(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _HOOKS:
        return
    for hook_id, hook in list(_HOOKS.items()):
        if hook_id in _HOOKS:  # not removed by an earlier hook of this step
            hook(optimizer, args, kwargs)


# Registered with torch when agpe_compile is imported, not at agpe's first hook: that may come
# inside a user's hook, in torch's loop (re-audit BK). It does nothing until agpe has hooks.
if not _INSTALLED:
    _INSTALLED.append(_register_with_torch(_run_hooks))
