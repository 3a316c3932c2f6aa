"""Launchers of the block-sparse Triton kernels: check inputs, allocate, pick a config, launch.

Every launcher takes a :class:`~agpe_compile.layout.BlockLayout` and plain tensors. Grids
depend only on shapes and the layout's bucket (``layout.capacity`` or the block grid), never
on the live count, so one compiled launch serves every mask of the bucket and nothing here
reads tensor contents on the host: the launchers can run inside a ``triton_op`` body.

X [..., K] and dY [..., N] may have any number of leading dimensions; a contiguous tensor
reaches the kernels as itself with the strides of its [M, K] view (Note [Kernel operands]),
others as that view (a copy only where the leading dimensions cannot be flattened), and
strides are passed through (transposed 2-D views work as well).
Triton is imported only when a kernel is first launched.

Example::

    >>> layout = build_layout(block_mask, 128)
    >>> y = block_sparse_forward(x, weight, layout, bias)
    >>> dx = block_sparse_grad_input(dy, weight, layout)
    >>> dw = block_sparse_grad_weight(dy, x, layout, weight=weight, saliency=sal, saliency_mode="taylor")
    >>> inactive_grad_sq_(dy, x, layout, dense_grad_sq)
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from ..layout import BlockLayout
from .checks import (SALIENCY_MODES, as_2d, check_int32_reach, check_layout, check_operands, check_rows,
                     check_saliency, check_scores, check_tensor, extent)
from .configs import KernelConfig, config_for
from .runtime import cdiv, dot_options, is_interpreted, is_tracing, launcher, require_triton


def block_sparse_forward(
    x: torch.Tensor, weight: torch.Tensor, layout: BlockLayout, bias: Optional[torch.Tensor] = None,
    *, config: Optional[KernelConfig] = None, tma="auto",
) -> torch.Tensor:
    """Y = X @ (W*M)^T + bias for X [..., K] -> Y [..., N]; reads only live blocks of W.

    ``tma`` picks the kernel (Note [TMA by default]): ``"auto"`` follows the ``AGPE_TMA``
    setting (default off: the plain kernel, kernels/forward.py); ``False`` the plain
    kernel; ``"device"`` the TMA kernel (kernels/forward_tma.py; X's and W's last dimension
    contiguous, rows 16-byte aligned; traceable), one tile per program; ``"persistent"``
    the same kernel on about one program per SM (Note [Persistent TMA programs]);
    ``"host"`` (or True) the TMA kernel with host-built descriptors, eager only
    (benchmarks/kernels.py)."""
    x2 = as_2d("x", x, check_layout(layout).shape[1])
    check_operands(layout, weight, [x2])
    check_int32_reach(layout, [x2, weight], x2.shape[0], layout.shape[0])
    if bias is not None:
        check_tensor("bias", bias, (layout.shape[0],), x.dtype, x.device)
        if bias.stride(0) != 1:  # the kernels read bias[n] at bias_ptr + n
            bias = bias.contiguous()
    require_triton()
    tma = _tma_mode(tma, x2, weight)
    if tma == "host":
        from .forward_tma import forward_tma_kernel as kernel
    elif tma in _DEVICE_DESCRIPTORS:
        from .forward_tma import forward_tma_device_kernel as kernel
    else:
        from .forward import forward_kernel as kernel

    cfg = _config(kernel, "forward", layout, x.dtype, config, tma=tma is not None)
    m, n = x2.shape[0], layout.shape[0]
    rows = layout.grid_shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:  # an empty grid is not launchable
        return y.view(*x.shape[:-1], n)
    if tma == "host":
        operands = (_descriptor("x", x2, [cfg.block_m, cfg.block_k]),
                    _descriptor("weight", weight, [layout.block_size, cfg.block_k]))
        sizes, strides = (m, rows), (*y.stride(),)
    elif tma in _DEVICE_DESCRIPTORS:
        _check_tma_operand("x", x2)
        _check_tma_operand("weight", weight)
        _ensure_scratch_allocator(kernel)
        operands = (kernel_operand(x, x2), weight)
        sizes, strides = (m, x2.shape[1], n, rows), (x2.stride(0), weight.stride(0), *y.stride())
    else:
        operands = (kernel_operand(x, x2), weight)
        sizes, strides = (m, rows), (*x2.stride(), *weight.stride(), *y.stride())
    tiles = cdiv(m, cfg.block_m) * rows
    programs = (persistent_programs(tiles, cfg, "forward", layout.block_size, x.dtype, x.device, kernel)
                if tma == "persistent" else tiles)
    launcher(kernel, (programs,), x.device)(
        *operands, bias if bias is not None else weight, y, layout.row_ptr, layout.col_idx, *sizes, *strides,
        BLOCK_SIZE=layout.block_size, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, **dot_options(kernel, x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.view(*x.shape[:-1], n)


def block_sparse_forward_tma(x, weight, layout, bias=None, *, config=None) -> torch.Tensor:
    """``block_sparse_forward(..., tma=True)``."""
    return block_sparse_forward(x, weight, layout, bias, config=config, tma=True)


def block_sparse_grad_input(
    grad_out: torch.Tensor, weight: torch.Tensor, layout: BlockLayout, *, config: Optional[KernelConfig] = None,
    tma="auto",
) -> torch.Tensor:
    """dX = dY @ (W*M) for dY [..., N] -> dX [..., K]; walks the transposed arrays.
    ``tma``: which kernel (kernels/grad_input.py or grad_input_tma.py), as for the forward."""
    dy2 = as_2d("grad_out", grad_out, check_layout(layout).shape[0])
    check_operands(layout, weight, [dy2])
    check_int32_reach(layout, [dy2, weight], dy2.shape[0], layout.shape[1])
    require_triton()
    tma = _tma_mode(tma, dy2, weight)
    if tma == "host":
        from .grad_input_tma import grad_input_tma_kernel as kernel
    elif tma in _DEVICE_DESCRIPTORS:
        from .grad_input_tma import grad_input_tma_device_kernel as kernel
    else:
        from .grad_input import grad_input_kernel as kernel

    cfg = _config(kernel, "grad_input", layout, grad_out.dtype, config, tma=tma is not None)
    m, k = dy2.shape[0], layout.shape[1]
    cols = layout.grid_shape[1]
    dx = torch.empty((m, k), dtype=grad_out.dtype, device=grad_out.device)
    if m == 0:
        return dx.view(*grad_out.shape[:-1], k)
    if tma == "host":
        operands = (_descriptor("grad_out", dy2, [cfg.block_m, cfg.block_k]),
                    _descriptor("weight", weight, [cfg.block_k, layout.block_size]))
        sizes, strides = (m, cols), (*dx.stride(),)
    elif tma in _DEVICE_DESCRIPTORS:
        _check_tma_operand("grad_out", dy2)
        _check_tma_operand("weight", weight)
        _ensure_scratch_allocator(kernel)
        operands = (kernel_operand(grad_out, dy2), weight)
        sizes, strides = (m, dy2.shape[1], k, cols), (dy2.stride(0), weight.stride(0), *dx.stride())
    else:
        operands = (kernel_operand(grad_out, dy2), weight)
        sizes, strides = (m, cols), (*dy2.stride(), *weight.stride(), *dx.stride())
    tiles = cdiv(m, cfg.block_m) * cols
    programs = (persistent_programs(tiles, cfg, "grad_input", layout.block_size, grad_out.dtype,
                                    grad_out.device, kernel)
                if tma == "persistent" else tiles)
    launcher(kernel, (programs,), grad_out.device)(
        *operands, dx, layout.col_ptr, layout.row_idx, *sizes, *strides,
        BLOCK_SIZE=layout.block_size, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **dot_options(kernel, grad_out.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx.view(*grad_out.shape[:-1], k)


def block_sparse_grad_input_tma(grad_out, weight, layout, *, config=None) -> torch.Tensor:
    """``block_sparse_grad_input(..., tma=True)``."""
    return block_sparse_grad_input(grad_out, weight, layout, config=config, tma=True)


# Note [TMA by default]
# ~~~~~~~~~~~~~~~~~~~~~
# On Hopper (compute capability 9.x) the forward, dX and dW kernels can load their tiles
# with the tensor memory accelerator through descriptors built in the kernel
# (forward_tma.py, grad_input_tma.py, grad_weight_tma.py). Timed side by side with the
# plain kernels on an H200 (twenty-first session, docs/benchmarks.md; bf16, block 128,
# d = 0.5 / 0.25 / 0.1): 0.83-0.98x their time for the forward, 0.86-1.06x for dX and
# 0.89-1.00x for dW (host-built descriptors, eager only: 0.79-0.82x, 0.84-0.86x,
# 0.89-1.00x). With AGPE_TMA=auto they are taken for 16-bit operands that meet TMA's rules
# (last dimension contiguous, 16-byte aligned rows and base) and the plain kernels
# otherwise; both compute the same function, so the choice is speed only. AGPE_TMA=device
# forces them (raising on operands they cannot take); AGPE_TMA=persistent is "auto" with
# persistent programs that build their descriptors once (Note [Persistent TMA programs] in
# forward_tma.py): on the H200 (twenty-fifth session, same shapes and densities) 0.72-0.92x
# the plain forward, 0.77-0.95x dX, 0.97-1.08x dW, and a CUDA-graphed training step faster
# in every comparison (graphed BlockSparseAdamW by 0.03-0.06 of the dense step at d =
# 0.25-0.5, a tie at d=0.1; graphed fused AdamW by 0.04-0.14). The default stays "off": a
# step without CUDA graphs is bound by the host, and there the comparison was inconclusive
# (fused AdamW at d=0.25: 0.949 and 0.660 of dense in two processes, 0.796 without it).
# (The twenty-first session's
# "auto" and "off" steps both ran the plain kernels: torch's AOTAutograd cache served
# "off"'s graphs to "auto", audit BF; the cache key now carries the setting, Note [Compile
# caches and the traced kernels] in inductor_passes.py.) Under "persistent" the dense-path
# crossover of ops/paths.py follows (persistent_tma_setting): block 128's kernels ran at
# 0.87-0.95 of cuBLAS at the 0.75 bucket, so 16-bit layers there run them. The eager backward that failed
# with "auto" in the ninth session (autograd's thread had no Triton scratch allocator,
# fixed below: _ensure_scratch_allocator) passed on the GPU in the twenty-first. Graphs
# the backend lowers with aot_eager (inductor=False) replay their kernels through torch's
# own wrapper, which sets no allocator either: the setting does not apply to launches
# traced for them (traced_for_eager_replay). fp32 (tf32) stays on the plain kernels: its
# TMA variant has not been timed.
TMA_ENV = "AGPE_TMA"
_TMA_ENV_VALUES = ("off", "auto", "device", "persistent")


def tma_applies(device: torch.device, dtype: torch.dtype, operands, capability=None) -> bool:
    """Whether "auto" takes the TMA kernels for these 2-D operands (Note [TMA by default]).
    ``capability`` (major, minor) defaults to the device's."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if capability is None:
        if not torch.cuda.is_available():  # fake CUDA tensors traced on a machine without CUDA
            return False
        capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        return False
    for t in operands:
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16:
            return False
        if (t.storage_offset() * t.element_size()) % 16:
            return False
        if not is_tracing() and t.data_ptr() % 16:
            return False
    return True


