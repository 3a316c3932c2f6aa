"""agpe_compile: prune-and-regrow training as a torch.compile backend.

Example::

    >>> import torch, agpe_compile
    >>> agpe_compile.prepare(model, options={"block_size": 32})
    >>> cmodel = torch.compile(model, backend="agpe")
    >>> print(agpe_compile.explain(model, x))
"""

from . import ops  # noqa: F401  (registers torch.ops.agpe.*)
from .backend import AgpeBackend, agpe_backend
from .config import BackendConfig
from .explain import ExplainReport, LayerRecord, explain
from .state import LayerState, layer_state, layer_states, prepare

__all__ = [
    "AgpeBackend",
    "BackendConfig",
    "ExplainReport",
    "LayerRecord",
    "LayerState",
    "agpe_backend",
    "explain",
    "layer_state",
    "layer_states",
    "prepare",
]
