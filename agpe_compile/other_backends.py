"""Prepared layers traced for a backend that is not agpe's.

Note [Prepared layers under other backends]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A prepared layer's forward pre-hook (``state._read_layouts``) marks a layer that runs
outside agpe's graphs, so the Sparsifier re-zeroes its inactive blocks (and their optimizer
moments) after the step: its raw weight received a dense gradient. Run eagerly, the hook
sees that itself. Traced by Dynamo it used to assume agpe's backend, but any backend traces
it: the same model also compiled with ``backend="inductor"``, or a training step compiled
with the default backend around a model compiled with agpe in place (Dynamo inlines the
inner compile into the outer frame). Those graphs compute the dense layer from the raw
weight, never pass agpe's call wrapper, and the mark was never set: inactive weights
drifted away from zero (eager calls, ``torch.export`` and a plain model loading the state
dict then compute something else) and, in the nested case, the whole run trained dense
while the Sparsifier reported its density (a helper audit, twentieth session).

While tracing, :func:`other_backend` asks Dynamo which backend the graph is for (at trace
time, as a constant: agpe's own graphs are unchanged). For another backend, the hook sets
``ran_eagerly`` in traced code, which Dynamo replays after every call of that graph, and
:func:`say_compiled_by` warns once per backend. A backend of your own that hands
the graph on to agpe's (a function calling ``agpe_compile.backend.agpe_backend``) cannot be
told from another one: it gets the warning, and the re-zeroing after each step (correct,
one pass over the weight). Inside a higher-order op's body (``torch.utils.checkpoint``)
Dynamo refuses the traced attribute write (a graph break; an error under fullgraph=True),
so there the layer is marked once, at trace time, by name (``traced_elsewhere``), and
re-zeroed after every optimizer step from then on. Where Dynamo's internals cannot be read, nothing changes;
``torch.export`` (strict) is left alone too: it computes with the raw weights, which a
Sparsifier keeps at zero after each step (design.md, "Known limits").
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, List, Set

import torch

log = logging.getLogger(__name__)

_WRAPPER_ATTRS = ("_torchdynamo_orig_backend", "__wrapped__", "func", "compiler_fn", "backend_compile_fn",
                  "__self__")
_said: Set[str] = set()  # backends warned about


def _backend_chain(fn: Any) -> Iterator[Any]:
    """``fn`` and what it wraps: Dynamo's debug wrapper, torch.compile's option wrapper,
    functools.partial, DDPOptimizer's bound compile_fn."""
    seen: List[int] = []
    todo = [fn]
    while todo and len(seen) < 32:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.append(id(current))
        yield current
        todo.extend(getattr(current, attr, None) for attr in _WRAPPER_ATTRS)


def _is_agpe(fn: Any) -> bool:
    from agpe_compile.backend import AgpeBackend, agpe_backend

    return isinstance(fn, AgpeBackend) or fn is agpe_backend


def _name(chain: List[Any]) -> str:
    for fn in chain:
        name = getattr(fn, "compiler_name", None) or getattr(fn, "__name__", None)
        if isinstance(name, str) and name:
            return name
    return type(chain[0]).__name__


@torch._dynamo.assume_constant_result
def other_backend() -> str:
    """While Dynamo traces: the name of the backend the graph is for when it is not agpe's,
    else "" (also when Dynamo's state cannot be read)."""
    try:
        if torch.compiler.is_exporting():  # torch.export: the raw weights, as design.md says
            return ""
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        compiler_fn = tx.output.compiler_fn
    except Exception:  # not tracing, or another torch's internals: change nothing
        return ""
    if compiler_fn is None:
        return ""
    chain = list(_backend_chain(compiler_fn))
    if any(_is_agpe(fn) for fn in chain):
        return ""
    try:  # inside a higher-order op's body (torch.utils.checkpoint): no side effects there
        nested = tx.output.current_tracer.parent is not None
    except Exception:
        nested = True
    return _name(chain) + (NESTED if nested else "")


# Names of layers traced for another backend inside a higher-order op's body
# (``LayerState.traced_elsewhere``).
TRACED_ELSEWHERE: Set[str] = set()


@torch._dynamo.assume_constant_result
def mark_traced_elsewhere(layer: str) -> int:
    """At trace time: layer ``layer`` runs in another backend's graph where no call can be
    marked (a higher-order op's body); the zero-weight hook re-zeroes it after every step."""
    TRACED_ELSEWHERE.add(layer)
    return 0


# Marks an other_backend() answer given inside a higher-order op's body: Dynamo refuses a
# traced attribute write there (a graph break, an error under fullgraph=True), so the layers
# are only said, not marked.
NESTED = " (inside a higher-order op)"


@torch._dynamo.assume_constant_result
def say_compiled_by(layer: str, backend: str) -> int:
    """Warn, once per backend, that a graph for ``backend`` (an :func:`other_backend`
    answer) computes prepared layers dense."""
    if backend not in _said:
        _said.add(backend)
        name, nested = (backend[:-len(NESTED)], True) if backend.endswith(NESTED) else (backend, False)
        log.warning(
            "agpe: prepared layers (%r first) are being compiled by the %r backend, not agpe's: that graph computes "
            "them with their raw weights (no mask, the dense product, no saliency). %s Compile the model, "
            "or the training step that calls it, with backend='agpe' (a step compiled with another backend inlines "
            "a model compiled with agpe); or agpe_compile.strip(model) first to run a finished model elsewhere. "
            "Said once per backend", layer, name,
            "They are inside an activation-checkpointed region (a higher-order op): a Sparsifier re-zeroes their "
            "inactive blocks after every optimizer step from now on; hand-set masks are not applied there." if nested else
            "A Sparsifier re-zeroes their inactive blocks after each optimizer step; hand-set masks are not applied "
            "there.")
    return 0
