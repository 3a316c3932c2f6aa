"""agpe's global optimizer step post-hooks, removable at any time.

Note [One global optimizer hook]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``torch.optim`` calls its global step post-hooks while iterating the OrderedDict that holds
them (torch 2.11 and 2.13), so removing one of them during that loop raises "OrderedDict
mutated during iteration" out of ``optimizer.step()``. agpe's hooks remove hooks: zero-code
mode's one-shot "nothing to prune" check removed itself, and zero-code's ``gc.collect()``
(when another optimizer of its weights steps) can run the finalizer of a dropped Sparsifier,
which removes that Sparsifier's hook (Note [A dropped Sparsifier] in
controller/sparsifier.py). Both made the first ``optimizer.step()`` raise (helper audit BH).

So an agpe hook is registered with torch as an entry that calls it, in the place it had
before among the user's hooks (a hook of the user's that writes weights runs where it ran,
re-audit BI), and removing it only empties the entry: from then on it calls nothing and
holds nothing, and it is not called later in the same step. torch's dict is touched only
when an agpe hook is registered, which also drops the emptied entries (user code, never
inside a step's hook loop). A copy or a pickle of a handle (a deep-copied Sparsifier's)
removes nothing: the copy never registered a hook (re-audit BI: closing a copy removed the
original's).

Example::

    >>> handle = register_step_post_hook(lambda optimizer, args, kwargs: None)
    >>> handle.remove()
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook as _register_with_torch

Hook = Callable[[torch.optim.Optimizer, Any, Any], None]


class _Entry:
    """What torch calls: the agpe hook, until it is removed."""

    __slots__ = ("hook", "torch_handle", "__weakref__")

    def __init__(self, hook: Hook) -> None:
        self.hook: Optional[Hook] = hook
        self.torch_handle = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        hook = self.hook
        if hook is not None:
            hook(optimizer, args, kwargs)


_ENTRIES: List[_Entry] = []  # registered with torch, live or emptied (dropped at the next registration)


class HookHandle:
    """Removes its hook (at any time, also from inside a hook or a finalizer)."""

    __slots__ = ("_entry",)

    def __init__(self, entry: Optional[_Entry]) -> None:
        self._entry = entry

    def remove(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            entry.hook = None

    def __deepcopy__(self, memo) -> "HookHandle":
        return HookHandle(None)

    def __reduce__(self):
        return HookHandle, (None,)


def register_step_post_hook(hook: Hook) -> HookHandle:
    """Like ``torch.optim.optimizer.register_optimizer_step_post_hook``, with a handle whose
    ``remove`` is safe inside torch's hook loop (Note [One global optimizer hook])."""
    for entry in [e for e in _ENTRIES if e.hook is None]:
        entry.torch_handle.remove()
        _ENTRIES.remove(entry)
    entry = _Entry(hook)
    # never traced: an optimizer step inside a compiled function would otherwise make Dynamo
    # trace agpe's host-side hooks (each is disabled too)
    entry.torch_handle = _register_with_torch(torch.compiler.disable(entry))
    _ENTRIES.append(entry)
    return HookHandle(entry)


def registered() -> List[Hook]:
    """agpe's hooks now registered, in order (for tests and diagnostics)."""
    return [e.hook for e in _ENTRIES if e.hook is not None]