def _tma_setting() -> str:
    value = os.environ.get(TMA_ENV, "off").strip().lower() or "off"
    if value not in _TMA_ENV_VALUES:
        raise ValueError(f"agpe kernels: expected {TMA_ENV} in {_TMA_ENV_VALUES}, got {value!r}")
    return value


_REPLAYED_EAGERLY = {"depth": 0}


def persistent_tma_setting(device: torch.device, dtype: torch.dtype, capability=None) -> bool:
    """Whether AGPE_TMA=persistent applies to a layer of ``dtype`` weights on ``device``:
    set, a 16-bit dtype, compute capability 9.x, and not a graph lowered for eager replay
    (traced_for_eager_replay). The operands' alignment is not checked here: a layer whose
    operands do not meet TMA's rules runs the plain kernels (ops/paths.py's crossover
    follows this, Note [TMA by default])."""
    if _tma_setting() != "persistent" or (_REPLAYED_EAGERLY["depth"] and is_tracing()):
        return False
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if capability is None:
        if not torch.cuda.is_available():  # fake CUDA tensors traced on a machine without CUDA
            return False
        capability = torch.cuda.get_device_capability(device)
    return capability[0] == 9


@contextlib.contextmanager
def traced_for_eager_replay():
    """Launches traced inside this block are replayed by torch's own kernel wrapper, not by
    Inductor (the backend's aot_eager lowering): that wrapper does not set Triton's scratch
    allocator, and autograd replays the backward on a thread where none is set, so the TMA
    kernels (which need it) are not chosen by the AGPE_TMA setting there."""
    _REPLAYED_EAGERLY["depth"] += 1
    try:
        yield
    finally:
        _REPLAYED_EAGERLY["depth"] -= 1


