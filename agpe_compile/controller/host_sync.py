"""Move the controller's small tensors between device and host in ONE transfer each way.

Note [Host-side updates]
~~~~~~~~~~~~~~~~~~~~~~~~
A mask update looks at a handful of small [R, C] tensors per layer (mask, saliency sums,
dense-gradient scores, counters) and takes decisions with data-dependent sizes (sorting,
``nonzero``, counts). Done on a GPU, every ``int(...)``, ``float(...)`` and ``nonzero``
waits for the device, and every tiny op is a kernel launch: 260-290 host reads and
1,700-2,200 tensor ops per update for 16 layers (counted on the CPU with a dispatch
mode), and 30 ms of controller time per update on an H200 against a 12-20 ms step. So the Sparsifier takes one snapshot of everything it
reads (:func:`to_host`: one device-to-host copy), decides on the host, and writes the new
masks, changed-block masks and layouts back with one pinned, non-blocking host-to-device
copy (:func:`to_device`); on the device only in-place updates of weights, optimizer
moments and buffers remain. On the CPU both are plain copies, so results are the same
bit for bit whichever device the model is on.

Example::

    >>> mask, counts = to_host([state.block_mask, state.counters])   # one transfer
    >>> to_device([(state.block_mask, new_mask)])                    # one transfer
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

# Every dtype the controller moves is exact in float64: bool, int32, float32, and int64
# counters below 2**53 (row counts; checked).
_CARRIER = torch.float64
_EXACT_INT = 2 ** 53


def to_host(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Host copies of ``tensors`` (same shapes and dtypes), one transfer per device.

    The copies never alias the inputs, so zeroing a buffer after the snapshot leaves the
    snapshot intact.
    """
    out: List[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            out[i] = t.detach().clone()
        else:
            by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        group = [tensors[i] for i in indices]
        flat, order = pack_flat(group)
        for i, host in zip(indices, unpack_flat(flat.cpu(), group, order)):  # .cpu(): the one sync
            out[i] = host
    return out


def pack_flat(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    """One float64 vector holding ``tensors`` grouped by dtype (one concatenation and one
    conversion per dtype: a handful of launches on a GPU), and the order they are in."""
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    order = [i for members in groups.values() for i in members]
    flat = torch.cat([torch.cat([tensors[i].detach().reshape(-1) for i in members]).to(_CARRIER)
                      for members in groups.values()])
    return flat, order


def unpack_flat(flat: torch.Tensor, like: Sequence[torch.Tensor], order: List[int]) -> List[torch.Tensor]:
    """Inverse of :func:`pack_flat` on the host: tensors shaped and typed like ``like``."""
    out: List[torch.Tensor] = [None] * len(like)  # type: ignore[list-item]
    offset = 0
    for i in order:
        t = like[i]
        n = t.numel()
        piece = flat[offset:offset + n]
        if t.dtype == torch.int64 and n and bool(piece.abs().max() >= _EXACT_INT):
            raise OverflowError("agpe: an int64 controller tensor exceeds 2**53 and cannot be moved exactly")
        out[i] = piece.to(t.dtype).view(t.shape)
        offset += n
    return out


def to_device(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src)`` for every (device tensor, host tensor) pair, one transfer per device.

    ``src`` must hold values exact in float64 (see ``_CARRIER``). The staging buffer is
    pinned and the copy non-blocking, so the host does not wait for the device's queue.
    """
    by_device: Dict[torch.device, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in pairs:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"agpe: to_device expected matching shapes, got {tuple(dst.shape)} <- {tuple(src.shape)}")
        if dst.device.type == "cpu":
            dst.copy_(src)
        else:
            by_device.setdefault(dst.device, []).append((dst, src))
    for device, group in by_device.items():
        flat = torch.cat([src.reshape(-1).to(_CARRIER) for _, src in group])
        if torch.cuda.is_available():
            flat = flat.pin_memory()
        staged = flat.to(device, non_blocking=True)
        offset = 0
        for dst, src in group:
            n = src.numel()
            dst.copy_(staged[offset:offset + n].view(dst.shape))
            offset += n
