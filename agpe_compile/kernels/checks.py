"""Input checks shared by the launchers and the CPU gather path ("expected X, got Y").

Only shapes, dtypes, devices and strides are looked at, never tensor contents, so the
checks are safe inside traced code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..layout import BlockLayout

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SALIENCY_MODES = ("taylor", "gradient", "magnitude", "movement")
_MAX_ELEMENTS = 2**31  # the kernels index with int32 offsets


def extent(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last element in memory, plus one: what its
    largest int32 offset reaches (a slice of a wider tensor reaches past its ``numel()``)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def as_2d(name: str, t: torch.Tensor, features: int) -> torch.Tensor:
    """[..., features] -> [M, features]; a view unless the leading dims cannot be flattened."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"agpe kernels: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2 or t.shape[-1] != features:
        raise ValueError(f"agpe kernels: expected {name} of shape [..., {features}] with at least 2 dims, "
                         f"got {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"agpe kernels: expected {name} dtype in {DTYPES}, got {t.dtype}")
    if t.numel() >= _MAX_ELEMENTS:
        raise ValueError(f"agpe kernels: expected {name} with < 2**31 elements, got {t.numel()}")
    return t if t.dim() == 2 else t.reshape(-1, features)


def check_int32_reach(layout: BlockLayout, tensors: Sequence[torch.Tensor], output_rows: Optional[int] = None,
                      output_features: int = 0) -> None:
    """The Triton kernels' offsets are int32 (audit BO): every operand must reach < 2**31
    elements in memory (a strided view of a wider tensor reaches past its ``numel()``), the
    weight's [N, K] too, and so must an output of ``output_rows`` x ``output_features``."""
    n, k = layout.shape
    if n * k >= _MAX_ELEMENTS:
        raise ValueError(f"agpe kernels: expected a weight of < 2**31 elements (the kernels index with int32), "
                         f"got {tuple(layout.shape)}; such a layer runs the dense path")
    for t in tensors:
        if extent(t) >= _MAX_ELEMENTS:
            raise ValueError(f"agpe kernels: expected operands reaching < 2**31 elements in memory (the kernels "
                             f"index with int32), got one of shape {tuple(t.shape)} and strides {t.stride()}; pass "
                             f"a contiguous tensor")
    if output_rows is not None and output_rows * output_features >= _MAX_ELEMENTS:
        raise ValueError(f"agpe kernels: expected an output of < 2**31 elements (the kernels index with int32), "
                         f"got {output_rows} x {output_features}")


def check_rows(grad_out: torch.Tensor, x: torch.Tensor) -> None:
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"agpe kernels: expected grad_out and x with the same number of rows, "
                         f"got {grad_out.shape[0]} and {x.shape[0]}")


def check_layout(layout: object) -> BlockLayout:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"agpe kernels: expected layout to be a BlockLayout, got {type(layout).__name__}")
    return layout


def check_operands(layout: BlockLayout, weight: Optional[torch.Tensor], activations: Sequence[torch.Tensor]) -> None:
    """Same dtype and device everywhere; weight [N, K] = layout.shape; layout on that device."""
    first = activations[0]
    for t in [*activations[1:], *([weight] if weight is not None else [])]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"agpe kernels: expected all operands as {first.dtype} on {first.device}, "
                             f"got {t.dtype} on {t.device}")
    if weight is not None and tuple(weight.shape) != layout.shape:
        raise ValueError(f"agpe kernels: expected weight of shape {layout.shape} (the layout's), "
                         f"got {tuple(weight.shape)}")

    if layout.row_ptr.device != first.device:
        raise ValueError(f"agpe kernels: expected the layout on {first.device}, got {layout.row_ptr.device}")


def check_tensor(name: str, t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"agpe kernels: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"agpe kernels: expected {name} {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def check_scores(name: str, scores: Optional[torch.Tensor], layout: BlockLayout, device: torch.device) -> None:
    """A float32 [R, C] contiguous running-sum buffer (the kernels index it flat)."""
    if scores is None:
        raise ValueError(f"agpe kernels: expected a float32 {layout.grid_shape} {name} buffer, got None")
    check_tensor(name, scores, layout.grid_shape, torch.float32, device)
    if not scores.is_contiguous():
        raise ValueError(f"agpe kernels: expected a contiguous {name} buffer, got strides {scores.stride()}")


def check_saliency(mode: Optional[str], saliency: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   layout: BlockLayout, device: torch.device) -> None:
    """A mode from SALIENCY_MODES comes with a buffer (and a weight unless "gradient"); None with neither."""
    if mode is None:
        if saliency is not None:
            raise ValueError("agpe kernels: expected a saliency_mode with a saliency buffer, got None")
        return
    if mode not in SALIENCY_MODES:
        raise ValueError(f"agpe kernels: expected saliency_mode in {SALIENCY_MODES} or None, got {mode!r}")
    check_scores("saliency", saliency, layout, device)
    if weight is None and mode != "gradient":
        raise ValueError(f"agpe kernels: expected weight for saliency_mode {mode!r}, got None")