def _tma_mode(tma, *operands) -> Optional[str]:
    if tma == "auto":
        setting = _tma_setting()
        if setting == "off":
            return None
        if _REPLAYED_EAGERLY["depth"] and is_tracing():
            if setting == "device":
                raise ValueError(f"agpe kernels: {TMA_ENV}=device needs the Inductor lowering (the backend's "
                                 f"default): graphs lowered with inductor=False replay kernels without Triton's "
                                 f"scratch allocator; use {TMA_ENV}=auto or off")
            return None
        if setting == "device":
            return "device"
        applies = operands and tma_applies(operands[0].device, operands[0].dtype, operands)
        return ("persistent" if setting == "persistent" else "device") if applies else None
    if tma is False or tma is None:
        return None
    if tma is True or tma == "host":
        return "host"
    if tma in _DEVICE_DESCRIPTORS:
        return tma
    raise ValueError(f"agpe kernels: expected tma in ('auto', False, True, 'host', 'device', 'persistent'), "
                     f"got {tma!r}")


# Kernels that build their descriptors on the device: one tile (dW: slot) per program, or
# persistent programs (Note [Persistent TMA programs] in forward_tma.py).
_DEVICE_DESCRIPTORS = ("device", "persistent")
# Shared memory of one Hopper SM that resident programs can share (bytes).
_SM_SHARED = 228 * 1024


