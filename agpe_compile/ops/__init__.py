"""Custom ops of agpe_compile. Importing this package registers ``torch.ops.agpe.*``."""

from . import reference
from .sparse_linear import sparse_linear, sparse_linear_backward

__all__ = ["reference", "sparse_linear", "sparse_linear_backward"]
