"""Zero-code mode: ``torch.compile(model, backend="agpe", options={"target_sparsity": 0.9})``.

The backend splits the options (:func:`split_options`), builds one controller per compiled
graph with :func:`make_zero_code_controller` over that graph's layer states, and its call
wrapper calls the controller (the "tick") at the start of every compiled call made with
grad enabled. The training loop is unchanged; the controller runs the same Sparsifier
with no loss and no optimizer.

Note [Zero-code step counting]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The controller counts its own ticks: tick k (k >= 2) means training step k - 1 is over
(its forward, backward and optimizer step ran before this call), so it runs
``Sparsifier.step()`` for step k - 1 and then, if step k is an update step, sets the
``score_dense`` flags before this call's backward. So one compiled call with grad enabled
= one training step. Consequences: a forward with grad enabled that is not a training
step (validation without ``torch.no_grad()``) counts as one; with gradient accumulation
every micro-batch counts, so scale ``update_interval``/``end_step`` by the micro-batches
per optimizer step. The last step of a run is never processed (no tick follows it); it
changes nothing. A graph break gives each graph its own controller and budget.

What it cannot do, and the mitigation:

* no optimizer: moments of pruned and regrown blocks cannot be reset. A pruned block's
  weight may then drift from zero between updates (stale momentum); the compiled op masks
  it so it never affects outputs or gradients, and every update re-zeroes all inactive
  weights, so a regrown block still starts at exactly zero. Stale moments of regrown
  blocks have decayed for ``update_interval`` steps (momentum 0.9: by 0.9^100).
* no momentum, so policy ``snfs`` is refused;
* no loss: the adaptive schedule prunes every ``patience`` updates and backs off on the
  regret signal only (Note [Adaptive schedule]);
* no checkpoint API in the training loop: the controller object has ``state_dict()``
  like the Sparsifier, but only code holding it can save it.

Layout buckets: like the Sparsifier, the tick calls ``agpe_compile.rebucket`` after an
update, which needs the layer states to be module buffers (``agpe_compile.prepare`` before
``torch.compile``). The tick runs inside the call wrapper, after Dynamo chose the graph for
the current call: a bucket change at that point must be handled by the backend (the graph
chosen for this call was built for the old layout sizes).

Example::

    >>> tick = make_zero_code_controller(list(agpe_compile.prepare(model, {"block_size": 8}).values()),
    ...                                  {"target_sparsity": 0.9, "policy": "rigl", "block_size": 8})
    >>> for x, y in loader:
    ...     tick(); loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

from agpe_compile.state import LayerState

from .config import AGPEConfig
from .sparsifier import Sparsifier

SHARED_OPTION_KEYS = frozenset({"block_size", "include", "exclude", "saliency"})
AGPE_OPTION_KEYS = frozenset(f.name for f in dataclasses.fields(AGPEConfig)) - SHARED_OPTION_KEYS - {"version"}


def split_options(options: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(backend options, AGPE-only options). Shared keys (block size, patterns, saliency) go to the backend.

    >>> split_options({"block_size": 8, "target_sparsity": 0.9})
    ({'block_size': 8}, {'target_sparsity': 0.9})
    """
    options = dict(options or {})
    return ({k: v for k, v in options.items() if k not in AGPE_OPTION_KEYS},
            {k: v for k, v in options.items() if k in AGPE_OPTION_KEYS})


def config_from_options(options: Optional[Mapping[str, Any]]) -> Optional[AGPEConfig]:
    """The AGPEConfig of zero-code mode, or None when no AGPE option is given.

    Raises ``ValueError`` naming the option for bad values (via AGPEConfig) and for
    options that need an optimizer.

    >>> config_from_options({"block_size": 8}) is None
    True
    >>> config_from_options({"target_sparsity": 0.9, "block_size": 8}).final_density
    0.1
    """
    backend_options, agpe_options = split_options(options)
    if not agpe_options:
        return None
    shared = {k: v for k, v in backend_options.items() if k in SHARED_OPTION_KEYS}
    for key in ("include", "exclude"):
        if isinstance(shared.get(key), str):
            shared[key] = (shared[key],)
        elif isinstance(shared.get(key), list):
            shared[key] = tuple(shared[key])
    if isinstance(agpe_options.get("buckets"), list):
        agpe_options["buckets"] = tuple(agpe_options["buckets"])
    config = AGPEConfig(**shared, **agpe_options)
    if config.policy == "snfs":
        raise ValueError("agpe: option 'policy' got 'snfs', which needs the optimizer's momentum; expected "
                         "another policy in zero-code mode, or agpe_compile.Sparsifier(model, optimizer, ...)")
    return config


class ZeroCodeController:
    """The tick: call it at the start of every compiled training call; see Note [Zero-code step counting]."""

    def __init__(self, states: List[LayerState], config: AGPEConfig):
        self.sparsifier = Sparsifier.for_layers(states, config, optimizer=None)
        self.calls = 0

    def __call__(self) -> None:
        if self.calls > 0:
            self.sparsifier.step(None)
        self.calls += 1

    def state_dict(self) -> dict:
        return {"calls": self.calls, "sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.sparsifier.load_state_dict(state["sparsifier"])


def make_zero_code_controller(states: List[LayerState], options: Mapping[str, Any]) -> ZeroCodeController:
    """A tick callable running the configured policy over ``states`` (``ValueError`` if no AGPE option)."""
    config = config_from_options(options)
    if config is None:
        raise ValueError(f"agpe: zero-code mode needs at least one of the options {sorted(AGPE_OPTION_KEYS)}; "
                         f"got {sorted(dict(options))}")
    return ZeroCodeController(states, config)
