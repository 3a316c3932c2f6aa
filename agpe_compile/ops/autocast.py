"""Autocast for ``agpe::sparse_linear``: cast the compute operands, never the buffers.

Under ``torch.autocast`` a linear layer runs in the autocast dtype. The generic
``torch.library.register_autocast`` would cast every floating-point argument, including
the float32 ``saliency`` / ``dense_grad_sq`` accumulators, and the backward would then add
its scores into throw-away copies. This kernel casts only ``x``, ``weight`` and ``bias``
(as autocast casts ``F.linear``'s) and redispatches below the autocast key; autograd
records the casts, so fp32 master weights get fp32 gradients.

Example::

    >>> with torch.autocast("cuda", dtype=torch.bfloat16):
    ...     y = cmodel(x)          # rewritten layers compute in bf16; y is bf16
"""

from __future__ import annotations

from typing import Optional

import torch

_lib = torch.library.Library("agpe", "IMPL")  # kept alive: dropping it unregisters the kernels
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # like torch's autocast: float64 operands are left alone
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _autocast_kernel(device_type: str):
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _KEYS[device_type]))

    def sparse_linear(x, weight, bias, block_mask, saliency, dense_grad_sq, score_dense, counters, block_layout,
                      block_size, saliency_mode, zero_inactive=False):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(key):
            return torch.ops.agpe.sparse_linear(
                _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), block_mask, saliency, dense_grad_sq,
                score_dense, counters, block_layout, block_size, saliency_mode, zero_inactive)

    return sparse_linear


for _device, _key in _KEYS.items():
    _lib.impl("sparse_linear", _autocast_kernel(_device), _key)
