"""Tensors the CPU dense path derives from a block mask, built once per mask version.

Note [Mask-derived tensors]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
On every call the CPU dense path (ops/dense_path.py) and the zero hook (zero_weights.py)
derive tensors from a layer's [R, C] block mask: the row-broadcast mask of Note
[Row-broadcast masks] (for ``W * M`` and for the AND that clears inactive blocks), the
positions of the live blocks (for scoring few live blocks), whether every block is live,
how many are, and the float mask of the inactive blocks (for their dense-gradient norms).
A mask changes only at a mask update (every ``update_interval`` steps) or when edited by
hand, yet building them anew on every call cost about 2 ms of a 25-28 ms training step of
three 1000 x 1000 layers at block 8 and density 0.1, the main job's shapes (2-core CPU;
docs/benchmarks.md, "host time of a compiled training step").

So they are built once per mask version and kept with the mask: keyed by the mask tensor
object (weakly: a freed mask drops its entry), valid while the mask's version counter and
data pointer are unchanged. Every in-place write bumps the version counter, through any
view and under ``no_grad`` (``copy_``, ``__setitem__``, ``fill_``, the Sparsifier's
updates), and ``mask.data = other`` changes the data pointer; the layout's own sync relies
on the same counter (``LayerState.layout_mask_version``). A write the counter cannot see
(through ``mask.numpy()``, or by another process into shared memory) is not seen here
either; the layout would miss it too.

Only real CPU tensors are cached (``host_readable``): fake and traced tensors, device
tensors and inference-mode tensors (which keep no version counter) build each time. The
values are exactly what building them anew gives (tests/test_mask_cache.py). Callers
must not write into a cached tensor.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

# mask -> ((version, data pointer), {key: derived value})
_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


def derived(block_mask: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` for ``block_mask``, computed once per version of the mask; ``key`` names
    what is built (and every argument besides the mask it depends on)."""
    if block_mask.device.type != "cpu" or is_fake(block_mask):
        return build()
    try:
        stamp = (block_mask._version, block_mask.data_ptr())
    except RuntimeError:  # an inference tensor keeps no version counter
        return build()
    entry = _entries.get(block_mask)
    if entry is None or entry[0] != stamp:
        entry = (stamp, {})
        _entries[block_mask] = entry
    cached = entry[1]
    if key not in cached:
        cached[key] = build()
    return cached[key]


def clear() -> None:
    """Forget every cached tensor (tests; nothing else needs it)."""
    _entries.clear()
