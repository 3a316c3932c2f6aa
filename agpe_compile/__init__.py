"""agpe_compile: prune-and-regrow training as a torch.compile backend.

Example::

    >>> import torch, agpe_compile
    >>> agpe_compile.prepare(model, options={"block_size": 32})
    >>> cmodel = torch.compile(model, backend="agpe")
    >>> print(agpe_compile.explain(model, x))

Training with the controller::

    >>> sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(target_sparsity=0.9))
    >>> ...; optimizer.step(); sparsifier.step(loss)
"""

import importlib.util as _importlib_util
import os as _os

# passes/ sits at the top of the repository and is installed as agpe_compile.passes. Run
# from a plain checkout (PYTHONPATH=., as on the GPU machine), map it the same way.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _importlib_util.find_spec("agpe_compile.passes") is None and _os.path.isdir(_os.path.join(_checkout, "passes")):
    __path__.append(_checkout)

from . import ops  # noqa: F401  (registers torch.ops.agpe.*)
from .averaged import AveragedModel
from .backend import AgpeBackend, agpe_backend
from .buckets import rebucket
from .config import BackendConfig
from .controller import AGPEConfig, Sparsifier
from .conv1d import conv1d_from_linear, linear_from_conv1d
from .explain import ExplainReport, LayerRecord, explain
from .graphs import GraphedStep
from .optim import BlockSparseAdamW
from .state import LayerState, layer_state, layer_states, prepare
from .strip import strip, strip_state_dict



def _register_without_entry_point() -> None:
    """From a plain checkout no entry point exists: register ``backend="agpe"`` by hand.

    With the package installed, torch finds the entry point itself and registering again
    would fail with "duplicate name" (Dynamo's registry asserts on it).
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    installed = any(ep.name == "agpe" for ep in entry_points(group="torch_dynamo_backends"))
    if not installed and "agpe" not in registry._COMPILER_FNS:
        registry.register_backend(agpe_backend, name="agpe")


_register_without_entry_point()

__all__ = [
    "AGPEConfig",
    "AveragedModel",
    "AgpeBackend",
    "BackendConfig",
    "BlockSparseAdamW",
    "ExplainReport",
    "GraphedStep",
    "LayerRecord",
    "LayerState",
    "agpe_backend",
    "conv1d_from_linear",
    "explain",
    "layer_state",
    "layer_states",
    "linear_from_conv1d",
    "prepare",
    "rebucket",
    "Sparsifier",
    "strip",
    "strip_state_dict",
]