def tma_shared_bytes(kernel_name: str, cfg: KernelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Shared memory of one device-descriptor TMA program, from its configuration: the
    forward and dX kernels keep num_stages - 2 tile pairs (the index load takes a stage),
    at least 2 from 2 stages on and at most (num_stages + 1) // 2 (what Triton 3.6 and 3.9
    allocate for 2-3 and 6-10 stages: audit BF found the grid of the 6-stage dX default at
    one program per SM where two fit), the dW kernel num_stages.
    An upper bound of what Triton allocates, within one stage of it (checked against sm_90
    compiles, tests/test_kernels.py), so the grid never counts more resident programs than
    shared memory allows (registers may allow fewer). 1 KB on top for the pipeline's
    barriers."""
    if kernel_name == "grad_weight":  # a dY and an X tile of BLOCK_M x block size per stage
        return cfg.num_stages * 2 * cfg.block_m * block_size * dtype.itemsize + 1024
    # an [BLOCK_M, BLOCK_K] activation tile and a [block size, BLOCK_K] weight tile per stage
    stages = cfg.num_stages
    tiles = max(min(2, stages), min(stages - 2, (stages + 1) // 2))
    return tiles * (cfg.block_m + block_size) * cfg.block_k * dtype.itemsize + 1024


def persistent_programs(tiles, cfg: KernelConfig, kernel_name: str, block_size: int, dtype: torch.dtype,
                        device: torch.device, kernel, split: int = 1):
    """Grid size of a persistent TMA launch (Note [Persistent TMA programs]): as many
    programs as fit on the GPU at once (SMs x the programs one SM holds by
    :func:`tma_shared_bytes`), at most one per tile; ``split`` programs share each slot of
    the dW kernel. Under the interpreter: 2, so the loop over tiles runs. From shapes and
    the device only (``tiles`` may be symbolic)."""
    if is_interpreted(kernel):
        return torch.sym_min(tiles, 2)
    resident = max(1, _SM_SHARED // tma_shared_bytes(kernel_name, cfg, block_size, dtype))
    return torch.sym_min(tiles, max(1, _multiprocessors(device) * resident // split))


def _check_tma_operand(name: str, t: torch.Tensor) -> None:
    """TMA's rules for a 2-D operand: contiguous last dimension, 16-byte aligned rows and
    base (the base from the storage offset when tracing, from the address otherwise)."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16:
        raise ValueError(f"agpe kernels: the TMA kernels need {name} with a contiguous last dimension and "
                         f"16-byte aligned rows, got strides {tuple(t.stride())}")
    if (t.storage_offset() * t.element_size()) % 16 or (not is_tracing() and t.data_ptr() % 16):
        raise ValueError(f"agpe kernels: the TMA kernels need {name} 16-byte aligned, got an address "
                         f"{t.storage_offset() * t.element_size()} bytes into its storage")


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator(kernel) -> None:
    """Device-side descriptors need Triton's global scratch allocator (one torch allocation
    per launch). Triton keeps it in a context variable, so it is set at every launch: a
    thread that never set it (eager autograd runs the backward on its own thread) would
    launch with none. (Inductor's launches set their own.) Not needed by the interpreter."""
    if is_interpreted(kernel):
        return
    import triton

    triton.set_allocator(_torch_scratch)


def _descriptor(name: str, t: torch.Tensor, block_shape):
    """A host ``TensorDescriptor`` of a 2-D operand, after TMA's rules (contiguous last
    dimension, 16-byte aligned rows and base).

    Refuses traced calls: torch.compile's ``wrap_triton`` (checked with torch 2.13) drops
    host-built descriptor arguments from the recorded launch, so the TMA candidates run
    eagerly only (the benchmark's way); a traced path would need device-side descriptors.
    """
    if is_tracing():
        raise RuntimeError("agpe kernels: the host-descriptor TMA candidates run eagerly only; torch.compile's "
                           "wrap_triton does not carry host-built TensorDescriptor arguments (use tma='device')")
    _check_tma_operand(name, t)
    if t.data_ptr() % 16:
        raise ValueError(f"agpe kernels: the TMA kernels need {name} 16-byte aligned")
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block_shape)


