"""``GraphedStep``: replay a whole training step as one CUDA graph, re-captured only when
agpe's tensors move (a bucket crossing).

Why: at low density the block-sparse step has so little GPU work that issuing it from
Python (Dynamo's guards, AOTAutograd's wrappers, a hundred-odd launches, the optimizer)
takes longer than running it: on an H200 the d=0.1 training step of
``benchmarks/train_step.py`` spent 8.7 ms issuing work per 11.3 ms step. A CUDA graph
replays every launch of the step with one call.

Note [Graphs and mask updates]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A CUDA graph replays kernels on the device addresses it captured. agpe keeps every tensor
the compiled step reads at a fixed address between bucket crossings: masks, saliency
buffers, the ``score_dense`` flag and the packed layout are edited in place (Note [Packed
layout]), pruned weights are zeroed in place and the optimizer's moments are zeroed in
place (controller/optimizer_state.py). So a mask update between two replays is seen by the
next replay. Two things are not: (1) the packed layout is rewritten from the mask by the
call wrapper on the host (``LayerState.sync_layout``), which a replay skips, so
:class:`GraphedStep` syncs every layer itself before each replay (the layouts handed to
graphs compiled at a fixed capacity too, Note [Layouts a graph cannot see change] in
backend.py); (2) a bucket crossing
replaces the layout buffer (a new length), so the captured graph would read the old one.
Before each replay :class:`GraphedStep` compares the addresses of every parameter, gradient,
optimizer state tensor and agpe buffer with those it captured, and re-captures when one
moved. A crossing therefore costs one eager step (which recompiles once, as without
graphs) and one capture.

Limits: the step must be capturable (no host syncs such as ``loss.item()`` inside it,
static input tensors refilled in place, a capturable optimizer such as
``torch.optim.AdamW(fused=True, capturable=True)`` or
``agpe_compile.BlockSparseAdamW(fused=True, capturable=True)``); agpe's zero-code mode, whose
controller ticks on the host inside the compiled call, cannot be captured and raises.
Replays skip Dynamo's guards: changing what the compiled code specialised on (train/eval,
input shapes, requires_grad) needs :meth:`GraphedStep.reset`.

Example::

    >>> x, y = torch.empty(batch_shape, device="cuda"), torch.empty(label_shape, device="cuda")
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    >>> def step():
    ...     loss = loss_fn(cmodel(x), y)
    ...     loss.backward()
    ...     optimizer.step()
    ...     return loss.detach()
    >>> graphed = agpe_compile.GraphedStep(step, model, optimizer)
    >>> for xb, yb in loader:
    ...     x.copy_(xb); y.copy_(yb)
    ...     loss = graphed()            # eager + capture on the first call, a replay after
    ...     sparsifier.step(loss)       # mask updates between replays are seen by the next one
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .state import layer_states

log = logging.getLogger(__name__)

Signature = Tuple[Tuple[str, int], ...]


def tensor_signature(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> Signature:
    """(name, device address) of every tensor a captured step reads or writes in place:
    parameters, their gradients, optimizer state tensors, buffers (agpe's among them)."""
    entries: List[Tuple[str, int]] = []
    for name, param in model.named_parameters():
        entries.append((name, param.data_ptr()))
        entries.append((name + ".grad", 0 if param.grad is None else param.grad.data_ptr()))
    for name, buffer in model.named_buffers():
        entries.append((name, buffer.data_ptr()))
    for index, optimizer in enumerate(optimizers):
        for slot, (param, state) in enumerate(optimizer.state.items()):
            for key, value in state.items():
                if torch.is_tensor(value):
                    entries.append((f"optimizer{index}[{slot}].{key}", value.data_ptr()))
    return tuple(entries)


class GraphedStep:
    """Run ``step_fn`` (forward, backward, optimizer step) as one CUDA graph (module doc).

    ``step_fn`` takes no arguments and reads its inputs from static tensors that the caller
    refills in place; what it returns (e.g. the detached loss) is returned by every call;
    after a replay it is the graph's static output, overwritten by the next replay (clone
    it to keep it). ``optimizers`` are the optimizers ``step_fn`` steps (their state is
    watched for moved tensors). ``captures`` counts captures, ``replays`` replays.
    """

    def __init__(self, step_fn: Callable[[], Any], model: nn.Module,
                 optimizers: Union[None, torch.optim.Optimizer, Sequence[torch.optim.Optimizer]] = None):
        if not callable(step_fn):
            raise TypeError(f"agpe.GraphedStep: expected a callable step_fn, got {type(step_fn).__name__}")
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.step_fn = step_fn
        self.model = model
        self.optimizers = list(optimizers or [])
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.signature: Optional[Signature] = None
        self.output: Any = None
        self.captures = 0
        self.replays = 0
        self._stepped: List[tuple] = []  # Note [Optimizer steps a replay runs]

    def reset(self) -> None:
        """Drop the captured graph: the next call runs eagerly and captures again."""
        self.graph, self.signature, self.output = None, None, None

    def __call__(self) -> Any:
        self._check_device()
        for state in layer_states(self.model).values():
            state.check_identity()
            state.sync_layout()  # a replay skips the call wrapper, which does this (module doc)
            state.sync_capacity_layouts()
        signature = tensor_signature(self.model, self.optimizers)
        if self.graph is not None and signature == self.signature:
            self.graph.replay()
            self.replays += 1
            _count_replayed_steps(self._stepped)
            for state in layer_states(self.model).values():  # the replay ran the captured backward
                state.backwards_reached += 1
            return self.output
        if self.graph is not None:
            moved = sorted({name for (name, ptr), (_, old) in zip(signature, self.signature) if ptr != old})
            log.info("agpe.GraphedStep: re-capturing, tensors moved: %s", ", ".join(moved[:8]) or "(layout changed)")
        return self._run_and_capture()

    def _check_device(self) -> None:
        param = next(self.model.parameters(), None)
        if param is None or param.device.type != "cuda" or not torch.cuda.is_available():
            where = "no parameters" if param is None else f"parameters on {param.device}"
            raise RuntimeError(f"agpe.GraphedStep: CUDA graphs need a model on a CUDA device, got {where}")

    def _run_and_capture(self) -> Any:
        """One eager step (this call's step: compiles, creates optimizer state), then a
        capture of the next ones. Capturing records kernels without running them."""
        self.graph = None
        # The graph overwrites gradients rather than accumulating into them, so a step run
        # outside it must start from none too (after a re-capture they hold the last replay's).
        for param in self.model.parameters():
            param.grad = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = _optimizer_steps_seen()
        with torch.cuda.stream(side):
            result = self.step_fn()
        torch.cuda.current_stream().wait_stream(side)
        self._stepped = _stepped_since(before)
        # Gradients allocated inside the capture come from the graph's pool and are
        # overwritten (not accumulated) by every replay.
        for param in self.model.parameters():
            param.grad = None
        for state in layer_states(self.model).values():
            state.sync_layout()
            state.sync_capacity_layouts()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.output = self.step_fn()
        except Exception as error:
            self.reset()
            raise RuntimeError(
                f"agpe.GraphedStep: capturing the step failed ({type(error).__name__}: {error}). The step must "
                f"be capturable: no host syncs (.item(), printing tensors), static inputs, and a capturable "
                f"optimizer, e.g. torch.optim.AdamW(..., fused=True, capturable=True) or "
                f"agpe_compile.BlockSparseAdamW(..., fused=True, capturable=True)") from error
        self.graph = graph
        self.signature = tensor_signature(self.model, self.optimizers)
        self.captures += 1
        return result


# Note [Optimizer steps a replay runs]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A Sparsifier counts the optimizer steps of its layers in a global optimizer hook, to name a
# step() called twice per optimizer step or once per several (Note [Mistakes the Sparsifier
# names] in controller/sparsifier.py). A replay runs its optimizer step without the hook,
# and the capture runs the hook without a step (capturing records kernels only; the hook
# skips counting while the stream captures). So the eager step of each capture records
# which Sparsifiers its optimizer steps reached (any live one: a second model's stepped in
# the same step_fn too, re-audit CD), and each replay counts one step for them, and one
# backward for their layers (the replay ran the captured backward; counting one that did not
# reach a layer can only silence the step-before-backward warning, never raise a false one).
# (Helper re-audit CC: both warnings misfired under GraphedStep.)
def _optimizer_steps_seen() -> list:
    from .controller.sparsifier import live_sparsifiers

    return [(weakref.ref(sp), sp._optimizer_steps, sp._own_optimizer_steps) for sp in live_sparsifiers()]


def _stepped_since(before: list) -> List[tuple]:
    """(Sparsifier ref, whether its own optimizer stepped) for each one an optimizer step reached."""
    stepped = []
    for ref, steps, own in before:
        sparsifier = ref()
        if sparsifier is not None and sparsifier._optimizer_steps > steps:
            stepped.append((ref, sparsifier._own_optimizer_steps > own))
    return stepped


def _count_replayed_steps(stepped: List[tuple]) -> None:
    for ref, own in stepped:
        sparsifier = ref()
        if sparsifier is not None:
            sparsifier._count_optimizer_step(own)
            for state in sparsifier.layers.values():
                state.backwards_reached += 1
