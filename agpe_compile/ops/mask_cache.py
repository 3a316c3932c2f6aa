"""Tensors the CPU dense path derives from a block mask, built once per mask contents.

Note [Mask-derived tensors]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
On every call the CPU dense path (ops/dense_path.py) and the zero hook (zero_weights.py)
derive tensors from a layer's [R, C] block mask: the row-broadcast mask of Note
[Row-broadcast masks] (for ``W * M`` and for the AND that clears inactive blocks), the
positions of the live blocks (for scoring few live blocks), whether every block is live,
how many are, and the float mask of the inactive blocks (for their dense-gradient norms).
A mask changes only at a mask update (every ``update_interval`` steps) or when edited by
hand, yet building them anew on every call cost about 1 ms of a 22-24 ms training step of
three 1000 x 1000 layers at block 8 and density 0.1, the main job's shapes (2-core CPU;
docs/benchmarks.md, "host time of a compiled training step").

So they are built once per mask CONTENT and kept with the mask: keyed by the mask tensor
object (weakly: a freed mask drops its entry), valid while the mask holds the same bytes
(and shape) as when they were built. Each lookup copies the mask's bytes and compares
them with the copy kept in the entry (the grid, R x C bytes: 5.7-8.5 us per lookup for the
main job's 125 x 125 grid on one thread, where ``torch.equal`` of the mask with a copy took
11.7-17.9 us; three runs on a shared 2-core VM,
benchmarks/results/2026-11-29-cpu-step-session30/lookup_time.txt; the cost grows with
R x C, larger grids were not timed; a few lookups per call). A first version trusted the mask's version counter, and a
helper audit (CM) found the writes it does not see: through ``mask.data[...]``,
``mask.numpy()``, ``untyped_storage()`` and DLPack aliases, and a second ``mask.data =``
landing on the address of the first; the CPU path then computed with the old mask, where
re-deriving on every call had been right. Comparing contents sees every write.
The layout the kernels read follows the mask the same way where the mask is cached
(``contents_token``, read by ``LayerState.layout_in_sync``): on the CPU, a write the
version counter does not see also rewrites the layout (the gathered-block path) and, under
the zero-weight promise, re-zeroes the newly inactive weights at the next call. On the GPU
the layout follows the version counter alone (reading a device mask would wait for the
device): edit a mask through the tensor itself there (README.md).

Only masks of blocks of at least ``CACHED_FROM_BLOCK`` (8) are cached: the row-broadcast
masks kept hold 2/b of the weight's memory (a quarter at block 8, the whole weight's size
twice at block 1, where the grid is as large as the weight and checking it costs what
building does), so smaller blocks build each time as before. Only real CPU tensors are
cached: fake tensors, anything under a dispatch mode or torch.compile's tracing (a
cached tensor would be baked into the graph as a constant: helper re-audit CM2), device
tensors, masks that are not bool, and tensors whose memory cannot be read directly
(functorch and functionalization wrappers) build each time. The values are exactly what building them anew gives (tests/test_mask_cache.py).
Callers must not write into a cached tensor.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Hashable, Optional, Tuple, TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

CACHED_FROM_BLOCK = 8  # smaller blocks build every time (see the Note)

# mask -> ((shape, dtype, bytes of the mask when built), {key: derived value})
_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _contents(block_mask: torch.Tensor) -> Optional[Tuple[tuple, torch.dtype, bytes]]:
    """(shape, dtype, bytes) of a real CPU tensor; None where its memory is not ours to read."""
    if (block_mask.dtype != torch.bool or block_mask.device.type != "cpu" or is_fake(block_mask)
            or block_mask.numel() == 0):
        return None  # (bool only: a float mask could carry a negation flag its bytes do not show)
    if _get_current_dispatch_mode() is not None or torch.compiler.is_compiling():
        return None  # traced (make_fx with real tensors, too): a cached tensor would become a constant
    try:
        dense = block_mask.contiguous()
        pointer = dense.data_ptr()
    except RuntimeError:  # a wrapper without storage (functionalization, functorch)
        return None
    if not pointer:
        return None
    return tuple(block_mask.shape), block_mask.dtype, ctypes.string_at(pointer, dense.numel() * dense.element_size())


def _entry(block_mask: torch.Tensor, block_size: int) -> Optional[dict]:
    """The mask's dict of derived values, emptied when its contents changed; None where
    nothing is cached."""
    if block_size < CACHED_FROM_BLOCK:
        return None
    contents = _contents(block_mask)
    if contents is None:
        return None
    entry = _entries.get(block_mask)
    if entry is None or entry[0] != contents:
        entry = (contents, {})
        _entries[block_mask] = entry
    return entry[1]


def derived(block_mask: torch.Tensor, block_size: int, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` for ``block_mask`` (of ``block_size`` blocks), computed once per contents
    of the mask; ``key`` names what is built (and every argument besides the mask and the
    block size it depends on)."""
    cached = _entry(block_mask, block_size)
    if cached is None:
        return build()
    if (block_size, key) not in cached:
        cached[block_size, key] = build()
    return cached[block_size, key]


def contents_token(block_mask: torch.Tensor, block_size: int) -> Optional[object]:
    """An object that stays the same (``is``) while the mask's contents do, and is new once
    they changed, whatever wrote them; None where masks are not cached (the caller then
    relies on the version counter alone). The layout sync uses it (``LayerState``)."""
    cached = _entry(block_mask, block_size)
    if cached is None:
        return None
    return cached.setdefault("contents token", object())


def clear() -> None:
    """Forget every cached tensor (tests; nothing else needs it)."""
    _entries.clear()