def block_sparse_grad_weight(
    grad_out: torch.Tensor, x: torch.Tensor, layout: BlockLayout, *,
    weight: Optional[torch.Tensor] = None, saliency: Optional[torch.Tensor] = None,
    saliency_mode: Optional[str] = None, config: Optional[KernelConfig] = None, split: Optional[int] = None,
    tma="auto",
) -> torch.Tensor:
    """dW = (dY^T @ X) * M: a fresh zero-filled [N, K] tensor in which only live blocks are computed.

    With ``saliency_mode`` in ``SALIENCY_MODES`` it also adds (+=, IN PLACE) each live
    block's score, taken from ``weight`` and the fp32 gradient, to the float32 [R, C]
    ``saliency`` buffer; inactive entries are left untouched (their score is 0 by the
    formulas). ``weight`` is needed by every mode but "gradient". ``split`` (split-K over
    M) defaults to :func:`split_for`, from the shapes and the GPU's size only. ``tma``: which
    kernel (kernels/grad_weight.py or grad_weight_tma.py), as for the forward.
    """
    dy2, x2 = _grad_operands(grad_out, x, layout, weight)
    check_saliency(saliency_mode, saliency, weight, layout, x.device)
    require_triton()
    from .grad_weight import grad_weight_finish_kernel

    tma = _tma_mode(tma, dy2, x2)
    if tma is not None and dy2.shape[0] == 0:  # no rows: no descriptor; the plain kernel still scores
        tma = None
    if tma == "host":
        from .grad_weight_tma import grad_weight_tma_kernel as kernel
    elif tma in _DEVICE_DESCRIPTORS:
        from .grad_weight_tma import grad_weight_tma_device_kernel as kernel
    else:
        from .grad_weight import grad_weight_kernel as kernel

    cfg = _config(kernel, "grad_weight", layout, x.dtype, config, tma=tma is not None)
    m = dy2.shape[0]
    interpreted = is_interpreted(kernel)
    if split is None:
        split = split_for(layout.capacity, size_hint(m), cfg.block_m, x.device, interpreted)
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"agpe kernels: expected split to be a positive int, got {split!r}")
    # A partial whose rows start past M adds zeros: the split need not divide M evenly, so it
    # stays one number for a symbolic (dynamic-batch) M.
    m_chunk = cdiv(cdiv(torch.sym_max(m, 1), split), cfg.block_m) * cfg.block_m
    dw = torch.zeros(layout.shape, dtype=x.dtype, device=x.device)
    # Unused pointer arguments get a read-only layout tensor, never dw (Note [Kernel operands])
    w = weight if weight is not None else layout.block_slot  # read only when the mode needs it
    scores = saliency if saliency is not None else layout.block_slot  # written only with a mode
    b = layout.block_size
    mode = SALIENCY_MODES.index(saliency_mode) + 1 if saliency_mode else 0
    ws = (layout.live_count if split == 1  # the workspace of split-K only
          else torch.empty((split, layout.capacity, b, b), dtype=torch.float32, device=x.device))
    if tma == "host":
        operands = (_descriptor("grad_out", dy2, [cfg.block_m, b]), _descriptor("x", x2, [cfg.block_m, b]))
        sizes, strides = (m, m_chunk), ()
    elif tma in _DEVICE_DESCRIPTORS:
        _check_tma_operand("grad_out", dy2)
        _check_tma_operand("x", x2)
        _ensure_scratch_allocator(kernel)
        operands = (kernel_operand(grad_out, dy2), kernel_operand(x, x2))
        sizes, strides = (m, layout.shape[0], layout.shape[1], m_chunk), (dy2.stride(0), x2.stride(0))
    else:
        operands = (kernel_operand(grad_out, dy2), kernel_operand(x, x2))
        sizes, strides = (m, m_chunk), (*dy2.stride(), *x2.stride())
    programs = layout.capacity  # one per slot; persistent: each walks slots pid, pid + P, ... below the live count
    if tma == "persistent":
        programs = persistent_programs(layout.capacity, cfg, "grad_weight", b, x.dtype, x.device, kernel,
                                       split=split)
    launcher(kernel, (programs, split), x.device)(
        *operands, w, dw, scores, ws, layout.slot_row, layout.col_idx, layout.live_count,
        *sizes, layout.capacity, layout.grid_shape[1], *strides, *w.stride(), *dw.stride(),
        BLOCK_SIZE=b, BLOCK_M=cfg.block_m, SALIENCY=mode, SPLIT=split,
        **dot_options(kernel, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        launcher(grad_weight_finish_kernel, (layout.capacity,), x.device)(
            ws, w, dw, scores, layout.slot_row, layout.col_idx, layout.live_count,
            layout.capacity, layout.grid_shape[1], *w.stride(), *dw.stride(),
            BLOCK_SIZE=b, SALIENCY=mode, SPLIT=split, num_warps=8 if b >= 128 else 4, num_stages=1,
        )
    return dw


def size_hint(n) -> int:
    """A plain int for a row count that may be symbolic (a compiled graph with a dynamic batch
    size): its size hint, or 0 without one. Only launch choices (split-K factors) use it; the
    kernels get the symbolic count itself, so every batch size computes the right result."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else 0


def split_for(capacity: int, m: int, block_m: int, device: torch.device, interpreted: bool = False) -> int:
    """Split-K factor of the dW kernel: enough programs for ~2 waves of the GPU, each still
    reducing >= 8 tiles of M, at most 16. Decided from shapes and the device only.

    >>> split_for(2048, 8192, 64, torch.device("cuda"))  # plenty of blocks: no split
    1
    """
    programs = 8 if interpreted else 2 * _multiprocessors(device)
    if capacity >= programs:
        return 1
    return max(1, min(cdiv(programs, max(capacity, 1)), m // (8 * block_m), 16))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except (AssertionError, RuntimeError):  # fake CUDA tensors traced on a host without a GPU
        return 132  # an H100/H200


def bias_grad(grad_out: torch.Tensor, *, split: Optional[int] = None) -> torch.Tensor:
    """``grad_out.reshape(-1, N).sum(0)`` for dY [..., N]: the bias gradient, in dY's dtype
    (fp32 accumulation), from one read of dY (kernels/column_sum.py). Deterministic.
    ``split`` (row ranges summed by separate programs) defaults to ~4 waves of the GPU."""
    g2 = as_2d("grad_out", grad_out, grad_out.shape[-1])
    if extent(g2) >= 2**31:
        raise ValueError(f"agpe kernels: expected grad_out reaching < 2**31 elements in memory (the kernel indexes "
                         f"with int32), got shape {tuple(grad_out.shape)} and strides {grad_out.stride()}")
    require_triton()
    from .column_sum import column_sum_kernel

    m, n = g2.shape
    interpreted = is_interpreted(column_sum_kernel)
    block_n = 128 if n >= 128 or interpreted else max(16, 1 << (n - 1).bit_length())
    block_m = 64 if interpreted else 32
    tiles = cdiv(n, block_n)
    if m == 0:
        return torch.zeros(n, dtype=grad_out.dtype, device=grad_out.device)
    if split is None:  # enough programs for ~4 waves on the GPU, each summing at least one BLOCK_M slab
        split = 1 if interpreted else min(cdiv(4 * _multiprocessors(grad_out.device), tiles),
                                          max(1, cdiv(size_hint(m), block_m)))
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"agpe kernels: expected split to be a positive int, got {split!r}")
    rows_per_split = cdiv(cdiv(m, split), block_m) * block_m  # a partial past M sums to zero
    partial = torch.empty((split, n), dtype=torch.float32, device=grad_out.device)
    launcher(column_sum_kernel, (tiles, split), grad_out.device)(
        kernel_operand(grad_out, g2), partial, m, n, rows_per_split, *g2.stride(), BLOCK_M=block_m, BLOCK_N=block_n,
        EVEN_N=n % block_n == 0, num_warps=4, num_stages=3,
    )
    return partial.sum(0).to(grad_out.dtype)


def zero_inactive_blocks_(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Write zeros into every inactive block of ``weight`` [N, K] IN PLACE (live blocks are
    not touched); returns ``weight``. See kernels/zero_blocks.py."""
    check_layout(layout)
    check_operands(layout, weight, [weight])
    check_int32_reach(layout, [weight])
    require_triton()
    from .zero_blocks import zero_blocks_kernel

    rows, cols = layout.grid_shape
    b = layout.block_size
    launcher(zero_blocks_kernel, (rows * cols,), weight.device)(
        weight, layout.block_slot, cols, *weight.stride(), BLOCK_SIZE=b, ROWS=min(b, 32), num_warps=4, num_stages=1,
    )
    return weight


def inactive_grad_sq_(
    grad_out: torch.Tensor, x: torch.Tensor, layout: BlockLayout, dense_grad_sq: torch.Tensor,
    enabled: Optional[torch.Tensor] = None, *, config: Optional[KernelConfig] = None,
) -> None:
    """dense_grad_sq[r, c] += ||(dY^T X) block (r, c)||_F^2 for every INACTIVE block, IN PLACE.

    Live blocks' entries are left untouched and the dense gradient is never materialised.
    With a 0-d ``enabled`` tensor (bool or int) nothing is added while it is 0, without a
    host sync or a graph branch.
    """
    dy2, x2 = _grad_operands(grad_out, x, layout, None)
    check_scores("dense_grad_sq", dense_grad_sq, layout, x.device)
    if enabled is not None and (not isinstance(enabled, torch.Tensor) or enabled.dim() != 0
                                or enabled.device != x.device):
        raise ValueError(f"agpe kernels: expected enabled to be a 0-d tensor on {x.device}, got {enabled!r}")
    require_triton()
    from .grad_scores import grad_scores_kernel

    cfg = _config(grad_scores_kernel, "grad_scores", layout, x.dtype, config)
    rows, cols = layout.grid_shape
    launcher(grad_scores_kernel, (rows * cols,), x.device)(
        kernel_operand(grad_out, dy2), kernel_operand(x, x2), dense_grad_sq, layout.block_slot, enabled if enabled is not None else layout.live_count,
        dy2.shape[0], cols, *dy2.stride(), *x2.stride(),
        BLOCK_SIZE=layout.block_size, BLOCK_M=cfg.block_m, HAS_FLAG=enabled is not None,
        **dot_options(grad_scores_kernel, x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def mask_and_score_(
    grad_weight: torch.Tensor, weight: torch.Tensor, layout: BlockLayout, *,
    saliency: torch.Tensor, saliency_mode: Optional[str], dense_grad_sq: torch.Tensor,
    enabled: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mask a DENSE weight gradient IN PLACE and score its blocks in the same pass.

    Live blocks of ``grad_weight`` add their ``saliency_mode`` score to ``saliency``;
    inactive blocks add ||G_block||_F^2 to ``dense_grad_sq`` (while ``enabled`` is non-zero)
    and are zeroed. Returns ``grad_weight``. Used by the CUDA dense path (above the
    crossover density), where cuBLAS computes the whole gradient anyway.
    """
    check_layout(layout)
    check_operands(layout, weight, [grad_weight])
    check_int32_reach(layout, [grad_weight, weight])
    check_tensor("grad_weight", grad_weight, layout.shape, weight.dtype, weight.device)
    check_saliency(saliency_mode, saliency, weight, layout, weight.device)
    check_scores("dense_grad_sq", dense_grad_sq, layout, weight.device)
    if enabled is not None and (not isinstance(enabled, torch.Tensor) or enabled.dim() != 0
                                or enabled.device != weight.device):
        raise ValueError(f"agpe kernels: expected enabled to be a 0-d tensor on {weight.device}, got {enabled!r}")
    require_triton()
    from .mask_scores import mask_scores_kernel

    rows, cols = layout.grid_shape
    b = layout.block_size
    launcher(mask_scores_kernel, (rows * cols,), weight.device)(
        grad_weight, weight, saliency if saliency is not None else layout.block_slot, dense_grad_sq,
        layout.block_slot, enabled if enabled is not None else layout.live_count,
        cols, *grad_weight.stride(), *weight.stride(),
        BLOCK_SIZE=b, SALIENCY=SALIENCY_MODES.index(saliency_mode) + 1 if saliency_mode else 0,
        HAS_FLAG=enabled is not None, num_warps=8 if b >= 128 else 4, num_stages=1,
    )
    return grad_weight


def block_sparse_adamw_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    layout: BlockLayout, *, lr, beta1: float, beta2: float, eps: float, weight_decay: float, step,
    log_betas: Optional[torch.Tensor] = None,
) -> None:
    """One AdamW step on the live blocks of ``param`` only, IN PLACE (kernels/adamw.py).

    All four tensors are [N, K] (the layout's shape), contiguous, on one device, and of one
    dtype. ``step`` is the step count after this update (1 on the first): an int, or a 0-d
    float tensor on ``param``'s device that the kernel reads (CUDA-graph capture). ``lr`` is
    a float, or such a 0-d tensor. With a step tensor, ``log_betas`` may give
    ``[log(beta1), log(beta2)]`` as a float64 tensor on the device (made here otherwise: a
    host-to-device copy, which a CUDA-graph capture cannot contain; BlockSparseAdamW keeps
    one). Nothing here reads a device tensor on the host.
    """
    check_layout(layout)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(name, t, layout.shape, param.dtype, param.device)
    check_operands(layout, param, [grad, exp_avg, exp_avg_sq])
    if not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq)):
        raise ValueError("agpe kernels: expected contiguous param, grad and AdamW moments")
    step_on_device = _device_scalar("step", step, param.device)
    lr_on_device = _device_scalar("lr", lr, param.device)
    if not step_on_device:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"agpe kernels: expected step >= 1 (an int or a 0-d tensor), got {step!r}")
    if step_on_device:
        if log_betas is None:
            log_betas = adamw_log_betas(beta1, beta2, param.device)
        elif (log_betas.shape != (2,) or log_betas.dtype != torch.float64 or log_betas.device != param.device):
            raise ValueError(f"agpe kernels: expected log_betas as a float64 tensor of shape (2,) on "
                             f"{param.device}, got {log_betas.dtype} {tuple(log_betas.shape)} on {log_betas.device}")
    require_triton()
    from .adamw import adamw_blocks_kernel

    b = layout.block_size
    inv_correction1, correction2_sqrt = (1.0, 1.0) if step_on_device else (
        1.0 / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5)
    launcher(adamw_blocks_kernel, (layout.capacity,), param.device)(
        param, grad, exp_avg, exp_avg_sq, layout.slot_row, layout.col_idx, layout.live_count,
        step if step_on_device else layout.live_count, lr if lr_on_device else layout.live_count,
        log_betas if step_on_device else layout.live_count,
        param.stride(0), 0.0 if lr_on_device else float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), inv_correction1, correction2_sqrt,
        BLOCK_SIZE=b, ROWS=min(b, 32), STEP_ON_DEVICE=step_on_device, LR_ON_DEVICE=lr_on_device,
        num_warps=4, num_stages=1,
    )


def adamw_log_betas(beta1: float, beta2: float, device: torch.device) -> torch.Tensor:
    """``[log(beta1), log(beta2)]`` in double, as the kernel's step-on-device path reads them."""
    import math

    def log(beta: float) -> float:
        return math.log(beta) if beta > 0 else float("-inf")

    return torch.tensor([log(float(beta1)), log(float(beta2))], dtype=torch.float64, device=device)


def _device_scalar(name: str, value, device: torch.device) -> bool:
    """Whether ``value`` is a 0-d floating tensor on ``device`` (read by the kernel)."""
    if not isinstance(value, torch.Tensor):
        return False
    if value.dim() != 0 or not value.is_floating_point() or value.device != device:
        raise ValueError(f"agpe kernels: expected {name} as a number or a 0-d floating tensor on {device}, "
                         f"got a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
    return True


# Note [Kernel operands]
# ~~~~~~~~~~~~~~~~~~~~~~
# Inside a compiled graph every tensor handed to a Triton kernel is an input of a
# ``triton_kernel_wrapper_mutation`` node. A launcher passes the N-D tensor itself when its
# [M, K] view shares its memory and address (a contiguous tensor: the kernels get the 2-D
# strides), so no graph records a reshape in front of a kernel; and an unused pointer
# argument never aliases a tensor the kernel writes (dW, the output: Inductor cloned a
# zero-filled dW that was also passed as the split-K workspace), it gets a read-only layout
# tensor (or the weight) instead. The ninth session took these for the cause of the GELU
# backward and the q/k/v gradient being written four times on the H200; they were not
# (the copies were still there in the twenty-first session's run). The cause is Inductor's
# stride constraint on user-defined kernel inputs, handled by agpe's post-grad pass (Note
# [Kernel inputs Inductor would copy] in agpe_compile/inductor_passes.py).
def kernel_operand(t: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """The tensor to launch with for ``t2 = as_2d(t)``: ``t`` itself when it is contiguous
    (the same memory, address and row stride as ``t2``), else ``t2`` (Note [Kernel operands])."""
    return t if t.dim() > 2 and t.is_contiguous() else t2


def _grad_operands(grad_out, x, layout, weight):
    n, k = check_layout(layout).shape
    dy2, x2 = as_2d("grad_out", grad_out, n), as_2d("x", x, k)
    check_rows(dy2, x2)
    check_operands(layout, weight, [dy2, x2])
    check_int32_reach(layout, [dy2, x2] + ([weight] if weight is not None else []))
    return dy2, x2


def _config(kernel, name: str, layout: BlockLayout, dtype: torch.dtype, override: Optional[KernelConfig],
            tma: bool = False):
    cfg = override or config_for(name, layout.block_size, dtype, interpret=is_interpreted(kernel), tma=tma)
    if layout.block_size % cfg.block_k:
        raise ValueError(f"agpe kernels: expected config.block_k dividing {layout.block_size}, got {cfg.block_k}")
    return cfg
