"""Custom ops of agpe_compile. Importing this package registers ``torch.ops.agpe.*``."""

from . import reference
from .masked_weight import masked_weight, masked_weight_backward
from .sparse_linear import sparse_linear, sparse_linear_backward
from . import autocast  # noqa: E402,F401  (after the op it registers for)

__all__ = ["masked_weight", "masked_weight_backward", "reference", "sparse_linear", "sparse_linear_backward"]
