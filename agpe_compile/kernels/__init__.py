"""Block-sparse kernels of the agpe linear layer, all driven by a :class:`BlockLayout`.

Triton launchers (GPU, or CPU under ``TRITON_INTERPRET=1``) and a pure-torch gathered-block
CPU path with the same signatures. Importing this package never imports triton.

Example::

    >>> from agpe_compile.layout import build_layout
    >>> layout = build_layout(block_mask, 128)
    >>> y = block_sparse_forward(x, weight, layout) if triton_available() else gather_forward(x, weight, layout)
"""

from .checks import SALIENCY_MODES, extent
from .configs import KernelConfig, config_for
from .cpu_gather import always_dense_from, choose_cpu_path, gather_forward, gather_grad_input, gather_grad_weight
from .launch import (adamw_log_betas, bias_grad, block_sparse_adamw_, block_sparse_forward, block_sparse_grad_input,
                     block_sparse_grad_weight, inactive_grad_sq_, mask_and_score_, persistent_tma_setting,
                     zero_inactive_blocks_)
from .runtime import triton_available

__all__ = [
    "SALIENCY_MODES",
    "KernelConfig",
    "adamw_log_betas",
    "bias_grad",
    "block_sparse_adamw_",
    "block_sparse_forward",
    "block_sparse_grad_input",
    "block_sparse_grad_weight",
    "always_dense_from",
    "choose_cpu_path",
    "config_for",
    "extent",
    "gather_forward",
    "gather_grad_input",
    "gather_grad_weight",
    "inactive_grad_sq_",
    "mask_and_score_",
    "persistent_tma_setting",
    "triton_available",
    "zero_inactive_blocks_",
]
